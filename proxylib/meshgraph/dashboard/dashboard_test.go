package dashboard

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/meshgraph"
)

// proxy serves a ztunnel-shaped /metrics whose counter grows on each scrape.
func proxy(t *testing.T) *httptest.Server {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v := n.Add(10)
		io.WriteString(w, `# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",source_workload="sleep",source_workload_namespace="default",source_principal="cluster.local/ns/default/sa/sleep",destination_workload="httpbin",destination_workload_namespace="default",destination_service="httpbin.default.svc.cluster.local",response_flags="-",connection_security_policy="mutual_tls"} `+itoa(v)+"\n")
	}))
	t.Cleanup(srv.Close)
	return srv
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

func get(t *testing.T, h http.Handler, host, path string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Host = host
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

func TestServer(t *testing.T) {
	p := proxy(t)
	src := &URLSource{Targets: []URLTarget{
		{Target: meshgraph.Target{Role: "ztunnel", Namespace: "ambient-system", Pod: "ztunnel-a"}, URL: p.URL + "/metrics"},
		{Target: meshgraph.Target{Role: "ztunnel", Namespace: "ambient-system", Pod: "ztunnel-gone"}, URL: "http://127.0.0.1:1/metrics"},
	}}
	s := New(src, time.Hour)
	h := s.Handler()

	if rec := get(t, h, "localhost:8080", "/api/graph"); rec.Code != http.StatusServiceUnavailable {
		t.Errorf("graph before the first scrape: %d, want 503", rec.Code)
	}
	s.Refresh(context.Background())
	s.Refresh(context.Background())

	rec := get(t, h, "127.0.0.1:8080", "/api/graph")
	if rec.Code != http.StatusOK {
		t.Fatalf("graph: %d %s", rec.Code, rec.Body)
	}
	var g meshgraph.Graph
	if err := json.Unmarshal(rec.Body.Bytes(), &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Edges) != 1 || g.Edges[0].Source != "workload:default/sleep" || g.Edges[0].Target != "workload:default/httpbin" {
		t.Fatalf("edges %+v", g.Edges)
	}
	if g.Edges[0].Total.Connections != 20 || g.Interval <= 0 || g.Edges[0].Rate.Connections <= 0 {
		t.Errorf("second scrape: total %v over %v s, rate %v; want 20 and a positive rate", g.Edges[0].Total.Connections, g.Interval, g.Edges[0].Rate.Connections)
	}
	if len(g.Errors) != 1 || !strings.Contains(g.Errors[0], "127.0.0.1:1") {
		t.Errorf("errors %v, want the unreachable proxy named", g.Errors)
	}

	page := get(t, h, "localhost:8080", "/")
	if page.Code != http.StatusOK || !strings.Contains(page.Body.String(), `<script src="app.js"`) {
		t.Fatalf("page: %d %.200s", page.Code, page.Body)
	}
	if csp := page.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
		t.Errorf("CSP %q", csp)
	}
	for _, asset := range []string{"/app.js", "/style.css"} {
		if rec := get(t, h, "localhost", asset); rec.Code != http.StatusOK || rec.Body.Len() == 0 {
			t.Errorf("%s: %d", asset, rec.Code)
		}
	}
	if rec := get(t, h, "evil.example:8080", "/api/graph"); rec.Code != http.StatusForbidden {
		t.Errorf("foreign Host header: %d, want 403 (DNS rebinding)", rec.Code)
	}
	if rec := get(t, h, "[::1]:9", "/policy/default/x"); rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "default/x") {
		t.Errorf("policy without a cluster: %d %s", rec.Code, rec.Body)
	}
}
