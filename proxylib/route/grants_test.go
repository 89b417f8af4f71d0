package route

import (
	"net/http/httptest"
	"strings"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

func grant(t *testing.T, ns, spec string) Grant {
	t.Helper()
	var s gwv1.ReferenceGrantSpec
	if err := yaml.UnmarshalStrict([]byte(spec), &s); err != nil {
		t.Fatal(err)
	}
	return Grant{Namespace: ns, Spec: s}
}

func TestGrantsPermits(t *testing.T) {
	// The conformance suite's grants: all Secrets of web-backend to
	// Gateways of infra, one Service of app-backend to HTTPRoutes of infra.
	grants := NewGrants([]Grant{
		grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret}]}`),
		grant(t, "app-backend", `{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: "", kind: Service, name: app-backend-v1}]}`),
		grant(t, "legacy", `{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: core, kind: Service}]}`),
	})
	gwFrom := Ref{Group: gwv1.GroupName, Kind: "Gateway", Namespace: "infra"}
	secret := func(ns, name string) Ref { return Ref{Kind: "Secret", Namespace: ns, Name: name} }
	cases := []struct {
		name     string
		g        *Grants
		from, to Ref
		want     bool
	}{
		{"same namespace needs no grant", nil, gwFrom, secret("infra", "cert"), true},
		{"no grants: another namespace refused", nil, gwFrom, secret("web-backend", "cert"), false},
		{"all Secrets of the namespace", grants, gwFrom, secret("web-backend", "anything"), true},
		{"grant for Secrets does not open Services", grants, gwFrom, Ref{Kind: "Service", Namespace: "web-backend", Name: "web"}, false},
		{"grant from another namespace", grants, Ref{Group: gwv1.GroupName, Kind: "Gateway", Namespace: "other"}, secret("web-backend", "cert"), false},
		{"grant in the wrong namespace", grants, gwFrom, secret("app-backend", "cert"), false},
		{"named Service", grants, Ref{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "infra"}, Ref{Kind: "Service", Namespace: "app-backend", Name: "app-backend-v1"}, true},
		{"another Service of the namespace", grants, Ref{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "infra"}, Ref{Kind: "Service", Namespace: "app-backend", Name: "app-backend-v2"}, false},
		{"HTTPRoute grant does not cover GRPCRoute", grants, Ref{Group: gwv1.GroupName, Kind: "GRPCRoute", Namespace: "infra"}, Ref{Kind: "Service", Namespace: "app-backend", Name: "app-backend-v1"}, false},
		{"group core is the core group", grants, Ref{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "infra"}, Ref{Kind: "Service", Namespace: "legacy", Name: "x"}, true},
	}
	for _, c := range cases {
		if got := c.g.Permits(c.from, c.to); got != c.want {
			t.Errorf("%s: Permits = %v, want %v", c.name, got, c.want)
		}
	}
}

// A certificateRef to another namespace's Secret is served only with a
// ReferenceGrant there (GatewaySecretReferenceGrant*,
// GatewaySecretMissingReferenceGrant), from its own directory.
func TestPlanCertificateReferenceGrants(t *testing.T) {
	gw := gateway(t, `
metadata: {name: gw, namespace: infra}
spec:
  gatewayClassName: istio
  listeners:
  - name: https
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{group: "", kind: Secret, name: certificate, namespace: web-backend}]}
`)
	cases := []struct {
		name   string
		grants []Grant
		served bool
	}{
		{"no grant", nil, false},
		{"all in namespace", []Grant{grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret}]}`)}, true},
		{"specific", []Grant{grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret, name: certificate}]}`)}, true},
		{"another Secret named", []Grant{grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret, name: other}]}`)}, false},
		{"for HTTPRoutes only", []Grant{grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: "", kind: Secret}]}`)}, false},
		// GatewaySecretInvalidReferenceGrant: every grant misses by one field.
		{"conformance's invalid grants", []Grant{
			grant(t, "app-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret, name: certificate}]}`),
			grant(t, "web-backend", `{from: [{group: not-the-group, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret, name: certificate}]}`),
			grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: "", kind: Secret, name: certificate}]}`),
			grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: not-the-namespace}], to: [{group: "", kind: Secret, name: certificate}]}`),
			grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: not-the-group, kind: Secret, name: other}]}`),
			grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Service, name: certificate}]}`),
			grant(t, "web-backend", `{from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}], to: [{group: "", kind: Secret, name: other}]}`),
		}, false},
	}
	for _, c := range cases {
		ports, rejected := Plan(gw, NewGrants(c.grants))
		if !c.served {
			if len(ports) != 0 || rejected["https"].Reason != gwv1.ListenerReasonRefNotPermitted || !rejected["https"].Refs {
				t.Errorf("%s: ports %v rejected %v, want the listener refused as RefNotPermitted", c.name, ports, rejected)
			}
			continue
		}
		if len(ports) != 1 || len(rejected) != 0 {
			t.Fatalf("%s: ports %v rejected %v, want the listener served", c.name, ports, rejected)
		}
		secrets := CertificateSecrets(gw.Namespace, ports)
		if len(secrets) != 1 || secrets[0] != (SecretKey{"web-backend", "certificate"}) {
			t.Errorf("%s: certificate Secrets %v", c.name, secrets)
		}
		if dir := CertificateDir(gw.Namespace, secrets[0]); dir != "web-backend_certificate" {
			t.Errorf("%s: certificate directory %q", c.name, dir)
		}
	}
	if dir := CertificateDir("infra", SecretKey{"infra", "certificate"}); dir != "certificate" {
		t.Errorf("own namespace's Secret directory %q, want its name", dir)
	}
}

// Routes attached to a Gateway reach Services of another namespace only
// when a ReferenceGrant there permits it; a backend it does not permit
// answers 500 while its siblings are served (HTTPRouteReferenceGrant,
// HTTPRoutePartiallyInvalidViaInvalidReferenceGrant).
func TestGatewayBackendReferenceGrants(t *testing.T) {
	gw := gateway(t, `
metadata: {name: same-namespace, namespace: infra}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
`)
	routes := []*gwv1.HTTPRoute{httpRoute(t, `
metadata: {name: invalid-reference-grant, namespace: infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: app-backend-v2, namespace: app-backend, port: 8080}]
  - backendRefs: [{name: app-backend-v1, namespace: app-backend, port: 8080}]
`)}
	grpc := []*gwv1.GRPCRoute{{}}
	if err := yaml.UnmarshalStrict([]byte(`
metadata: {name: grpc, namespace: infra}
spec:
  parentRefs: [{name: same-namespace}]
  rules: [{backendRefs: [{name: app-backend-v1, namespace: app-backend, port: 8080}]}]
`), grpc[0]); err != nil {
		t.Fatal(err)
	}
	v1Only := []Grant{grant(t, "app-backend", `{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: "", kind: Service, name: app-backend-v1}]}`)}
	cases := []struct {
		name          string
		grants        []Grant
		v1, v2, gRPCV bool // backend valid
	}{
		{"no grant", nil, false, false, false},
		{"grant for app-backend-v1", v1Only, true, false, false},
		{"grant for the whole namespace and GRPCRoutes", []Grant{grant(t, "app-backend",
			`{from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}, {group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: infra}], to: [{group: "", kind: Service}]}`)}, true, true, true},
	}
	for _, c := range cases {
		tbl, errs := BuildGateway(gw, NewGrants(c.grants), routes, grpc, L4Routes{})
		valid := func(path string, grpcReq bool) bool {
			req := httptest.NewRequest("POST", "http://x"+path, nil)
			if grpcReq {
				req.ProtoMajor = 2
				req.Header.Set("Content-Type", "application/grpc")
			}
			m, ok := tbl.LookupGateway(80, req)
			if !ok {
				t.Fatalf("%s: %s not routed", c.name, path)
			}
			b, picked := m.Rule.PickBackend(nil)
			return picked && b.Invalid == ""
		}
		if got := valid("/", false); got != c.v1 {
			t.Errorf("%s: app-backend-v1 valid=%v, want %v", c.name, got, c.v1)
		}
		if got := valid("/v2", false); got != c.v2 {
			t.Errorf("%s: app-backend-v2 valid=%v, want %v", c.name, got, c.v2)
		}
		if got := valid("/pkg.Svc/Method", true); got != c.gRPCV {
			t.Errorf("%s: GRPCRoute backend valid=%v, want %v", c.name, got, c.gRPCV)
		}
		for _, err := range errs {
			if !strings.Contains(err.Error(), "ReferenceGrant") {
				t.Errorf("%s: unexpected error %v", c.name, err)
			}
		}
	}
	// The same routes attached to a Service (GAMMA) need no grant.
	if BackendPermitted(nil, false, "HTTPRoute", "infra", "app-backend", "app-backend-v2") != true {
		t.Error("a mesh route's cross-namespace backend was refused")
	}
}
