package ztunnel

import (
	"net/netip"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// What the control plane sends for trafficDistribution PreferClose and for
// internalTrafficPolicy Local (controllers/discovery/locality.go).
var (
	preferClose = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_FAILOVER, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK, workloadapi.LoadBalancing_REGION, workloadapi.LoadBalancing_ZONE}}
	nodeLocal = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_STRICT, RoutingPreference: []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NODE}}
)

func inZone(zone string) func(*workloadapi.Workload) {
	return func(w *workloadapi.Workload) { w.Locality = &workloadapi.Locality{Region: "r1", Zone: zone} }
}

// TestTrafficDistributionPreferClose: three nodes, the client on node1 in
// zone z1, httpbin on node2 (z1, near) and node3 (z2, far). With
// PreferClose the client's ztunnel sends every connection to the near
// endpoint while it is healthy, fails over to the far one when the near
// one turns unhealthy or goes, and comes back; without a preference both
// are used. internalTrafficPolicy Local refuses when the client's node has
// no endpoint.
func TestTrafficDistributionPreferClose(t *testing.T) {
	m := meshtest.New(t, 3)
	m.SyncAll()
	const host = "httpbin.default.svc.cluster.local"
	key := discovery.ServiceKey("default", host)
	vip := netip.MustParseAddrPort("10.96.0.40:80")
	member := func(w *workloadapi.Workload) {
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}}}
	}
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true, inZone("z1"))
	near := m.AddPod(m.Nodes[1], "httpbin-near", "httpbin", true, inZone("z1"), member)
	far := m.AddPod(m.Nodes[2], "httpbin-far", "httpbin", true, inZone("z2"), member)
	near.ServeHTTP(t, 80)
	far.ServeHTTP(t, 80)
	service := func(lb *workloadapi.LoadBalancing) {
		m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: host,
			Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}, LoadBalancing: lb})
	}
	answers := func(n int) map[string]int {
		t.Helper()
		got := map[string]int{}
		for range n {
			body, err := sleep.Get(vip)
			if err != nil {
				t.Fatalf("GET %s: %v", vip, err)
			}
			got[body]++
		}
		return got
	}
	expectOnly := func(why, pod string) {
		t.Helper()
		if got := answers(8); got[pod] != 8 {
			t.Fatalf("%s: answers %v, want all 8 from %s", why, got, pod)
		}
	}

	service(nil)
	if got := answers(8); got["httpbin-near"] == 0 || got["httpbin-far"] == 0 {
		t.Fatalf("no preference: answers %v, want both endpoints", got)
	}
	service(preferClose)
	expectOnly("PreferClose, near endpoint healthy", "httpbin-near")
	near.Workload.Status = workloadapi.WorkloadStatus_UNHEALTHY
	m.CP.Workload(near.Workload)
	expectOnly("near endpoint unhealthy: fail over", "httpbin-far")
	near.Workload.Status = workloadapi.WorkloadStatus_HEALTHY
	m.CP.Workload(near.Workload)
	expectOnly("near endpoint healthy again", "httpbin-near")
	m.CP.Remove(discovery.AddressType, near.UID)
	expectOnly("near endpoint gone: fail over", "httpbin-far")
	m.CP.Workload(near.Workload)
	expectOnly("near endpoint back", "httpbin-near")

	// internalTrafficPolicy Local: no endpoint on the client's node.
	service(nodeLocal)
	meshtest.ExpectRefused(t, sleep, vip)
	m.Logs.WaitFor(t, "has no healthy endpoint")
}

// TestPublishNotReadyAddresses: a Service with publishNotReadyAddresses
// (health policy ALLOW_ALL) is served by an endpoint that is not ready;
// without it the same endpoint is not used.
func TestPublishNotReadyAddresses(t *testing.T) {
	m := meshtest.New(t, 2)
	m.SyncAll()
	const host = "httpbin.default.svc.cluster.local"
	key := discovery.ServiceKey("default", host)
	vip := netip.MustParseAddrPort("10.96.0.41:80")
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	unready := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true, func(w *workloadapi.Workload) {
		w.Status = workloadapi.WorkloadStatus_UNHEALTHY
		w.Services = map[string]*workloadapi.PortList{key: {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}}}
	})
	unready.ServeHTTP(t, 80)
	service := func(lb *workloadapi.LoadBalancing) {
		m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: host,
			Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 80}}, LoadBalancing: lb})
	}
	service(nil)
	meshtest.ExpectRefused(t, sleep, vip)
	service(&workloadapi.LoadBalancing{HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL})
	meshtest.ExpectOK(t, sleep, vip, "httpbin-1")
}
