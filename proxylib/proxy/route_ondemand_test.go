package proxy

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
)

// TestRouterOnDemand: with Demand set, a connection to an address the
// state lacks waits for the lookup and is then routed with its answer; a
// service's endpoints are asked for before the first pick; an address the
// control plane does not know passes through (outside the mesh) and a
// lookup that does not finish refuses the connection.
func TestRouterOnDemand(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	svcKey := "default/web.default.svc.cluster.local"
	applyAddr(t, s, svcKey, &workloadapi.Address{Type: &workloadapi.Address_Service{Service: &workloadapi.Service{
		Name: "web", Namespace: "default", Hostname: "web.default.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.10").AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}}})
	local := wl("local", "10.0.1.1", "n1", true)
	applyAddr(t, s, local.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: local}})
	// What the control plane would answer, by name.
	answers := map[string]*workloadapi.Workload{
		discovery.AddressAlias("", netip.MustParseAddr("10.0.2.2")): wl("remote", "10.0.2.2", "n2", true),
		svcKey: wl("web-b", "10.0.2.3", "n2", true, func(w *workloadapi.Workload) {
			w.Services = map[string]*workloadapi.PortList{svcKey: {}}
		}),
	}
	var mu sync.Mutex
	var asked []string
	r := &Router{State: s, Node: "n1", TrustDomain: "cluster.local", DemandTimeout: 200 * time.Millisecond,
		Demand: func(ctx context.Context, names ...string) error {
			mu.Lock()
			asked = append(asked, names...)
			mu.Unlock()
			for _, n := range names {
				if n == discovery.AddressAlias("", netip.MustParseAddr("198.51.100.1")) {
					<-ctx.Done() // the control plane never answers
					return ctx.Err()
				}
				if w := answers[n]; w != nil {
					// The answer arrives while the connection waits.
					time.Sleep(20 * time.Millisecond)
					applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
				}
			}
			return nil
		}}
	tests := []struct {
		name       string
		dst        string
		wantKind   RouteKind
		wantTarget string
		wantAsk    string
		wantReason proxyerr.Reason
	}{
		{name: "known local workload: no lookup", dst: "10.0.1.1:80", wantKind: FastPath, wantTarget: "10.0.1.1:80"},
		{name: "unknown pod address: held, resolved, tunnelled", dst: "10.0.2.2:80", wantKind: HBONE, wantTarget: "10.0.2.2:80", wantAsk: "/10.0.2.2"},
		{name: "service: endpoints asked for first", dst: "10.96.0.10:80", wantKind: HBONE, wantTarget: "10.0.2.3:8080", wantAsk: svcKey},
		{name: "not in the mesh: passthrough", dst: "192.0.2.1:443", wantKind: Passthrough, wantTarget: "192.0.2.1:443", wantAsk: "/192.0.2.1"},
		{name: "lookup unanswered: refused", dst: "198.51.100.1:80", wantAsk: "/198.51.100.1", wantReason: proxyerr.DiscoveryLookupFailed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			asked = nil
			mu.Unlock()
			rt, err := r.Resolve(local, netip.MustParseAddrPort(tc.dst))
			mu.Lock()
			got := slices.Clone(asked)
			mu.Unlock()
			if tc.wantAsk == "" && len(got) > 0 || tc.wantAsk != "" && !slices.Contains(got, tc.wantAsk) {
				t.Fatalf("asked %v, want %q", got, tc.wantAsk)
			}
			if tc.wantReason != "" {
				var pe *proxyerr.Error
				if !errors.As(err, &pe) || pe.Reason != tc.wantReason {
					t.Fatalf("error %v, want reason %s", err, tc.wantReason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rt.Kind != tc.wantKind || rt.Target.String() != tc.wantTarget {
				t.Fatalf("route %v to %v, want %v to %s", rt.Kind, rt.Target, tc.wantKind, tc.wantTarget)
			}
		})
	}
}
