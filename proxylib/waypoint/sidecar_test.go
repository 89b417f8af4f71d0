package waypoint_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/proxylib/waypoint/waypointtest"
)

// sidecarFixture is one sidecar pod's L7 engine over a hand-fed discovery
// State, its app a local HTTP server answering "app <path>".
type sidecarFixture struct {
	t     *testing.T
	reg   *prometheus.Registry
	state *discovery.State
	srv   *waypoint.Server
	self  *workloadapi.Workload
	app   netip.AddrPort
	ver   int
}

func newSidecarFixture(t *testing.T) *sidecarFixture {
	f := newUnsyncedSidecarFixture(t)
	f.state.Apply(discovery.AuthorizationType, nil, nil)
	return f
}

// newUnsyncedSidecarFixture is the fixture before its first authorization
// response: discovery is not synced.
func newUnsyncedSidecarFixture(t *testing.T) *sidecarFixture {
	f := &sidecarFixture{t: t, reg: prometheus.NewRegistry(), state: discovery.NewState(discovery.SidecarTypes...)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "app "+r.URL.Path)
	})}
	go app.Serve(ln)
	t.Cleanup(func() { app.Close() })
	f.app = netip.MustParseAddrPort(ln.Addr().String())
	f.self = &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", "web-0"), Name: "web-0", Namespace: "default",
		ServiceAccount: "web", Addresses: [][]byte{f.app.Addr().AsSlice()}, AuthorizationPolicies: []string{"default/web-l7"},
		Services: map[string]*workloadapi.PortList{"default/web.default.svc.cluster.local": {}}}
	f.apply(discovery.AddressType, "default/web.default.svc.cluster.local", &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local"}}})
	f.apply(discovery.AddressType, f.self.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: f.self}})
	// The root namespace comes from the control plane's Mesh resource.
	mesh, err := discovery.MeshResource(discovery.MeshSettings{RootNamespace: "ambient-system"})
	if err != nil {
		t.Fatal(err)
	}
	f.apply(discovery.L7ResourceType, discovery.MeshKey(discovery.MeshSettings{RootNamespace: "ambient-system"}), mesh)
	f.srv, err = waypoint.NewSidecar(waypoint.SidecarConfig{Pod: "web-0", Namespace: "default",
		Identity: id("default", "web"), State: f.state, Registry: f.reg, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.srv.Close)
	return f
}

func id(ns, sa string) identity.Identity {
	return identity.Identity{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
}

func (f *sidecarFixture) apply(typeURL, name string, m proto.Message) {
	body, err := anypb.New(m)
	if err != nil {
		f.t.Fatal(err)
	}
	body.TypeUrl = typeURL
	f.ver++
	if err := f.state.Apply(typeURL, []discovery.Resource{{Name: name, Version: string(rune('a' + f.ver)), Body: body}}, nil); err != nil {
		f.t.Fatal(err)
	}
}

func (f *sidecarFixture) l7(y string) {
	key, r := waypointtest.L7Resource(f.t, y)
	f.apply(discovery.L7ResourceType, key, r)
}

// do sends one request over a connection the engine serves as an inbound
// connection from peer (zero: plaintext) with the CONNECT header h.
func (f *sidecarFixture) do(peer identity.Identity, h http.Header, method, path string) (int, string) {
	f.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		f.t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		f.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer server.Close()
		f.srv.ServeInbound(context.Background(), proxy.L7Inbound{Peer: peer, PeerAddr: netip.MustParseAddrPort("10.0.0.9:40000"),
			Header: h, Target: f.app, Workload: f.self,
			Dial: func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", a.String())
			}}, server.(hbone.Stream))
	}()
	req, _ := http.NewRequest(method, "http://"+f.app.String()+path, nil)
	req.Close = true
	client.SetDeadline(time.Now().Add(5 * time.Second))
	if err := req.Write(client); err != nil {
		f.t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(client), req)
	if err != nil {
		return 0, err.Error()
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	client.Close()
	<-done
	return resp.StatusCode, string(b)
}

// TestSidecarInboundL7: the engine in sidecar mode authorizes each request
// to its own pod against the L7 policies selecting it and forwards the
// allowed ones to the app.
func TestSidecarInboundL7(t *testing.T) {
	f := newSidecarFixture(t)
	f.l7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-l7, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"], notPaths: ["/admin*"]}}]
`)
	// The waypoints' policy (targetRefs) never binds to a sidecar's pod.
	f.l7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoints-allow-all, namespace: ambient-system}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
  action: ALLOW
  rules: [{}]
`)
	sleep, other, web := id("default", "sleep"), id("default", "other"), id("default", "web")
	tests := []struct {
		name         string
		peer         identity.Identity
		header       http.Header
		method, path string
		want         int
	}{
		{"allowed principal and method", sleep, nil, "GET", "/get", 200},
		{"method not allowed", sleep, nil, "POST", "/get", 403},
		{"excluded path", sleep, nil, "GET", "/admin/x", 403},
		{"other principal", other, nil, "GET", "/get", 403},
		{"plaintext caller", identity.Identity{}, nil, "GET", "/get", 403},
		// A peer with the pod's own identity (another replica) is not a
		// hair-pin: the caller it names is not believed.
		{"same-identity peer naming an allowed caller", web, http.Header{hbone.HeaderHairpinCaller: {sleep.String()}}, "GET", "/get", 403},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := f.do(tt.peer, tt.header, tt.method, tt.path)
			want := map[string]string{"reporter": "destination", "response_code": fmt.Sprint(tt.want),
				"destination_service_name": "web", "destination_principal": "spiffe://cluster.local/ns/default/sa/web"}
			if n := countRequests(t, f.reg, want); n == 0 {
				t.Errorf("no istio_requests_total with %v", want)
			}
			if code != tt.want {
				t.Fatalf("%s %s from %q: %d %q, want %d", tt.method, tt.path, tt.peer, code, body, tt.want)
			}
			if code == 200 && body != "app "+tt.path {
				t.Fatalf("body %q", body)
			}
		})
	}
}

// countRequests sums istio_requests_total series matching want.
func countRequests(t *testing.T, reg *prometheus.Registry, want map[string]string) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, f := range fams {
		if f.GetName() != "istio_requests_total" {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue series
				}
			}
			n += m.GetCounter().GetValue()
		}
	}
	return n
}

// TestSidecarBrokenPolicyFailsClosed: a policy of the pod's namespace that
// cannot be decoded denies every request (it might have denied them).
func TestSidecarBrokenPolicyFailsClosed(t *testing.T) {
	f := newSidecarFixture(t)
	if code, _ := f.do(id("default", "sleep"), nil, "GET", "/get"); code != 200 {
		t.Fatalf("no policy: %d", code)
	}
	r := &meshapi.L7Resource{Group: "security.istio.io", Kind: "AuthorizationPolicy", Namespace: "default", Name: "broken",
		Json: []byte(`{"spec":{"action":"DENY","rules":[{"to":[{"operation":{"paths":5}}]}]}}`)}
	f.apply(discovery.L7ResourceType, discovery.L7Key(r.Group, r.Kind, r.Namespace, r.Name), r)
	if code, body := f.do(id("default", "sleep"), nil, "GET", "/get"); code != 403 {
		t.Fatalf("broken policy: %d %q, want 403", code, strings.TrimSpace(body))
	}
}

// TestSidecarRootNamespaceFromControlPlane: a sidecar's engine is given no
// root namespace (pods injected before ROOT_NAMESPACE existed have none);
// it takes it from the control plane's Mesh resource, so a root-namespace
// policy applies mesh-wide, follows the resource when it changes, and
// without it (or with a broken one) every request is refused.
func TestSidecarRootNamespaceFromControlPlane(t *testing.T) {
	f := newSidecarFixture(t)
	f.l7(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: ambient-system}
spec:
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
`)
	sleep := id("default", "sleep")
	expect := func(what, method string, want int) {
		t.Helper()
		if code, body := f.do(sleep, nil, method, "/x"); code != want {
			t.Fatalf("%s: %s %d %q, want %d", what, method, code, strings.TrimSpace(body), want)
		}
	}
	expect("root policy from the Mesh resource", "GET", 200)
	expect("root policy from the Mesh resource", "POST", 403)

	oldKey := discovery.MeshKey(discovery.MeshSettings{RootNamespace: "ambient-system"})
	if err := f.state.Apply(discovery.L7ResourceType, nil, []string{oldKey}); err != nil {
		t.Fatal(err)
	}
	expect("no Mesh resource", "GET", 403)

	broken := &meshapi.L7Resource{Group: discovery.MeshGroup, Kind: discovery.MeshKind, Namespace: "x", Name: "mesh", Json: []byte(`{}`)}
	brokenKey := discovery.L7Key(broken.Group, broken.Kind, broken.Namespace, broken.Name)
	f.apply(discovery.L7ResourceType, brokenKey, broken)
	expect("broken Mesh resource", "GET", 403)
	if err := f.state.Apply(discovery.L7ResourceType, nil, []string{brokenKey}); err != nil {
		t.Fatal(err)
	}

	// Another root: ambient-system's policy is now a namespace's own.
	other, err := discovery.MeshResource(discovery.MeshSettings{RootNamespace: "mesh-root"})
	if err != nil {
		t.Fatal(err)
	}
	f.apply(discovery.L7ResourceType, discovery.MeshKey(discovery.MeshSettings{RootNamespace: "mesh-root"}), other)
	expect("policy of a namespace that is not the root", "POST", 200)
}

// A connection that arrives while the sidecar's discovery syncs is held,
// then served on what discovery says (it was refused before the sync).
func TestSidecarHoldsUntilSynced(t *testing.T) {
	f := newUnsyncedSidecarFixture(t)
	type answer struct {
		code int
		body string
	}
	done := make(chan answer, 1)
	go func() {
		code, body := f.do(identity.Identity{}, nil, "GET", "/held")
		done <- answer{code, body}
	}()
	select {
	case a := <-done:
		t.Fatalf("answered (%d %q) before discovery synced, want the connection held", a.code, a.body)
	case <-time.After(100 * time.Millisecond):
	}
	f.state.Apply(discovery.AuthorizationType, nil, nil)
	if a := <-done; a.code != http.StatusOK || a.body != "app /held" {
		t.Fatalf("after the sync: %d %q, want 200 from the app", a.code, a.body)
	}
}
