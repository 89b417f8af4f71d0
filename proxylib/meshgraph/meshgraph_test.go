package meshgraph

import (
	"math"
	"strconv"
	"strings"
	"testing"
	"time"
)

// series lines in the shape the proxies write them (telemetry.Labels and
// the waypoint's httpLabels), trimmed to the labels the graph reads.
func tcp(metric, reporter, src, dst, svc, flags, sec string, v int) string {
	return metric + `{reporter="` + reporter + `",source_workload="` + src + `",source_workload_namespace="default",source_principal="cluster.local/ns/default/sa/` + src +
		`",destination_workload="` + dst + `",destination_workload_namespace="default",destination_service="` + svc +
		`",destination_service_name="` + strings.Split(svc, ".")[0] + `",destination_service_namespace="default",response_flags="` + flags +
		`",connection_security_policy="` + sec + `"} ` + itoa(v) + "\n"
}

func req(src, dst, svc, code, flags string, v int) string {
	return `istio_requests_total{reporter="waypoint",source_workload="` + src + `",source_workload_namespace="default",source_principal="cluster.local/ns/default/sa/` + src +
		`",destination_workload="` + dst + `",destination_workload_namespace="default",destination_service="` + svc +
		`",destination_service_name="` + strings.Split(svc, ".")[0] + `",destination_service_namespace="default",request_protocol="http",response_code="` + code +
		`",response_flags="` + flags + `",connection_security_policy="mutual_tls"} ` + itoa(v) + "\n"
}

func itoa(v int) string { return strconv.Itoa(v) }

const opened = "istio_tcp_connections_opened_total"

func snap(t *testing.T, at time.Time, texts map[Target]string) *Snapshot {
	t.Helper()
	s := &Snapshot{At: at}
	for tg, text := range texts {
		sc, err := Parse(tg, strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		s.Scrapes = append(s.Scrapes, sc)
	}
	return s
}

var (
	zt1 = Target{Role: "ztunnel", Namespace: "ambient-system", Pod: "ztunnel-a", Workload: "ztunnel"}
	zt2 = Target{Role: "ztunnel", Namespace: "ambient-system", Pod: "ztunnel-b", Workload: "ztunnel"}
	wp  = Target{Role: "waypoint", Namespace: "default", Pod: "waypoint-x", Workload: "waypoint"}
)

func edgeByID(g *Graph, id string) *Edge {
	for i := range g.Edges {
		if g.Edges[i].ID == id {
			return &g.Edges[i]
		}
	}
	return nil
}

func TestBuild(t *testing.T) {
	t0 := time.Unix(1000, 0)
	const sleepHTTPBin = "workload:default/sleep->workload:default/httpbin|tcp"
	const sleepEchoHTTP = "workload:default/sleep->workload:default/echo|http"
	cases := []struct {
		name       string
		prev, cur  map[Target]string
		dt         time.Duration
		edge       string
		want       Counts // total
		wantRate   Counts
		mtls       bool
		via        []string
		principals []string
		nodeKinds  map[string]NodeKind
	}{
		{
			name: "one connection counted by both ztunnels is one connection",
			cur: map[Target]string{
				zt1: tcp(opened, "source", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 4),
				zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 4),
			},
			edge: sleepHTTPBin, want: Counts{Connections: 4}, mtls: true,
			principals: []string{"cluster.local/ns/default/sa/sleep"},
		},
		{
			name: "source reporter alone when the destination ztunnel did not count (denied at the client)",
			cur: map[Target]string{
				zt1: tcp(opened, "source", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "authorization_policy_rejection", "mutual_tls", 3),
			},
			edge: sleepHTTPBin, want: Counts{Connections: 3, Denied: 3}, mtls: true,
			principals: []string{"cluster.local/ns/default/sa/sleep"},
		},
		{
			name: "rate over the interval, plaintext clears mTLS, failures are errors",
			prev: map[Target]string{
				zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 10),
			},
			cur: map[Target]string{
				zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 30) +
					tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "upstream_connect_failed", "unknown", 5),
			},
			dt:   10 * time.Second,
			edge: sleepHTTPBin, want: Counts{Connections: 35, Errors: 5}, wantRate: Counts{Connections: 2.5, Errors: 0.5}, mtls: false,
			principals: []string{"cluster.local/ns/default/sa/sleep"},
		},
		{
			name: "counter reset: the new value is the increase",
			prev: map[Target]string{zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 100)},
			cur:  map[Target]string{zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 20)},
			dt:   5 * time.Second,
			edge: sleepHTTPBin, want: Counts{Connections: 20}, wantRate: Counts{Connections: 4}, mtls: true,
			principals: []string{"cluster.local/ns/default/sa/sleep"},
		},
		{
			name: "waypoint requests: via the waypoint, 5xx errors, 403 by policy denied, 404 neither",
			prev: map[Target]string{wp: req("sleep", "echo", "echo.default.svc.cluster.local", "200", "-", 0)},
			cur: map[Target]string{
				wp: req("sleep", "echo", "echo.default.svc.cluster.local", "200", "-", 20) +
					req("sleep", "echo", "echo.default.svc.cluster.local", "503", "no_healthy_upstream", 4) +
					req("sleep", "echo", "echo.default.svc.cluster.local", "403", "authorization_policy_rejection", 2) +
					req("sleep", "echo", "echo.default.svc.cluster.local", "404", "-", 6),
				zt1: tcp(opened, "source", "sleep", "waypoint", "echo.default.svc.cluster.local", "-", "mutual_tls", 1),
			},
			dt:   2 * time.Second,
			edge: sleepEchoHTTP, want: Counts{Requests: 32, Errors: 4, Denied: 2}, wantRate: Counts{Requests: 16, Errors: 2, Denied: 1},
			mtls: true, via: []string{"workload:default/waypoint"},
			principals: []string{"cluster.local/ns/default/sa/sleep"},
			nodeKinds:  map[string]NodeKind{"workload:default/waypoint": KindWaypoint, "workload:default/echo": KindWorkload},
		},
		{
			name: "unknown destination workload falls back to the service node",
			cur: map[Target]string{
				zt1: strings.ReplaceAll(tcp(opened, "source", "sleep", "unknown", "ext.example.com", "-", "unknown", 2), `destination_workload_namespace="default"`, `destination_workload_namespace="unknown"`),
			},
			edge: "workload:default/sleep->service:ext.example.com|tcp", want: Counts{Connections: 2}, mtls: false,
			principals: []string{"cluster.local/ns/default/sa/sleep"},
			nodeKinds:  map[string]NodeKind{"service:ext.example.com": KindService},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var prev *Snapshot
			if tc.prev != nil {
				prev = snap(t, t0, tc.prev)
			}
			g := Build(prev, snap(t, t0.Add(tc.dt), tc.cur))
			e := edgeByID(g, tc.edge)
			if e == nil {
				var ids []string
				for _, e := range g.Edges {
					ids = append(ids, e.ID)
				}
				t.Fatalf("no edge %s; edges: %v", tc.edge, ids)
			}
			if e.Total != tc.want {
				t.Errorf("total %+v, want %+v", e.Total, tc.want)
			}
			if e.Rate != tc.wantRate {
				t.Errorf("rate %+v, want %+v", e.Rate, tc.wantRate)
			}
			if e.MTLS != tc.mtls {
				t.Errorf("mtls %v, want %v", e.MTLS, tc.mtls)
			}
			if strings.Join(e.Via, ",") != strings.Join(tc.via, ",") {
				t.Errorf("via %v, want %v", e.Via, tc.via)
			}
			if strings.Join(e.Principals, ",") != strings.Join(tc.principals, ",") {
				t.Errorf("principals %v, want %v", e.Principals, tc.principals)
			}
			for id, k := range tc.nodeKinds {
				found := false
				for _, n := range g.Nodes {
					if n.ID == id {
						found = true
						if n.Kind != k {
							t.Errorf("node %s kind %s, want %s", id, n.Kind, k)
						}
					}
				}
				if !found {
					t.Errorf("no node %s", id)
				}
			}
		})
	}
}

func TestRatios(t *testing.T) {
	cases := []struct {
		c           Counts
		err, denied float64
	}{
		{Counts{}, 0, 0},
		{Counts{Requests: 10, Errors: 1, Denied: 4}, 0.1, 0.4},
		{Counts{Connections: 4, Denied: 1}, 0, 0.25},
	}
	for _, tc := range cases {
		e, d := ratios(tc.c)
		if math.Abs(e-tc.err) > 1e-9 || math.Abs(d-tc.denied) > 1e-9 {
			t.Errorf("ratios(%+v) = %v, %v; want %v, %v", tc.c, e, d, tc.err, tc.denied)
		}
	}
}

func TestParseRejectsGarbage(t *testing.T) {
	if _, err := Parse(zt1, strings.NewReader("istio_requests_total{reporter=\"x\" 1\n")); err == nil || !strings.Contains(err.Error(), "ztunnel-a") {
		t.Fatalf("want an error naming the target, got %v", err)
	}
}

func TestLinkPolicies(t *testing.T) {
	cur := map[Target]string{
		wp: req("sleep", "echo", "echo.default.svc.cluster.local", "200", "-", 1) +
			req("sleep", "httpbin", "httpbin.default.svc.cluster.local", "200", "-", 1) +
			// refused before routing: the waypoint knows only the service
			strings.ReplaceAll(req("notsleep", "unknown", "httpbin.default.svc.cluster.local", "403", "authorization_policy_rejection", 1),
				`destination_workload_namespace="default"`, `destination_workload_namespace="unknown"`),
		zt2: tcp(opened, "destination", "sleep", "httpbin", "httpbin.default.svc.cluster.local", "-", "mutual_tls", 1),
	}
	g := Build(nil, snap(t, time.Unix(1, 0), cur))
	workloads := []Workload{
		{Namespace: "default", Name: "httpbin", Labels: map[string]string{"app": "httpbin", "version": "v1"}},
		{Namespace: "default", Name: "echo", Labels: map[string]string{"app": "echo"}},
	}
	policies := []Policy{
		{Namespace: "default", Name: "ns-wide", Action: "DENY"},
		{Namespace: "ambient-system", Name: "mesh-wide"},
		{Namespace: "other", Name: "other-ns"},
		{Namespace: "default", Name: "httpbin-only", Selector: map[string]string{"app": "httpbin"}},
		{Namespace: "default", Name: "httpbin-v2", Selector: map[string]string{"app": "httpbin", "version": "v2"}},
		{Namespace: "default", Name: "echo-svc", TargetRefs: []Ref{{Kind: "Service", Name: "echo"}}},
		{Namespace: "default", Name: "at-waypoint", TargetRefs: []Ref{{Kind: "Gateway", Name: "waypoint"}}},
		{Namespace: "default", Name: "other-gw", TargetRefs: []Ref{{Kind: "Gateway", Name: "ingress"}}},
	}
	g.LinkPolicies("ambient-system", policies, workloads)
	want := map[string]string{
		"workload:default/sleep->workload:default/httpbin|tcp":                      "ambient-system/mesh-wide,default/httpbin-only,default/ns-wide",
		"workload:default/sleep->workload:default/echo|http":                        "ambient-system/mesh-wide,default/at-waypoint,default/echo-svc,default/ns-wide",
		"workload:default/notsleep->service:httpbin.default.svc.cluster.local|http": "ambient-system/mesh-wide,default/at-waypoint,default/httpbin-only,default/ns-wide",
	}
	for id, w := range want {
		e := edgeByID(g, id)
		if e == nil {
			t.Fatalf("no edge %s", id)
		}
		var got []string
		for _, p := range e.Policies {
			got = append(got, p.Namespace+"/"+p.Name)
			if p.Name == "mesh-wide" && p.Action != "ALLOW" {
				t.Errorf("default action %q, want ALLOW", p.Action)
			}
		}
		if strings.Join(got, ",") != w {
			t.Errorf("%s: policies %v, want %s", id, got, w)
		}
	}
}
