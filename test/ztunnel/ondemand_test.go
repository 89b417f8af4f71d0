package ztunnel

import (
	"net/netip"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TestOnDemandLookup: node-scoped ztunnels (the control plane pushes each
// only services and its own node's workloads). The first connection to a
// pod or service on another node is held while node1's ztunnel looks the
// address up, then forwarded over HBONE with mTLS; an address outside the
// mesh passes through after the lookup; a lookup the control plane does not
// answer refuses the connection (fail closed).
func TestOnDemandLookup(t *testing.T) {
	m := meshtest.New(t, 2, meshtest.WithOnDemand())
	m.SyncAll()
	vip := netip.MustParseAddrPort("10.96.0.40:8000")
	svcKey := discovery.ServiceKey("default", "httpbin.default.svc.cluster.local")
	inService := func(w *workloadapi.Workload) {
		w.Services = map[string]*workloadapi.PortList{svcKey: {Ports: []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}}}
	}
	sleep := m.AddPod(m.Nodes[0], "sleep-1", "sleep", true)
	httpbin := m.AddPod(m.Nodes[1], "httpbin-1", "httpbin", true)
	backend := m.AddPod(m.Nodes[1], "httpbin-2", "httpbin", true, inService)
	outside := m.AddPod(m.Nodes[1], "outside-1", "outside", false)
	silent := m.AddPod(m.Nodes[1], "outside-2", "outside", false)
	m.CP.Service(&workloadapi.Service{Name: "httpbin", Namespace: "default", Hostname: "httpbin.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: vip.Addr().AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 8000, TargetPort: 80}}})
	for _, p := range []*meshtest.Pod{httpbin, backend, outside, silent} {
		p.ServeHTTP(t, 80)
	}
	node1 := m.Nodes[0].State
	for _, p := range []*meshtest.Pod{httpbin, backend, outside} {
		if node1.WorkloadByUID(p.UID) != nil {
			t.Fatalf("node1's ztunnel holds %s of node2 before any lookup", p.PodName)
		}
	}

	t.Run("pod on another node: held, resolved, tunnelled", func(t *testing.T) {
		meshtest.ExpectOK(t, sleep, httpbin.Addr(80), "httpbin-1")
		m.Logs.WaitFor(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+httpbin.Addr(80).String())
		if node1.WorkloadByUID(httpbin.UID) == nil {
			t.Fatal("the looked-up workload is not in node1's state")
		}
		// node2's ztunnel looked the caller up too: its telemetry names it.
		m.Logs.WaitFor(t, "inbound{", "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: complete", "src.workload=sleep ")
	})
	t.Run("service VIP: endpoints looked up, tunnelled", func(t *testing.T) {
		meshtest.ExpectOK(t, sleep, vip, "httpbin-2")
		m.Logs.WaitFor(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+backend.Addr(80).String())
	})
	t.Run("outside the mesh: passes through after the lookup", func(t *testing.T) {
		meshtest.ExpectOK(t, sleep, outside.Addr(80), "outside-1")
	})
	t.Run("lookup unanswered: refused", func(t *testing.T) {
		m.CP.Unanswered = map[string]bool{discovery.AddressAlias("", silent.IP): true}
		meshtest.ExpectRefused(t, sleep, silent.Addr(80))
		m.Logs.WaitFor(t, "discovery_lookup_failed")
	})
}
