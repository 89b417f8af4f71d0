//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/test/browser"
	"github.com/ambientmesh/ambient/test/dashboardtest"
)

// observedPolicy is an AuthorizationPolicy on echo that lets the journey's
// traffic through (the waypoint and sleep are in the namespace) and that
// the dashboard must link from the sleep → echo edge.
const observedPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dashboard-observed}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [NS]}}]
`

// TestObservabilityAfterJourney runs the journey's traffic — sleep →
// httpbin, sleep → echo through the namespace waypoint (the seeds'
// HTTPRoute sends it to echo-v1) — and then checks what an operator looks
// at: the lab's Prometheus has scraped istio_tcp_connections_opened_total
// from the ztunnels and istio_requests_total from the waypoint with the
// right labels, and `ambientctl dashboard`, loaded in a real headless
// Chromium, draws those edges with their identity and policy links.
func TestObservabilityAfterJourney(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	deployJourney(t)
	enrollAmbient(t, demoNS)
	echoBehindNamespaceWaypoint(t)
	apply(t, demoNS, strings.ReplaceAll(observedPolicy, "NS", demoNS))
	t.Cleanup(func() {
		kubectl("delete", "authorizationpolicy", "dashboard-observed", "-n", demoNS, "--ignore-not-found")
	})
	expectEchoV1Only(t, "sleep → echo through the waypoint", demoNS, "http://echo/hostname")

	// Traffic for the whole test: the dashboard shows rates.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			kubectl("exec", "-n", demoNS, "deploy/sleep", "--", "curl", "-s", "-m", reqTime, "--repeat", "5", "http://echo/hostname")
			kubectl("exec", "-n", demoNS, "deploy/sleep", "--", "curl", "-s", "-m", reqTime, "--repeat", "5", "http://httpbin:8000/hostname")
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()

	t.Run("Prometheus scraped the proxies", func(t *testing.T) { checkPrometheus(t) })
	t.Run("ambientctl dashboard in Chromium", func(t *testing.T) { checkDashboard(t) })
}

// promSeries is one series of a Prometheus instant query.
type promSeries struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

func (s promSeries) value() float64 {
	var v float64
	if str, ok := s.Value[1].(string); ok {
		fmt.Sscan(str, &v)
	}
	return v
}

// promQuery asks the lab's Prometheus over its HTTP API (through the API
// server's service proxy).
func promQuery(q string) ([]promSeries, error) {
	out, err := kubectl("get", "--raw", "/api/v1/namespaces/ambient-monitoring/services/prometheus:9090/proxy/api/v1/query?query="+url.QueryEscape(q))
	if err != nil {
		return nil, fmt.Errorf("query %s: %v: %s", q, err, out)
	}
	var resp struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []promSeries `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		return nil, fmt.Errorf("query %s: %v: %.300s", q, err, out)
	}
	if resp.Status != "success" {
		return nil, fmt.Errorf("query %s: %s", q, resp.Error)
	}
	return resp.Data.Result, nil
}

func checkPrometheus(t *testing.T) {
	requireComponents(t, "PROMETHEUS")
	ztunnels := strings.Fields(mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app.kubernetes.io/component=ztunnel", "-o", "name"))
	eventually(t, 60*time.Second, "every ztunnel, the waypoint and the manager up", func() error {
		for job, want := range map[string]int{"ztunnel": len(ztunnels), "waypoint": 1, "ambient-manager": 1} {
			rs, err := promQuery(fmt.Sprintf(`up{job=%q} == 1`, job))
			if err != nil {
				return err
			}
			if len(rs) < want {
				return fmt.Errorf("job %s: %d targets up, want %d", job, len(rs), want)
			}
		}
		return nil
	})
	principal := "spiffe://cluster.local/ns/" + demoNS + "/sa/sleep"
	eventually(t, 60*time.Second, "istio_tcp_connections_opened_total from the ztunnels", func() error {
		rs, err := promQuery(fmt.Sprintf(`istio_tcp_connections_opened_total{job="ztunnel",source_workload="sleep",source_workload_namespace=%q}`, demoNS))
		if err != nil {
			return err
		}
		for _, s := range rs {
			m := s.Metric
			if s.value() > 0 && m["source_principal"] == principal && m["connection_security_policy"] == "mutual_tls" &&
				(m["reporter"] == "source" || m["reporter"] == "destination") && m["node"] != "" && m["pod"] != "" &&
				m["destination_workload_namespace"] == demoNS && m["destination_workload"] != "" && m["destination_workload"] != "unknown" {
				return nil
			}
		}
		return fmt.Errorf("no series from sleep with principal %s over mTLS, reporter, node and destination labels: %v", principal, rs)
	})
	eventually(t, 60*time.Second, "istio_requests_total from the waypoint", func() error {
		rs, err := promQuery(fmt.Sprintf(`istio_requests_total{job="waypoint",source_workload="sleep",destination_workload="echo-v1",destination_workload_namespace=%q}`, demoNS))
		if err != nil {
			return err
		}
		for _, s := range rs {
			m := s.Metric
			if s.value() > 0 && m["reporter"] == "waypoint" && m["response_code"] == "200" && m["source_principal"] == principal &&
				m["connection_security_policy"] == "mutual_tls" && m["request_protocol"] == "http" && m["gateway"] != "" &&
				strings.HasPrefix(m["destination_service"], "echo-v1."+demoNS+".") {
				return nil
			}
		}
		return fmt.Errorf("no sleep → echo-v1 200 series with the waypoint's labels: %v", rs)
	})
}

func checkDashboard(t *testing.T) {
	chromium := browser.Find(t)
	// bin/ambientctl is what make e2e built (test/lab/build.sh ambientctl).
	dash := dashboardtest.Start(t, filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "--refresh", "2s")
	sleep, echoV1, httpbin := "workload:"+demoNS+"/sleep", "workload:"+demoNS+"/echo-v1", "workload:"+demoNS+"/httpbin"
	page := dashboardtest.Load(t, chromium, dash, 90*time.Second, func(p *dashboardtest.Page) bool {
		e := p.HTTPEdge(sleep, echoV1)
		return e != nil && strings.Contains(e.Label, "req/s") && !strings.HasPrefix(e.Label, "http · 0 ") && len(p.Find(sleep, httpbin)) > 0
	})
	var drawn []string
	for _, e := range page.Edges {
		drawn = append(drawn, e.String())
	}
	t.Logf("graph: %s\n%s", page.Status, strings.Join(drawn, "\n"))
	writeArtifact(t, "dashboard-lab-edges.txt", []byte(strings.Join(drawn, "\n")))

	e := page.HTTPEdge(sleep, echoV1)
	if len(e.Via) != 1 || !strings.HasPrefix(e.Via[0], "workload:"+demoNS+"/") || !e.MTLS || e.Class != "ok" {
		t.Errorf("sleep → echo-v1: %s; want through the namespace's waypoint, mTLS, healthy", e)
	}
	if !strings.Contains(e.Title, "/ns/"+demoNS+"/sa/sleep") {
		t.Errorf("sleep → echo-v1 tooltip %q does not name sleep's identity", e.Title)
	}
	// The table row of that edge links to the policy selecting echo.
	var links []string
	for _, r := range page.Rows {
		if len(r.Cells) > 2 && r.Cells[0] == demoNS+"/sleep" && r.Cells[1] == demoNS+"/echo-v1" && r.Cells[2] == "http" {
			links = r.Policies
		}
	}
	want := "policy/" + demoNS + "/dashboard-observed"
	if !slices.Contains(links, want) {
		t.Fatalf("sleep → echo-v1 row links %v, want %s", links, want)
	}
	resp, err := http.Get(dash + want)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "name: dashboard-observed") || !strings.Contains(string(body), "app: echo") {
		t.Errorf("policy link: %s\n%s", resp.Status, body)
	}
	if len(page.Errors) != 0 {
		t.Errorf("the page shows scrape errors: %v", page.Errors)
	}

	dir := os.Getenv("E2E_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(repoRoot, "_artifacts")
	}
	shot := filepath.Join(dir, "dashboard-lab.png")
	if err := chromium.Screenshot(context.Background(), dash, shot, 1400, 900, 8*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", shot)
}
