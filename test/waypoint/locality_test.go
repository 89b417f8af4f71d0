package waypoint

import (
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
	"github.com/ambientmesh/ambient/test/meshtest"
)

func inZone(zone string) func(*workloadapi.Workload) {
	return func(w *workloadapi.Workload) { w.Locality = &workloadapi.Locality{Region: "r1", Zone: zone} }
}

// TestWaypointPrefersCloseEndpoints: a Service with PreferClose behind a
// waypoint. The waypoint (node1, zone z1) chooses the endpoint closest to
// itself, as Istio's waypoints do: httpbin-near on node2 (z1) rather than
// httpbin-far on node3 (z2), although the client runs in z2; it fails over
// to the far endpoint when the near one turns unhealthy and comes back.
func TestWaypointPrefersCloseEndpoints(t *testing.T) {
	m := newMesh(t, 3)
	m.SyncAll()
	state := m.NewWaypointState()
	wpVIP := netip.MustParseAddr("10.96.0.20")
	wpKey := discovery.ServiceKey("default", hostname("waypoint"))
	wpPod := m.AddPod(m.Nodes[0], "waypoint-1", "waypoint", false, inZone("z1"), func(w *workloadapi.Workload) {
		w.WorkloadName = "waypoint"
		w.Services = map[string]*workloadapi.PortList{wpKey: {Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}}}
	})
	m.CP.Service(&workloadapi.Service{Name: "waypoint", Namespace: "default", Hostname: hostname("waypoint"),
		Addresses: []*workloadapi.NetworkAddress{{Address: wpVIP.AsSlice()}}, Ports: []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}}})
	m.RunWaypoint(wpPod, waypoint.Config{Name: "waypoint", State: state, Registry: prometheus.NewRegistry(),
		Log: m.Logs.Logger("waypoint"), RootNamespace: meshtest.RootNamespace, PodUID: wpPod.UID})
	gw := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: wpVIP.AsSlice()}}, HboneMtlsPort: 15008}

	vip := netip.MustParseAddrPort("10.96.0.40:80")
	key := discovery.ServiceKey("default", hostname("httpbin"))
	member := func(w *workloadapi.Workload) {
		w.WorkloadName = "httpbin"
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}}}
	}
	sleep := m.AddPod(m.Nodes[2], "sleep-1", "sleep", true, inZone("z2"))
	near := m.AddPod(m.Nodes[1], "httpbin-near", "httpbin", true, inZone("z1"), member)
	far := m.AddPod(m.Nodes[2], "httpbin-far", "httpbin", true, inZone("z2"), member)
	near.ServeHTTP(t, 80)
	far.ServeHTTP(t, 80)
	m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: hostname("httpbin"),
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}}, Waypoint: gw,
		Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}},
		LoadBalancing: &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
			workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}}})

	sent := 0
	expectOnly := func(why, pod string) {
		t.Helper()
		got := map[string]int{}
		for range 8 {
			code, body, err := do(sleep, "GET", vip, "/locality")
			if err != nil || code != 200 {
				t.Fatalf("%s: GET = %d %q, %v", why, code, body, err)
			}
			got[body]++
		}
		sent += 8
		if got[pod] != 8 {
			t.Fatalf("%s: answers %v, want all 8 from %s", why, got, pod)
		}
	}
	expectOnly("near endpoint (the waypoint's zone) healthy", "httpbin-near")
	near.Workload.Status = workloadapi.WorkloadStatus_UNHEALTHY
	m.CP.Workload(near.Workload)
	expectOnly("near endpoint unhealthy: fail over", "httpbin-far")
	near.Workload.Status = workloadapi.WorkloadStatus_HEALTHY
	m.CP.Workload(near.Workload)
	expectOnly("near endpoint healthy again", "httpbin-near")
	if n := awaitAccessLines(m.Logs, "waypoint", "/locality", sent); n != sent {
		t.Fatalf("the waypoint logged %d of the %d requests: traffic did not go through it", n, sent)
	}
}
