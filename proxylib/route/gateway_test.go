package route

import (
	"net/http/httptest"
	"reflect"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

// The seeds' ingress Gateway: HTTP on 80, routes from every namespace.
const seedsGateway = `
metadata: {name: gateway, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
  - name: same-only
    hostname: internal.example.com
    port: 8080
    protocol: HTTP
  - name: wildcard
    hostname: "*.example.com"
    port: 9090
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
  - name: exact
    hostname: shop.example.com
    port: 9090
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}, kinds: [{kind: GRPCRoute}]}
`

func gateway(t *testing.T, y string) *gwv1.Gateway {
	t.Helper()
	g := &gwv1.Gateway{}
	if err := yaml.UnmarshalStrict([]byte(y), g); err != nil {
		t.Fatal(err)
	}
	return g
}

func TestGatewayAttachmentAndHostnames(t *testing.T) {
	gw := gateway(t, seedsGateway)
	routes := []*gwv1.HTTPRoute{
		// The seeds' HTTPRoute: in the app namespace, parent the Gateway.
		httpRoute(t, `
metadata: {name: httpbin, namespace: ambient-demo}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /get}}]
    backendRefs: [{name: httpbin, port: 8000}]
`),
		// Another namespace's route on a Same-only listener: not attached.
		httpRoute(t, `
metadata: {name: sneaky, namespace: ambient-demo}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: same-only}]
  rules: [{backendRefs: [{name: sneaky, port: 80}]}]
`),
		httpRoute(t, `
metadata: {name: internal, namespace: istio-ingress}
spec:
  parentRefs: [{name: gateway, sectionName: same-only}]
  rules: [{backendRefs: [{name: internal, port: 80}]}]
`),
		// A route for a host outside the listener's: not attached.
		httpRoute(t, `
metadata: {name: elsewhere, namespace: ambient-demo}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, port: 9090}]
  hostnames: [other.org]
  rules: [{backendRefs: [{name: elsewhere, port: 80}]}]
`),
		// Narrower than the wildcard listener; the exact listener only
		// admits GRPCRoutes, so the HTTPRoute attaches through the wildcard.
		httpRoute(t, `
metadata: {name: shop, namespace: ambient-demo}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, port: 9090}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: shop, port: 80}]}]
`),
		httpRoute(t, `
metadata: {name: any-sub, namespace: ambient-demo}
spec:
  parentRefs: [{name: gateway, namespace: istio-ingress, sectionName: wildcard}]
  rules: [{backendRefs: [{name: anysub, port: 80}]}]
`),
		// A Service parent is the mesh's, never the Gateway's.
		httpRoute(t, seedRoute),
	}
	tbl, errs := BuildGateway(gw, nil, routes, nil, L4Routes{})
	if len(errs) != 0 {
		t.Fatalf("errors: %v", errs)
	}
	cases := []struct {
		port       uint16
		host, path string
		want       string // backend service name; "" for no match
	}{
		{80, "203.0.113.10", "/get", "httpbin"},
		{80, "anything.test:80", "/get?x=1", "httpbin"},
		{80, "203.0.113.10", "/status/200", ""},
		{8080, "internal.example.com", "/", "internal"},
		{8080, "other.example.com", "/", ""},
		{9090, "shop.example.com", "/", "shop"},
		{9090, "SHOP.example.com.", "/", "shop"},
		{9090, "cart.example.com", "/", "anysub"},
		{9090, "a.b.example.com", "/", "anysub"},
		{9090, "example.com", "/", ""},
		{9090, "other.org", "/", ""},
		{81, "203.0.113.10", "/get", ""},
	}
	for _, c := range cases {
		req := httptest.NewRequest("GET", "http://x"+c.path, nil)
		req.Host = c.host
		m, ok := tbl.LookupGateway(c.port, req)
		got := ""
		if ok {
			got = m.Rule.Backends[0].Service.Name
		}
		if got != c.want {
			t.Errorf(":%d %s%s routed to %q, want %q", c.port, c.host, c.path, got, c.want)
		}
	}
	// Service lookups never see Gateway routes, and vice versa.
	svcTable, _ := Build(routes, nil)
	if _, ok := svcTable.LookupGateway(80, httptest.NewRequest("GET", "/get", nil)); ok {
		t.Error("a mesh (Service) table answered a Gateway lookup")
	}
	if _, ok := tbl.Lookup(ServiceKey{"default", "echo"}, 80, "default", httptest.NewRequest("GET", "/", nil)); ok {
		t.Error("a Gateway table answered a Service lookup")
	}
}

func TestIntersectHostnames(t *testing.T) {
	h := func(s string) *gwv1.Hostname { v := gwv1.Hostname(s); return &v }
	cases := []struct {
		listener *gwv1.Hostname
		route    []gwv1.Hostname
		want     []string
		ok       bool
	}{
		{nil, nil, nil, true},
		{h("a.com"), nil, []string{"a.com"}, true},
		{nil, []gwv1.Hostname{"B.com"}, []string{"b.com"}, true},
		{h("*.a.com"), []gwv1.Hostname{"x.a.com", "y.b.com"}, []string{"x.a.com"}, true},
		{h("x.a.com"), []gwv1.Hostname{"*.a.com"}, []string{"x.a.com"}, true},
		{h("a.com"), []gwv1.Hostname{"*.a.com"}, nil, false},
		{h("a.com"), []gwv1.Hostname{"b.com"}, nil, false},
	}
	for _, c := range cases {
		got, ok := IntersectHostnames(c.listener, c.route)
		if ok != c.ok || len(got) != len(c.want) || (len(got) > 0 && got[0] != c.want[0]) {
			t.Errorf("IntersectHostnames(%v, %v) = %v, %v; want %v, %v", c.listener, c.route, got, ok, c.want, c.ok)
		}
	}
}

func TestPlan(t *testing.T) {
	gw := gateway(t, `
metadata: {name: gw, namespace: edge}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - name: shop
    hostname: shop.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop-cert}]}
  - name: any
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, group: "", name: wildcard-cert}]}
  - {name: no-certs, port: 8443, protocol: HTTPS}
  - name: passthrough
    port: 9443
    protocol: TLS
    tls: {mode: Passthrough}
  - name: tls-terminate
    port: 9444
    protocol: TLS
    tls: {mode: Terminate, certificateRefs: [{name: shop-cert}]}
  - name: other-ns-cert
    port: 10443
    protocol: HTTPS
    tls: {certificateRefs: [{name: c, namespace: elsewhere}]}
  - {name: http-on-443, port: 443, protocol: HTTP}
  - {name: tcp, port: 5432, protocol: TCP}
  - {name: tcp-again, port: 5432, protocol: TCP}
  - {name: tls-on-tcp, port: 5432, protocol: TLS, tls: {mode: Passthrough}}
  - {name: tcp-with-httproutes, port: 5433, protocol: TCP, allowedRoutes: {kinds: [{kind: HTTPRoute}]}}
  - {name: udp, port: 53, protocol: UDP}
`)
	ports, rejected := Plan(gw, nil)
	type pp struct {
		port  uint16
		proto gwv1.ProtocolType
		n     int
	}
	var got []pp
	for _, p := range ports {
		got = append(got, pp{p.Port, p.Protocol, len(p.Listeners)})
	}
	want := []pp{{80, "HTTP", 1}, {443, "HTTPS", 2}, {5432, "TCP", 1}, {9443, "TLS", 1}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ports %+v, want %+v", got, want)
	}
	if !ports[1].Terminates() || ports[3].Terminates() || !ports[2].L4() || !ports[3].L4() || ports[0].L4() {
		t.Errorf("port kinds wrong: %+v", ports)
	}
	for name, reason := range map[gwv1.SectionName]gwv1.ListenerConditionReason{
		"no-certs":            gwv1.ListenerReasonInvalidCertificateRef,
		"tls-terminate":       gwv1.ListenerReasonUnsupportedValue,
		"other-ns-cert":       gwv1.ListenerReasonRefNotPermitted,
		"http-on-443":         gwv1.ListenerReasonProtocolConflict,
		"tcp-again":           gwv1.ListenerReasonHostnameConflict,
		"tls-on-tcp":          gwv1.ListenerReasonProtocolConflict,
		"tcp-with-httproutes": gwv1.ListenerReasonInvalidRouteKinds,
		"udp":                 gwv1.ListenerReasonUnsupportedProtocol,
	} {
		if r := rejected[name]; r.Message == "" || r.Reason != reason {
			t.Errorf("listener %s: rejection %+v, want reason %s", name, r, reason)
		}
	}
	if len(rejected) != 8 {
		t.Errorf("rejected %v, want exactly the eight unservable listeners", rejected)
	}
	if got := CertificateSecrets(gw.Namespace, ports); len(got) != 2 || got[0] != (SecretKey{"edge", "shop-cert"}) || got[1] != (SecretKey{"edge", "wildcard-cert"}) {
		t.Errorf("certificate Secrets %v", got)
	}
	for sni, want := range map[string]string{"shop.example.com": "shop", "cart.example.com": "any", "": "any"} {
		l, ok := ListenerFor(ports[1], sni)
		if !ok || string(l.Name) != want {
			t.Errorf("SNI %q -> listener %q (%v), want %q", sni, l.Name, ok, want)
		}
	}
	if _, ok := ListenerFor(Port{Listeners: ports[1].Listeners[:1]}, "other.org"); ok {
		t.Error("an SNI no listener names found a certificate")
	}
}

// Namespace selectors admit routes from the namespaces the control plane
// resolved; unresolved (a proxy never sees labels) they admit nothing.
func TestListenerNamespaceSelector(t *testing.T) {
	gw := gateway(t, `
metadata: {name: gw, namespace: edge}
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    port: 80
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: Selector
        selector: {matchLabels: {expose: "true"}}
`)
	l := gw.Spec.Listeners[0]
	if ListenerAllows(gw, l, "shop", "HTTPRoute") {
		t.Fatal("an unresolved selector admitted a route")
	}
	resolved := ResolveSelectors(gw, map[string]map[string]string{
		"shop": {"expose": "true"}, "internal": {"expose": "false"}, "edge": nil,
	})
	for ns, want := range map[string]bool{"shop": true, "internal": false, "edge": false, "unknown": false} {
		if got := ListenerAllows(resolved, l, ns, "HTTPRoute"); got != want {
			t.Errorf("route in %s admitted=%v, want %v", ns, got, want)
		}
	}
	if gw.Annotations[ListenerNamespacesAnnotation] != "" {
		t.Error("ResolveSelectors changed its input")
	}
	// A Gateway without selectors carries no (stale or forged) resolution.
	forged := gw.DeepCopy()
	forged.Spec.Listeners[0].AllowedRoutes = nil
	forged.Annotations = map[string]string{ListenerNamespacesAnnotation: `{"http":["shop"]}`}
	if _, ok := ResolveSelectors(forged, nil).Annotations[ListenerNamespacesAnnotation]; ok {
		t.Error("a Gateway without selectors kept a namespace resolution")
	}
}
