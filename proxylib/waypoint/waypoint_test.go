package waypoint_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
	wt "github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// demo is the seeds' setup behind a namespace waypoint: echo (v1, v2),
// httpbin, and clients sleep and notsleep.
type demo struct {
	m                 *wt.Mesh
	wp                *wt.Waypoint
	v1, v2, httpbin   *wt.Pod
	echo, echoV1      netip.Addr
	echoV2, httpbinIP netip.Addr
	sleep, notsleep   *wt.Client
}

func newDemo(t *testing.T) *demo {
	m := wt.New(t)
	d := &demo{m: m}
	d.wp = m.AddWaypoint("waypoint", true)
	d.v1 = m.AddPod("echo-v1-0", "echo", map[string]string{"app": "echo", "version": "v1"}, d.wp)
	d.v2 = m.AddPod("echo-v2-0", "echo", map[string]string{"app": "echo", "version": "v2"}, d.wp)
	d.httpbin = m.AddPod("httpbin-0", "httpbin", map[string]string{"app": "httpbin"}, d.wp, wt.Namespace+"/allow-sleep-to-httpbin")
	wpOf := func(*wt.Pod) *wt.Waypoint { return d.wp }
	ports := []uint32{wt.HTTPPort, wt.GRPCPort, wt.TCPPort}
	d.echo = m.AddService("echo", d.wp, []*wt.Pod{d.v1, d.v2}, wpOf, ports...)
	d.echoV1 = m.AddService("echo-v1", d.wp, []*wt.Pod{d.v1}, wpOf, ports...)
	d.echoV2 = m.AddService("echo-v2", d.wp, []*wt.Pod{d.v2}, wpOf, ports...)
	d.httpbinIP = m.AddService("httpbin", d.wp, []*wt.Pod{d.httpbin}, wpOf, ports...)
	d.sleep = m.NewClient("sleep", netip.MustParseAddr("10.244.1.5"))
	d.notsleep = m.NewClient("notsleep", netip.MustParseAddr("10.244.1.6"))
	return d
}

func get(t *testing.T, c *http.Client, method, url string, hdr ...string) (int, wt.Seen, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var s wt.Seen
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(body, &s); err != nil {
			t.Fatalf("%s %s: body %q: %v", method, url, body, err)
		}
	}
	return resp.StatusCode, s, resp.Header
}

func svcURL(ip netip.Addr, path string) string {
	return fmt.Sprintf("http://%s:%d%s", ip, wt.HTTPPort, path)
}

func target(ip netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(ip, port) }

// The seeds' HTTPRoute: every request for echo goes to echo-v1; without it,
// requests are balanced over both pods.
func TestSeedsRouteEchoToV1(t *testing.T) {
	d := newDemo(t)
	c := d.sleep.HTTP(d.wp, target(d.echo, wt.HTTPPort), false)
	pods := map[string]int{}
	for range 20 {
		code, s, _ := get(t, c, "GET", svcURL(d.echo, "/"))
		if code != 200 {
			t.Fatalf("status %d", code)
		}
		pods[s.Pod]++
	}
	if pods["echo-v1-0"] == 0 || pods["echo-v2-0"] == 0 {
		t.Fatalf("without a route both pods should serve: %v", pods)
	}
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: echo}
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 8080
  rules:
  - backendRefs:
    - name: echo-v1
      port: 8080
`)
	for range 30 {
		code, s, _ := get(t, c, "GET", svcURL(d.echo, "/x"))
		if code != 200 || s.Pod != "echo-v1-0" {
			t.Fatalf("status %d pod %q, want echo-v1-0", code, s.Pod)
		}
	}
}

func TestWeightedSplitWithinBinomialBounds(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{kind: Service, name: echo, group: ""}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 8080, weight: 90}
    - {name: echo-v2, port: 8080, weight: 10}
`)
	c := d.sleep.HTTP(d.wp, target(d.echo, wt.HTTPPort), false)
	const n = 400
	v2 := 0
	for range n {
		code, s, _ := get(t, c, "GET", svcURL(d.echo, "/"))
		if code != 200 {
			t.Fatalf("status %d", code)
		}
		if s.Pod == "echo-v2-0" {
			v2++
		}
	}
	// 5 sigma: a correct 90/10 split fails ~1e-6 of runs; 80/20 or 50/50 fail.
	mean, sd := n*0.1, math.Sqrt(n*0.1*0.9)
	if math.Abs(float64(v2)-mean) > 5*sd {
		t.Fatalf("%d of %d to v2, want %.0f±%.0f", v2, n, mean, 5*sd)
	}
}

const seedPolicy = `
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-sleep-to-httpbin}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]
    to: [{operation: {methods: [GET]}}]
`

func TestL7AuthorizationSeeds(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(seedPolicy)
	sleep := d.sleep.HTTP(d.wp, target(d.httpbinIP, wt.HTTPPort), false)
	notsleep := d.notsleep.HTTP(d.wp, target(d.httpbinIP, wt.HTTPPort), false)
	if code, s, _ := get(t, sleep, "GET", svcURL(d.httpbinIP, "/get")); code != 200 || s.Pod != "httpbin-0" {
		t.Fatalf("GET from sleep: %d %q", code, s.Pod)
	}
	if code, _, _ := get(t, sleep, "POST", svcURL(d.httpbinIP, "/post")); code != 403 {
		t.Fatalf("POST from sleep: %d, want 403", code)
	}
	for _, m := range []string{"GET", "POST", "DELETE"} {
		if code, _, _ := get(t, notsleep, m, svcURL(d.httpbinIP, "/get")); code != 403 {
			t.Fatalf("%s from notsleep: %d, want 403", m, code)
		}
	}
	// The policy selects httpbin only: echo stays open.
	if code, _, _ := get(t, d.notsleep.HTTP(d.wp, target(d.echo, wt.HTTPPort), false), "POST", svcURL(d.echo, "/")); code != 200 {
		t.Fatalf("echo from notsleep: %d", code)
	}
	// A request addressed to the pod itself is authorized the same way.
	pod := target(d.httpbin.IP, wt.HTTPPort)
	if code, s, _ := get(t, d.sleep.HTTP(d.wp, pod, false), "GET", "http://"+pod.String()+"/"); code != 200 || s.Pod != "httpbin-0" {
		t.Fatalf("pod-addressed GET from sleep: %d %q", code, s.Pod)
	}
	if code, _, _ := get(t, d.notsleep.HTTP(d.wp, pod, false), "GET", "http://"+pod.String()+"/"); code != 403 {
		t.Fatalf("pod-addressed GET from notsleep: %d", code)
	}
}

func TestForwardingHeadersAndTrace(t *testing.T) {
	d := newDemo(t)
	c := d.sleep.HTTP(d.wp, target(d.echoV1, wt.HTTPPort), false)
	code, s, _ := get(t, c, "GET", svcURL(d.echoV1, "/"),
		"X-Forwarded-For", "6.6.6.6", "X-Forwarded-Client-Cert", "URI=spiffe://evil/ns/x/sa/y", "Connection", "X-Hop", "X-Hop", "1")
	if code != 200 {
		t.Fatal(code)
	}
	if got := s.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "10.244.1.5" {
		t.Errorf("X-Forwarded-For %v, want the verified source only", got)
	}
	if got := s.Header.Get("X-Forwarded-Client-Cert"); !strings.Contains(got, "URI=spiffe://cluster.local/ns/ambient-demo/sa/sleep") || strings.Contains(got, "evil") {
		t.Errorf("XFCC %q", got)
	}
	if s.Header.Get("X-Hop") != "" {
		t.Error("Connection-listed header forwarded")
	}
	if tp := s.Header.Get("Traceparent"); len(tp) != 55 {
		t.Errorf("traceparent not generated with tracing on: %q", tp)
	}
}

// TestForwardedSourceIsBelievedOnlyFirstHand: a peer's Forwarded for= is
// the client address only when it is the peer's own workload address, or
// the peer is the destination hair-pinning a direct caller; notsleep cannot
// borrow sleep's address (to pass an ipBlocks rule or fool the app).
func TestForwardedSourceIsBelievedOnlyFirstHand(t *testing.T) {
	d := newDemo(t)
	outsider := netip.MustParseAddr("192.168.7.7")
	echo := d.m.PodClient(d.v1) // the destination's own identity
	for _, c := range []struct {
		name   string
		client *wt.Client
		claim  netip.Addr
		want   string
	}{
		{"own address", d.sleep, d.sleep.IP, d.sleep.IP.String()},
		{"another workload's address", d.notsleep, d.sleep.IP, "127.0.0.1"},
		{"an address outside the mesh", d.notsleep, outsider, "127.0.0.1"},
		{"the destination hair-pinning a direct caller", echo, outsider, outsider.String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return c.client.DialAs(ctx, d.wp, target(d.v1.IP, wt.HTTPPort), c.claim)
				}}}
			defer hc.CloseIdleConnections()
			code, s, _ := get(t, hc, "GET", svcURL(d.v1.IP, "/"))
			if code != 200 {
				t.Fatalf("status %d", code)
			}
			if got := s.Header.Values("X-Forwarded-For"); len(got) != 1 || got[0] != c.want {
				t.Errorf("X-Forwarded-For %v, want [%s]", got, c.want)
			}
		})
	}
}

// TestHairpinCallerIsBelievedOnlyFromTheDestination: the caller a
// hair-pinning destination names is who the waypoint serves (policy,
// X-Forwarded-Client-Cert); a name from any other peer is ignored, and a
// hair-pin naming nobody is a caller without identity, never the
// destination itself.
func TestHairpinCallerIsBelievedOnlyFromTheDestination(t *testing.T) {
	d := newDemo(t)
	echo := d.m.PodClient(d.v1) // the destination's own identity
	for _, c := range []struct {
		name    string
		client  *wt.Client
		header  string
		wantURI string // "" : the backend must see no client certificate
	}{
		{"the destination names an mTLS caller", echo, d.sleep.ID.String(), d.sleep.ID.String()},
		{"the destination names nobody: no identity", echo, "", ""},
		{"the destination names garbage: no identity", echo, "not-a-spiffe-id", ""},
		{"another peer's claim is ignored", d.notsleep, echo.ID.String(), d.notsleep.ID.String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			extra := http.Header{}
			if c.header != "" {
				extra.Set(hbone.HeaderHairpinCaller, c.header)
			}
			hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
				DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return c.client.DialWithHeader(ctx, d.wp, target(d.v1.IP, wt.HTTPPort), extra)
				}}}
			defer hc.CloseIdleConnections()
			code, s, _ := get(t, hc, "GET", svcURL(d.v1.IP, "/"))
			if code != 200 {
				t.Fatalf("status %d", code)
			}
			xfcc := s.Header.Get("X-Forwarded-Client-Cert")
			if c.wantURI == "" && strings.Contains(xfcc, "URI=") || c.wantURI != "" && !strings.Contains(xfcc, "URI="+c.wantURI) {
				t.Fatalf("X-Forwarded-Client-Cert %q, want caller %q", xfcc, c.wantURI)
			}
		})
	}
}

func TestTargetsNotServedAreRefused(t *testing.T) {
	d := newDemo(t)
	other := d.m.AddPod("other-0", "other", map[string]string{"app": "other"}, nil)
	otherSvc := d.m.AddService("other", nil, []*wt.Pod{other}, func(*wt.Pod) *wt.Waypoint { return nil }, wt.HTTPPort)
	for _, tgt := range []netip.AddrPort{
		target(other.IP, wt.HTTPPort),               // pod without this waypoint
		target(otherSvc, wt.HTTPPort),               // service without our pods
		target(netip.MustParseAddr("10.9.9.9"), 80), // unknown
		target(d.echo, 1234),                        // our service, port it does not have
	} {
		_, err := d.sleep.Dial(context.Background(), d.wp, tgt)
		if err == nil || hbone.StatusOf(err) != 400 {
			t.Errorf("CONNECT %s: err %v (status %d), want 400", tgt, err, hbone.StatusOf(err))
		}
	}
}

// A service-account waypoint takes the pods bound to it; the namespace
// waypoint refuses them (discovery binds each pod to one waypoint, the
// service-account one first).
func TestServiceAccountWaypointWins(t *testing.T) {
	d := newDemo(t)
	saWP := d.m.AddWaypoint("echo-sa-waypoint", false)
	d.m.PublishPod(d.v1, saWP, nil)
	tgt := target(d.v1.IP, wt.HTTPPort)
	if _, err := d.sleep.Dial(context.Background(), d.wp, tgt); hbone.StatusOf(err) != 400 {
		t.Fatalf("namespace waypoint accepted a pod of the service-account waypoint: %v", err)
	}
	code, s, _ := get(t, d.sleep.HTTP(saWP, tgt, false), "GET", "http://"+tgt.String()+"/")
	if code != 200 || s.Pod != "echo-v1-0" {
		t.Fatalf("via service-account waypoint: %d %q", code, s.Pod)
	}
}

func TestGRPCRouteAndAuthorization(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc}
spec:
  parentRefs: [{kind: Service, name: echo, group: ""}]
  rules:
  - matches: [{method: {service: grpc.health.v1.Health, method: Check}}]
    backendRefs: [{name: echo-v2, port: 9090}]
`)
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-only-sleep}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ambient-demo/sa/sleep"]}}]
    to: [{operation: {methods: [POST], paths: ["/grpc.health.v1.Health/*"]}}]
`)
	tgt := target(d.echo, wt.GRPCPort)
	hc := healthpb.NewHealthClient(d.sleep.GRPC(d.wp, tgt))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 10 {
		// Only echo-v2-0 knows the service name "echo-v2-0".
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "echo-v2-0"})
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("gRPC via route: %v %v", resp, err)
		}
	}
	_, err := healthpb.NewHealthClient(d.notsleep.GRPC(d.wp, tgt)).Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("gRPC from notsleep: %v, want PermissionDenied", err)
	}
}

func TestMetricsLabels(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(seedPolicy)
	c := d.sleep.HTTP(d.wp, target(d.httpbinIP, wt.HTTPPort), false)
	get(t, c, "GET", svcURL(d.httpbinIP, "/"))
	get(t, c, "POST", svcURL(d.httpbinIP, "/"))
	// Metrics are recorded when the response body is closed, which can be
	// just after the client has read the response.
	var mfs []*dto.MetricFamily
	for deadline := time.Now().Add(5 * time.Second); ; {
		var err error
		if mfs, err = d.wp.Registry.Gather(); err != nil {
			t.Fatal(err)
		}
		if (countSeries(mfs, "istio_requests_total") >= 2 && histSamples(mfs) == 6) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	want := map[string]string{
		"reporter": "waypoint", "source_workload": "sleep-client", "source_principal": "spiffe://cluster.local/ns/ambient-demo/sa/sleep",
		"destination_service": "httpbin.ambient-demo.svc.cluster.local", "destination_service_name": "httpbin",
		"destination_service_namespace": "ambient-demo", "request_protocol": "http", "connection_security_policy": "mutual_tls",
	}
	found := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range mt.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					t.Errorf("label %s=%q, want %q (%v)", k, labels[k], v, labels)
				}
			}
			found[labels["response_code"]] = true
			if labels["response_code"] == "200" && (labels["destination_workload"] != "httpbin-0" || labels["destination_principal"] != "spiffe://cluster.local/ns/ambient-demo/sa/httpbin") {
				t.Errorf("destination labels %v", labels)
			}
			if labels["response_code"] == "403" && labels["response_flags"] != "authorization_policy_rejection" {
				t.Errorf("403 flags %v", labels)
			}
		}
	}
	if !found["200"] || !found["403"] {
		t.Fatalf("requests_total series by code: %v", found)
	}
	hist := histSamples(mfs)
	if hist != 6 {
		t.Fatalf("histogram series with samples: %d, want 3 metrics x 2 codes", hist)
	}
}

// histSamples counts histogram series of the three request histograms
// that have samples.
func histSamples(mfs []*dto.MetricFamily) int {
	hist := 0
	for _, mf := range mfs {
		switch mf.GetName() {
		case "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes":
			for _, mt := range mf.GetMetric() {
				if mt.GetHistogram().GetSampleCount() > 0 {
					hist++
				}
			}
		}
	}
	return hist
}

func countSeries(mfs []*dto.MetricFamily, name string) int {
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}

// TestOnwardClientAddress: an onward HTTP tunnel is pooled across clients,
// so it names no client (the app sees the waypoint; X-Forwarded-For names
// each request's client); an opaque TCP tunnel serves one client and names
// it, so the destination's ztunnel can show the app its address.
func TestOnwardClientAddress(t *testing.T) {
	d := newDemo(t)
	for _, c := range []*wt.Client{d.sleep, d.notsleep, d.sleep} {
		hc := c.HTTP(d.wp, target(d.echoV1, wt.HTTPPort), false)
		if code, s, _ := get(t, hc, "GET", svcURL(d.echoV1, "/")); code != 200 || s.Header.Get("X-Forwarded-For") != c.IP.String() {
			t.Fatalf("%s: %d, X-Forwarded-For %q", c.ID, code, s.Header.Get("X-Forwarded-For"))
		}
	}
	http := d.v1.Forwarded()
	if len(http) == 0 {
		t.Fatal("no onward tunnel reached echo-v1")
	}
	for _, f := range http {
		if f != "" {
			t.Fatalf("pooled HTTP tunnel names a client: Forwarded %q", f)
		}
	}
	st, err := d.sleep.Dial(context.Background(), d.wp, target(d.echoV1, wt.TCPPort))
	if err != nil {
		t.Fatal(err)
	}
	st.CloseWrite()
	io.ReadAll(st)
	st.Close()
	all := d.v1.Forwarded()
	if got, want := all[len(all)-1], hbone.FormatForwarded(d.sleep.IP); got != want {
		t.Fatalf("TCP tunnel: Forwarded %q, want %q", got, want)
	}
}

func TestTCPPassthroughWithL4Policy(t *testing.T) {
	d := newDemo(t)
	tgt := target(d.echoV1, wt.TCPPort)
	st, err := d.sleep.Dial(context.Background(), d.wp, tgt)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(st, "\x00\x01binary")
	st.CloseWrite()
	got, _ := io.ReadAll(st)
	st.Close()
	if string(got) != "echo-v1-0:\x00\x01binary" {
		t.Fatalf("passthrough got %q", got)
	}
	// An ALLOW policy with only L7 rules fails closed for opaque TCP.
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
`)
	st, err = d.sleep.Dial(context.Background(), d.wp, tgt)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(st, "\x00\x01binary")
	st.CloseWrite()
	got, _ = io.ReadAll(st)
	st.Close()
	if len(got) != 0 {
		t.Fatalf("TCP with an L7-only ALLOW policy got %q, want closed", got)
	}
}

// Case 24 through the full waypoint: smuggling shapes never reach a pod.
func TestHostileHTTPThroughWaypoint(t *testing.T) {
	d := newDemo(t)
	for _, raw := range []string{
		"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
		"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: echo\r\nX: " + strings.Repeat("a", 64<<10) + "\r\n\r\n",
	} {
		st, err := d.sleep.Dial(context.Background(), d.wp, target(d.echo, wt.HTTPPort))
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(st, raw)
		resp, err := http.ReadResponse(bufio.NewReader(st), nil)
		st.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 400 && resp.StatusCode != 431 {
			t.Errorf("%.40q: status %d", raw, resp.StatusCode)
		}
	}
}

func TestOutlierEjectionAndRetry(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry}
spec:
  parentRefs: [{kind: Service, name: echo, group: ""}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /status/503}}]
    retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo, port: 8080}]
  - backendRefs: [{name: echo, port: 8080}]
`)
	c := d.sleep.HTTP(d.wp, target(d.echo, wt.HTTPPort), false)
	if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/status/503")); code != 503 {
		t.Fatalf("status %d", code)
	}
	// 3 attempts per request: both endpoints answered 503 repeatedly; the
	// waypoint still answers (never fewer than one endpoint available).
	for range 3 {
		if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/status/503")); code != 503 {
			t.Fatalf("status %d", code)
		}
	}
	if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/ok")); code != 200 {
		t.Fatalf("healthy path after ejections: %d", code)
	}
}

// WebSocket-style upgrades pass through the waypoint after policy.
func TestUpgradeThroughWaypoint(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ws-sleep-only}
spec:
  targetRefs: [{kind: Service, group: "", name: echo-v1}]
  rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]}]
`)
	upgrade := func(c *wt.Client) (*http.Response, net.Conn, *bufio.Reader) {
		st, err := c.Dial(context.Background(), d.wp, target(d.echoV1, wt.HTTPPort))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		io.WriteString(st, "GET /ws HTTP/1.1\r\nHost: echo-v1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
		br := bufio.NewReader(st)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		return resp, st, br
	}
	resp, st, br := upgrade(d.sleep)
	if resp.StatusCode != 101 || resp.Header.Get("X-Pod") != "echo-v1-0" {
		t.Fatalf("sleep upgrade: %d %v", resp.StatusCode, resp.Header)
	}
	io.WriteString(st, "frame")
	got := make([]byte, 5)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "frame" {
		t.Fatalf("echo after upgrade: %q %v", got, err)
	}
	if resp, _, _ := upgrade(d.notsleep); resp.StatusCode != 403 {
		t.Fatalf("notsleep upgrade: %d, want 403", resp.StatusCode)
	}
}

// Reliability case 20: a TCP tunnel that a new policy no longer allows is
// closed.
func TestPolicyChangeClosesTCPTunnel(t *testing.T) {
	d := newDemo(t)
	st, err := d.notsleep.Dial(context.Background(), d.wp, target(d.echoV1, wt.TCPPort))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	io.WriteString(st, "\x00ping")
	buf := make([]byte, len("echo-v1-0:\x00ping"))
	if _, err := io.ReadFull(st, buf); err != nil {
		t.Fatalf("relay before the policy: %v", err)
	}
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sleep-only}
spec:
  rules: [{from: [{source: {principals: [cluster.local/ns/ambient-demo/sa/sleep]}}]}]
`)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := st.Read(buf); err == nil {
		t.Fatal("tunnel still open after a policy that denies it")
	}
}

// Reliability case 19: before discovery has synced, nothing is admitted: a
// tunnel is held for at most ConnectTimeout, then refused.
func TestNotReadyRefuses(t *testing.T) {
	d, _, srv := newUnsyncedWaypoint(t, 50*time.Millisecond)
	rec := &recorder{}
	srv.ServeHBONE(context.Background(), &hbone.Request{Target: target(d.echo, wt.HTTPPort), Peer: d.sleep.ID}, rec)
	if rec.status != http.StatusServiceUnavailable || rec.accepted {
		t.Fatalf("unsynced waypoint answered %d (accepted=%v), want 503", rec.status, rec.accepted)
	}
}

// A tunnel that arrives while discovery syncs is held and then judged on
// what discovery says (a replica starting beside others is reached before
// its first response): here an empty snapshot, so the target is unknown,
// not "not ready".
func TestNotReadyHoldsUntilSynced(t *testing.T) {
	d, fresh, srv := newUnsyncedWaypoint(t, 10*time.Second)
	rec := &recorder{}
	done := make(chan struct{})
	go func() {
		srv.ServeHBONE(context.Background(), &hbone.Request{Target: target(d.echo, wt.HTTPPort), Peer: d.sleep.ID}, rec)
		close(done)
	}()
	select {
	case <-done:
		t.Fatalf("answered %d before discovery synced, want the tunnel held", rec.status)
	case <-time.After(100 * time.Millisecond):
	}
	for _, typeURL := range []string{discovery.AddressType, discovery.L7ResourceType} {
		if err := fresh.Apply(typeURL, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("still held after discovery synced")
	}
	if rec.status == http.StatusServiceUnavailable || rec.status == 0 || rec.accepted {
		t.Fatalf("after the sync: answered %d (accepted=%v), want the unknown target refused", rec.status, rec.accepted)
	}
}

// newUnsyncedWaypoint is a waypoint of the demo whose discovery has not
// synced yet, holding tunnels for at most hold.
func newUnsyncedWaypoint(t *testing.T, hold time.Duration) (*demo, *discovery.State, *waypoint.Server) {
	d := newDemo(t)
	fresh := discovery.NewState(discovery.AddressType, discovery.L7ResourceType)
	srv, err := waypoint.New(waypoint.Config{Name: "waypoint", Namespace: wt.Namespace, Identity: d.wp.ID, State: fresh,
		Dialer: nopDialer{}, ConnectTimeout: hold})
	if err != nil {
		t.Fatal(err)
	}
	return d, fresh, srv
}

type nopDialer struct{}

func (nopDialer) Dial(context.Context, hbone.DialRequest) (hbone.Stream, error) {
	return nil, fmt.Errorf("not dialing")
}
func (nopDialer) Close() error { return nil }

type recorder struct {
	status   int
	accepted bool
}

func (r *recorder) Accept() (hbone.Stream, error) {
	r.accepted = true
	return nil, fmt.Errorf("no stream")
}
func (r *recorder) Reject(status int, _ string) { r.status = status }

func TestTimeoutsAndRetries(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: resilience}
spec:
  parentRefs: [{kind: Service, name: echo, group: ""}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /sleep}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo, port: 8080}]
  - matches: [{path: {type: Exact, value: /flaky}, headers: [{name: x-retry, value: "yes"}]}]
    retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo, port: 8080}]
  - backendRefs: [{name: echo, port: 8080}]
`)
	c := d.sleep.HTTP(d.wp, target(d.echo, wt.HTTPPort), false)
	if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/sleep/10ms")); code != 200 {
		t.Fatalf("fast request: %d", code)
	}
	if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/sleep/5s")); code != http.StatusGatewayTimeout {
		t.Fatalf("slow request: %d, want 504 from the route timeout", code)
	}
	// Each pod fails every other call, starting with its first: without a
	// retry the first request sees the 503; with 2 retries every request
	// finds a 200.
	if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/flaky")); code != 503 {
		t.Fatalf("unretried first call: %d, want the backend's 503", code)
	}
	for range 6 {
		if code, _, _ := get(t, c, "GET", svcURL(d.echo, "/flaky"), "X-Retry", "yes"); code != 200 {
			t.Fatalf("retried request: %d", code)
		}
	}
}

var _ = waypointtest.Namespace

// TestPathNormalizedBeforePolicyAndForwarded: a DENY on /admin* cannot be
// bypassed with dot segments, doubled slashes or encoded characters, on
// HTTP/1.1 and HTTP/2; what the pod receives is the normalized path.
func TestPathNormalizedBeforePolicyAndForwarded(t *testing.T) {
	d := newDemo(t)
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
`)
	tgt := target(d.echo, wt.HTTPPort)
	rawGet := func(path string) (int, wt.Seen) {
		st, err := d.sleep.Dial(context.Background(), d.wp, tgt)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		fmt.Fprintf(st, "GET %s HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(st), nil)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		var s wt.Seen
		if resp.StatusCode == 200 {
			json.NewDecoder(resp.Body).Decode(&s)
		}
		return resp.StatusCode, s
	}
	h2 := d.sleep.HTTP(d.wp, tgt, true)
	defer h2.CloseIdleConnections()
	for _, p := range []string{"/admin", "/./admin", "//admin", "/x/../admin", "/%61dmin/x", "/x/%2e%2e/admin", "/static/..//admin"} {
		if code, _ := rawGet(p); code != 403 {
			t.Errorf("HTTP/1.1 GET %s: %d, want 403", p, code)
		}
		if code, _, _ := get(t, h2, "GET", "http://echo"+p); code != 403 {
			t.Errorf("HTTP/2 GET %s: %d, want 403", p, code)
		}
	}
	for p, want := range map[string]string{"/x/./y//z/../w": "/x/y/w", "/%7Euser/": "/~user/"} {
		code, s := rawGet(p)
		if code != 200 || s.Path != want {
			t.Errorf("GET %s: %d, pod saw %q, want %q", p, code, s.Path, want)
		}
	}
	if code, _ := rawGet("/%zz"); code != 400 {
		t.Errorf("broken percent-encoding: %d, want 400", code)
	}
}

// TestSlowHTTPClientIsStillHTTP: a client whose first bytes arrive late
// (a busy node) is still served as HTTP — routed, policed at L7, given the
// waypoint's forwarding headers — not passed through as opaque TCP (where
// an L7 policy would refuse it). With the old 100ms bound this request,
// sent 300ms after its tunnel opened, went through as TCP.
func TestSlowHTTPClientIsStillHTTP(t *testing.T) {
	d := newDemo(t)
	st, err := d.sleep.Dial(context.Background(), d.wp, target(d.echoV1, wt.HTTPPort))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	time.Sleep(300 * time.Millisecond)
	fmt.Fprintf(st, "GET / HTTP/1.1\r\nHost: echo-v1\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(st), nil)
	if err != nil {
		t.Fatalf("no HTTP response: %v", err)
	}
	defer resp.Body.Close()
	var s wt.Seen
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, body: %v", resp.StatusCode, err)
	}
	if s.Header.Get("X-Forwarded-Client-Cert") == "" {
		t.Errorf("request reached echo without the waypoint's headers (served as TCP): %v", s.Header)
	}
}
