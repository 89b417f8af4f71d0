package observability

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/prometheus/promql"
	"github.com/prometheus/prometheus/promql/promqltest"
	"github.com/prometheus/prometheus/storage"

	"github.com/ambientmesh/ambient/proxylib/boot"
	wt "github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// loadText renders gathered families as a promqltest "load" block: each
// series at 0 at time 0 (counters and histograms; gauges at their value)
// and at its value one step later, with the labels Prometheus and the
// waypoint PodMonitor add at scrape time.
func loadText(families []*dto.MetricFamily, scrape map[string]string) string {
	var b strings.Builder
	b.WriteString("load 1m\n")
	line := func(name string, labels map[string]string, v float64, counter bool) {
		keys := make([]string, 0, len(labels))
		for k := range labels {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var pairs []string
		for _, k := range keys {
			pairs = append(pairs, k+"="+strconv.Quote(labels[k]))
		}
		start := v
		if counter {
			start = 0
		}
		fmt.Fprintf(&b, "  %s{%s} %s %s\n", name, strings.Join(pairs, ","), fmtFloat(start), fmtFloat(v))
	}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for k, v := range scrape {
				labels[k] = v
			}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				line(f.GetName(), labels, m.GetCounter().GetValue(), true)
			case dto.MetricType_GAUGE:
				line(f.GetName(), labels, m.GetGauge().GetValue(), false)
			case dto.MetricType_HISTOGRAM:
				h := m.GetHistogram()
				for _, bk := range h.GetBucket() {
					line(f.GetName()+"_bucket", with(labels, "le", fmtFloat(bk.GetUpperBound())), float64(bk.GetCumulativeCount()), true)
				}
				line(f.GetName()+"_bucket", with(labels, "le", "+Inf"), float64(h.GetSampleCount()), true)
				line(f.GetName()+"_sum", labels, h.GetSampleSum(), true)
				line(f.GetName()+"_count", labels, float64(h.GetSampleCount()), true)
			}
		}
	}
	return b.String()
}

func with(labels map[string]string, k, v string) map[string]string {
	out := map[string]string{k: v}
	for lk, lv := range labels {
		if lk != k {
			out[lk] = lv
		}
	}
	return out
}

func fmtFloat(f float64) string {
	if math.IsInf(f, 1) {
		return "+Inf"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// waypointTraffic runs a real in-process waypoint in front of httpbin,
// sends ok requests that succeed and failed ones answered 503, and returns
// what the waypoint pod's metrics endpoint would serve (its traffic
// metrics and the runtime collectors).
func waypointTraffic(t *testing.T, ok, failed int) []*dto.MetricFamily {
	m := wt.New(t)
	wp := m.AddWaypoint("waypoint", false)
	httpbin := m.AddPod("httpbin-0", "httpbin", map[string]string{"app": "httpbin"}, wp)
	vip := m.AddService("httpbin", wp, []*wt.Pod{httpbin}, func(*wt.Pod) *wt.Waypoint { return wp }, wt.HTTPPort)
	c := m.NewClient("sleep", netip.MustParseAddr("10.244.1.5")).HTTP(wp, netip.AddrPortFrom(vip, wt.HTTPPort), false)
	send := func(path string, want int) {
		resp, err := c.Get(fmt.Sprintf("http://%s:%d%s", vip, wt.HTTPPort, path))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	for range ok {
		send("/", http.StatusOK)
	}
	for range failed {
		send("/status/503", http.StatusServiceUnavailable)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(boot.RuntimeCollectors()...)
	// Requests are recorded when the response body closes: wait until all are.
	var families []*dto.MetricFamily
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs, err := prometheus.Gatherers{wp.Registry, reg}.Gather()
		if err != nil {
			t.Fatal(err)
		}
		families = mfs
		if requestCount(families) == ok+failed {
			return families
		}
		if time.Now().After(deadline) {
			t.Fatalf("the waypoint recorded %d of %d requests", requestCount(families), ok+failed)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func requestCount(families []*dto.MetricFamily) int {
	n := 0.0
	for _, f := range families {
		if f.GetName() == "istio_requests_total" {
			for _, m := range f.GetMetric() {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return int(n)
}

// TestDashboardOverWaypointMetrics: the panels a waypoint feeds return
// data from a real waypoint's metrics, loaded into Prometheus' engine as
// scraped through config/prometheus, and the error rate is what was sent.
func TestDashboardOverWaypointMetrics(t *testing.T) {
	const ok, failed = 9, 3
	families := waypointTraffic(t, ok, failed)
	scrape := map[string]string{"job": "waypoint", "namespace": wt.Namespace, "pod": "waypoint-5d8f-x1", "instance": "10.0.0.9:15020", "gateway": "waypoint"}
	storage := promqltest.LoadedStorage(t, loadText(families, scrape))
	engine := promqltest.NewTestEngine(t, false, 0, promqltest.DefaultMaxSamplesPerQuery)
	at := time.Unix(60, 0)

	// Panel title → check of its first target's result (nil: any data).
	errorShare := func(v float64) error {
		if want := float64(failed) / float64(ok+failed); math.Abs(v-want) > 1e-9 {
			return fmt.Errorf("error rate %v, want %v", v, want)
		}
		return nil
	}
	positive := func(v float64) error {
		if !(v > 0) || math.IsInf(v, 0) {
			return fmt.Errorf("%v, want a positive number", v)
		}
		return nil
	}
	panels := map[string]func(float64) error{
		"Requests/s":                                positive,
		"Success rate":                              func(v float64) error { return errorShare(1 - v) },
		"p99 latency":                               positive,
		"Request rate by service":                   positive,
		"Error rate by service":                     errorShare,
		"p50 latency by service":                    positive,
		"p99 latency by service":                    positive,
		"Requests by response code":                 positive,
		"Service summary":                           positive,
		"Requests by source → destination workload": positive,
		"Waypoint CPU":                              nil,
		"Waypoint memory":                           positive,
	}
	seen := map[string]bool{}
	for _, dash := range loadDashboards(t) {
		for _, q := range dashboardQueries(dash) {
			title := q.where
			check, fed := panels[title]
			if !fed || seen[title] {
				continue
			}
			seen[title] = true
			v := instant(t, engine, storage, expandAll(q.expr), at)
			if len(v) == 0 {
				t.Errorf("%s: %q returns nothing over a waypoint's metrics", title, q.expr)
				continue
			}
			if check != nil {
				if err := check(v[0].F); err != nil {
					t.Errorf("%s: %q: %v", title, q.expr, err)
				}
			}
		}
	}
	for title := range panels {
		if !seen[title] {
			t.Errorf("panel %q not in the dashboards", title)
		}
	}
}

// expandAll replaces Grafana's variables as "All" would.
func expandAll(expr string) string {
	return grafanaVars.ReplaceAllString(grafanaRanges.ReplaceAllString(expr, "5m"), ".*")
}

func instant(t *testing.T, engine *promql.Engine, storage storage.Queryable, expr string, at time.Time) promql.Vector {
	t.Helper()
	q, err := engine.NewInstantQuery(context.Background(), storage, nil, expr, at)
	if err != nil {
		t.Fatalf("%q: %v", expr, err)
	}
	defer q.Close()
	res := q.Exec(context.Background())
	if res.Err != nil {
		t.Fatalf("%q: %v", expr, res.Err)
	}
	v, err := res.Vector()
	if err != nil {
		t.Fatalf("%q: %v", expr, err)
	}
	return v
}
