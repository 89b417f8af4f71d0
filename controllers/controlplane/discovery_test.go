package controlplane

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/policy"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

const ambientLabel = "istio.io/dataplane-mode"

func uid(ns, name string) string { return xds.PodUID("Kubernetes", ns, name) }

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

// TestPodSelection: every capture rule of the seeds, seen by a real client.
func TestPodSelection(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-sel", "node-a", "10.200.0.1")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	eventually(t, "ready", state.Ready)

	ensureNamespace(t, "sel-app", map[string]string{ambientLabel: "ambient"})
	ensureNamespace(t, "sel-plain", nil)
	ensureNamespace(t, "sel-legacy", map[string]string{ambientLabel: "ambient"})
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "mesh"}, Spec: meshv1.AmbientMeshSpec{
		Namespace: meshNS, Capture: meshv1.CaptureSpec{ExcludedNamespaces: []string{"sel-legacy"}}}}
	if err := s.k8s.Create(ctx, mesh); err != nil && !isAlreadyExists(err) {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), mesh) })

	tests := []struct {
		pod      podSpec
		tunnel   workloadapi.TunnelProtocol
		health   workloadapi.WorkloadStatus
		hostNet  bool
		byAddr   bool
		captured bool
	}{
		{pod: podSpec{ns: "sel-app", name: "plain", ip: "10.1.0.1"}, tunnel: workloadapi.TunnelProtocol_HBONE, byAddr: true},
		{pod: podSpec{ns: "sel-app", name: "sidecar", ip: "10.1.0.2", annotations: map[string]string{"sidecar.istio.io/status": "{}"}}, byAddr: true},
		{pod: podSpec{ns: "sel-app", name: "redirect-off", ip: "10.1.0.3", annotations: map[string]string{"ambient.istio.io/redirection": "disabled"}}, byAddr: true},
		{pod: podSpec{ns: "sel-app", name: "opt-out", ip: "10.1.0.4", labels: map[string]string{ambientLabel: "none"}}, byAddr: true},
		{pod: podSpec{ns: "sel-app", name: "hostnet", ip: "10.1.0.5", hostNetwork: true}, hostNet: true},
		{pod: podSpec{ns: "sel-app", name: "not-ready", ip: "10.1.0.6", notReady: true}, tunnel: workloadapi.TunnelProtocol_HBONE, health: workloadapi.WorkloadStatus_UNHEALTHY, byAddr: true},
		{pod: podSpec{ns: "sel-plain", name: "p", ip: "10.1.0.7"}, byAddr: true},
		{pod: podSpec{ns: "sel-legacy", name: "p", ip: "10.1.0.8"}, byAddr: true},
		{pod: podSpec{ns: meshNS, name: "mesh-component", ip: "10.1.0.9"}, byAddr: true},
	}
	for _, tt := range tests {
		tt.pod.node = "node-a"
		createPod(t, tt.pod)
	}
	for _, tt := range tests {
		id := uid(tt.pod.ns, tt.pod.name)
		eventually(t, "workload "+id, func() bool { return state.WorkloadByUID(id) != nil })
		w := state.WorkloadByUID(id)
		if w.TunnelProtocol != tt.tunnel || w.Status != tt.health {
			t.Errorf("%s: tunnel=%v status=%v, want %v %v", id, w.TunnelProtocol, w.Status, tt.tunnel, tt.health)
		}
		if (w.NetworkMode == workloadapi.NetworkMode_HOST_NETWORK) != tt.hostNet {
			t.Errorf("%s: network mode %v", id, w.NetworkMode)
		}
		if got := state.WorkloadByAddr(ip(tt.pod.ip)) != nil; got != tt.byAddr {
			t.Errorf("%s: found by address = %v, want %v", id, got, tt.byAddr)
		}
		if w.Node != "node-a" || w.ServiceAccount != "default" || w.TrustDomain != "cluster.local" || w.Namespace != tt.pod.ns {
			t.Errorf("%s: identity/node fields wrong: %v", id, w)
		}
	}
	// Capture follows the namespace label live, without touching pods.
	var ns corev1.Namespace
	if err := s.k8s.Get(ctx, client.ObjectKey{Name: "sel-plain"}, &ns); err != nil {
		t.Fatal(err)
	}
	ns.Labels = map[string]string{ambientLabel: "ambient"}
	if err := s.k8s.Update(ctx, &ns); err != nil {
		t.Fatal(err)
	}
	eventually(t, "namespace enrolment", func() bool {
		w := state.WorkloadByUID(uid("sel-plain", "p"))
		return w != nil && w.TunnelProtocol == workloadapi.TunnelProtocol_HBONE
	})
}

// TestServicesAndUpdates: services with named target ports, then pod
// address changes and deletions arrive at the client.
func TestServicesAndUpdates(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-svc", "node-a", "10.200.0.2")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "svc", map[string]string{ambientLabel: "ambient"})
	pod := createPod(t, podSpec{ns: "svc", name: "web-0", node: "node-a", ip: "10.2.0.1", labels: map[string]string{"app": "web"}, namedPort: "http", namedPortNumber: 8080})
	createPod(t, podSpec{ns: "svc", name: "other", node: "node-a", ip: "10.2.0.2", labels: map[string]string{"app": "other"}})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "svc"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "web"},
		Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
			{Name: "metrics", Port: 9090, TargetPort: intstr.FromInt32(9091)},
			{Name: "missing", Port: 81, TargetPort: intstr.FromString("nope")},
		}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), svc) })
	const key = "svc/web.svc.svc.cluster.local"
	eventually(t, "service", func() bool { return state.ServiceByKey(key) != nil })
	got := state.ServiceByVIP(ip(svc.Spec.ClusterIP))
	if got == nil || got.Hostname != "web.svc.svc.cluster.local" || len(got.Ports) != 3 {
		t.Fatalf("service by VIP %s = %v", svc.Spec.ClusterIP, got)
	}
	eventually(t, "endpoint", func() bool { return len(state.Endpoints(key)) == 1 })
	w := state.WorkloadByUID(uid("svc", "web-0"))
	want := &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}, {ServicePort: 9090, TargetPort: 9091}}}
	if !proto.Equal(w.Services[key], want) {
		t.Fatalf("ports of web-0 = %v, want %v", w.Services[key], want)
	}
	if _, ok := state.WorkloadByUID(uid("svc", "other")).Services[key]; ok {
		t.Fatal("unselected pod listed as endpoint")
	}

	// Address change: old address disappears, new one appears.
	setPodStatus(t, pod, "10.2.0.9", true)
	eventually(t, "new address", func() bool {
		return state.WorkloadByAddr(ip("10.2.0.9")) != nil && state.WorkloadByAddr(ip("10.2.0.1")) == nil
	})
	// Selector change on the service moves the endpoint.
	svc.Spec.Selector = map[string]string{"app": "other"}
	if err := s.k8s.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "selector change", func() bool {
		eps := state.Endpoints(key)
		return len(eps) == 1 && eps[0].Name == "other"
	})
	// Deletions.
	if err := s.k8s.Delete(ctx, pod, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	if err := s.k8s.Delete(ctx, svc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "removals", func() bool {
		return state.WorkloadByUID(uid("svc", "web-0")) == nil && state.ServiceByKey(key) == nil
	})
}

func rulesFrom(ns ...string) []*apisecurity.Rule {
	return []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Namespaces: ns}}}}}
}

// TestPolicies: AuthorizationPolicy v1 and v1beta1 in all scopes, L7
// policies (fail closed for ztunnel, whole for waypoints), PeerAuthentication.
func TestPolicies(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-pol", "node-a", "10.200.0.3")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "pol", map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: "pol", name: "web", node: "node-a", ip: "10.3.0.1", labels: map[string]string{"app": "web"}})
	createPod(t, podSpec{ns: "pol", name: "db", node: "node-a", ip: "10.3.0.2", labels: map[string]string{"app": "db"}})

	nsPolicy := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "ns-allow", Namespace: "pol"}}
	nsPolicy.Spec.Rules = rulesFrom("pol", "prod*")
	selPolicy := &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "sel-deny", Namespace: "pol"}}
	selPolicy.Spec.Selector = &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}}
	selPolicy.Spec.Action = apisecurity.AuthorizationPolicy_DENY
	selPolicy.Spec.Rules = []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{"9090"}}}}}}
	l7Policy := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "l7", Namespace: "pol"}}
	l7Policy.Spec.Selector = &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}}
	l7Policy.Spec.Rules = []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}}}}
	globalPolicy := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "global-deny", Namespace: meshNS}}
	globalPolicy.Spec.Action = apisecurity.AuthorizationPolicy_DENY
	globalPolicy.Spec.Rules = []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{IpBlocks: []string{"192.0.2.0/24"}}}}}}
	strict := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "strict", Namespace: "pol"}}
	strict.Spec.Mtls = &apisecurity.PeerAuthentication_MutualTLS{Mode: apisecurity.PeerAuthentication_MutualTLS_STRICT}
	for _, o := range []client.Object{nsPolicy, selPolicy, l7Policy, globalPolicy, strict} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
	}

	eventually(t, "policies", func() bool {
		return state.Policy("pol/ns-allow") != nil && state.Policy("pol/sel-deny") != nil &&
			state.Policy("pol/l7") != nil && state.Policy(meshNS+"/global-deny") != nil
	})
	if p := state.Policy("pol/ns-allow"); p.Scope != security.Scope_NAMESPACE || p.Action != security.Action_ALLOW ||
		len(p.Groups) != 1 || len(p.Groups[0].Rules[0].Matches[0].Namespaces) != 2 {
		t.Errorf("namespace policy = %v", p)
	}
	if p := state.Policy("pol/sel-deny"); p.Scope != security.Scope_WORKLOAD_SELECTOR || p.Action != security.Action_DENY ||
		!slices.Equal(p.Groups[0].Rules[0].Matches[0].DestinationPorts, []uint32{9090}) {
		t.Errorf("v1beta1 selector policy = %v", p)
	}
	if p := state.Policy("pol/l7"); p.Action != security.Action_ALLOW || len(p.Groups) != 0 {
		t.Errorf("L7 ALLOW must reach ztunnel as an ALLOW that never matches (fail closed): %v", p)
	}
	if p := state.Policy(meshNS + "/global-deny"); p.Scope != security.Scope_GLOBAL {
		t.Errorf("root namespace policy scope = %v", p.Scope)
	}
	staticKey := meshNS + "/" + policy.StaticStrictPolicyName
	eventually(t, "workload policy references", func() bool {
		web, db := state.WorkloadByUID(uid("pol", "web")), state.WorkloadByUID(uid("pol", "db"))
		return web != nil && db != nil &&
			slices.Equal(web.AuthorizationPolicies, []string{staticKey, "pol/sel-deny"}) &&
			slices.Equal(db.AuthorizationPolicies, []string{staticKey, "pol/l7"})
	})
	if state.Policy(staticKey) == nil {
		t.Fatal("static STRICT policy not served")
	}
	got := state.PoliciesFor(state.WorkloadByUID(uid("pol", "db")))
	var names []string
	for _, p := range got {
		names = append(names, p.Namespace+"/"+p.Name)
	}
	if !slices.Equal(names, []string{meshNS + "/global-deny", staticKey, "pol/l7", "pol/ns-allow"}) {
		t.Errorf("policies for db = %v", names)
	}
	// The L7 policy is carried whole for waypoints.
	eventually(t, "L7 resource", func() bool {
		for _, r := range s.cp.Discovery.Snapshot(xds.L7ResourceType) {
			if r.Name == "security.istio.io/AuthorizationPolicy/pol/l7" {
				return true
			}
		}
		return false
	})

	// Selector edits move the reference; PERMISSIVE drops the strict one.
	if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(selPolicy), selPolicy); err != nil {
		t.Fatal(err)
	}
	selPolicy.Spec.Selector.MatchLabels = map[string]string{"app": "db"}
	if err := s.k8s.Update(ctx, selPolicy); err != nil {
		t.Fatal(err)
	}
	if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(strict), strict); err != nil {
		t.Fatal(err)
	}
	strict.Spec.Mtls.Mode = apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE
	if err := s.k8s.Update(ctx, strict); err != nil {
		t.Fatal(err)
	}
	eventually(t, "policy edits", func() bool {
		web, db := state.WorkloadByUID(uid("pol", "web")), state.WorkloadByUID(uid("pol", "db"))
		return len(web.AuthorizationPolicies) == 0 && slices.Equal(db.AuthorizationPolicies, []string{"pol/l7", "pol/sel-deny"})
	})
	if err := s.k8s.Delete(ctx, nsPolicy); err != nil {
		t.Fatal(err)
	}
	eventually(t, "policy removal", func() bool { return state.Policy("pol/ns-allow") == nil })
}

// TestWaypointBinding: namespace waypoint, service-account waypoint wins,
// pod label opt-out, services, and the address once the Service exists.
func TestWaypointBinding(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-wp", "node-a", "10.200.0.4")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "wp", map[string]string{ambientLabel: "ambient"})
	nsWaypoint := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "ns-waypoint", Namespace: "wp", Labels: map[string]string{"istio.io/waypoint-for": "all"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	saWaypoint := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "sa-waypoint", Namespace: "wp", Annotations: map[string]string{"istio.io/for-service-account": "special"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	for _, o := range []client.Object{nsWaypoint, saWaypoint} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
	}
	createPod(t, podSpec{ns: "wp", name: "plain", node: "node-a", ip: "10.4.0.1", labels: map[string]string{"app": "a"}})
	createPod(t, podSpec{ns: "wp", name: "special", node: "node-a", sa: "special", ip: "10.4.0.2"})
	createPod(t, podSpec{ns: "wp", name: "opt-out", node: "node-a", ip: "10.4.0.3", labels: map[string]string{"istio.io/use-waypoint": "none"}})
	createPod(t, podSpec{ns: "wp", name: "ns-waypoint-0", node: "node-a", ip: "10.4.0.4", labels: map[string]string{"gateway.networking.k8s.io/gateway-name": "ns-waypoint"}})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "a", Namespace: "wp"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "a"}, Ports: []corev1.ServicePort{{Port: 80}}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	hostnameOf := func(g *workloadapi.GatewayAddress) string { return g.GetHostname().GetHostname() }
	eventually(t, "waypoint binding", func() bool {
		plain, special, optOut, wp := state.WorkloadByUID(uid("wp", "plain")), state.WorkloadByUID(uid("wp", "special")),
			state.WorkloadByUID(uid("wp", "opt-out")), state.WorkloadByUID(uid("wp", "ns-waypoint-0"))
		sv := state.ServiceByKey("wp/a.wp.svc.cluster.local")
		return plain != nil && special != nil && optOut != nil && wp != nil && sv != nil &&
			hostnameOf(plain.Waypoint) == "ns-waypoint.wp.svc.cluster.local" &&
			hostnameOf(special.Waypoint) == "sa-waypoint.wp.svc.cluster.local" &&
			optOut.Waypoint == nil && wp.Waypoint == nil && wp.NativeTunnel &&
			hostnameOf(sv.Waypoint) == "ns-waypoint.wp.svc.cluster.local"
	})
	// Once the waypoint's Service exists, proxies get its address.
	wpSvc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "ns-waypoint", Namespace: "wp", Labels: map[string]string{"gateway.networking.k8s.io/gateway-name": "ns-waypoint"}},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"gateway.networking.k8s.io/gateway-name": "ns-waypoint"}, Ports: []corev1.ServicePort{{Name: "mesh", Port: 15008}}}}
	if err := s.k8s.Create(ctx, wpSvc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), wpSvc); _ = s.k8s.Delete(context.Background(), svc) })
	eventually(t, "waypoint address", func() bool {
		plain := state.WorkloadByUID(uid("wp", "plain"))
		a, ok := netip.AddrFromSlice(plain.GetWaypoint().GetAddress().GetAddress())
		return ok && a.String() == wpSvc.Spec.ClusterIP && plain.Waypoint.HboneMtlsPort == 15008
	})
	if w := state.ServiceByKey("wp/ns-waypoint.wp.svc.cluster.local"); w == nil || w.Waypoint != nil {
		t.Fatalf("a waypoint's own service must not point at a waypoint: %v", w)
	}
	// Deleting the SA waypoint falls back to the namespace waypoint.
	if err := s.k8s.Delete(ctx, saWaypoint); err != nil {
		t.Fatal(err)
	}
	eventually(t, "fallback to namespace waypoint", func() bool {
		a, ok := netip.AddrFromSlice(state.WorkloadByUID(uid("wp", "special")).GetWaypoint().GetAddress().GetAddress())
		return ok && a.String() == wpSvc.Spec.ClusterIP
	})
}

// streamCode opens a delta ADS stream with tok and returns the status code
// of the first receive.
func streamCode(t *testing.T, tok string) codes.Code {
	t.Helper()
	conn, err := grpc.NewClient(s.xdsAddr, grpc.WithTransportCredentials(credentials.NewTLS(s.clientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if tok != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	stream, err := discoverypb.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		return status.Code(err)
	}
	if err := stream.Send(&discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AddressType, ResourceNamesSubscribe: []string{"*"}}); err != nil && err != io.EOF {
		return status.Code(err)
	}
	_, err = stream.Recv()
	return status.Code(err)
}

// TestDiscoveryClientAuth: only ztunnels, waypoints and sidecars of this mesh
// are served.
func TestDiscoveryClientAuth(t *testing.T) {
	zt := ztunnel(t, "zt-auth", "node-a", "10.200.0.5")
	ensureNamespace(t, "auth-app", map[string]string{ambientLabel: "ambient"})
	app := createPod(t, podSpec{ns: "auth-app", name: "app", node: "node-a", ip: "10.5.0.1"})
	fakeZtunnel := createPod(t, podSpec{ns: "auth-app", name: "ztunnel", node: "node-a", sa: "ztunnel", ip: "10.5.0.2"})
	sidecar := createPod(t, podSpec{ns: "auth-app", name: "injected", node: "node-a", sa: "web", ip: "10.5.0.3", sidecar: true})
	fakeInjected := createPod(t, podSpec{ns: "auth-app", name: "fake-injected", node: "node-a", ip: "10.5.0.4",
		labels: map[string]string{"networking.istio.io/tunnel": "http"}, annotations: map[string]string{"sidecar.istio.io/status": "{}"}})
	tests := []struct {
		name string
		tok  string
		want codes.Code
	}{
		{"ztunnel of the mesh", token(t, zt, xds.TokenAudience), codes.OK},
		{"no token", "", codes.Unauthenticated},
		{"garbage token", "not-a-jwt", codes.Unauthenticated},
		{"wrong audience", token(t, zt, "https://kubernetes.default.svc"), codes.Unauthenticated},
		{"application pod", token(t, app, xds.TokenAudience), codes.PermissionDenied},
		{"ztunnel-named SA outside the mesh namespace", token(t, fakeZtunnel, xds.TokenAudience), codes.PermissionDenied},
		{"sidecar of an injected pod", token(t, sidecar, xds.TokenAudience), codes.OK},
		{"pod annotated as injected without the sidecar", token(t, fakeInjected, xds.TokenAudience), codes.PermissionDenied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := streamCode(t, tt.tok); got != tt.want {
				t.Fatalf("code = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestDebugConfigDump: the debug view shows what a proxy receives, only
// over TLS (it takes bearer tokens), and only to callers whose RBAC grants
// GET on it.
func TestDebugConfigDump(t *testing.T) {
	zt := ztunnel(t, "zt-debug", "node-a", "10.200.0.6")
	ensureNamespace(t, "dbg", map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: "dbg", name: "web", node: "node-a", ip: "10.6.0.1"})
	reader := debugReaderToken(t)
	get := func(bearer, query string) (int, string) { return debugGet(t, bearer, query) }
	query := "?proxyID=" + zt.Name + "." + meshNS
	eventually(t, "dump has the workload", func() bool {
		code, body := get(reader, query)
		return code == http.StatusOK && strings.Contains(body, uid("dbg", "web")) && strings.Contains(body, `"role":"ztunnel"`)
	})
	if code, _ := get(reader, ""); code != http.StatusBadRequest {
		t.Errorf("missing proxyID: %d", code)
	}
	if code, _ := get(reader, "?proxyID=nope."+meshNS); code != http.StatusNotFound {
		t.Errorf("unknown proxy: %d", code)
	}
	if code, body := get("", query); code != http.StatusUnauthorized {
		t.Errorf("without a token: %d %.80q, want 401", code, body)
	}
	// Plain HTTP is never served: a token sent that way was exposed.
	plain, _ := http.NewRequest("GET", "http://"+s.debugAddr+"/debug/config_dump"+query, nil)
	plain.Header.Set("Authorization", "Bearer "+reader)
	if resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(plain); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK || strings.Contains(string(b), uid("dbg", "web")) {
			t.Errorf("plain HTTP served the dump: %d %.80q", resp.StatusCode, b)
		}
	}
	// A proxy's own token does not open the dump of the whole mesh.
	if code, body := get(token(t, zt, xds.TokenAudience), query); code != http.StatusUnauthorized && code != http.StatusForbidden {
		t.Errorf("ztunnel's token: %d %.80q, want 401 or 403", code, body)
	}
}

// debugGet fetches /debug/config_dump<query> over TLS with bearer (none
// when empty).
func debugGet(t *testing.T, bearer, query string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", "https://"+s.debugAddr+"/debug/config_dump"+query, nil)
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: s.clientTLS()}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// debugReaderToken is a token of a service account bound to a ClusterRole
// that grants GET on /debug/config_dump.
func debugReaderToken(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	for _, o := range []client.Object{
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "debug-reader", Namespace: meshNS}},
		&rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "debug-reader"},
			Rules: []rbacv1.PolicyRule{{NonResourceURLs: []string{"/debug/config_dump"}, Verbs: []string{"get"}}}},
		&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "debug-reader"},
			RoleRef:  rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "debug-reader"},
			Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "debug-reader", Namespace: meshNS}}},
	} {
		if err := s.k8s.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	tr, err := s.cs.CoreV1().ServiceAccounts(meshNS).CreateToken(ctx, "debug-reader", &authnv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// TestSelectorlessService: a service without selector takes its endpoints
// from EndpointSlices that point at pods.
func TestSelectorlessService(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-eps", "node-a", "10.200.0.8")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "eps", map[string]string{ambientLabel: "ambient"})
	pod := createPod(t, podSpec{ns: "eps", name: "backend", node: "node-a", ip: "10.8.0.1"})
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "external", Namespace: "eps"}, Spec: corev1.ServiceSpec{
		Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	name, port, proto := "http", int32(8081), corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "external-1", Namespace: "eps", Labels: map[string]string{discoveryv1.LabelServiceName: "external"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.8.0.1"}, TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: pod.Name, Namespace: "eps"}}},
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
	}
	if err := s.k8s.Create(ctx, es); err != nil {
		t.Fatal(err)
	}
	const key = "eps/external.eps.svc.cluster.local"
	eventually(t, "endpoint from slice", func() bool {
		w := state.WorkloadByUID(uid("eps", "backend"))
		pl := w.GetServices()[key]
		return len(pl.GetPorts()) == 1 && pl.Ports[0].ServicePort == 80 && pl.Ports[0].TargetPort == 8081
	})
	if err := s.k8s.Delete(ctx, es); err != nil {
		t.Fatal(err)
	}
	eventually(t, "endpoint removed with its slice", func() bool {
		_, ok := state.WorkloadByUID(uid("eps", "backend")).GetServices()[key]
		return !ok
	})
}

// TestWaypointClientGetsL7: a waypoint pod may subscribe to L7 resources and
// receives HTTPRoutes and L7 policies whole; a ztunnel may not.
func TestWaypointClientGetsL7(t *testing.T) {
	ctx := context.Background()
	ensureNamespace(t, "l7", map[string]string{ambientLabel: "ambient"})
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "l7"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	route := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "l7"}, Spec: gwv1.HTTPRouteSpec{
		CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Name: "reviews", Kind: ptrTo(gwv1.Kind("Service")), Group: ptrTo(gwv1.Group(""))}}}}}
	l7 := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "get-only", Namespace: "l7"}}
	l7.Spec.TargetRefs = []*apitype.PolicyTargetReference{{Group: "gateway.networking.k8s.io", Kind: "Gateway", Name: "waypoint"}}
	l7.Spec.Rules = []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Methods: []string{"GET"}}}}}}
	for _, o := range []client.Object{gw, route, l7} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
	}
	eventually(t, "waypoint known", func() bool { return s.cp.Discovery.IsWaypoint("l7", "waypoint") })
	wpPod := createWaypointPod(t, "l7", "waypoint", "node-a", "10.9.0.1")
	state := startClient(t, token(t, wpPod, xds.TokenAudience), wpPod.Name, xds.RoleWaypoint, xds.AddressType, xds.AuthorizationType, xds.L7ResourceType)
	eventually(t, "waypoint sync with L7", func() bool {
		if !state.Ready() {
			return false
		}
		var kinds []string
		for _, r := range state.L7Resources() {
			if r.Namespace == "l7" {
				kinds = append(kinds, r.Kind+"/"+r.Name)
			}
		}
		slices.Sort(kinds)
		return slices.Equal(kinds, []string{"AuthorizationPolicy/get-only", "HTTPRoute/reviews"})
	})
	for _, r := range state.L7Resources() {
		if r.Kind == "HTTPRoute" && !strings.Contains(string(r.Json), `"parentRefs"`) {
			t.Fatalf("HTTPRoute spec missing from L7 JSON: %s", r.Json)
		}
	}
	// A targetRef policy is waypoint-only: ztunnel gets no L4 form of it.
	if state.Policy("l7/get-only") != nil {
		t.Fatal("targetRef policy must not be an L4 policy")
	}
	// ztunnels are refused L7 resources.
	zt := ztunnel(t, "zt-l7", "node-a", "10.200.0.9")
	ztState := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel, xds.AddressType, xds.L7ResourceType)
	time.Sleep(500 * time.Millisecond)
	if ztState.Ready() || len(ztState.L7Resources()) != 0 {
		t.Fatal("a ztunnel received L7 resources")
	}
}

func ptrTo[T any](v T) *T { return &v }

// TestClusterDomainFromMesh: Service hostnames use the mesh's cluster
// domain, not a hard-coded cluster.local.
func TestClusterDomainFromMesh(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-domain", "node-a", "10.200.0.12")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	ensureNamespace(t, "domain", map[string]string{ambientLabel: "ambient"})
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "mesh"}, Spec: meshv1.AmbientMeshSpec{Namespace: meshNS, ClusterDomain: "corp.example"}}
	if err := s.k8s.Create(ctx, mesh); err != nil && !isAlreadyExists(err) {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), mesh) })
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "domain"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), svc) })
	eventually(t, "service under the mesh's cluster domain", func() bool {
		got := state.ServiceByVIP(ip(svc.Spec.ClusterIP))
		return got != nil && got.Hostname == "web.domain.svc.corp.example"
	})
}

// TestReferenceGrantsSentToL7Proxies: ReferenceGrants reach the L7
// proxies whole (the ingress gateway decides cross-namespace backends and
// certificates from them), and leave when deleted.
func TestReferenceGrantsSentToL7Proxies(t *testing.T) {
	ctx := context.Background()
	ensureNamespace(t, "rg-backend", nil)
	rg := &gwv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Name: "from-edge", Namespace: "rg-backend"},
		Spec: gwv1beta1.ReferenceGrantSpec{
			From: []gwv1beta1.ReferenceGrantFrom{{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: "edge"}},
			To:   []gwv1beta1.ReferenceGrantTo{{Group: "", Kind: "Service"}},
		}}
	if err := s.k8s.Create(ctx, rg); err != nil {
		t.Fatal(err)
	}
	const key = "gateway.networking.k8s.io/ReferenceGrant/rg-backend/from-edge"
	sent := func() *meshapi.L7Resource {
		for _, r := range s.cp.Discovery.Snapshot(xds.L7ResourceType) {
			if r.Name == key {
				return r.Resource.(*meshapi.L7Resource)
			}
		}
		return nil
	}
	eventually(t, "ReferenceGrant sent", func() bool { return sent() != nil })
	var got gwv1beta1.ReferenceGrant
	if err := json.Unmarshal(sent().Json, &got); err != nil || len(got.Spec.From) != 1 || got.Spec.From[0].Namespace != "edge" || got.Spec.To[0].Kind != "Service" {
		t.Fatalf("sent %s (%v), want the grant's spec", sent().Json, err)
	}
	if err := s.k8s.Delete(ctx, rg); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ReferenceGrant withdrawn", func() bool { return sent() == nil })
}

// TestL4RoutesSentToL7Proxies: TLSRoutes and TCPRoutes (v1) reach the L7
// proxies whole, with their creation time (conflicting routes resolve
// oldest first), and leave when deleted.
func TestL4RoutesSentToL7Proxies(t *testing.T) {
	ctx := context.Background()
	ensureNamespace(t, "l4-apps", nil)
	tlsR := &gwv1.TLSRoute{ObjectMeta: metav1.ObjectMeta{Name: "shop", Namespace: "l4-apps"},
		Spec: gwv1.TLSRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Name: "edge"}}},
			Hostnames:       []gwv1.Hostname{"shop.example.com"},
			Rules:           []gwv1.TLSRouteRule{{BackendRefs: []gwv1.BackendRef{{BackendObjectReference: gwv1.BackendObjectReference{Name: "shop", Port: ptr.To(gwv1.PortNumber(8443))}}}}},
		}}
	tcpR := &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: "l4-apps"},
		Spec: gwv1.TCPRouteSpec{
			CommonRouteSpec: gwv1.CommonRouteSpec{ParentRefs: []gwv1.ParentReference{{Name: "edge"}}},
			Rules:           []gwv1.TCPRouteRule{{BackendRefs: []gwv1.BackendRef{{BackendObjectReference: gwv1.BackendObjectReference{Name: "postgres", Port: ptr.To(gwv1.PortNumber(5432))}}}}},
		}}
	for _, o := range []client.Object{tlsR, tcpR} {
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	sent := func(key string) *meshapi.L7Resource {
		for _, r := range s.cp.Discovery.Snapshot(xds.L7ResourceType) {
			if r.Name == key {
				return r.Resource.(*meshapi.L7Resource)
			}
		}
		return nil
	}
	const tlsKey, tcpKey = "gateway.networking.k8s.io/TLSRoute/l4-apps/shop", "gateway.networking.k8s.io/TCPRoute/l4-apps/db"
	eventually(t, "TLSRoute and TCPRoute sent", func() bool { return sent(tlsKey) != nil && sent(tcpKey) != nil })
	var gotTLS gwv1.TLSRoute
	if err := json.Unmarshal(sent(tlsKey).Json, &gotTLS); err != nil || len(gotTLS.Spec.Hostnames) != 1 || gotTLS.Spec.Rules[0].BackendRefs[0].Name != "shop" {
		t.Fatalf("sent %s (%v), want the TLSRoute's spec", sent(tlsKey).Json, err)
	}
	if gotTLS.CreationTimestamp.IsZero() {
		t.Errorf("sent %s without its creation time", sent(tlsKey).Json)
	}
	var gotTCP gwv1.TCPRoute
	if err := json.Unmarshal(sent(tcpKey).Json, &gotTCP); err != nil || gotTCP.Spec.Rules[0].BackendRefs[0].Name != "postgres" {
		t.Fatalf("sent %s (%v), want the TCPRoute's spec", sent(tcpKey).Json, err)
	}
	for _, o := range []client.Object{tlsR, tcpR} {
		if err := s.k8s.Delete(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "L4 routes withdrawn", func() bool { return sent(tlsKey) == nil && sent(tcpKey) == nil })
}

// TestIngressUseWaypointSent: the control plane tells the ingress
// gateways which Services they reach through the waypoint, as Istio reads
// istio.io/ingress-use-waypoint: the Service's label, else its
// namespace's; only for a Service that has a waypoint; withdrawn when the
// label, the waypoint or the Service goes.
func TestIngressUseWaypointSent(t *testing.T) {
	ctx := context.Background()
	ensureNamespace(t, "iuw", map[string]string{ambientLabel: "ambient"})
	wp := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "iuw"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	svc := func(name string, labels map[string]string) *corev1.Service {
		o := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "iuw", Labels: labels},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Port: 80}}}}
		if err := s.k8s.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), o) })
		return o
	}
	labelled := svc("labelled", map[string]string{"istio.io/ingress-use-waypoint": "true"})
	svc("plain", nil)
	svc("refused", map[string]string{"istio.io/ingress-use-waypoint": "false"})
	sent := func() map[string]bool {
		out := map[string]bool{}
		for _, r := range s.cp.Discovery.Snapshot(xds.L7ResourceType) {
			if l := r.Resource.(*meshapi.L7Resource); l.Kind == xds.IngressUseWaypointKind && l.Namespace == "iuw" {
				out[l.Name] = r.Name == xds.IngressUseWaypointKey("iuw", l.Name) && l.Group == xds.MeshGroup
			}
		}
		return out
	}
	want := func(why string, names ...string) {
		t.Helper()
		eventually(t, why, func() bool {
			got := sent()
			if len(got) != len(names) {
				return false
			}
			for _, n := range names {
				if !got[n] {
					return false
				}
			}
			return true
		})
	}
	// A label without a waypoint means nothing: nothing is sent.
	time.Sleep(200 * time.Millisecond)
	want("no waypoint yet")
	if err := s.k8s.Create(ctx, wp); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), wp) })
	want("the labelled Service with a waypoint", "labelled")
	// The namespace label covers Services without their own label; a
	// Service's "false" still wins.
	var ns corev1.Namespace
	if err := s.k8s.Get(ctx, client.ObjectKey{Name: "iuw"}, &ns); err != nil {
		t.Fatal(err)
	}
	ns.Labels["istio.io/ingress-use-waypoint"] = "true"
	if err := s.k8s.Update(ctx, &ns); err != nil {
		t.Fatal(err)
	}
	want("namespace label", "labelled", "plain")
	delete(ns.Labels, "istio.io/ingress-use-waypoint")
	if err := s.k8s.Update(ctx, &ns); err != nil {
		t.Fatal(err)
	}
	want("namespace label removed", "labelled")
	if err := s.k8s.Delete(ctx, labelled); err != nil {
		t.Fatal(err)
	}
	want("Service deleted")
}

// TestLocalityAndTrafficDistribution: pods carry their node's locality
// (topology labels, followed when they change), and a Service's
// trafficDistribution reaches the proxies as Istio sends it.
func TestLocalityAndTrafficDistribution(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-loc", "loc-node-a", "10.200.0.9")
	state := startClient(t, token(t, zt, xds.TokenAudience), zt.Name, xds.RoleZtunnel)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "loc-node-a", Labels: map[string]string{
		corev1.LabelTopologyRegion: "r1", corev1.LabelTopologyZone: "z1", "topology.istio.io/subzone": "s1"}}}
	if err := s.k8s.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), node) })
	ensureNamespace(t, "loc", map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: "loc", name: "near", node: "loc-node-a", ip: "10.6.0.1", labels: map[string]string{"app": "near"}})
	preferClose := "PreferClose"
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "near", Namespace: "loc"}, Spec: corev1.ServiceSpec{
		Selector: map[string]string{"app": "near"}, Ports: []corev1.ServicePort{{Port: 80}}, TrafficDistribution: &preferClose}}
	if err := s.k8s.Create(ctx, svc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), svc) })
	eventually(t, "pod locality and the Service's PreferClose", func() bool {
		w, sv := state.WorkloadByUID(uid("loc", "near")), state.ServiceByKey("loc/near.loc.svc.cluster.local")
		l := w.GetLocality()
		lb := sv.GetLoadBalancing()
		return l.GetRegion() == "r1" && l.GetZone() == "z1" && l.GetSubzone() == "s1" &&
			lb.GetMode() == workloadapi.LoadBalancing_FAILOVER && len(lb.GetRoutingPreference()) == 3 &&
			lb.GetRoutingPreference()[2] == workloadapi.LoadBalancing_ZONE
	})
	node.Labels[corev1.LabelTopologyZone] = "z2"
	if err := s.k8s.Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the node's new zone on its pod", func() bool {
		return state.WorkloadByUID(uid("loc", "near")).GetLocality().GetZone() == "z2"
	})
	// The namespace's annotation applies to Services without their own
	// preference; the spec field here still wins.
	svc.Spec.TrafficDistribution = nil
	if err := s.k8s.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	var ns corev1.Namespace
	if err := s.k8s.Get(ctx, client.ObjectKey{Name: "loc"}, &ns); err != nil {
		t.Fatal(err)
	}
	ns.Annotations = map[string]string{"networking.istio.io/traffic-distribution": "PreferSameNode"}
	if err := s.k8s.Update(ctx, &ns); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the namespace's PreferSameNode", func() bool {
		prefs := state.ServiceByKey("loc/near.loc.svc.cluster.local").GetLoadBalancing().GetRoutingPreference()
		return len(prefs) == 5 && prefs[4] == workloadapi.LoadBalancing_NODE
	})
	// The API server takes the field's newer values; the field wins over
	// the namespace's annotation.
	sameZone := "PreferSameZone"
	if err := s.k8s.Get(ctx, client.ObjectKeyFromObject(svc), svc); err != nil {
		t.Fatal(err)
	}
	svc.Spec.TrafficDistribution = &sameZone
	if err := s.k8s.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "spec PreferSameZone over the namespace's PreferSameNode", func() bool {
		prefs := state.ServiceByKey("loc/near.loc.svc.cluster.local").GetLoadBalancing().GetRoutingPreference()
		return len(prefs) == 3 && prefs[2] == workloadapi.LoadBalancing_ZONE
	})
	sameNode := "PreferSameNode"
	ns.Annotations["networking.istio.io/traffic-distribution"] = "PreferClose"
	if err := s.k8s.Update(ctx, &ns); err != nil {
		t.Fatal(err)
	}
	svc.Spec.TrafficDistribution = &sameNode
	if err := s.k8s.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "spec PreferSameNode over the namespace's PreferClose", func() bool {
		prefs := state.ServiceByKey("loc/near.loc.svc.cluster.local").GetLoadBalancing().GetRoutingPreference()
		return len(prefs) == 5 && prefs[4] == workloadapi.LoadBalancing_NODE
	})
}
