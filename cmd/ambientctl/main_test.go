package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/meshgraph"
	"github.com/ambientmesh/ambient/proxylib/meshgraph/dashboard"
)

func TestParseMetricsURL(t *testing.T) {
	inv, err := parseArgs([]string{"dashboard", "--metrics-url", "waypoint:default/waypoint-7d9f-x/waypoint=http://127.0.0.1:1/metrics",
		"--metrics-url", "ztunnel:ambient-system/ztunnel-a=http://127.0.0.1:2/metrics"})
	if err != nil {
		t.Fatal(err)
	}
	want := []dashboard.URLTarget{
		{Target: meshgraph.Target{Role: "waypoint", Namespace: "default", Pod: "waypoint-7d9f-x", Workload: "waypoint"}, URL: "http://127.0.0.1:1/metrics"},
		{Target: meshgraph.Target{Role: "ztunnel", Namespace: "ambient-system", Pod: "ztunnel-a", Workload: "ztunnel-a"}, URL: "http://127.0.0.1:2/metrics"},
	}
	if !reflect.DeepEqual(inv.metricsURLs, want) {
		t.Fatalf("got %+v\nwant %+v", inv.metricsURLs, want)
	}
}

func TestWorkloadOf(t *testing.T) {
	yes := true
	rs := func(name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{Kind: "ReplicaSet", Name: name, Controller: &yes}}
	}
	tests := []struct {
		pod  corev1.Pod
		want string
	}{
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "waypoint-6b8f9c-x", Labels: map[string]string{"pod-template-hash": "6b8f9c"}, OwnerReferences: rs("waypoint-6b8f9c")}}, "waypoint"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-abcde", OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: "ztunnel", Controller: &yes}}}}, "ztunnel"},
		{corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "bare"}}, "bare"},
	}
	for _, tt := range tests {
		if got := workloadOf(&tt.pod); got != tt.want {
			t.Errorf("workloadOf(%s) = %s, want %s", tt.pod.Name, got, tt.want)
		}
	}
}

func TestPolicyOf(t *testing.T) {
	u := &unstructured.Unstructured{Object: map[string]any{
		"metadata": map[string]any{"namespace": "default", "name": "p"},
		"spec": map[string]any{
			"action":     "DENY",
			"selector":   map[string]any{"matchLabels": map[string]any{"app": "httpbin"}},
			"targetRef":  map[string]any{"kind": "Gateway", "name": "waypoint"},
			"targetRefs": []any{map[string]any{"kind": "Service", "name": "echo"}},
		},
	}}
	got := policyOf(u)
	want := meshgraph.Policy{Namespace: "default", Name: "p", Action: "DENY", Selector: map[string]string{"app": "httpbin"},
		TargetRefs: []meshgraph.Ref{{Kind: "Gateway", Name: "waypoint"}, {Kind: "Service", Name: "echo"}}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestParseArgs(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		want    invocation // only cmd, sub, pod, podNS, names are compared
		check   func(options) bool
		wantErr string
	}{
		{name: "seeds: workloads of pod.ns", args: []string{"proxy-config", "workloads", "ztunnel-5jfj2.istio-system"},
			want: invocation{cmd: "proxy-config", sub: "workloads", pod: "ztunnel-5jfj2", podNS: "istio-system"}},
		{name: "secrets, pod without ns takes -n", args: []string{"-n", "ambient-system", "pc", "secret", "ztunnel-x"},
			want: invocation{cmd: "proxy-config", sub: "secrets", pod: "ztunnel-x", podNS: "ambient-system"}},
		{name: "all -o json after positionals", args: []string{"proxy-config", "all", "z.ns", "-o", "json"},
			want:  invocation{cmd: "proxy-config", sub: "all", pod: "z", podNS: "ns"},
			check: func(o options) bool { return o.output == "json" }},
		{name: "istioctl's ztunnel-config certificates", args: []string{"ztunnel-config", "certificates", "z.ns"},
			want: invocation{cmd: "proxy-config", sub: "secrets", pod: "z", podNS: "ns"}},
		{name: "istioctl's zc alias", args: []string{"zc", "all", "-o", "yaml"},
			want: invocation{cmd: "proxy-config", sub: "all"}, check: func(o options) bool { return o.output == "yaml" }},
		{name: "no pod: first ztunnel", args: []string{"proxy-config", "workloads"},
			want: invocation{cmd: "proxy-config", sub: "workloads"}},
		{name: "dotted pod name splits at last dot", args: []string{"pc", "wl", "a.b.c"},
			want: invocation{cmd: "proxy-config", sub: "workloads", pod: "a.b", podNS: "c"}},
		{name: "waypoint apply for SA", args: []string{"waypoint", "apply", "-n", "demo", "--for-service-account", "httpbin", "--wait"},
			want:  invocation{cmd: "waypoint", sub: "apply"},
			check: func(o options) bool { return o.flagNamespace() == "demo" && o.serviceAccount == "httpbin" && o.wait }},
		{name: "istioctl's waypoint apply flags", args: []string{"waypoint", "apply", "-n", "demo", "--for", "workload", "--name", "wl", "--enroll-namespace", "--overwrite"},
			want: invocation{cmd: "waypoint", sub: "apply"},
			check: func(o options) bool {
				return o.forTraffic == "workload" && o.name == "wl" && o.enroll && o.overwrite && o.flagNamespace() == "demo"
			}},
		{name: "waypoint status of one", args: []string{"wp", "status", "--name", "wl"},
			want: invocation{cmd: "waypoint", sub: "status"}, check: func(o options) bool { return o.name == "wl" }},
		{name: "waypoint --for unknown", args: []string{"waypoint", "apply", "--for", "pods"}, wantErr: "want service, workload, all or none"},
		{name: "waypoint generate does not enroll", args: []string{"waypoint", "generate", "--enroll-namespace"}, wantErr: "only prints"},
		{name: "waypoint delete default name", args: []string{"waypoint", "delete"},
			want: invocation{cmd: "waypoint", sub: "delete", names: []string{"waypoint"}}},
		{name: "waypoint delete names", args: []string{"wp", "delete", "a", "b"},
			want: invocation{cmd: "waypoint", sub: "delete", names: []string{"a", "b"}}},
		{name: "waypoint delete --all", args: []string{"waypoint", "delete", "--all"},
			want: invocation{cmd: "waypoint", sub: "delete"}, check: func(o options) bool { return o.all }},
		{name: "status", args: []string{"status"}, want: invocation{cmd: "status"}},
		{name: "gateway list", args: []string{"gateway", "list", "-A"}, want: invocation{cmd: "gateway", sub: "list"},
			check: func(o options) bool { return o.allNamespaces }},
		{name: "gateway bad verb", args: []string{"gw", "apply"}, wantErr: "one command: list"},
		{name: "help flag", args: []string{"--help"}, want: invocation{cmd: "help"}},
		{name: "no command", args: nil, wantErr: "no command"},
		{name: "unknown command", args: []string{"frobnicate"}, wantErr: "unknown command"},
		{name: "unknown section", args: []string{"proxy-config", "clusters"}, wantErr: "unknown proxy-config section"},
		{name: "missing section", args: []string{"proxy-config"}, wantErr: "needs a section"},
		{name: "two pods", args: []string{"proxy-config", "workloads", "a", "b"}, wantErr: "one pod"},
		{name: "bad output", args: []string{"status", "-o", "xml"}, wantErr: "unknown output format"},
		{name: "unknown flag", args: []string{"status", "--bogus"}, wantErr: "unknown flag"},
		{name: "waypoint without verb", args: []string{"waypoint"}, wantErr: "apply, list or delete"},
		{name: "waypoint bad verb", args: []string{"waypoint", "create"}, wantErr: "unknown waypoint command"},
		{name: "waypoint apply extra arg", args: []string{"waypoint", "apply", "x"}, wantErr: "takes no arguments"},
		{name: "delete names and --all", args: []string{"waypoint", "delete", "x", "--all"}, wantErr: "not both"},
		{name: "status extra arg", args: []string{"status", "x"}, wantErr: "takes no arguments"},
		{name: "dashboard defaults: loopback, 5s", args: []string{"dashboard"}, want: invocation{cmd: "dashboard"},
			check: func(o options) bool { return o.listen == "127.0.0.1:20001" && o.refresh == 5*time.Second }},
		{name: "dashboard on [::1] and localhost", args: []string{"dash", "--listen", "[::1]:0"}, want: invocation{cmd: "dashboard"}},
		{name: "dashboard localhost", args: []string{"dashboard", "--listen", "localhost:9000"}, want: invocation{cmd: "dashboard"}},
		{name: "dashboard refuses a non-loopback address", args: []string{"dashboard", "--listen", "0.0.0.0:20001"}, wantErr: "loopback address only"},
		{name: "dashboard refuses a host name", args: []string{"dashboard", "--listen", "example.com:20001"}, wantErr: "loopback address only"},
		{name: "dashboard refresh too fast", args: []string{"dashboard", "--refresh", "10ms"}, wantErr: "at least 1s"},
		{name: "dashboard metrics-url without role", args: []string{"dashboard", "--metrics-url", "ns/pod=http://x"}, wantErr: "ROLE:NAMESPACE/POD"},
		{name: "dashboard metrics-url bad role", args: []string{"dashboard", "--metrics-url", "sidecar:ns/pod=http://x"}, wantErr: "role must be"},
		{name: "dashboard metrics-url without URL", args: []string{"dashboard", "--metrics-url", "ztunnel:ns/pod"}, wantErr: "ROLE:NAMESPACE/POD"},
		{name: "dashboard extra arg", args: []string{"dashboard", "x"}, wantErr: "takes no arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			inv, err := parseArgs(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				if !errors.Is(err, errUsage) {
					t.Fatalf("err %v is not a usage error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := invocation{cmd: inv.cmd, sub: inv.sub, pod: inv.pod, podNS: inv.podNS, names: inv.names}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if tt.check != nil && !tt.check(inv.opts) {
				t.Fatalf("options %+v", inv.opts)
			}
		})
	}
}

var sampleDump = []byte(`{
 "workloads": [
  {"name":"sleep-69cfb4968f-mwglt","namespace":"ambient-demo","addresses":["10.244.1.4"],"node":"ambient-worker","waypoint":"","protocol":"HBONE"},
  {"name":"coredns-6d4b75cb6d-ptbhb","namespace":"kube-system","addresses":["10.244.2.2"],"node":"ambient-worker2","waypoint":"","protocol":"TCP"},
  {"name":"httpbin-648cd984f8-2q9bn","namespace":"ambient-demo","addresses":["10.244.1.5"],"node":"ambient-worker","waypoint":"ambient-demo/waypoint","protocol":"HBONE"}
 ],
 "certificates": [
  {"identity":"spiffe://cluster.local/ns/ambient-demo/sa/sleep","type":"Cert Chain","state":"Available","valid":true,"serial":"ec30e0e1","notBefore":"2026-11-22T04:00:00Z","notAfter":"2026-11-23T04:00:00Z"},
  {"identity":"spiffe://cluster.local/ns/ambient-demo/sa/sleep","type":"CA","state":"Available","valid":true,"serial":"3b9dbea3","notBefore":"2026-11-22T00:00:00Z","notAfter":"2036-11-20T00:00:00Z"},
  {"identity":"spiffe://cluster.local/ns/ambient-demo/sa/httpbin","type":"Cert Chain","state":"Pending","valid":false,"serial":"","notBefore":"","notAfter":""}
 ],
 "unknownField": {"ignored": true}
}`)

func TestWorkloadsTable(t *testing.T) {
	d, err := parseConfigDump(sampleDump)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := renderProxyConfig(&buf, d, "workloads", "table"); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	if got := strings.Fields(lines[0]); !reflect.DeepEqual(got, []string{"NAME", "NAMESPACE", "IP", "NODE", "WAYPOINT", "PROTOCOL"}) {
		t.Fatalf("header %q", lines[0])
	}
	want := [][]string{
		{"coredns-6d4b75cb6d-ptbhb", "kube-system", "10.244.2.2", "ambient-worker2", "None", "TCP"},
		{"httpbin-648cd984f8-2q9bn", "ambient-demo", "10.244.1.5", "ambient-worker", "ambient-demo/waypoint", "HBONE"},
		{"sleep-69cfb4968f-mwglt", "ambient-demo", "10.244.1.4", "ambient-worker", "None", "HBONE"},
	}
	if len(lines) != len(want)+1 {
		t.Fatalf("got %d lines:\n%s", len(lines), buf.String())
	}
	for i, w := range want {
		if got := strings.Fields(lines[i+1]); !reflect.DeepEqual(got, w) {
			t.Errorf("row %d = %q, want %q", i, got, w)
		}
	}
	// Columns are aligned: every row's PROTOCOL starts where the header's does.
	col := strings.Index(lines[0], "PROTOCOL")
	for _, l := range lines[1:] {
		if !strings.HasPrefix(l[col:], "HBONE") && !strings.HasPrefix(l[col:], "TCP") {
			t.Errorf("misaligned row %q", l)
		}
	}
}

func TestSecretsTable(t *testing.T) {
	d, err := parseConfigDump(sampleDump)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := renderProxyConfig(&buf, d, "secrets", "table"); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	for _, h := range []string{"NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"} {
		if !strings.Contains(lines[0], h) {
			t.Errorf("header %q lacks %q", lines[0], h)
		}
	}
	// Sorted by identity; leaf before CA within one identity (stable).
	wantStarts := []string{
		"spiffe://cluster.local/ns/ambient-demo/sa/httpbin",
		"spiffe://cluster.local/ns/ambient-demo/sa/sleep",
		"spiffe://cluster.local/ns/ambient-demo/sa/sleep",
	}
	for i, w := range wantStarts {
		if !strings.HasPrefix(lines[i+1], w) {
			t.Errorf("row %d = %q, want identity %s", i, lines[i+1], w)
		}
	}
	if !strings.Contains(lines[1], "Pending") || !strings.Contains(lines[1], "false") || !strings.Contains(lines[1], "None") {
		t.Errorf("pending row %q", lines[1])
	}
	if !strings.Contains(lines[2], "Cert Chain") || !strings.Contains(lines[3], "CA") || !strings.Contains(lines[3], "2036-11-20T00:00:00Z") {
		t.Errorf("sleep rows %q / %q", lines[2], lines[3])
	}
}

func TestJSONOutput(t *testing.T) {
	d, err := parseConfigDump(sampleDump)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		section string
		wantLen int
	}{{"workloads", 3}, {"secrets", 3}, {"services", 0}}
	for _, tt := range tests {
		var buf bytes.Buffer
		if err := renderProxyConfig(&buf, d, tt.section, "json"); err != nil {
			t.Fatal(err)
		}
		var arr []json.RawMessage
		if err := json.Unmarshal(buf.Bytes(), &arr); err != nil {
			t.Fatalf("%s: not a JSON array: %v\n%s", tt.section, err, buf.String())
		}
		if len(arr) != tt.wantLen {
			t.Errorf("%s: %d items, want %d", tt.section, len(arr), tt.wantLen)
		}
	}
	var buf bytes.Buffer
	if err := renderProxyConfig(&buf, d, "all", "json"); err != nil {
		t.Fatal(err)
	}
	var all ConfigDump
	if err := json.Unmarshal(buf.Bytes(), &all); err != nil || len(all.Workloads) != 3 || len(all.Certificates) != 3 {
		t.Fatalf("all: %v %+v", err, all)
	}
}

func TestParseConfigDumpRejectsNonJSON(t *testing.T) {
	for _, in := range []string{"<html>404 page not found</html>", "", `{"workloads": "nope"}`} {
		if _, err := parseConfigDump([]byte(in)); err == nil {
			t.Errorf("accepted %q", in)
		} else if !strings.Contains(err.Error(), "config dump") {
			t.Errorf("unclear error %v", err)
		}
	}
}

func TestDesiredWaypoint(t *testing.T) {
	tests := []struct {
		name     string
		o        options
		wantName string
		scope    meshv1.WaypointScope
		sa       string
	}{
		{"namespace waypoint", options{}, "waypoint", meshv1.ScopeNamespace, ""},
		{"service account waypoint named after SA", options{serviceAccount: "httpbin"}, "httpbin", meshv1.ScopeServiceAccount, "httpbin"},
		{"explicit name", options{name: "wp1", serviceAccount: "sleep"}, "wp1", meshv1.ScopeServiceAccount, "sleep"},
	}
	if got := desiredWaypoint("demo", options{forTraffic: "all"}).Spec.TrafficType; got != meshv1.TrafficAll {
		t.Errorf("--for all: trafficType %q", got)
	}
	for _, tt := range tests {
		wp := desiredWaypoint("demo", tt.o)
		if wp.Name != tt.wantName || wp.Namespace != "demo" || wp.Spec.Scope != tt.scope || wp.Spec.ServiceAccount != tt.sa {
			t.Errorf("%s: got %s/%s %+v", tt.name, wp.Namespace, wp.Name, wp.Spec)
		}
	}
}

func TestWaypointAndMeshTables(t *testing.T) {
	now := time.Date(2026, 11, 22, 4, 0, 0, 0, time.UTC)
	items := []meshv1.WaypointPolicy{{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "waypoint"},
		Status: meshv1.WaypointPolicyStatus{Address: "10.96.0.50", Conditions: []metav1.Condition{
			{Type: meshv1.ConditionReady, Status: metav1.ConditionTrue, Reason: "DeploymentReady"}}},
	}}
	var buf bytes.Buffer
	if err := writeWaypoints(&buf, items, true); err != nil {
		t.Fatal(err)
	}
	row := strings.Fields(strings.Split(buf.String(), "\n")[1])
	if !reflect.DeepEqual(row, []string{"demo", "waypoint", "Namespace", "None", "10.96.0.50", "True", "DeploymentReady"}) {
		t.Fatalf("row %q", row)
	}
	buf.Reset()
	m := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{TrustDomain: "cluster.local", Namespace: "ambient-system"},
		Status: meshv1.AmbientMeshStatus{ReadySummary: "2/2", Conditions: []metav1.Condition{
			{Type: "ZtunnelReady", Status: "True", Reason: "DaemonSetReady", LastTransitionTime: metav1.NewTime(now.Add(-90 * time.Second))},
			{Type: "Ready", Status: "False", Reason: "ComponentsNotReady", Message: "node agent\n 1/2", LastTransitionTime: metav1.NewTime(now.Add(-5 * time.Second))},
		}}}
	writeMesh(&buf, m, now)
	out := buf.String()
	for _, want := range []string{"trust domain cluster.local", "ztunnels 2/2", "Ready", "ComponentsNotReady", "node agent 1/2", "90s"} {
		if !strings.Contains(out, want) {
			t.Errorf("mesh output lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "  Ready") > strings.Index(out, "ZtunnelReady") {
		t.Errorf("conditions not sorted:\n%s", out)
	}
}

// TestGatewaysTable: the seeds' gateway with MetalLB's address, its
// listener and the HTTPRoute attached from the app namespace.
func TestGatewaysTable(t *testing.T) {
	ns := gwv1.Namespace("istio-system")
	gw := gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "httpbin-gateway"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{{Name: "http", Port: 80, Protocol: "HTTP"},
			{Name: "tls", Port: 443, Protocol: "TLS"}, {Name: "tcp", Port: 9000, Protocol: "TCP"}}},
		Status: gwv1.GatewayStatus{
			Addresses:  []gwv1.GatewayStatusAddress{{Value: "10.201.0.200"}},
			Conditions: []metav1.Condition{{Type: "Programmed", Status: "True", Reason: "Programmed"}},
			Listeners: []gwv1.ListenerStatus{{Name: "http", AttachedRoutes: 1}, {Name: "tls", AttachedRoutes: 1},
				{Name: "tcp", AttachedRoutes: 1}},
		},
	}
	toGateway := []gwv1.ParentReference{{Name: "httpbin-gateway", Namespace: &ns}}
	accepted := []gwv1.RouteParentStatus{{
		ParentRef:  gwv1.ParentReference{Name: "httpbin-gateway", Namespace: &ns},
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "True", Reason: "Accepted"}},
	}}
	notAllowed := []gwv1.RouteParentStatus{{
		ParentRef:  gwv1.ParentReference{Name: "httpbin-gateway", Namespace: &ns},
		Conditions: []metav1.Condition{{Type: "Accepted", Status: "False", Reason: "NotAllowedByListeners"}},
	}}
	routes := []gatewayRoute{
		{kind: "HTTPRoute", namespace: "ambient-demo", name: "httpbin", parents: toGateway, status: accepted},
		{kind: "TLSRoute", namespace: "ambient-demo", name: "httpbin-tls", parents: toGateway, status: accepted},
		{kind: "TCPRoute", namespace: "ambient-demo", name: "echo", parents: toGateway, status: notAllowed},
		{kind: "GRPCRoute", namespace: "ambient-demo", name: "grpc", parents: toGateway},
		{kind: "HTTPRoute", namespace: "ambient-demo", name: "mesh-only",
			parents: []gwv1.ParentReference{{Name: "httpbin", Kind: ptrTo(gwv1.Kind("Service"))}}},
	}
	var b strings.Builder
	if err := writeGateways(&b, []gwv1.Gateway{gw}, routes); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"httpbin-gateway", "10.201.0.200", "True", "http:80/HTTP(1 routes)",
		"tls:443/TLS(1 routes)", "tcp:9000/TCP(1 routes)", "ambient-demo/httpbin(Accepted)",
		"TLSRoute:ambient-demo/httpbin-tls(Accepted)", "TCPRoute:ambient-demo/echo(NotAllowedByListeners)",
		"GRPCRoute:ambient-demo/grpc(?)"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "mesh-only") {
		t.Errorf("a Service-parented route is listed on the gateway:\n%s", out)
	}
}

func ptrTo[T any](v T) *T { return &v }

func TestDNSTable(t *testing.T) {
	d, err := parseConfigDump([]byte(`{"workloads":[],"services":[],"policies":[],"certificates":[],
 "dns": {"clusterDomain": "cluster.local", "defaultUpstreams": ["10.96.0.10:53"], "cacheEntries": 7, "pods": [
  {"name": "sleep-1", "namespace": "demo", "uid": "u1", "captured": true, "nameservers": ["10.96.0.10:53"]},
  {"name": "legacy-1", "namespace": "demo", "uid": "u2", "captured": false, "nameservers": []},
  {"name": "new-1", "namespace": "demo", "uid": "u3", "captured": true, "nameservers": []}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := renderProxyConfig(&buf, d, "dns", "table"); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	if !strings.Contains(lines[0], "cluster domain cluster.local") || !strings.Contains(lines[0], "cached answers 7") {
		t.Fatalf("summary %q", lines[0])
	}
	want := [][]string{
		{"NAMESPACE", "POD", "DNS", "CAPTURED", "UPSTREAMS"},
		{"demo", "sleep-1", "true", "10.96.0.10:53"},
		{"demo", "legacy-1", "false", "-"},
		{"demo", "new-1", "true", "10.96.0.10:53", "(default)"},
	}
	if len(lines) != len(want)+1 {
		t.Fatalf("got %d lines:\n%s", len(lines), buf.String())
	}
	for i, w := range want {
		if got := strings.Fields(lines[i+1]); !reflect.DeepEqual(got, w) {
			t.Errorf("row %d = %q, want %q", i, got, w)
		}
	}
	inv, err := parseArgs([]string{"proxy-config", "dns"})
	if err != nil || inv.sub != "dns" {
		t.Fatalf("parseArgs(proxy-config dns) = %+v, %v", inv, err)
	}
	buf.Reset()
	if err := renderProxyConfig(&buf, &ConfigDump{}, "dns", "table"); err != nil || !strings.Contains(buf.String(), "no DNS proxy") {
		t.Fatalf("without a DNS section: %q, %v", buf.String(), err)
	}
}

// TestServiceEntryRows: a ServiceEntry host is listed by host (an entry
// with two hosts gives two distinguishable rows) with its VIPs, a
// Kubernetes Service by name; a workload known by hostname shows it.
func TestServiceEntryRows(t *testing.T) {
	var buf bytes.Buffer
	err := writeServices(&buf, []Service{
		{Name: "httpbin", Namespace: "ambient-demo", Hostname: "httpbin.ambient-demo.svc.cluster.local", Addresses: []string{"10.96.0.5"}, Endpoints: 1},
		{Name: "ext", Namespace: "egress", Hostname: "api.example.com", Addresses: []string{"240.240.0.1", "2001:2::1"}, Waypoint: "egress/waypoint", Endpoints: 1},
		{Name: "ext", Namespace: "egress", Hostname: "www.example.com", Addresses: []string{"240.240.0.2", "2001:2::2"}, Endpoints: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	want := [][]string{
		{"NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"},
		{"ambient-demo", "httpbin", "10.96.0.5", "None", "1"},
		{"egress", "api.example.com", "240.240.0.1,2001:2::1", "egress/waypoint", "1"},
		{"egress", "www.example.com", "240.240.0.2,2001:2::2", "None", "1"},
	}
	for i, w := range want {
		if got := strings.Fields(lines[i]); !reflect.DeepEqual(got, w) {
			t.Errorf("row %d = %q, want %q", i, got, w)
		}
	}
	buf.Reset()
	if err := writeWorkloads(&buf, []Workload{{Name: "ext", Namespace: "egress", Hostname: "api.example.com", Protocol: "TCP"}}); err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(strings.Split(buf.String(), "\n")[1]); !reflect.DeepEqual(got, []string{"ext", "egress", "api.example.com", "None", "None", "TCP"}) {
		t.Errorf("hostname workload row %q", got)
	}
}

func TestWaypointGenerate(t *testing.T) {
	var b strings.Builder
	if err := waypointGenerate("demo", options{forTraffic: "workload", name: "wl"}, &b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kind: WaypointPolicy", "apiVersion: " + meshv1.GroupVersion.String(), "name: wl", "namespace: demo", "trafficType: workload", "scope: Namespace"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("generate output lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	if err := waypointGenerate("demo", options{output: "json"}, &b); err != nil || !strings.Contains(b.String(), `"kind": "WaypointPolicy"`) {
		t.Errorf("-o json: %v\n%s", err, b.String())
	}
}

func TestEnrollLabels(t *testing.T) {
	for _, tc := range []struct {
		name      string
		labels    map[string]string
		overwrite bool
		wantErr   bool
	}{
		{"unlabelled", map[string]string{"istio.io/dataplane-mode": "ambient"}, false, false},
		{"same waypoint", map[string]string{"istio.io/use-waypoint": "waypoint"}, false, false},
		{"another waypoint", map[string]string{"istio.io/use-waypoint": "other"}, false, true},
		{"another waypoint, --overwrite", map[string]string{"istio.io/use-waypoint": "other"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := enrollLabels(tc.labels, "waypoint", tc.overwrite)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", err, tc.wantErr)
			}
			if err == nil && (got["istio.io/use-waypoint"] != "waypoint" || (tc.labels["istio.io/dataplane-mode"] != "" && got["istio.io/dataplane-mode"] != "ambient")) {
				t.Errorf("labels %v", got)
			}
		})
	}
}

func TestWaypointListOutput(t *testing.T) {
	items := []meshv1.WaypointPolicy{*desiredWaypoint("demo", options{forTraffic: "all"})}
	for _, tc := range []struct{ output, want string }{{"json", `"trafficType": "all"`}, {"yaml", "trafficType: all"}} {
		var b strings.Builder
		if err := writeObjects(&b, items, tc.output); err != nil || !strings.Contains(b.String(), tc.want) {
			t.Errorf("-o %s: %v\n%s", tc.output, err, b.String())
		}
	}
}
