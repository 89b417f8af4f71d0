package proxy

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"syscall"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func TestHBONESource(t *testing.T) {
	peer := netip.MustParseAddrPort("10.0.1.5:41000")
	fwd := func(v string) http.Header { return http.Header{"Forwarded": {v}} }
	tests := []struct {
		name    string
		trusted bool
		header  http.Header
		want    string
		origin  sourceOrigin
	}{
		{"direct peer, no header", false, nil, "10.0.1.5", fromPeer},
		{"hostile peer claims another address", false, fwd(`for="1.2.3.4"`), "10.0.1.5", ignoredForwarded},
		{"hostile peer claims loopback", false, fwd(`for="127.0.0.1"`), "10.0.1.5", ignoredForwarded},
		{"waypoint forwards the client", true, fwd(`for="10.0.0.7"`), "10.0.0.7", fromWaypointFwd},
		{"waypoint forwards an IPv6 client", true, fwd(`for="[fd00::7]"`), "fd00::7", fromWaypointFwd},
		{"waypoint forwards a v4-mapped client", true, fwd(`for="[::ffff:10.0.0.7]"`), "10.0.0.7", fromWaypointFwd},
		{"waypoint without header", true, nil, "10.0.1.5", fromWaypointNoFwd},
		{"waypoint with malformed header", true, fwd(`for=unknown`), "10.0.1.5", fromWaypointNoFwd},
		{"waypoint with obfuscated identifier", true, fwd(`for=_hidden`), "10.0.1.5", fromWaypointNoFwd},
		{"waypoint forwarding loopback", true, fwd(`for="127.0.0.1"`), "10.0.1.5", fromWaypointNoFwd},
		{"waypoint forwarding unspecified", true, fwd(`for="0.0.0.0"`), "10.0.1.5", fromWaypointNoFwd},
		{"waypoint forwarding multicast", true, fwd(`for="[ff02::1]"`), "10.0.1.5", fromWaypointNoFwd},
		{"waypoint header only first element counts", true, fwd(`for="10.0.0.7", for="1.2.3.4"`), "10.0.0.7", fromWaypointFwd},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.header
			if h == nil {
				h = http.Header{}
			}
			got, origin := hboneSource(peer, tc.trusted, h)
			if got != netip.MustParseAddr(tc.want) || origin != tc.origin {
				t.Fatalf("hboneSource = %v (%s), want %s (%s)", got, origin, tc.want, tc.origin)
			}
		})
	}
}

func TestPreserveSkip(t *testing.T) {
	captured := wl("sleep", "10.0.0.7", "n1", true)
	outside := wl("outside", "10.0.0.8", "n1", false)
	tests := []struct {
		src, target string
		client      *workloadapi.Workload
		ok          bool
		noNAT       bool // TPROXY capture
	}{
		{"10.0.0.7", "10.0.2.2:80", captured, true, false},
		{"fd00::7", "[fd00::2]:80", captured, true, false},
		{"10.0.0.7", "[fd00::2]:80", captured, false, false},
		{"fd00::7", "10.0.2.2:80", captured, false, false},
		{"127.0.0.1", "10.0.2.2:80", captured, false, false},
		{"0.0.0.0", "10.0.2.2:80", captured, false, false},
		{"", "10.0.2.2:80", captured, false, false},
		{"10.0.0.8", "10.0.2.2:80", outside, false, false}, // not captured: may hold NATed tuples
		{"192.0.2.1", "10.0.2.2:80", nil, false, false},    // unknown to discovery
		// TPROXY capture: no NAT entries, every real client is usable.
		{"10.0.0.8", "10.0.2.2:80", outside, true, true},
		{"192.0.2.1", "10.0.2.2:80", nil, true, true},
		{"fd00::9", "[fd00::2]:80", nil, true, true},
		{"127.0.0.1", "10.0.2.2:80", nil, false, true},
		{"192.0.2.1", "[fd00::2]:80", nil, false, true},
	}
	for _, tc := range tests {
		t.Run(tc.src+"->"+tc.target, func(t *testing.T) {
			src, _ := netip.ParseAddr(tc.src)
			if why := preserveSkip(src, netip.MustParseAddrPort(tc.target), tc.client, tc.noNAT); (why == "") != tc.ok {
				t.Fatalf("preserveSkip = %q, want usable=%v", why, tc.ok)
			}
		})
	}
}

// Only a waypoint serving the destination (its own, or one of its
// services') is trusted with Forwarded, by verified identity and discovery.
func TestTrustsForwarded(t *testing.T) {
	s := discovery.NewState(discovery.AddressType)
	gw := func(host string) *workloadapi.GatewayAddress {
		return &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: host}}}
	}
	host := func(n string) string { return n + ".default.svc.cluster.local" }
	inSvc := func(h string) func(*workloadapi.Workload) {
		return func(w *workloadapi.Workload) {
			if w.Services == nil {
				w.Services = map[string]*workloadapi.PortList{}
			}
			w.Services[discovery.ServiceKey("default", h)] = &workloadapi.PortList{}
		}
	}
	ws := map[string]*workloadapi.Workload{}
	for _, w := range []*workloadapi.Workload{
		wl("httpbin", "10.0.2.2", "n2", true, func(w *workloadapi.Workload) { w.Waypoint = gw(host("wp")) }),
		wl("web", "10.0.2.3", "n2", true, inSvc(host("websvc"))),
		wl("plain", "10.0.2.4", "n2", true),
		wl("orphan", "10.0.2.5", "n2", true, func(w *workloadapi.Workload) { w.Waypoint = gw(host("gone")) }),
		wl("wp", "10.0.2.8", "n2", false, inSvc(host("wp"))),
		wl("svc-wp", "10.0.2.9", "n2", false, inSvc(host("svc-wp"))),
	} {
		w.Status = workloadapi.WorkloadStatus_HEALTHY
		ws[w.Name] = w
		applyAddr(t, s, w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
	}
	for i, n := range []string{"wp", "svc-wp", "gone", "websvc"} {
		svc := &workloadapi.Service{Name: n, Namespace: "default", Hostname: host(n),
			Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, byte(10 + i)}}}}
		if n == "websvc" {
			svc.Waypoint = gw(host("svc-wp"))
		}
		applyAddr(t, s, discovery.ServiceKey("default", host(n)), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}})
	}
	p := &Proxy{cfg: Config{State: s}, router: &Router{State: s, Node: "n2", TrustDomain: "cluster.local"}}
	id := func(sa string) identity.Identity {
		return identity.MustParse("spiffe://cluster.local/ns/default/sa/" + sa)
	}
	tests := []struct {
		dst, peer string
		want      bool
	}{
		{"httpbin", "wp", true},      // the pod's own waypoint
		{"httpbin", "svc-wp", false}, // a waypoint, but not this pod's
		{"httpbin", "sleep", false},  // an ordinary mesh peer
		{"httpbin", "httpbin", false},
		{"web", "svc-wp", true}, // waypoint of a service the pod backs
		{"web", "wp", false},
		{"plain", "wp", false},  // no waypoint at all
		{"orphan", "wp", false}, // unresolvable waypoint trusts nobody
		{"orphan", "gone", false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s from %s", tc.dst, tc.peer), func(t *testing.T) {
			if got := p.trustsForwarded(ws[tc.dst], id(tc.peer)); got != tc.want {
				t.Fatalf("trustsForwarded = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestFastPathSource(t *testing.T) {
	w := wl("sleep", "10.0.1.2", "n1", true, func(w *workloadapi.Workload) {
		w.Addresses = append(w.Addresses, netip.MustParseAddr("fd00::2").AsSlice())
	})
	tests := []struct{ observed, want string }{
		{"10.0.1.2", "10.0.1.2"},
		{"fd00::2", "fd00::2"},
		{"::ffff:10.0.1.2", "10.0.1.2"},
		{"10.9.9.9", "10.0.1.2"}, // not the pod's: discovery's address instead
	}
	for _, tc := range tests {
		if got := fastPathSource(w, netip.MustParseAddr(tc.observed)); got != netip.MustParseAddr(tc.want) {
			t.Errorf("fastPathSource(%s) = %v, want %s", tc.observed, got, tc.want)
		}
	}
}

func TestLocalDialFailure(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{&os.SyscallError{Syscall: "setsockopt", Err: syscall.EPERM}, true},
		{fmt.Errorf("dial: %w", syscall.EADDRNOTAVAIL), true},
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), false},
		{fmt.Errorf("dial: %w", syscall.ETIMEDOUT), false},
	}
	for _, tc := range tests {
		if got := localDialFailure(tc.err); got != tc.want {
			t.Errorf("localDialFailure(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestWithForwardedReplacesPeerHeader(t *testing.T) {
	in := http.Header{"Forwarded": {`for="1.2.3.4"`}, "Baggage": {"k8s.pod.name=x"}}
	out := withForwarded(in, netip.MustParseAddr("10.0.1.5"))
	if got := out.Get("Forwarded"); got != `for="10.0.1.5"` {
		t.Fatalf("Forwarded = %q", got)
	}
	if out.Get("Baggage") != "k8s.pod.name=x" || in.Get("Forwarded") != `for="1.2.3.4"` {
		t.Fatalf("baggage lost or input modified: %v / %v", out, in)
	}
	if got := withForwarded(in, netip.Addr{}); got.Get("Forwarded") != "" {
		t.Fatalf("no usable source: Forwarded = %q, want none", got.Get("Forwarded"))
	}
}
