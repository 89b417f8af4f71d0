package sidecar

import (
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/controllers/policy"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// publishPolicy publishes an AuthorizationPolicy as the control plane does:
// its L4 translation (lossy when it has L7 rules) to every proxy, and the
// whole policy as an L7 resource when it needs L7 attributes.
func publishPolicy(t *testing.T, m *meshtest.Mesh, y string) {
	t.Helper()
	var ap securityv1.AuthorizationPolicy
	if err := yaml.Unmarshal([]byte(y), &ap); err != nil {
		t.Fatal(err)
	}
	if out := policy.TranslateAuthorizationPolicy(meshtest.RootNamespace, &ap); out != nil {
		m.CP.Policy(out)
	}
	if policy.NeedsWaypoint(&ap) {
		m.CP.L7(y)
	}
}

// request sends one request from inside p (a new captured connection).
func request(t *testing.T, p *meshtest.Pod, method string, dst netip.AddrPort, path string) int {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+dst.String()+path, strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s%s from %s: %v", method, dst, path, p.PodName, err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// waitRequests waits for a request matching want.
func waitRequests(t *testing.T, what string, reg gatherer, want map[string]string) {
	t.Helper()
	waitMetric(t, what, reg, "istio_requests_total", want)
}

// TestSidecarL7Policy: an AuthorizationPolicy with L7 rules selecting a
// sidecar pod is enforced by that pod's sidecar request by request (as an
// Istio sidecar does), not by its lossy L4 form that would refuse every
// connection; opaque TCP still fails closed on the L7 rules; requests are
// reported with reporter="destination".
func TestSidecarL7Policy(t *testing.T) {
	c := newCoexistence(t)
	m := c.Mesh
	web := m.AddSidecarPod(m.Nodes[1], "sc-web-1", "sc-web", func(w *workloadapi.Workload) {
		w.AuthorizationPolicies = []string{"default/web-deny-admin", "default/web-allow"}
	})
	web.ServeHTTP(t, 80)
	web80 := web.Addr(80)
	meshtest.ExpectOK(t, c.sleep, web80, "sc-web-1") // no policy yet

	publishPolicy(t, m, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: sc-web}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
`)
	publishPolicy(t, m, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: default}
spec:
  selector: {matchLabels: {app: sc-web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["`+c.scSleep.ID().Principal()+`"]}}]
    to: [{operation: {methods: ["GET"]}}]
  - to: [{operation: {paths: ["/public"]}}]
`)
	t.Cleanup(func() {
		m.CP.Remove(discovery.AuthorizationType, "default/web-deny-admin")
		m.CP.Remove(discovery.AuthorizationType, "default/web-allow")
	})

	tests := []struct {
		name   string
		from   *meshtest.Pod
		method string
		path   string
		want   int
	}{
		{"sidecar client GET allowed by principal and method", c.scSleep.Pod, "GET", "/get", 200},
		{"sidecar client POST not allowed", c.scSleep.Pod, "POST", "/get", 403},
		{"DENY path wins over ALLOW", c.scSleep.Pod, "GET", "/admin/users", 403},
		{"ambient client GET not allowed by principal", c.sleep, "GET", "/get", 403},
		{"ambient client allowed on the public path", c.sleep, "GET", "/public", 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := request(t, tt.from, tt.method, web80, tt.path); got != tt.want {
				t.Fatalf("%s %s from %s: %d, want %d", tt.method, tt.path, tt.from.PodName, got, tt.want)
			}
		})
	}
	m.Logs.WaitFor(t, "RBAC rejected request")

	// Opaque TCP has no path or method: the L7 ALLOW rules cannot match it.
	t.Run("opaque TCP fails closed on L7 rules", func(t *testing.T) {
		web.ServeTCP(t, 9000, meshtest.Echo)
		conn, err := c.scSleep.Dial(web.Addr(9000))
		if err != nil {
			return // refused at connect: closed as well
		}
		defer conn.Close()
		conn.Write([]byte("ping\n"))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if got, _ := io.ReadAll(conn); len(got) > 0 {
			t.Fatalf("opaque TCP echoed %q through L7-only ALLOW rules, want the connection closed", got)
		}
	})

	t.Run("requests reported by the server sidecar as destination", func(t *testing.T) {
		waitRequests(t, "allowed", web.Metrics, map[string]string{"reporter": "destination", "response_code": "200",
			"source_principal": spiffe(c.scSleep.Pod), "destination_principal": spiffe(web.Pod), "connection_security_policy": "mutual_tls"})
		waitRequests(t, "denied", web.Metrics, map[string]string{"reporter": "destination", "response_code": "403",
			"source_principal": spiffe(c.sleep), "response_flags": "authorization_policy_rejection"})
	})
}

// body sends one request with headers from inside p and returns the body.
func body(t *testing.T, p *meshtest.Pod, dst netip.AddrPort, path string, h map[string]string) string {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+dst.String()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header.Set(k, v)
	}
	resp, err := p.Client().Do(req)
	if err != nil {
		t.Fatalf("GET %s%s from %s: %v", dst, path, p.PodName, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s%s from %s: %d %q", dst, path, p.PodName, resp.StatusCode, b)
	}
	return string(b)
}

// TestSidecarHTTPRoute: an HTTPRoute attached to a Service without a
// waypoint (GAMMA) is applied by the client's sidecar, as an Istio sidecar
// applies it: header matches and weights pick the backend Service; the
// request is reported by the client sidecar with reporter="source". The
// endpoints are ambient pods, reached over HBONE with the client's identity.
// The client's discovery is a sidecar's scope: the backends' endpoints are
// looked up when a route first picks them.
func TestSidecarHTTPRoute(t *testing.T) {
	c := newCoexistence(t)
	m := c.Mesh
	host := func(n string) string { return n + ".default.svc.cluster.local" }
	ports := func(svcs ...string) func(*workloadapi.Workload) {
		return func(w *workloadapi.Workload) {
			w.WorkloadName = svcs[len(svcs)-1]
			w.Services = map[string]*workloadapi.PortList{}
			for _, s := range svcs {
				w.Services[discovery.ServiceKey("default", host(s))] = &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}}
			}
		}
	}
	// The parent Service's only endpoint is v1: without the route every
	// request reaches v1.
	v1 := m.AddPod(m.Nodes[0], "web-v1-1", "httpbin", true, ports("web", "web-v1"))
	v2 := m.AddPod(m.Nodes[0], "web-v2-1", "httpbin", true, ports("web-v2"))
	v1.ServeHTTP(t, 80)
	v2.ServeHTTP(t, 80)
	web := netip.MustParseAddrPort("10.96.0.40:80")
	for i, n := range []string{"web", "web-v1", "web-v2"} {
		vip := netip.AddrFrom4([4]byte{10, 96, 0, byte(40 + i)})
		m.CP.Service(&workloadapi.Service{Name: n, Namespace: "default", Hostname: host(n),
			Addresses: []*workloadapi.NetworkAddress{{Address: vip.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}})
	}
	m.ScopedSidecars = true
	client := m.AddSidecarPod(m.Nodes[1], "sc-client-1", "sc-client")
	if got := body(t, client.Pod, web, "/", map[string]string{"x-canary": "yes"}); got != "web-v1-1" {
		t.Fatalf("before the route: %q, want web-v1-1", got)
	}
	if client.State.WorkloadByUID(v2.UID) != nil {
		t.Fatal("the scoped sidecar holds web-v2's workload before anything sent there")
	}
	m.CP.L7(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-canary}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /weighted}}]
    backendRefs: [{name: web-v1, port: 80, weight: 0}, {name: web-v2, port: 80, weight: 1}]
  - backendRefs: [{name: web-v1, port: 80}]
`)
	t.Cleanup(func() {
		m.CP.Remove(discovery.L7ResourceType, discovery.L7Key("gateway.networking.k8s.io", "HTTPRoute", "default", "web-canary"))
	})

	tests := []struct {
		name, path string
		header     map[string]string
		want       string
	}{
		{"header match picks v2", "/", map[string]string{"x-canary": "yes"}, "web-v2-1"},
		{"no match falls to the default rule", "/", nil, "web-v1-1"},
		{"weights send everything to v2", "/weighted/x", nil, "web-v2-1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for range 5 {
				if got := body(t, client.Pod, web, tt.path, tt.header); got != tt.want {
					t.Fatalf("GET %s %v: %q, want %q", tt.path, tt.header, got, tt.want)
				}
			}
		})
	}

	t.Run("requests reported by the client sidecar as source", func(t *testing.T) {
		waitRequests(t, "routed to v2", client.Metrics, map[string]string{"reporter": "source", "response_code": "200",
			"source_principal": spiffe(client.Pod), "destination_service_name": "web-v2", "destination_workload": "web-v2"})
	})
	// The destination authorized the client's own identity (HBONE).
	t.Run("the endpoint's ztunnel saw the client's identity", func(t *testing.T) {
		waitOpened(t, "destination ztunnel", m.Nodes[0].Metrics, map[string]string{"reporter": "destination",
			"source_principal": spiffe(client.Pod), "destination_principal": spiffe(v2), "connection_security_policy": "mutual_tls"})
	})
}
