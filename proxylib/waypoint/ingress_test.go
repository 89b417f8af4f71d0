package waypoint_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/identity"
	wt "github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// The seeds' north-south setup: Gateway "gateway" (class istio, HTTP :80,
// routes from all namespaces) in istio-ingress, and an HTTPRoute in the
// app namespace sending /get and /headers to httpbin.
const seedsIngress = `
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gateway, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 18080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
`

const seedsIngressRoute = `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: httpbin}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /get}}, {path: {type: PathPrefix, value: /headers}}]
    backendRefs: [{name: httpbin, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /echo}}]
    backendRefs: [{name: echo, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /legacy}}]
    backendRefs: [{name: legacy, port: 8080}]
`

// echoIngressUseWaypoint is what the control plane sends for Service echo
// labelled istio.io/ingress-use-waypoint=true (or in a namespace so
// labelled).
const echoIngressUseWaypoint = `
apiVersion: ambient.mesh/v1
kind: IngressUseWaypoint
metadata: {name: echo}
`

type ingressDemo struct {
	m             *wt.Mesh
	gw            *wt.Gateway
	wp            *wt.Waypoint
	httpbin, echo *wt.Pod
	legacy        *wt.Pod
	client        *http.Client
	outside       netip.Addr
	ingressPort   uint16
}

// newIngressDemo: httpbin without a waypoint, echo behind a service
// waypoint that ingress uses (istio.io/ingress-use-waypoint), legacy
// outside the mesh (plain TCP).
func newIngressDemo(t *testing.T) *ingressDemo {
	m := wt.New(t)
	d := &ingressDemo{m: m, ingressPort: 18080}
	d.wp = m.AddWaypoint("waypoint", false)
	m.PublishWaypointWorkload(d.wp)
	d.httpbin = m.AddPod("httpbin-0", "httpbin", map[string]string{"app": "httpbin"}, nil)
	d.echo = m.AddPod("echo-0", "echo", map[string]string{"app": "echo"}, d.wp)
	d.legacy = m.AddPod("legacy-0", "legacy", map[string]string{"app": "legacy"}, nil)
	m.AddService("httpbin", nil, []*wt.Pod{d.httpbin}, func(*wt.Pod) *wt.Waypoint { return nil }, wt.HTTPPort, wt.TLSPort, wt.TCPPort)
	m.AddService("echo", d.wp, []*wt.Pod{d.echo}, func(*wt.Pod) *wt.Waypoint { return d.wp }, wt.HTTPPort, wt.TLSPort, wt.TCPPort)
	m.AddService("legacy", nil, []*wt.Pod{d.legacy}, func(*wt.Pod) *wt.Waypoint { return nil }, wt.HTTPPort, wt.TCPPort)
	m.MarkOutsideMesh(d.legacy)
	d.gw = m.AddGateway("gateway")
	m.ApplyL7(seedsIngress)
	m.ApplyL7(seedsIngressRoute)
	m.ApplyL7(echoIngressUseWaypoint)
	d.gw.WaitReady(m)
	// The outside client: its own address, so forwarding headers can be
	// checked.
	d.outside = netip.MustParseAddr("127.0.0.77")
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: d.outside.AsSlice()}}
	d.client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true, DialContext: dialer.DialContext}}
	return d
}

func (d *ingressDemo) get(t *testing.T, path, host string) (int, wt.Seen) {
	t.Helper()
	req, _ := http.NewRequest("GET", d.gw.URL(d.ingressPort, path), nil)
	if host != "" {
		req.Host = host
	}
	resp, err := d.client.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var s wt.Seen
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(body, &s); err != nil {
			t.Fatalf("GET %s: body %q: %v", path, body, err)
		}
	}
	return resp.StatusCode, s
}

// The seeds' curl from outside: the gateway routes /get to httpbin and
// reaches it over HBONE with its own identity; the app sees the outside
// client in X-Forwarded-For.
func TestIngressRoutesToMeshBackendWithGatewayIdentity(t *testing.T) {
	d := newIngressDemo(t)
	code, seen := d.get(t, "/get?show_env=1", "")
	if code != 200 || seen.Pod != "httpbin-0" {
		t.Fatalf("GET /get: %d from %q, want 200 from httpbin-0", code, seen.Pod)
	}
	peers := d.httpbin.Peers()
	if len(peers) == 0 || peers[len(peers)-1] != d.gw.ID {
		t.Fatalf("httpbin's tunnel peers %v, want the gateway's identity %s", peers, d.gw.ID)
	}
	if xff := seen.Header.Get("X-Forwarded-For"); !strings.Contains(xff, d.outside.String()) {
		t.Errorf("X-Forwarded-For %q does not name the outside client %s", xff, d.outside)
	}
	if code, _ := d.get(t, "/status/200", ""); code != http.StatusNotFound {
		t.Errorf("GET /status/200 (no route): %d, want 404", code)
	}
}

// A backend Service with a waypoint is reached through it, with the
// gateway's identity, so the waypoint's policy decides; the pod sees the
// waypoint as its peer.
func TestIngressGoesThroughTheBackendsWaypoint(t *testing.T) {
	d := newIngressDemo(t)
	if code, seen := d.get(t, "/echo", ""); code != 200 || seen.Pod != "echo-0" {
		t.Fatalf("GET /echo: %d from %q, want 200 from echo-0", code, seen.Pod)
	}
	if peers := d.echo.Peers(); len(peers) == 0 || peers[len(peers)-1] != d.wp.ID {
		t.Fatalf("echo's tunnel peers %v, want the waypoint %s", peers, d.wp.ID)
	}
	// Only the gateway's principal may call echo.
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ingress}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/istio-ingress/sa/gateway"]}}]
`)
	if code, _ := d.get(t, "/echo", ""); code != 200 {
		t.Fatalf("gateway principal allowed: %d, want 200", code)
	}
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-ingress}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ambient-demo/sa/sleep"]}}]
`)
	if code, _ := d.get(t, "/echo", ""); code != http.StatusForbidden {
		t.Fatalf("gateway principal not allowed: %d, want 403 from the waypoint", code)
	}
}

// istio.io/ingress-use-waypoint, as Istio has it: a gateway reaches a
// Service that has a (service) waypoint straight at its endpoints unless
// the control plane says the Service wants ingress through the waypoint.
func TestIngressUseWaypoint(t *testing.T) {
	d := newIngressDemo(t)
	// echo's waypoint serves the Service only (waypoint-for: service), so
	// its pod has none of its own.
	d.m.AddService("echo", d.wp, []*wt.Pod{d.echo}, func(*wt.Pod) *wt.Waypoint { return nil }, wt.HTTPPort, wt.TLSPort, wt.TCPPort)
	via := func(want identity.Identity, why string) {
		t.Helper()
		code, seen := d.get(t, "/echo", "")
		if code != 200 || seen.Pod != "echo-0" {
			t.Fatalf("%s: GET /echo: %d from %q, want 200 from echo-0", why, code, seen.Pod)
		}
		if peers := d.echo.Peers(); len(peers) == 0 || peers[len(peers)-1] != want {
			t.Fatalf("%s: echo's tunnel peers %v, want the last to be %s", why, peers, want)
		}
	}
	via(d.wp.ID, "labelled: through the waypoint")
	d.m.DeleteL7(discovery.MeshGroup, discovery.IngressUseWaypointKind, "echo")
	via(d.gw.ID, "label removed: straight to the pod with the gateway's identity")
	// The waypoint's policy no longer applies to ingress traffic: a policy
	// refusing the gateway at the waypoint does not stop it.
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ambient-demo/sa/sleep"]}}]
`)
	via(d.gw.ID, "bypassing the waypoint's policy")
	d.m.ApplyL7(echoIngressUseWaypoint)
	if code, _ := d.get(t, "/echo", ""); code != http.StatusForbidden {
		t.Fatalf("labelled again: GET /echo = %d, want 403 from the waypoint's policy", code)
	}
}

// A backend outside the mesh is reached in plain TCP (no tunnel).
func TestIngressToNonMeshBackendIsPlainTCP(t *testing.T) {
	d := newIngressDemo(t)
	if code, seen := d.get(t, "/legacy", ""); code != 200 || seen.Pod != "legacy-0" {
		t.Fatalf("GET /legacy: %d from %q, want 200 from legacy-0", code, seen.Pod)
	}
	if peers := d.legacy.Peers(); len(peers) != 0 {
		t.Fatalf("legacy accepted tunnels %v, want plain TCP", peers)
	}
}

// An AuthorizationPolicy targeting the Gateway applies at the gateway.
func TestIngressPolicyOnTheGateway(t *testing.T) {
	d := newIngressDemo(t)
	d.m.ApplyL7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-headers, namespace: istio-ingress}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gateway}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/headers"]}}]
`)
	if code, _ := d.get(t, "/headers", ""); code != http.StatusForbidden {
		t.Errorf("GET /headers: %d, want 403 by the gateway's policy", code)
	}
	if code, _ := d.get(t, "/get", ""); code != 200 {
		t.Errorf("GET /get: %d, want 200", code)
	}
	if n := len(d.httpbin.Peers()); n != 1 {
		t.Errorf("httpbin accepted %d tunnels, want 1 (the denied request never left the gateway)", n)
	}
}

// Ingress requests are reported as Istio's gateways report them.
func TestIngressMetricsReportAsSource(t *testing.T) {
	d := newIngressDemo(t)
	d.get(t, "/get", "")
	// The request is counted once its exchange completes, which may be
	// just after the client has read the response.
	var found bool
	for deadline := time.Now().Add(2 * time.Second); !found && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		mfs, err := d.gw.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "istio_requests_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				l := labelMap(m)
				if l["reporter"] == "source" && l["source_workload"] == "gateway" && l["source_workload_namespace"] == "istio-ingress" &&
					l["destination_service_name"] == "httpbin" && l["response_code"] == "200" {
					found = true
				}
			}
		}
	}
	if !found {
		t.Fatalf("no istio_requests_total{reporter=source, source_workload=gateway, destination_service_name=httpbin, response_code=200}")
	}
}

func labelMap(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, lp := range m.GetLabel() {
		out[lp.GetName()] = lp.GetValue()
	}
	return out
}

// HTTPS listeners terminate TLS with the certificate of the listener the
// client's SNI names, then route as for HTTP.
func TestIngressHTTPSListenersBySNI(t *testing.T) {
	d := newIngressDemo(t)
	shop := d.gw.WriteCertificate(t, "shop-cert", "shop.example.com")
	wild := d.gw.WriteCertificate(t, "wildcard-cert", "*.example.com")
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gateway, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 18080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
  - name: shop
    hostname: shop.example.com
    port: 18443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop-cert}]}
    allowedRoutes: {namespaces: {from: All}}
  - name: wildcard
    hostname: "*.example.com"
    port: 18443
    protocol: HTTPS
    tls: {certificateRefs: [{name: wildcard-cert}]}
    allowedRoutes: {namespaces: {from: All}}
`)
	d.gw.WaitReady(d.m)
	get := func(host string, roots *x509.CertPool, h2 bool) (int, wt.Seen, error) {
		tr := &http.Transport{DisableKeepAlives: true, ForceAttemptHTTP2: h2,
			TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: host},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var dl net.Dialer
				return dl.DialContext(ctx, "tcp", netip.AddrPortFrom(d.gw.IP, 18443).String())
			}}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Get("https://" + host + "/get")
		if err != nil {
			return 0, wt.Seen{}, err
		}
		defer resp.Body.Close()
		var s wt.Seen
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == 200 {
			if err := json.Unmarshal(body, &s); err != nil {
				t.Fatalf("body %q: %v", body, err)
			}
		}
		if h2 && resp.StatusCode == 200 && s.Proto == "" {
			t.Errorf("%s: the backend did not say which protocol it saw", host)
		}
		if h2 && resp.ProtoMajor != 2 {
			t.Errorf("%s: HTTP/%d, want HTTP/2 negotiated by ALPN", host, resp.ProtoMajor)
		}
		// HTTP/2 is the client's with the gateway; the backend is spoken
		// to in HTTP/1.1 (it may know nothing else).
		if s.Proto != "" && s.Proto != "HTTP/1.1" {
			t.Errorf("%s: the backend was sent %s, want HTTP/1.1", host, s.Proto)
		}
		return resp.StatusCode, s, nil
	}
	// Each name gets its own listener's certificate: trusting only that one
	// proves which was served.
	for _, c := range []struct {
		host  string
		roots *x509.CertPool
		h2    bool
	}{{"shop.example.com", shop, false}, {"cart.example.com", wild, false}, {"shop.example.com", shop, true}} {
		code, seen, err := get(c.host, c.roots, c.h2)
		if err != nil || code != 200 || seen.Pod != "httpbin-0" {
			t.Errorf("https://%s/get: %d %q %v, want 200 from httpbin-0", c.host, code, seen.Pod, err)
		}
	}
	if _, _, err := get("shop.example.com", wild, false); err == nil {
		t.Error("shop.example.com was served the wildcard certificate, want its own listener's")
	}
	if _, _, err := get("other.org", shop, false); err == nil {
		t.Error("a server name no listener serves completed the handshake")
	}
}

// A route in the Gateway's namespace sending to a Service of another
// namespace is served only while a ReferenceGrant there permits it;
// otherwise that backend answers 500 (HTTPRouteReferenceGrant).
func TestIngressCrossNamespaceBackendNeedsReferenceGrant(t *testing.T) {
	d := newIngressDemo(t)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: remote, namespace: istio-ingress}
spec:
  parentRefs: [{name: gateway}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /remote}}]
    backendRefs: [{name: httpbin, namespace: ambient-demo, port: 8080}]
`)
	waitCode := func(want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			code, _ := d.get(t, "/remote", "")
			if code == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET /remote: %d, want %d", code, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitCode(http.StatusInternalServerError)
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-ingress, namespace: ambient-demo}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: istio-ingress}]
  to: [{group: "", kind: Service, name: httpbin}]
`)
	waitCode(http.StatusOK)
	d.m.DeleteL7("gateway.networking.k8s.io", "ReferenceGrant", "from-ingress")
	waitCode(http.StatusInternalServerError)
}

// An HTTPS listener's certificate from a Secret of another namespace is
// served, from its own directory, once a ReferenceGrant permits it
// (GatewaySecretReferenceGrantSpecific).
func TestIngressCertificateFromAnotherNamespace(t *testing.T) {
	d := newIngressDemo(t)
	roots := d.gw.WriteCertificate(t, "ambient-demo_shop-cert", "shop.example.com")
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gateway, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 18080
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
  - name: shop
    port: 18443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop-cert, namespace: ambient-demo}]}
    allowedRoutes: {namespaces: {from: All}}
`)
	d.gw.WaitReady(d.m)
	if ports := d.gw.Server.Plan(); len(ports) != 1 {
		t.Fatalf("planned ports %v without a ReferenceGrant, want only HTTP", ports)
	}
	d.m.ApplyL7(`
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: certs, namespace: ambient-demo}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: istio-ingress}]
  to: [{group: "", kind: Secret, name: shop-cert}]
`)
	deadline := time.Now().Add(5 * time.Second)
	for len(d.gw.Server.Plan()) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("the HTTPS listener was not planned after the ReferenceGrant")
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.gw.WaitReady(d.m)
	tr := &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: "shop.example.com"},
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "tcp", netip.AddrPortFrom(d.gw.IP, 18443).String())
		}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("https://shop.example.com/get")
	if err != nil {
		t.Fatalf("HTTPS with the granted certificate: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("HTTPS /get: %d, want 200", resp.StatusCode)
	}
}
