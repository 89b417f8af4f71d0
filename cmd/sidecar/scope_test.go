package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/test/netns"
	"github.com/ambientmesh/ambient/test/proctest"
)

// vmRSS is a process's resident set in KiB.
func vmRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// TestSidecarDiscoveryScope: in a mesh of many workloads, the control plane
// sends a sidecar its own workload, every service and what it looks up,
// not every workload (as it did before the sidecar scope: the "full"
// sidecar here is served so). The scoped sidecar still reaches a service
// whose endpoints it was never pushed (looked up on its first connection).
// SIDECAR_SCOPE_WORKLOADS sets the mesh size (default 2000).
func TestSidecarDiscoveryScope(t *testing.T) {
	netns.RequireRoot(t)
	workloads := 2000
	if v := os.Getenv("SIDECAR_SCOPE_WORKLOADS"); v != "" {
		workloads, _ = strconv.Atoi(v)
	}
	c := netns.NewCluster(t)
	n := c.AddNode("n1")
	scoped, full, peer := n.AddPod("web"), n.AddPod("web-full"), n.AddPod("peer")
	cp := proctest.NewControlPlane(t)
	cp.Unscoped[full.Name] = true
	open := func(p *netns.Pod) *os.File {
		f, err := p.Open()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	scopedNS, fullNS, peerNS := open(scoped), open(full), open(peer)
	cp.ServeIn(t, scopedNS)
	cp.ServeIn(t, fullNS)
	for _, p := range []*netns.Pod{scoped, full} {
		cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", p.Name), Name: p.Name, Namespace: "default",
			Addresses: [][]byte{p.IP.AsSlice()}, ServiceAccount: p.Name, TrustDomain: "cluster.local", Node: "n1",
			TunnelProtocol: workloadapi.TunnelProtocol_HBONE, NativeTunnel: true, Status: workloadapi.WorkloadStatus_HEALTHY})
	}
	// The mesh: workloads on other nodes behind 100 services, and "db"
	// whose only endpoint is the peer pod (outside the mesh: plain TCP).
	const services = 100
	for i := range services {
		host := fmt.Sprintf("svc-%d.apps.svc.cluster.local", i)
		cp.Address(t, discovery.ServiceKey("apps", host), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
			Name: fmt.Sprintf("svc-%d", i), Namespace: "apps", Hostname: host,
			Addresses: []*workloadapi.NetworkAddress{{Address: netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)}).AsSlice()}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	}
	for i := range workloads {
		name := fmt.Sprintf("app-%d", i)
		key := discovery.ServiceKey("apps", fmt.Sprintf("svc-%d.apps.svc.cluster.local", i%services))
		cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "apps", name), Name: name, Namespace: "apps",
			Node: fmt.Sprintf("node-%d", i%50), ServiceAccount: "app", TrustDomain: "cluster.local", WorkloadName: "app", CanonicalName: "app", CanonicalRevision: "v1",
			Addresses:      [][]byte{netip.AddrFrom4([4]byte{10, 200, byte(i >> 8), byte(i)}).AsSlice()},
			Services:       map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}},
			TunnelProtocol: workloadapi.TunnelProtocol_HBONE, Status: workloadapi.WorkloadStatus_HEALTHY})
	}
	dbVIP := netip.MustParseAddrPort("10.96.9.9:5432")
	dbKey := discovery.ServiceKey("default", "db.default.svc.cluster.local")
	cp.Address(t, dbKey, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: "db", Namespace: "default",
		Hostname: "db.default.svc.cluster.local", Addresses: []*workloadapi.NetworkAddress{{Address: dbVIP.Addr().AsSlice()}},
		Ports: []*workloadapi.Port{{ServicePort: 5432, TargetPort: 9090}}}}})
	cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", "peer"), Name: "peer", Namespace: "default",
		Addresses: [][]byte{peer.IP.AsSlice()}, Node: "n2", Status: workloadapi.WorkloadStatus_HEALTHY,
		Services: map[string]*workloadapi.PortList{dbKey: {Ports: []*workloadapi.Port{{ServicePort: 5432, TargetPort: 9090}}}}})

	// Policies and routes, as many as one per ten (policies) and one per
	// twenty (each kind of route) workloads, mostly of other namespaces:
	// the scoped sidecar (namespace default) gets its namespace's, the
	// root's and the producer routes; the full one all of them.
	publishPoliciesAndRoutes(t, cp, workloads, services)

	// RSS is the binary's as much as its state: SIDECAR_BIN (a built
	// cmd/sidecar) measures the real program, not this test binary.
	exe, env := proctest.Executable(t), []string{runMainEnv + "=1"}
	if bin := os.Getenv("SIDECAR_BIN"); bin != "" {
		exe, env = proctest.Copy(t, bin), nil
	}
	start := func(p *netns.Pod, ns *os.File) (*proctest.LogBuffer, int) {
		return proctest.StartSidecar(t, proctest.Sidecar{Exe: exe, PodNS: ns, ProbeNS: peerNS, IP: p.IP, Name: p.Name, Roots: cp.Roots, Env: env})
	}
	scopedOut, scopedPID := start(scoped, scopedNS)
	_, fullPID := start(full, fullNS)
	time.Sleep(2 * time.Second) // settle after the first push
	sb, fb := cp.PushedTo(scoped.Name), cp.PushedTo(full.Name)
	sr, fr := vmRSS(t, scopedPID), vmRSS(t, fullPID)
	pushed := func(pod string) (authz, l7 int) {
		return cp.PushedOf(pod, discovery.AuthorizationType), cp.PushedOf(pod, discovery.L7ResourceType)
	}
	sa, sl := pushed(scoped.Name)
	fa, fl := pushed(full.Name)
	t.Logf("%d workloads, %d services, %d policies, %d L7 resources: scoped sidecar received %d bytes of addresses, %d of authorizations, %d of L7 resources, RSS %d KiB; "+
		"full sidecar %d, %d, %d bytes, RSS %d KiB", workloads+3, services+1, workloads/10+2, 3*(workloads/20)+services+3, sb, sa, sl, sr, fb, fa, fl, fr)
	if sb == 0 || sb*5 > fb {
		t.Fatalf("scoped sidecar received %d bytes of addresses, full %d: want at most a fifth", sb, fb)
	}
	if sa == 0 || sa*5 > fa || sl == 0 || sl*2 > fl {
		t.Fatalf("scoped sidecar received %d bytes of authorizations and %d of L7 resources, full %d and %d: want at most a fifth and a half", sa, sl, fa, fl)
	}

	serve(t, peerNS, "[::]:9090", "db")
	t.Run("a service whose endpoints were not pushed is looked up", func(t *testing.T) {
		before := cp.PushedTo(scoped.Name)
		conn, err := netns.DialAs(context.Background(), scopedNS, dbVIP, 1000)
		if got := readAll(t, conn, err); got != "db" {
			t.Fatalf("got %q", got)
		}
		waitLine(t, scopedOut, "outbound{", "proxying to "+netip.AddrPortFrom(peer.IP, 9090).String()+" using passthrough")
		if cp.PushedTo(scoped.Name) == before {
			t.Fatal("nothing was pushed for the lookup")
		}
	})
}

// publishPoliciesAndRoutes adds to cp, for a mesh of workloads behind
// services (svc-<i>.apps): workloads/10 L4 policies over 100 namespaces
// plus one in default and one in the root namespace; workloads/20 L7
// policies, consumer routes and ingress routes in other namespaces; one
// producer route per service; and one L7 policy and one consumer route in
// default.
func publishPoliciesAndRoutes(t *testing.T, cp *proctest.ControlPlane, workloads, services int) {
	l4 := func(ns, name string) {
		cp.Resource(t, discovery.AuthorizationType, discovery.PolicyKey(ns, name), &security.Authorization{Name: name, Namespace: ns,
			Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
			Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Namespaces: []*security.StringMatch{
				{MatchType: &security.StringMatch_Exact{Exact: ns}}, {MatchType: &security.StringMatch_Prefix{Prefix: "prod-"}}}}}}}}}})
	}
	l7 := func(group, kind, ns, name, spec string) {
		js := fmt.Sprintf(`{"apiVersion":"%s/v1","kind":"%s","metadata":{"name":"%s","namespace":"%s"},"spec":%s}`, group, kind, name, ns, spec)
		cp.Resource(t, discovery.L7ResourceType, discovery.L7Key(group, kind, ns, name),
			&meshapi.L7Resource{Group: group, Kind: kind, Namespace: ns, Name: name, Json: []byte(js)})
	}
	const policySpec = `{"selector":{"matchLabels":{"app":"app"}},"rules":[{"from":[{"source":{"principals":["cluster.local/ns/apps/sa/app"]}}],"to":[{"operation":{"methods":["GET"],"paths":["/api/*"]}}]}]}`
	route := func(parentNS, parentKind string, svc int) string {
		return fmt.Sprintf(`{"parentRefs":[{"group":"","kind":"%s","name":"svc-%d","namespace":"%s"}],"rules":[{"matches":[{"path":{"type":"PathPrefix","value":"/v2"}}],`+
			`"backendRefs":[{"name":"svc-%d","port":80,"weight":90},{"name":"svc-%d","port":80,"weight":10}]}]}`, parentKind, svc, parentNS, svc, (svc+1)%services)
	}
	for i := range workloads / 10 {
		l4(fmt.Sprintf("team-%d", i%100), fmt.Sprintf("allow-%d", i))
	}
	l4("default", "allow")
	l4(proctest.RootNamespace, "mesh-wide")
	const gw = "gateway.networking.k8s.io"
	for i := range workloads / 20 {
		ns := fmt.Sprintf("team-%d", i%100)
		l7("security.istio.io", "AuthorizationPolicy", ns, fmt.Sprintf("l7-%d", i), policySpec)
		l7(gw, "HTTPRoute", ns, fmt.Sprintf("consumer-%d", i), route("apps", "Service", i%services))
		l7(gw, "HTTPRoute", "edge", fmt.Sprintf("ingress-%d", i), strings.Replace(route("edge", "Gateway", i%services), `"group":""`, `"group":"`+gw+`"`, 1))
	}
	for i := range services {
		l7(gw, "HTTPRoute", "apps", fmt.Sprintf("producer-%d", i), route("apps", "Service", i))
	}
	l7("security.istio.io", "AuthorizationPolicy", "default", "l7", policySpec)
	l7(gw, "HTTPRoute", "default", "consumer", route("apps", "Service", 0))
}
