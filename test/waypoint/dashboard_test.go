package waypoint

import (
	"context"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ambientmesh/ambient/test/browser"
	"github.com/ambientmesh/ambient/test/dashboardtest"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// serveMetrics serves a proxy's registry as its :15020/metrics would, on
// the host's loopback where ambientctl can reach it.
func serveMetrics(t *testing.T, reg *prometheus.Registry) string {
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	t.Cleanup(srv.Close)
	return srv.URL + "/metrics"
}

// TestDashboardInBrowser runs the real `ambientctl dashboard` against the
// metrics of real ztunnels and a real waypoint carrying the journey's
// traffic (sleep → echo through the waypoint, sleep → httpbin, and
// notsleep → httpbin refused by the seeds' L7 policy), loads the page in a
// real headless Chromium and checks the graph it draws. The proxies'
// registries are served over HTTP on the host (ambientctl --metrics-url):
// the netns mesh has no API server to read them through.
func TestDashboardInBrowser(t *testing.T) {
	chromium := browser.Find(t)
	s := newSeedsWaypointMesh(t)
	l7(s.Mesh, seedsRoute)
	s.CP.Policy(translateSeedsL7Policy(t))
	l7(s.Mesh, seedsL7Policy)
	bin := dashboardtest.BuildAmbientctl(t, "../..")

	// Traffic for the whole test, so the page shows rates, not only totals.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	first := make(chan error, 1)
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			errs := []error{}
			for _, c := range []struct {
				p      *meshtest.Pod
				method string
				dst    netip.AddrPort
				want   int
			}{{s.sleep, "GET", s.echo, 200}, {s.sleep, "GET", s.httpSv, 200}, {s.notsleep, "POST", s.httpSv, 403}} {
				code, _, err := do(c.p, c.method, c.dst, "/")
				if err == nil && code != c.want {
					err = fmt.Errorf("%s %s %s: %d, want %d", c.p.PodName, c.method, c.dst, code, c.want)
				}
				if err != nil {
					errs = append(errs, err)
				}
			}
			if i == 0 {
				if len(errs) > 0 {
					first <- errs[0]
				} else {
					first <- nil
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	if err := <-first; err != nil {
		t.Fatalf("journey traffic: %v", err)
	}

	args := []string{"--refresh", "1s",
		"--metrics-url", "waypoint:default/" + s.wp.pod.PodName + "/waypoint=" + serveMetrics(t, s.wp.metrics)}
	for _, n := range s.Nodes {
		args = append(args, "--metrics-url", "ztunnel:"+meshtest.RootNamespace+"/ztunnel-"+n.NodeName+"/ztunnel="+serveMetrics(t, n.Metrics))
	}
	url := dashboardtest.Start(t, bin, args...)

	const (
		sleep    = "workload:default/sleep"
		notsleep = "workload:default/notsleep"
		echoV1   = "workload:default/echo-v1"
		httpbin  = "workload:default/httpbin"
		// refused before routing: the waypoint names only the service
		httpbinSvc = "service:httpbin.default.svc.cluster.local"
		wp         = "workload:default/waypoint"
	)
	page := dashboardtest.Load(t, chromium, url, 60*time.Second, func(p *dashboardtest.Page) bool {
		e := p.HTTPEdge(sleep, echoV1)
		return e != nil && strings.Contains(e.Label, "req/s") && p.HTTPEdge(notsleep, httpbinSvc) != nil
	})
	var drawn []string
	for _, e := range page.Edges {
		drawn = append(drawn, e.String())
	}
	t.Logf("graph: %s\n%s", page.Status, strings.Join(drawn, "\n"))

	e := page.HTTPEdge(sleep, echoV1)
	if !slices.Equal(e.Via, []string{wp}) || !e.MTLS || e.Class != "ok" {
		t.Errorf("sleep → echo-v1: %s; want via the waypoint, mTLS, healthy", e)
	}
	if !strings.Contains(e.Title, "cluster.local/ns/default/sa/sleep") {
		t.Errorf("sleep → echo-v1 shows identity %q, want sleep's SPIFFE identity", e.Title)
	}
	if e := page.HTTPEdge(sleep, httpbin); e == nil || e.Class != "ok" {
		t.Errorf("sleep → httpbin: %v; want a healthy edge", e)
	}
	if e := page.HTTPEdge(notsleep, httpbinSvc); e == nil || !strings.HasPrefix(e.Class, "denied") || !strings.Contains(e.Label, "denied") {
		t.Errorf("notsleep → httpbin: %s; want drawn as denied by policy", e)
	}
	// ztunnels carried the client's connections to the waypoint over HBONE.
	var toWaypoint bool
	for _, e := range page.Find(sleep, wp) {
		toWaypoint = toWaypoint || (e.Protocol == "tcp" && e.MTLS)
	}
	if !toWaypoint {
		t.Errorf("no mTLS tcp edge sleep → waypoint from the ztunnels' metrics")
	}
	if len(page.Rows) != len(page.Edges) {
		t.Errorf("table has %d rows for %d edges", len(page.Rows), len(page.Edges))
	}
	if len(page.Errors) != 0 {
		t.Errorf("page shows errors: %v", page.Errors)
	}

	shot := filepath.Join(artifactsDir(), "dashboard-netns.png")
	if err := chromium.Screenshot(context.Background(), url, shot, 1400, 900, 6*time.Second); err != nil {
		t.Fatal(err)
	}
	tablePNG := filepath.Join(artifactsDir(), "dashboard-netns-table.png")
	if err := chromium.Screenshot(context.Background(), url+"#table", tablePNG, 1400, 600, 6*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshots: %s, %s", shot, tablePNG)
}

// artifactsDir is $ARTIFACTS, else the repository's _artifacts.
func artifactsDir() string {
	if d := os.Getenv("ARTIFACTS"); d != "" {
		return d
	}
	return filepath.Join("..", "..", "_artifacts")
}
