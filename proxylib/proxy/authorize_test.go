package proxy

import (
	"net/netip"
	"testing"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/rbac"
)

// The seeds' allow-sleep-to-httpbin reaches ztunnel as an L7-derived ALLOW
// without groups (deny-all). Only the destination's own waypoint, which
// enforced it whole, gets past it.
func TestAuthorizeSkipsL7DerivedOnlyForDestinationWaypoint(t *testing.T) {
	s := discovery.NewState(discovery.AddressType, discovery.AuthorizationType)
	const pol = "default/allow-sleep-to-httpbin"
	selected := func(w *workloadapi.Workload) { w.AuthorizationPolicies = []string{pol} }
	gw := func(host string) *workloadapi.GatewayAddress {
		return &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: host}}}
	}
	const wpHost, otherHost, goneHost = "wp.default.svc.cluster.local", "other-wp.default.svc.cluster.local", "gone.default.svc.cluster.local"
	inSvc := func(host string) func(*workloadapi.Workload) {
		return func(w *workloadapi.Workload) {
			w.Services = map[string]*workloadapi.PortList{discovery.ServiceKey("default", host): {}}
		}
	}
	for _, w := range []*workloadapi.Workload{
		wl("httpbin", "10.0.2.2", "n2", true, selected, func(w *workloadapi.Workload) { w.Waypoint = gw(wpHost) }),
		wl("plain", "10.0.2.3", "n2", true, selected),
		wl("orphan", "10.0.2.4", "n2", true, selected, func(w *workloadapi.Workload) { w.Waypoint = gw(goneHost) }),
		wl("wp", "10.0.2.8", "n2", false, inSvc(wpHost)),
		wl("other-wp", "10.0.2.9", "n2", false, inSvc(otherHost)),
	} {
		w.Status = workloadapi.WorkloadStatus_HEALTHY
		applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	}
	for i, host := range []string{wpHost, otherHost, goneHost} {
		applyAddr(t, s, discovery.ServiceKey("default", host), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
			Name: host[:len(host)-len(".default.svc.cluster.local")], Namespace: "default", Hostname: host,
			Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, byte(10 + i)}}}}}})
	}
	body, err := anypb.New(&security.Authorization{Name: "allow-sleep-to-httpbin", Namespace: "default",
		Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_ALLOW, AmbientL7Derived: true})
	if err != nil {
		t.Fatal(err)
	}
	body.TypeUrl = discovery.AuthorizationType
	if err := s.Apply(discovery.AuthorizationType, []discovery.Resource{{Name: pol, Version: "1", Body: body}}, nil); err != nil {
		t.Fatal(err)
	}

	r := &Router{State: s, Node: "n2", TrustDomain: "cluster.local"}
	id := func(sa string) identity.Identity {
		return identity.MustParse("spiffe://cluster.local/ns/default/sa/" + sa)
	}
	cases := []struct {
		name    string
		dst     string
		peer    identity.Identity
		forged  bool // caller claims FromDestinationWaypoint; Authorize must recompute it
		allowed bool
	}{
		{"destination's own waypoint: L7-derived policy skipped", "httpbin", id("wp"), false, true},
		{"sleep direct to httpbin: fail closed", "httpbin", id("sleep"), false, false},
		{"another waypoint's identity: applied", "httpbin", id("other-wp"), false, false},
		{"a forged flag from a non-waypoint peer: applied", "httpbin", id("sleep"), true, false},
		{"no waypoint: applied to the waypoint identity", "plain", id("wp"), false, false},
		{"no waypoint: applied to sleep", "plain", id("sleep"), false, false},
		{"unresolvable waypoint: matches nobody", "orphan", id("wp"), false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dst := s.WorkloadByUID("c//Pod/default/" + c.dst)
			if dst == nil {
				t.Fatalf("no workload %s", c.dst)
			}
			peer := c.peer
			d := r.Authorize(dst, rbac.Conn{Source: &peer, DstPort: 80, FromDestinationWaypoint: c.forged})
			if d.Allowed != c.allowed {
				t.Fatalf("Authorize(%s from %s) = %+v, want allowed=%v", c.dst, peer, d, c.allowed)
			}
		})
	}
}

// Checking a peer against a waypoint (every inbound tunnel does) must not
// advance the round robin that spreads outbound traffic over its replicas,
// and any replica's identity is the waypoint's.
func TestIsWaypointIdentityLeavesRoundRobinAlone(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	const host = "wp.default.svc.cluster.local"
	key := discovery.ServiceKey("default", host)
	inSvc := func(w *workloadapi.Workload) {
		w.ServiceAccount = "wp"
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	}
	for _, w := range []*workloadapi.Workload{wl("wp-a", "10.0.2.8", "n2", false, inSvc), wl("wp-b", "10.0.2.9", "n2", false, inSvc)} {
		w.Status = workloadapi.WorkloadStatus_HEALTHY
		applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	}
	applyAddr(t, s, key, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "wp", Namespace: "default", Hostname: host, Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 20}}},
		Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}})
	gw := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: host}}}
	r := &Router{State: s, Node: "n1", TrustDomain: "cluster.local"}
	wpID := identity.MustParse("spiffe://cluster.local/ns/default/sa/wp")
	if r.isWaypointIdentity(gw, identity.MustParse("spiffe://cluster.local/ns/default/sa/sleep")) {
		t.Fatal("sleep taken for the waypoint")
	}
	var picked []string
	for i := 0; i < 4; i++ {
		// One check per outbound pick: with a round-robin pick inside the
		// check, every outbound pick would land on the same replica.
		if !r.isWaypointIdentity(gw, wpID) {
			t.Fatal("the waypoint's identity not recognised")
		}
		rt, err := r.toWaypoint(gw, netip.MustParseAddrPort("10.0.2.2:80"))
		if err != nil {
			t.Fatal(err)
		}
		picked = append(picked, rt.ProxyAddr.Addr().String())
	}
	for i := 1; i < len(picked); i++ {
		if picked[i] == picked[i-1] {
			t.Fatalf("outbound picks %v: identity checks disturbed the round robin", picked)
		}
	}
}
