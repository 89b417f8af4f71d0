package route

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

const l4Gateway = `
metadata: {name: edge, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - name: passthrough
    port: 443
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}}
  - name: shop-only
    hostname: shop.example.com
    port: 8443
    protocol: TLS
    tls: {mode: Passthrough}
    allowedRoutes: {namespaces: {from: All}}
  - name: db
    port: 5432
    protocol: TCP
    allowedRoutes: {namespaces: {from: All}}
  - name: web
    port: 80
    protocol: HTTP
    allowedRoutes: {namespaces: {from: All}}
`

func decode[T any](t *testing.T, y string) *T {
	t.Helper()
	v := new(T)
	if err := yaml.UnmarshalStrict([]byte(y), v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TLSRoutes pick a backend by the ClientHello's server name (most specific
// hostname first, oldest route on a tie); TCPRoutes by port; each kind
// attaches only to listeners of its protocol.
func TestL4Routes(t *testing.T) {
	gw := gateway(t, l4Gateway)
	older := metav1.NewTime(time.Unix(1000, 0))
	tlsRoutes := []*gwv1.TLSRoute{
		decode[gwv1.TLSRoute](t, `
metadata: {name: shop, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: shop, port: 8443}]}]
`),
		decode[gwv1.TLSRoute](t, `
metadata: {name: wildcard, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress, sectionName: passthrough}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: catchall, port: 8443}]}]
`),
		// Claims shop.example.com too, but is newer than "shop".
		decode[gwv1.TLSRoute](t, `
metadata: {name: shop-late, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress, sectionName: passthrough}]
  hostnames: [shop.example.com]
  rules: [{backendRefs: [{name: impostor, port: 8443}]}]
`),
		// Attaches to the shop-only listener, but only for the listener's
		// host: cart.example.com is not served there.
		decode[gwv1.TLSRoute](t, `
metadata: {name: cart, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress, port: 8443}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: cart, port: 8443}]}]
`),
		// A TLSRoute naming the HTTP listener does not attach.
		decode[gwv1.TLSRoute](t, `
metadata: {name: on-http, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress, sectionName: web}]
  hostnames: [web.example.com]
  rules: [{backendRefs: [{name: web, port: 80}]}]
`),
	}
	for _, r := range tlsRoutes[1:] {
		r.CreationTimestamp = metav1.NewTime(time.Unix(5000, 0))
	}
	tlsRoutes[0].CreationTimestamp = older
	tcpRoutes := []*gwv1.TCPRoute{
		decode[gwv1.TCPRoute](t, `
metadata: {name: db, namespace: apps}
spec:
  parentRefs: [{name: edge, namespace: istio-ingress}]
  rules: [{backendRefs: [{name: postgres, port: 5432, weight: 1}]}]
`),
		// Another namespace's backend without a ReferenceGrant.
		decode[gwv1.TCPRoute](t, `
metadata: {name: remote-db, namespace: istio-ingress}
spec:
  parentRefs: [{name: edge, sectionName: db}]
  rules: [{backendRefs: [{name: postgres, namespace: data, port: 5432}]}]
`),
	}
	tcpRoutes[1].CreationTimestamp = metav1.NewTime(time.Unix(2000, 0))
	tcpRoutes[0].CreationTimestamp = older
	tbl, errs := BuildGateway(gw, nil, nil, nil, L4Routes{TLS: tlsRoutes, TCP: tcpRoutes})
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "data/postgres") {
		t.Fatalf("errors: %v, want one for the ungranted backend data/postgres", errs)
	}
	for _, c := range []struct {
		port uint16
		sni  string
		want string // backend Service name; "" for no route
	}{
		{443, "shop.example.com", "shop"},
		{443, "SHOP.example.com.", "shop"},
		{443, "cart.example.com", "catchall"},
		{443, "a.b.example.com", "catchall"},
		{443, "example.com", ""},
		{443, "other.org", ""},
		{443, "", ""},
		{8443, "shop.example.com", "shop"},
		{8443, "cart.example.com", ""},
		{5432, "", "postgres"},
		{80, "web.example.com", ""},
		{9999, "shop.example.com", ""},
	} {
		r, ok := tbl.LookupL4(c.port, c.sni)
		got := ""
		if ok {
			got = r.Backends[0].Service.Name
		}
		if got != c.want {
			t.Errorf("port %d SNI %q -> %q, want %q", c.port, c.sni, got, c.want)
		}
	}
	// The oldest TCPRoute on the port wins; the other's backend would need
	// a grant.
	r, _ := tbl.LookupL4(5432, "")
	if r.Route != "apps/db" || r.Backends[0].Invalid != "" {
		t.Errorf("TCP rule %+v, want apps/db with a valid backend", r)
	}
	tcpRoutes[1].CreationTimestamp = metav1.NewTime(time.Unix(10, 0))
	tbl, _ = BuildGateway(gw, nil, nil, nil, L4Routes{TCP: tcpRoutes})
	if r, _ := tbl.LookupL4(5432, ""); r.Route != "istio-ingress/remote-db" || r.Backends[0].Invalid == "" {
		t.Errorf("TCP rule %+v, want istio-ingress/remote-db with its backend refused (no ReferenceGrant)", r)
	}
	grants := NewGrants([]Grant{{Namespace: "data", Spec: gwv1.ReferenceGrantSpec{
		From: []gwv1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "TCPRoute", Namespace: "istio-ingress"}},
		To:   []gwv1.ReferenceGrantTo{{Group: "", Kind: "Service"}},
	}}})
	tbl, _ = BuildGateway(gw, grants, nil, nil, L4Routes{TCP: tcpRoutes})
	if r, _ := tbl.LookupL4(5432, ""); r.Backends[0].Invalid != "" {
		t.Errorf("granted TCP backend refused: %s", r.Backends[0].Invalid)
	}
	// The mesh table (no Gateway) compiles no L4 routes.
	if tbl, _ := Build(nil, nil); tbl.l4 == nil || len(tbl.l4) != 0 {
		t.Errorf("mesh table has L4 routes: %v", tbl.l4)
	}
}

// Route kinds attach only to listeners of their protocol.
func TestListenerAllowsKindsByProtocol(t *testing.T) {
	gw := gateway(t, l4Gateway)
	ls := map[gwv1.SectionName]gwv1.Listener{}
	for _, l := range gw.Spec.Listeners {
		ls[l.Name] = l
	}
	for _, c := range []struct {
		listener gwv1.SectionName
		kind     string
		want     bool
	}{
		{"passthrough", "TLSRoute", true}, {"passthrough", "HTTPRoute", false}, {"passthrough", "TCPRoute", false},
		{"db", "TCPRoute", true}, {"db", "TLSRoute", false}, {"db", "HTTPRoute", false},
		{"web", "HTTPRoute", true}, {"web", "GRPCRoute", true}, {"web", "TLSRoute", false}, {"web", "TCPRoute", false},
	} {
		if got := ListenerAllows(gw, ls[c.listener], "apps", c.kind); got != c.want {
			t.Errorf("listener %s admits %s = %v, want %v", c.listener, c.kind, got, c.want)
		}
	}
}
