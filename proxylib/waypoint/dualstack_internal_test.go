package waypoint

import (
	"net/netip"
	"testing"

	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// TestEndpointsKeepClientFamily: the waypoint sends a request that came
// for a dual-stack Service's IPv6 address to its endpoints' IPv6
// addresses, and one for the IPv4 address to their IPv4 ones.
func TestEndpointsKeepClientFamily(t *testing.T) {
	st := discovery.NewState()
	apply := func(name string, a *workloadapi.Address) {
		body, err := anypb.New(a)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Apply(discovery.AddressType, []discovery.Resource{{Name: name, Version: "1", Body: body}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	key := discovery.ServiceKey("default", "web.default.svc.cluster.local")
	svc := &workloadapi.Service{Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local", IpFamilies: workloadapi.IPFamilies_DUAL,
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.7").AsSlice()}, {Address: netip.MustParseAddr("fd00:96::7").AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}
	apply(key, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}})
	apply("c//Pod/default/web-1", &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid: "c//Pod/default/web-1", Name: "web-1", Namespace: "default", Status: workloadapi.WorkloadStatus_HEALTHY,
		Addresses: [][]byte{netip.MustParseAddr("10.244.2.5").AsSlice(), netip.MustParseAddr("fd00:244:2::5").AsSlice()},
		Services:  map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}}}})
	s, err := New(Config{Name: "wp", Namespace: "default", Identity: identity.Identity{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "wp"},
		State: st, Sidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	for dst, want := range map[string]string{"fd00:96::7": "[fd00:244:2::5]:8080", "10.96.0.7": "10.244.2.5:8080"} {
		tiers, addrs := s.endpointsOf(svc, 80, netip.MustParseAddr(dst))
		if len(tiers) != 1 || len(tiers[0]) != 1 || addrs[tiers[0][0]].addr.String() != want {
			t.Errorf("request for %s: endpoints %v, want %s", dst, tiers, want)
		}
	}
}
