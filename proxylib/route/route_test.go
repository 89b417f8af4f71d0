package route

import (
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

func httpRoute(t *testing.T, y string) *gwv1.HTTPRoute {
	t.Helper()
	r := &gwv1.HTTPRoute{}
	if err := yaml.UnmarshalStrict([]byte(y), r); err != nil {
		t.Fatal(err)
	}
	if r.Namespace == "" {
		r.Namespace = "default"
	}
	return r
}

func grpcRoute(t *testing.T, y string) *gwv1.GRPCRoute {
	t.Helper()
	r := &gwv1.GRPCRoute{}
	if err := yaml.UnmarshalStrict([]byte(y), r); err != nil {
		t.Fatal(err)
	}
	if r.Namespace == "" {
		r.Namespace = "default"
	}
	return r
}

// The seeds' route: every request for echo goes to echo-v1.
const seedRoute = `
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: echo}
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - backendRefs:
    - name: echo-v1
      port: 80
`

const precedenceRoute = `
metadata: {name: prec}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: root, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2/}}]
    backendRefs: [{name: apiv2, port: 80}]
  - matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: post, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-user, value: alice}]}]
    backendRefs: [{name: alice, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-user, value: alice}, {name: x-env, type: RegularExpression, value: "can.*"}]}]
    backendRefs: [{name: alicecanary, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: v, value: "2"}]}]
    backendRefs: [{name: query, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
    backendRefs: [{name: regex, port: 80}]
`

func TestLookupPrecedence(t *testing.T) {
	tbl, errs := Build([]*gwv1.HTTPRoute{httpRoute(t, seedRoute), httpRoute(t, precedenceRoute)}, nil)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	tests := []struct {
		name, svc, method, target string
		hdr                       map[string]string
		want                      string // backend name; "" = no match
	}{
		{"seed echo to echo-v1", "echo", "GET", "/anything", nil, "echo-v1"},
		{"seed echo post", "echo", "POST", "/", nil, "echo-v1"},
		{"root prefix", "svc", "GET", "/x", nil, "root"},
		{"prefix is element-wise", "svc", "GET", "/apix", nil, "root"},
		{"exact beats prefix", "svc", "GET", "/api", nil, "exact"},
		{"prefix with trailing slash in rule", "svc", "GET", "/api/v2", nil, "apiv2"},
		{"longest prefix", "svc", "GET", "/api/v2/users", nil, "apiv2"},
		{"method beats headers", "svc", "POST", "/api/users", map[string]string{"X-User": "alice"}, "post"},
		{"more headers win", "svc", "GET", "/api/users", map[string]string{"X-User": "alice", "X-Env": "canary"}, "alicecanary"},
		{"header value exact", "svc", "GET", "/api/users", map[string]string{"X-User": "alicex"}, "api"},
		{"one header", "svc", "GET", "/api/users", map[string]string{"x-user": "alice"}, "alice"},
		{"query match", "svc", "GET", "/q?v=2", nil, "query"},
		{"query mismatch", "svc", "GET", "/q?v=3", nil, "root"},
		{"regex path", "svc", "GET", "/re/42", nil, "regex"},
		{"regex anchored", "svc", "GET", "/re/42/x", nil, "root"},
		{"unknown service", "other", "GET", "/", nil, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := httptest.NewRequest(tc.method, "http://h"+tc.target, nil)
			for k, v := range tc.hdr {
				req.Header.Set(k, v)
			}
			m, ok := tbl.Lookup(ServiceKey{"default", tc.svc}, 80, "default", req)
			if tc.want == "" {
				if ok {
					t.Fatalf("matched %s, want none", m.Rule.Backends[0].Service)
				}
				return
			}
			if !ok {
				t.Fatal("no match")
			}
			b, ok := m.Rule.PickBackend(nil)
			if !ok || b.Service.Name != tc.want {
				t.Fatalf("backend %v, want %s", b.Service, tc.want)
			}
		})
	}
}

func TestOldestRouteWinsTies(t *testing.T) {
	a := httpRoute(t, strings.ReplaceAll(seedRoute, "echo-v1", "older"))
	b := httpRoute(t, strings.ReplaceAll(seedRoute, "echo-v1", "newer"))
	a.Name, b.Name = "z-route", "a-route"
	a.CreationTimestamp.Time = b.CreationTimestamp.Time.Add(-1e9)
	if a.CreationTimestamp.Time.IsZero() {
		t.Fatal("setup")
	}
	tbl, _ := Build([]*gwv1.HTTPRoute{b, a}, nil)
	m, ok := tbl.Lookup(ServiceKey{"default", "echo"}, 80, "default", httptest.NewRequest("GET", "/", nil))
	if !ok || m.Rule.Backends[0].Service.Name != "older" {
		t.Fatalf("got %+v, want older route", m.Rule)
	}
}

func TestParentPortAndConsumerRoutes(t *testing.T) {
	portRoute := httpRoute(t, `
metadata: {name: p, namespace: prod}
spec:
  parentRefs: [{kind: Service, name: api, port: 8080}]
  rules: [{backendRefs: [{name: api-8080, port: 8080}]}]
`)
	producer := httpRoute(t, `
metadata: {name: producer, namespace: prod}
spec:
  parentRefs: [{kind: Service, name: api}]
  rules: [{backendRefs: [{name: api-v1, port: 80}]}]
`)
	consumer := httpRoute(t, `
metadata: {name: consumer, namespace: team-a}
spec:
  parentRefs: [{kind: Service, name: api, namespace: prod}]
  rules: [{backendRefs: [{name: api-v2, namespace: prod, port: 80}]}]
`)
	// A mesh route needs no ReferenceGrant for a backend in another
	// namespace (GEP-1294): the consumer route's backend is served.
	tbl, errs := Build([]*gwv1.HTTPRoute{portRoute, producer, consumer}, nil)
	if len(errs) != 0 {
		t.Fatalf("errs %v, want none", errs)
	}
	svc := ServiceKey{"prod", "api"}
	req := httptest.NewRequest("GET", "/", nil)
	m, _ := tbl.Lookup(svc, 80, "prod", req)
	if m.Rule.Backends[0].Service.Name != "api-v1" {
		t.Errorf("producer route: got %v", m.Rule.Backends[0].Service)
	}
	m, _ = tbl.Lookup(svc, 8080, "prod", req)
	if m.Rule.Backends[0].Service.Name != "api-8080" {
		t.Errorf("port route: got %v", m.Rule.Backends[0].Service)
	}
	m, _ = tbl.Lookup(svc, 80, "team-a", req)
	if m.Rule.Route != "team-a/consumer" || m.Rule.Backends[0].Invalid != "" || m.Rule.Backends[0].Service != (ServiceKey{"prod", "api-v2"}) {
		t.Errorf("consumer route: got %+v", m.Rule)
	}
}

// TestRoutesApplyToPortAndClientNamespace guards the default route: a
// request that no route applies to (a route scoped to another Service
// port, another namespace's consumer route) goes to the Service as if it
// had no routes, instead of 404 (the MeshPorts and MeshConsumerRoute
// conformance tests; both answered 404 before).
func TestRoutesApplyToPortAndClientNamespace(t *testing.T) {
	port80 := httpRoute(t, `
metadata: {name: port80, namespace: mesh}
spec:
  parentRefs: [{kind: Service, name: echo-v1, port: 80}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
`)
	consumer := httpRoute(t, `
metadata: {name: consumer, namespace: mesh-consumer}
spec:
  parentRefs: [{kind: Service, name: echo-v2, namespace: mesh}]
  rules: [{backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]}]
`)
	tbl, errs := Build([]*gwv1.HTTPRoute{port80, consumer}, nil)
	if len(errs) != 0 {
		t.Fatalf("errs %v, want none", errs)
	}
	v1, v2 := ServiceKey{"mesh", "echo-v1"}, ServiceKey{"mesh", "echo-v2"}
	for _, tc := range []struct {
		name  string
		svc   ServiceKey
		port  uint16
		srcNS string
		route string // "" when no route applies
	}{
		{"port-scoped route, its port", v1, 80, "mesh", "mesh/port80"},
		{"port-scoped route, another port", v1, 8080, "mesh", ""},
		{"consumer route, its namespace", v2, 80, "mesh-consumer", "mesh-consumer/consumer"},
		{"consumer route, producer namespace", v2, 80, "mesh", ""},
		{"consumer route, third namespace", v2, 8080, "other", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tbl.HasRoutesFor(tc.svc, tc.port, tc.srcNS); got != (tc.route != "") {
				t.Errorf("HasRoutesFor = %v, want %v", got, tc.route != "")
			}
			m, ok := tbl.Lookup(tc.svc, tc.port, tc.srcNS, httptest.NewRequest("GET", "/", nil))
			if tc.route == "" {
				if ok {
					t.Errorf("Lookup matched %s, want no route", m.Rule.Route)
				}
				return
			}
			if !ok || m.Rule.Route != tc.route {
				t.Errorf("Lookup = %v %+v, want route %s", ok, m.Rule, tc.route)
			}
		})
	}
	if !tbl.HasRoutes(v2) {
		t.Error("HasRoutes(echo-v2) = false: a consumer route attaches to it")
	}
}

// binomialOK checks k successes out of n against p within 5 standard
// deviations: false failures are ~1e-6, a wrong split fails reliably.
func binomialOK(k, n int, p float64) bool {
	mean := float64(n) * p
	sd := math.Sqrt(float64(n) * p * (1 - p))
	return math.Abs(float64(k)-mean) <= 5*sd
}

func TestWeightedSplit(t *testing.T) {
	r := httpRoute(t, `
metadata: {name: split}
spec:
  parentRefs: [{kind: Service, name: echo}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
    - {name: never, port: 80, weight: 0}
`)
	tbl, _ := Build([]*gwv1.HTTPRoute{r}, nil)
	m, _ := tbl.Lookup(ServiceKey{"default", "echo"}, 80, "default", httptest.NewRequest("GET", "/", nil))
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	counts := map[string]int{}
	const n = 10000
	for range n {
		b, ok := m.Rule.PickBackend(rng)
		if !ok {
			t.Fatal("no backend")
		}
		counts[b.Service.Name]++
	}
	if counts["never"] != 0 || !binomialOK(counts["echo-v2"], n, 0.1) || counts["echo-v1"]+counts["echo-v2"] != n {
		t.Fatalf("split %v out of bounds for 90/10", counts)
	}
}

func TestZeroWeightsAndInvalidRules(t *testing.T) {
	r := httpRoute(t, `
metadata: {name: bad}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules:
  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: a, port: 80, weight: 0}]
  - matches: [{path: {value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}]
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {value: /noport}}]
    backendRefs: [{name: a}]
  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
    backendRefs: [{name: a, port: 80}]
`)
	tbl, errs := Build([]*gwv1.HTTPRoute{r}, nil)
	if len(errs) != 3 {
		t.Fatalf("want 3 errors (mirror, port, regex), got %v", errs)
	}
	look := func(p string) Match {
		m, ok := tbl.Lookup(ServiceKey{"default", "svc"}, 80, "default", httptest.NewRequest("GET", p, nil))
		if !ok {
			t.Fatalf("%s: no match", p)
		}
		return m
	}
	if _, ok := look("/zero").Rule.PickBackend(nil); ok {
		t.Error("all-zero weights must not pick a backend")
	}
	if look("/mirror").Rule.Invalid == "" {
		t.Error("unsupported filter must make the rule invalid")
	}
	if b, _ := look("/noport").Rule.PickBackend(nil); b.Invalid == "" {
		t.Error("backend without port must be invalid")
	}
	if _, ok := tbl.Lookup(ServiceKey{"default", "svc"}, 80, "default", httptest.NewRequest("GET", "/x", nil)); ok {
		t.Error("a broken regex match must never match")
	}
}

func TestFilters(t *testing.T) {
	r := httpRoute(t, `
metadata: {name: f}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules:
  - matches: [{path: {value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8443}}]
  - matches: [{path: {value: /v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: s}]
        add: [{name: x-add, value: a2}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: r}], remove: [server]}
    backendRefs:
    - name: v1
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: v1}]}}]
  - matches: [{path: {value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /fixed}}}]
    backendRefs: [{name: v1, port: 80}]
`)
	tbl, errs := Build([]*gwv1.HTTPRoute{r}, nil)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	svc := ServiceKey{"default", "svc"}
	redirects := []struct {
		target, host, loc string
		code              int
	}{
		{"/old/a?x=1", "svc:8080", "https://new.example/new/a?x=1", 301},
		{"/old", "svc", "https://new.example/new", 301},
		{"/port/p", "svc:8080", "http://svc:8443/port/p", 302},
	}
	for _, tc := range redirects {
		req := httptest.NewRequest("GET", tc.target, nil)
		req.Host = tc.host
		m, _ := tbl.Lookup(svc, 80, "default", req)
		if !m.IsRedirect() {
			t.Fatalf("%s: not a redirect", tc.target)
		}
		if code, loc := m.Redirect(req); code != tc.code || loc != tc.loc {
			t.Errorf("%s: got %d %s, want %d %s", tc.target, code, loc, tc.code, tc.loc)
		}
	}
	req := httptest.NewRequest("GET", "/v1/users", nil)
	req.Header.Set("X-Set", "client")
	req.Header.Set("X-Add", "a1")
	req.Header.Set("X-Remove", "gone")
	m, _ := tbl.Lookup(svc, 80, "default", req)
	b, _ := m.Rule.PickBackend(nil)
	m.ApplyRequest(req, b)
	if req.URL.Path != "/users" || req.Host != "internal" {
		t.Errorf("rewrite: path %q host %q", req.URL.Path, req.Host)
	}
	if req.Header.Get("X-Set") != "s" || strings.Join(req.Header.Values("X-Add"), ",") != "a1,a2" ||
		req.Header.Get("X-Remove") != "" || req.Header.Get("X-Backend") != "v1" {
		t.Errorf("request headers: %v", req.Header)
	}
	resp := http.Header{"Server": {"x"}}
	m.ApplyResponse(resp, b)
	if resp.Get("X-Resp") != "r" || resp.Get("Server") != "" {
		t.Errorf("response headers: %v", resp)
	}
	req = httptest.NewRequest("GET", "/full/a/b", nil)
	m, _ = tbl.Lookup(svc, 80, "default", req)
	m.ApplyRequest(req, b)
	if req.URL.Path != "/fixed" {
		t.Errorf("full rewrite: %q", req.URL.Path)
	}
}

func TestTimeoutsAndRetry(t *testing.T) {
	r := httpRoute(t, `
metadata: {name: t}
spec:
  parentRefs: [{kind: Service, name: svc}]
  rules:
  - timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [503, 502], attempts: 3, backoff: 100ms}
    backendRefs: [{name: a, port: 80}]
`)
	tbl, errs := Build([]*gwv1.HTTPRoute{r}, nil)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	m, _ := tbl.Lookup(ServiceKey{"default", "svc"}, 80, "default", httptest.NewRequest("GET", "/", nil))
	rl := m.Rule
	if rl.Timeout.Seconds() != 10 || rl.BackendTimeout.Seconds() != 2 || rl.Retry.Attempts != 3 ||
		!rl.Retry.Codes[503] || !rl.Retry.Codes[502] || rl.Retry.Codes[500] || rl.Retry.Backoff.Milliseconds() != 100 {
		t.Fatalf("rule %+v retry %+v", rl, rl.Retry)
	}
}

func TestGRPCRoute(t *testing.T) {
	g := grpcRoute(t, `
metadata: {name: g}
spec:
  parentRefs: [{kind: Service, name: grpc}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Ping}}]
    backendRefs: [{name: ping, port: 9000}]
  - matches: [{method: {service: echo.Echo}}]
    backendRefs: [{name: echo-any, port: 9000}]
  - matches: [{method: {type: RegularExpression, service: "admin\\..*"}, headers: [{name: x-admin, value: "yes"}]}]
    backendRefs: [{name: admin, port: 9000}]
  - backendRefs: [{name: fallback, port: 9000}]
`)
	h := httpRoute(t, `
metadata: {name: h}
spec:
  parentRefs: [{kind: Service, name: grpc}]
  rules: [{backendRefs: [{name: http-only, port: 9000}]}]
`)
	tbl, errs := Build([]*gwv1.HTTPRoute{h}, []*gwv1.GRPCRoute{g})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	tests := []struct {
		path  string
		grpc  bool
		admin bool
		want  string
	}{
		{"/echo.Echo/Ping", true, false, "ping"},
		{"/echo.Echo/Other", true, false, "echo-any"},
		{"/admin.Svc/Do", true, true, "admin"},
		{"/admin.Svc/Do", true, false, "fallback"},
		{"/echo.Echo/Ping", false, false, "http-only"},
	}
	for _, tc := range tests {
		req := httptest.NewRequest("POST", tc.path, nil)
		if tc.grpc {
			req.ProtoMajor = 2
			req.Header.Set("Content-Type", "application/grpc+proto")
		}
		if tc.admin {
			req.Header.Set("X-Admin", "yes")
		}
		m, ok := tbl.Lookup(ServiceKey{"default", "grpc"}, 9000, "default", req)
		if !ok || m.Rule.Backends[0].Service.Name != tc.want {
			t.Errorf("%s grpc=%v: got %+v, want %s", tc.path, tc.grpc, m.Rule, tc.want)
		}
	}
}

func TestPrefixRewrite(t *testing.T) {
	p := func(s string) *string { return &s }
	tests := []struct{ prefix, repl, path, want string }{
		{"/api", "/v2", "/api/x", "/v2/x"},
		{"/api/", "/v2", "/api/x", "/v2/x"},
		{"/api", "/", "/api/x", "/x"},
		{"/api", "/", "/api", "/"},
		{"/", "/pre", "/x", "/pre/x"},
		{"/api", "/v2/", "/api", "/v2"},
	}
	for _, tc := range tests {
		got := (&pathMod{prefix: p(tc.repl)}).rewritePath(tc.path, tc.prefix)
		if got != tc.want {
			t.Errorf("prefix %s -> %s on %s: got %s want %s", tc.prefix, tc.repl, tc.path, got, tc.want)
		}
	}
}
