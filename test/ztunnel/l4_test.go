package ztunnel

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// TestSleepToHTTPBin: sleep on node1 reaches httpbin on node2 through both
// ztunnels over HBONE, and httpbin's ztunnel sees sleep's SPIFFE identity.
func TestSleepToHTTPBin(t *testing.T) {
	m := newMesh(t, 2)
	m.syncAll()
	sleep := m.addPod(m.nodes[0], "sleep-1", "sleep", true)
	httpbin := m.addPod(m.nodes[1], "httpbin-1", "httpbin", true)
	httpbin.serveHTTP(t, 80)

	got, err := sleep.get(httpbin.addr(80))
	if err != nil || got != "httpbin-1" {
		t.Fatalf("GET = %q, %v", got, err)
	}
	m.logs.waitFor(t, "proxy to "+httpbin.addr(80).String()+" using HBONE via "+netip.AddrPortFrom(httpbin.IP, 15008).String()+" type Direct")
	m.logs.waitFor(t, "inbound{", "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+httpbin.addr(80).String())
	m.logs.waitFor(t, "complete dur=", "direction=inbound", "src.identity=spiffe://cluster.local/ns/default/sa/sleep")
	_ = strings.Contains
	_ = workloadapi.TunnelProtocol_HBONE
	_ = security.Action_ALLOW
}
