package discovery

import (
	"net/netip"
	"sort"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverypb "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/protobuf/types/known/structpb"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

func wl(name, node, ip string, services ...string) *workloadapi.Address {
	w := &workloadapi.Workload{Uid: xds.PodUID("Kubernetes", "ns", name), Name: name, Namespace: "ns", Node: node,
		Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()}, Services: map[string]*workloadapi.PortList{}}
	for _, s := range services {
		w.Services[s] = &workloadapi.PortList{}
	}
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
}

func svcAddr(host, vip string, wp *workloadapi.GatewayAddress) *workloadapi.Address {
	return &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{Name: host, Namespace: "ns", Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr(vip).AsSlice()}}, Waypoint: wp}}}
}

func scopedReq(role, node string, subscribe ...string) *cachev3.DeltaRequest {
	md, _ := structpb.NewStruct(map[string]any{scopeRoleKey: role, scopeNodeKey: node})
	return &discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AddressType, Node: &core.Node{Metadata: md}, ResourceNamesSubscribe: subscribe}
}

// sidecarReq is a sidecar's request as the server scopes it: its role and
// its own pod's workload uid.
func sidecarReq(pod string, subscribe ...string) *cachev3.DeltaRequest {
	md, _ := structpb.NewStruct(map[string]any{scopeRoleKey: xds.RoleSidecar, scopeNodeKey: "node-a", scopePodKey: pod})
	return &discoverypb.DeltaDiscoveryRequest{TypeUrl: xds.AddressType, Node: &core.Node{Metadata: md}, ResourceNamesSubscribe: subscribe}
}

// TestAddressCacheScope: what one response carries for each kind of
// subscriber.
func TestAddressCacheScope(t *testing.T) {
	uid := func(n string) string { return xds.PodUID("Kubernetes", "ns", n) }
	wpGW := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{
		Address: &workloadapi.NetworkAddress{Address: netip.MustParseAddr("10.96.0.20").AsSlice()}}, HboneMtlsPort: 15008}
	c := NewAddressCache()
	if err := c.UpdateResources(map[string]cachetypes.Resource{
		"ns/web":       svcAddr("web", "10.96.0.10", wpGW),
		"ns/wp":        svcAddr("wp", "10.96.0.20", nil),
		"ns/db":        svcAddr("db", "10.96.0.30", nil),
		uid("wp-0"):    wl("wp-0", "node-c", "10.0.3.1", "ns/wp"),
		uid("web-a"):   wl("web-a", "node-a", "10.0.1.1", "ns/web"),
		uid("web-b"):   wl("web-b", "node-b", "10.0.2.1", "ns/web"),
		uid("db-b"):    wl("db-b", "node-b", "10.0.2.2", "ns/db"),
		uid("other-b"): wl("other-b", "node-b", "10.0.2.3"),
	}, nil); err != nil {
		t.Fatal(err)
	}
	all := []string{"ns/db", "ns/web", "ns/wp", uid("db-b"), uid("other-b"), uid("web-a"), uid("web-b"), uid("wp-0")}
	base := []string{"ns/db", "ns/web", "ns/wp", uid("web-a"), uid("wp-0")}
	tests := []struct {
		name        string
		req         *cachev3.DeltaRequest
		wildcard    bool
		want        []string
		wantRemoved []string
	}{
		{"wildcard ztunnel (Istio without on-demand)", scopedReq(xds.RoleZtunnel, "node-a"), true, all, nil},
		{"waypoint", scopedReq(xds.RoleWaypoint, ""), true, all, nil},
		{"node scope: services, own node, waypoints", scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName), false, base, nil},
		{"by pod address", scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName, "/10.0.2.3"), false, append(base, uid("other-b")), nil},
		{"by service VIP brings endpoints", scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName, "/10.96.0.30"), false, append(base, uid("db-b")), nil},
		{"by service key brings endpoints", scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName, "ns/web"), false, append(base, uid("web-b")), nil},
		{"unknown address is answered as removed", scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName, "/192.0.2.1"), false, base, []string{"/192.0.2.1"}},
		{"names only, no node scope", scopedReq(xds.RoleZtunnel, "node-a", uid("db-b")), false, []string{uid("db-b")}, nil},
		// A sidecar on node-a: not node-a's pods, only its own.
		{"sidecar scope: services, own pod, waypoints", sidecarReq(uid("other-b"), xds.NodeScopeName), false,
			[]string{"ns/db", "ns/web", "ns/wp", uid("other-b"), uid("wp-0")}, nil},
		{"sidecar looks up the endpoints of a service it calls", sidecarReq(uid("other-b"), xds.NodeScopeName, "/10.96.0.30"), false,
			[]string{"ns/db", "ns/web", "ns/wp", uid("other-b"), uid("wp-0"), uid("db-b")}, nil},
		{"wildcard sidecar (full discovery)", sidecarReq(uid("other-b")), true, all, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var sub stream.Subscription
			if tc.wildcard {
				sub = stream.NewDeltaSubscription(nil, nil, nil, true)
			} else {
				sub = stream.NewDeltaSubscription(tc.req.ResourceNamesSubscribe, nil, nil, true)
			}
			out := make(chan cachev3.DeltaResponse, 1)
			if _, err := c.CreateDeltaWatch(tc.req, &sub, out); err != nil {
				t.Fatal(err)
			}
			resp, _ := (<-out).GetDeltaDiscoveryResponse()
			var got []string
			for _, r := range resp.Resources {
				got = append(got, r.Name)
			}
			sort.Strings(got)
			sort.Strings(tc.want)
			if !equal(got, tc.want) {
				t.Errorf("resources %v\nwant %v", got, tc.want)
			}
			if !equal(resp.RemovedResources, tc.wantRemoved) {
				t.Errorf("removed %v, want %v", resp.RemovedResources, tc.wantRemoved)
			}
		})
	}
}

// TestAddressCachePushesOnlyToWhomItConcerns: a pod change on node-b
// answers node-b's open watch and leaves node-a's open.
func TestAddressCachePushesOnlyToWhomItConcerns(t *testing.T) {
	c := NewAddressCache()
	if err := c.UpdateResources(map[string]cachetypes.Resource{"ns/web": svcAddr("web", "10.96.0.10", nil)}, nil); err != nil {
		t.Fatal(err)
	}
	watch := func(node string) chan cachev3.DeltaResponse {
		req := scopedReq(xds.RoleZtunnel, node, xds.NodeScopeName)
		sub := stream.NewDeltaSubscription(req.ResourceNamesSubscribe, nil, nil, true)
		sub.SetReturnedResources(map[string]string{"ns/web": c.entries["ns/web"].version})
		req.ResourceNamesSubscribe = nil // an ACK
		req.ResponseNonce = "1"
		out := make(chan cachev3.DeltaResponse, 1)
		if _, err := c.CreateDeltaWatch(req, &sub, out); err != nil {
			t.Fatal(err)
		}
		return out
	}
	a, b := watch("node-a"), watch("node-b")
	if len(a)+len(b) != 0 {
		t.Fatal("an up-to-date watch was answered")
	}
	if err := c.UpdateResources(map[string]cachetypes.Resource{xds.PodUID("Kubernetes", "ns", "p"): wl("p", "node-b", "10.0.2.9")}, nil); err != nil {
		t.Fatal(err)
	}
	if len(b) != 1 {
		t.Fatal("node-b's ztunnel was not told about its new pod")
	}
	if len(a) != 0 {
		t.Fatal("node-a's ztunnel was pushed node-b's pod")
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestAddressCacheResumesOnAnotherInstance: a ztunnel reconnecting to a
// restarted control plane (or another replica) with the versions it holds
// is sent only what differs, as the client expects (versions are content
// hashes, not an instance's update counter).
func TestAddressCacheResumesOnAnotherInstance(t *testing.T) {
	uid := func(n string) string { return xds.PodUID("Kubernetes", "ns", n) }
	objs := map[string]cachetypes.Resource{
		"ns/web":     svcAddr("web", "10.96.0.10", nil),
		uid("web-a"): wl("web-a", "node-a", "10.0.1.1", "ns/web"),
		uid("web-b"): wl("web-b", "node-b", "10.0.2.1", "ns/web"),
	}
	old, restarted := NewAddressCache(), NewAddressCache()
	// The old instance saw more updates (the same content in the end).
	for _, c := range []*AddressCache{old, old, restarted} {
		if err := c.UpdateResources(objs, nil); err != nil {
			t.Fatal(err)
		}
	}
	held := map[string]string{}
	for _, name := range []string{"ns/web", uid("web-a")} {
		held[name] = old.entries[name].version
	}
	resume := func(c *AddressCache) []string {
		req := scopedReq(xds.RoleZtunnel, "node-a", xds.NodeScopeName)
		sub := stream.NewDeltaSubscription(req.ResourceNamesSubscribe, nil, held, true)
		out := make(chan cachev3.DeltaResponse, 1)
		if _, err := c.CreateDeltaWatch(req, &sub, out); err != nil {
			t.Fatal(err)
		}
		resp, _ := (<-out).GetDeltaDiscoveryResponse()
		var got []string
		for _, r := range resp.Resources {
			got = append(got, r.Name)
		}
		return append(got, resp.RemovedResources...)
	}
	if got := resume(restarted); len(got) != 0 {
		t.Errorf("resuming with current versions was sent %v, want nothing", got)
	}
	if err := restarted.UpdateResources(map[string]cachetypes.Resource{uid("web-a"): wl("web-a", "node-a", "10.0.1.2", "ns/web")}, nil); err != nil {
		t.Fatal(err)
	}
	if got := resume(restarted); !equal(got, []string{uid("web-a")}) {
		t.Errorf("after web-a changed, resuming was sent %v, want only web-a", got)
	}
}
