package controlplane

import (
	"context"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
)

// startOnDemandClient runs a node-scoped ztunnel client (as cmd/ztunnel
// does) that claims claimedNode in its node metadata.
func startOnDemandClient(t *testing.T, tok, pod, claimedNode string) (*xds.Client, *xds.State) {
	t.Helper()
	state := xds.NewState(xds.AddressType, xds.AuthorizationType)
	c := xds.NewClient(xds.ClientConfig{
		Address: s.xdsAddr, TLS: s.clientTLS(), Token: func() (string, error) { return tok, nil },
		Node:     xds.NodeInfo{NodeName: claimedNode, PodName: pod, PodNamespace: meshNS, Role: xds.RoleZtunnel},
		OnDemand: true, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Log: s.log,
	}, state)
	runClient(t, c)
	return c, state
}

func demand(t *testing.T, c *xds.Client, names ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Demand(ctx, names...); err != nil {
		t.Fatalf("demand %v: %v", names, err)
	}
}

// TestZtunnelScope: a node-scoped ztunnel holds every service and the
// workloads of its own node (the node of its authenticated pod, not the one
// it claims), not those of other nodes until it asks for them; an address
// the mesh does not know is answered as absent; what it asked for stays
// current. A wildcard client on the same server still receives everything.
func TestZtunnelScope(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-scope", "node-a", "10.200.0.30")
	// The client claims node-b: the server must scope it to node-a.
	c, state := startOnDemandClient(t, token(t, zt, xds.TokenAudience), zt.Name, "node-b")
	ztFull := ztunnel(t, "zt-scope-full", "node-b", "10.200.0.31")
	full := startClient(t, token(t, ztFull, xds.TokenAudience), ztFull.Name, xds.RoleZtunnel)
	eventually(t, "ready", func() bool { return state.Ready() && full.Ready() })

	ensureNamespace(t, "scope", map[string]string{ambientLabel: "ambient"})
	web := map[string]string{"app": "web"}
	createPod(t, podSpec{ns: "scope", name: "local-web", node: "node-a", ip: "10.30.0.1", labels: web})
	createPod(t, podSpec{ns: "scope", name: "remote-web", node: "node-b", ip: "10.30.0.2", labels: web})
	remote := createPod(t, podSpec{ns: "scope", name: "remote-other", node: "node-b", ip: "10.30.0.3"})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "scope"}, Spec: corev1.ServiceSpec{
		Selector: web, Ports: []corev1.ServicePort{{Port: 80}}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), svc) })
	const key = "scope/web.scope.svc.cluster.local"

	eventually(t, "full client has every workload", func() bool {
		return full.WorkloadByUID(uid("scope", "remote-web")) != nil && full.WorkloadByUID(uid("scope", "remote-other")) != nil &&
			len(full.Endpoints(key)) == 2
	})
	eventually(t, "scoped client has the service and its node's workload", func() bool {
		return state.ServiceByKey(key) != nil && state.WorkloadByUID(uid("scope", "local-web")) != nil
	})
	// A pod created after the others on node-a arrives after them: once it
	// is there, anything of node-b that was to come has come.
	createPod(t, podSpec{ns: "scope", name: "local-marker", node: "node-a", ip: "10.30.0.9"})
	eventually(t, "marker", func() bool { return state.WorkloadByUID(uid("scope", "local-marker")) != nil })
	for _, name := range []string{"remote-web", "remote-other"} {
		if state.WorkloadByUID(uid("scope", name)) != nil {
			t.Fatalf("node-a's ztunnel received %s of node-b before asking", name)
		}
	}
	if state.WorkloadByUID(uid(meshNS, "zt-scope-full")) != nil {
		t.Fatal("node-a's ztunnel received node-b's ztunnel pod")
	}

	// Asking for the service brings its endpoints; asking for an address
	// brings the workload that owns it.
	demand(t, c, key)
	if n := len(state.Endpoints(key)); n != 2 {
		t.Fatalf("after asking for %s: %d endpoints, want 2", key, n)
	}
	demand(t, c, xds.AddressAlias("", ip("10.30.0.3")))
	if w := state.WorkloadByAddr(ip("10.30.0.3")); w == nil || w.Name != "remote-other" {
		t.Fatalf("after asking for 10.30.0.3: %v", w)
	}
	// An address nobody owns is answered (not found) and stays unknown.
	unknown := xds.AddressAlias("", ip("10.30.9.9"))
	demand(t, c, unknown)
	if state.WorkloadByAddr(ip("10.30.9.9")) != nil || state.ServiceByVIP(ip("10.30.9.9")) != nil {
		t.Fatal("unknown address resolved to something")
	}
	// The subscription stays: a pod that takes that address later arrives.
	createPod(t, podSpec{ns: "scope", name: "late", node: "node-b", ip: "10.30.9.9"})
	eventually(t, "late owner of the asked-for address", func() bool { return state.WorkloadByAddr(ip("10.30.9.9")) != nil })
	// A new endpoint of the asked-for service on another node arrives too.
	createPod(t, podSpec{ns: "scope", name: "remote-web-2", node: "node-b", ip: "10.30.0.4", labels: web})
	eventually(t, "new remote endpoint", func() bool { return len(state.Endpoints(key)) == 3 })
	// Changes and removals of what it holds reach it.
	setPodStatus(t, remote, "10.30.0.5", true)
	eventually(t, "address change of asked-for workload", func() bool {
		w := state.WorkloadByUID(uid("scope", "remote-other"))
		return w != nil && state.WorkloadByAddr(ip("10.30.0.5")) == w
	})
	if err := s.k8s.Delete(ctx, remote, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "removal", func() bool { return state.WorkloadByUID(uid("scope", "remote-other")) == nil })
}

// startSidecarClient runs the discovery client of pod's sidecar (role
// sidecar, on-demand, L7 resources too), as cmd/sidecar does, until ready.
func startSidecarClient(t *testing.T, pod *corev1.Pod) (*xds.Client, *xds.State) {
	t.Helper()
	state := xds.NewState(xds.SidecarTypes...)
	c := xds.NewClient(xds.ClientConfig{
		Address: s.xdsAddr, TLS: s.clientTLS(), Token: func() (string, error) { return token(t, pod, xds.TokenAudience), nil },
		// Claiming another pod's name is refused by the node metadata
		// check, so it names itself; its scope comes from the token's pod.
		Node:     xds.NodeInfo{NodeName: pod.Spec.NodeName, PodName: pod.Name, PodNamespace: pod.Namespace, Role: xds.RoleSidecar},
		OnDemand: true, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Log: s.log,
	}, state)
	runClient(t, c)
	eventually(t, "sidecar ready (addresses, authorizations and L7 resources synced)", state.Ready)
	return c, state
}

// TestSidecarScope: an injected pod's sidecar (role sidecar, on-demand, L7
// resources too) holds every service and its own workload (named from its
// authenticated pod, not its claims), not the other pods of its node; the
// endpoints of a service it calls come when it asks.
func TestSidecarScope(t *testing.T) {
	ctx := context.Background()
	ensureNamespace(t, "sc-scope", nil)
	self := createPod(t, podSpec{ns: "sc-scope", name: "client", node: "node-a", sa: "client", ip: "10.31.0.1", sidecar: true})
	c, state := startSidecarClient(t, self)

	web := map[string]string{"app": "web"}
	createPod(t, podSpec{ns: "sc-scope", name: "same-node-web", node: "node-a", ip: "10.31.0.2", labels: web})
	createPod(t, podSpec{ns: "sc-scope", name: "remote-web", node: "node-b", ip: "10.31.0.3", labels: web})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "sc-scope"}, Spec: corev1.ServiceSpec{
		Selector: web, Ports: []corev1.ServicePort{{Port: 80}}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), svc) })
	const key = "sc-scope/web.sc-scope.svc.cluster.local"
	eventually(t, "the service and its own workload", func() bool {
		return state.ServiceByKey(key) != nil && state.WorkloadByUID(uid("sc-scope", "client")) != nil
	})
	// The service was created after the pods: had they been in scope,
	// they would have come with it or before.
	for _, name := range []string{"same-node-web", "remote-web"} {
		if state.WorkloadByUID(uid("sc-scope", name)) != nil {
			t.Fatalf("the sidecar received %s before asking", name)
		}
	}
	demand(t, c, key)
	if n := len(state.Endpoints(key)); n != 2 {
		t.Fatalf("after asking for %s: %d endpoints, want 2", key, n)
	}
}

// TestSidecarPolicyAndRouteScope: a sidecar receives the authorization
// policies (L4 and L7) that can apply to its pod - its namespace's and the
// root namespace's - and not another namespace's; the routes it may apply
// as a client - producer routes of any Service, consumer routes of its own
// namespace - and not another namespace's consumer routes nor ingress
// routes; and the Mesh settings naming the root namespace. A change to a
// route of a Service it calls reaches it. Everything withheld is in the
// model (a ztunnel or waypoint gets it).
func TestSidecarPolicyAndRouteScope(t *testing.T) {
	ctx := context.Background()
	for _, ns := range []string{"scp-own", "scp-other", "scp-svc"} {
		ensureNamespace(t, ns, nil)
	}
	self := createPod(t, podSpec{ns: "scp-own", name: "client", node: "node-a", sa: "client", ip: "10.32.0.1", sidecar: true,
		labels: map[string]string{"app": "client"}})
	_, state := startSidecarClient(t, self)

	l4 := func(ns, name string) *securityv1.AuthorizationPolicy {
		p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
		p.Spec.Rules = rulesFrom("scp-own")
		return p
	}
	l7 := func(ns, name string) *securityv1.AuthorizationPolicy {
		p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
		p.Spec.Selector = &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "client"}}
		p.Spec.Rules = []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}}}}
		return p
	}
	svcParent := func(ns string) gwv1.ParentReference {
		return gwv1.ParentReference{Name: "api", Namespace: ptrTo(gwv1.Namespace(ns)), Kind: ptrTo(gwv1.Kind("Service")), Group: ptrTo(gwv1.Group(""))}
	}
	httpRoute := func(ns, name string, parent gwv1.ParentReference) *gwv1.HTTPRoute {
		return &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Spec: gwv1.HTTPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{parent}}}}
	}
	create := func(objs ...client.Object) {
		for _, o := range objs {
			if err := s.k8s.Create(ctx, o); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
		}
	}
	const (
		otherL4, otherL7      = "scp-other/other", "security.istio.io/AuthorizationPolicy/scp-other/other-l7"
		theirRoute, edgeRoute = "gateway.networking.k8s.io/HTTPRoute/scp-other/theirs", "gateway.networking.k8s.io/HTTPRoute/scp-svc/edge"
		ownL7, rootL7         = "security.istio.io/AuthorizationPolicy/scp-own/own-l7", "security.istio.io/AuthorizationPolicy/" + meshNS + "/root-l7"
		producer, consumer    = "gateway.networking.k8s.io/HTTPRoute/scp-svc/api", "gateway.networking.k8s.io/HTTPRoute/scp-own/mine"
	)
	// What the sidecar must not receive first, then what it must: a
	// flush pushes each type whole, so once the later ones are there, the
	// earlier ones would have come too.
	create(l4("scp-other", "other"), l7("scp-other", "other-l7"),
		httpRoute("scp-other", "theirs", svcParent("scp-svc")),
		httpRoute("scp-svc", "edge", gwv1.ParentReference{Name: "ingress"}))
	inModel := func(typeURL, name string) bool {
		for _, r := range s.cp.Discovery.Snapshot(typeURL) {
			if r.Name == name {
				return true
			}
		}
		return false
	}
	eventually(t, "withheld resources in the model", func() bool {
		return inModel(xds.AuthorizationType, otherL4) && inModel(xds.L7ResourceType, otherL7) &&
			inModel(xds.L7ResourceType, theirRoute) && inModel(xds.L7ResourceType, edgeRoute)
	})
	create(l4("scp-own", "own"), l4(meshNS, "root"), l7("scp-own", "own-l7"), l7(meshNS, "root-l7"),
		httpRoute("scp-svc", "api", svcParent("scp-svc")), httpRoute("scp-own", "mine", svcParent("scp-svc")))
	l7Held := func(key string) *meshapi.L7Resource {
		for _, r := range state.L7Resources() {
			if xds.L7Key(r.Group, r.Kind, r.Namespace, r.Name) == key {
				return r
			}
		}
		return nil
	}
	eventually(t, "its namespace's and the root's policies, the routes it may apply", func() bool {
		return state.Policy("scp-own/own") != nil && state.Policy(meshNS+"/root") != nil &&
			l7Held(ownL7) != nil && l7Held(rootL7) != nil && l7Held(producer) != nil && l7Held(consumer) != nil
	})
	if state.Policy(otherL4) != nil {
		t.Errorf("the sidecar received %s, a policy of another namespace", otherL4)
	}
	for _, key := range []string{otherL7, theirRoute, edgeRoute} {
		if l7Held(key) != nil {
			t.Errorf("the sidecar received %s", key)
		}
	}
	var mesh *meshapi.L7Resource
	for _, r := range state.L7Resources() {
		if r.Kind == xds.MeshKind {
			mesh = r
		}
	}
	if m, err := xds.DecodeMesh(mesh); mesh == nil || err != nil || m.RootNamespace != meshNS {
		t.Errorf("mesh settings %v (%v), want root namespace %s", mesh, err, meshNS)
	}

	// The debug dump of the sidecar shows what it receives.
	code, dump := debugGet(t, debugReaderToken(t), "?proxyID="+self.Name+"."+self.Namespace)
	if code != 200 || !strings.Contains(dump, `"scp-own/own"`) || !strings.Contains(dump, `"`+meshNS+`/root"`) || !strings.Contains(dump, `"`+producer+`"`) {
		t.Errorf("sidecar's dump (%d) lacks what it receives: %.300s", code, dump)
	}
	for _, name := range []string{otherL4, otherL7, theirRoute, edgeRoute} {
		if strings.Contains(dump, `"`+name+`"`) {
			t.Errorf("sidecar's dump shows %s, which it does not receive", name)
		}
	}

	// A change to the producer route of a Service it may call arrives.
	var r gwv1.HTTPRoute
	if err := s.k8s.Get(ctx, client.ObjectKey{Namespace: "scp-svc", Name: "api"}, &r); err != nil {
		t.Fatal(err)
	}
	r.Spec.Rules = []gwv1.HTTPRouteRule{{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: gwv1.BackendRef{
		BackendObjectReference: gwv1.BackendObjectReference{Name: "api-v2", Port: ptr.To(gwv1.PortNumber(80))}}}}}}
	if err := s.k8s.Update(ctx, &r); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the route change", func() bool {
		got := l7Held(producer)
		return got != nil && strings.Contains(string(got.Json), "api-v2")
	})
}
