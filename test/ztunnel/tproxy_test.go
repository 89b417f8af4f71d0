package ztunnel

import (
	"io"
	"net/netip"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TPROXY inbound capture (AmbientMesh spec.capture.inboundMode: TPROXY):
// with real ztunnels, a plaintext client outside the mesh reaches an
// enrolled pod's app from its own address (IPv4 and IPv6); with NAT
// capture it arrives from the pod's own address, as before. Mesh clients
// (HBONE across nodes, the same-node fast path) are seen as themselves in
// both modes, and an L4 policy on source addresses still decides.

func inboundMode(tproxy bool) redirect.Redirector {
	cfg := redirect.DefaultConfig()
	cfg.PreserveSource, cfg.InboundTPROXY = true, tproxy
	return redirect.NewNFTables(cfg)
}

// withIPv6 publishes p's IPv6 address too (dual-stack pod), so ztunnel
// accepts inbound connections to it.
func withIPv6(m *meshtest.Mesh, p *meshtest.Pod) {
	p.Workload.Addresses = append(p.Workload.Addresses, p.IP6.AsSlice())
	m.CP.Workload(p.Workload)
}

func TestInboundCaptureModes(t *testing.T) {
	for _, tc := range []struct {
		mode   string
		tproxy bool
	}{{"NAT", false}, {"TPROXY", true}} {
		t.Run(tc.mode, func(t *testing.T) {
			s := newSourceMesh(t, inboundMode(tc.tproxy))
			withIPv6(s.Mesh, s.httpbin1)
			// Outside clients are preserved only without NAT; mesh clients always.
			outsideSeen, outsideSeen6, outsideSeen2 := s.httpbin1.IP, s.httpbin1.IP6, s.httpbin2.IP
			if tc.tproxy {
				outsideSeen, outsideSeen6, outsideSeen2 = s.outside.IP, s.outside.IP6, s.outside.IP
			}
			cases := []struct {
				name string
				from *meshtest.Pod
				dst  netip.AddrPort
				want netip.Addr
			}{
				{"plaintext from outside the mesh", s.outside, s.httpbin1.Addr(whoPort), outsideSeen},
				{"plaintext from outside the mesh, other node", s.outside, s.httpbin2.Addr(whoPort), outsideSeen2},
				{"plaintext from outside the mesh, IPv6", s.outside, netip.AddrPortFrom(s.httpbin1.IP6, whoPort), outsideSeen6},
				{"mesh client across nodes (HBONE)", s.sleep, s.httpbin1.Addr(whoPort), s.sleep.IP},
				{"mesh client on the same node (fast path)", s.sleep, s.httpbin2.Addr(whoPort), s.sleep.IP},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					for i := 0; i < 5; i++ { // new tuples each time, no stale state
						if got := seenBy(t, c.from, c.dst); got != c.want.String() {
							t.Fatalf("connection %d: app saw %s, want %s (client %s/%s, app %s/%s)", i, got, c.want,
								c.from.IP, c.from.IP6, s.httpbin1.IP, s.httpbin1.IP6)
						}
					}
				})
			}
			t.Run("outside client: bulk both ways and half-close", func(t *testing.T) {
				testBulkAndHalfClose(t, s.outside, s.httpbin1, 4<<20)
			})
			t.Run("L4 policy on the source address", func(t *testing.T) {
				// A second client outside the mesh, on the other node.
				other := s.AddPod(s.Nodes[0], "outside-2", "outside", false)
				s.CP.Policy(&security.Authorization{Name: "allow-outside-1", Namespace: meshtest.Namespace, Scope: security.Scope_NAMESPACE,
					Action: security.Action_ALLOW, Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
						SourceIps: []*security.Address{{Address: s.outside.IP.AsSlice(), Length: 32}}}}}}}}})
				defer s.CP.Remove(discovery.AuthorizationType, meshtest.Namespace+"/allow-outside-1")
				if c, err := other.Dial(s.httpbin1.Addr(whoPort)); err == nil {
					b, _ := io.ReadAll(c)
					c.Close()
					if len(b) > 0 {
						t.Fatalf("a client the policy does not allow reached the app, which saw %s", b)
					}
				}
				s.Logs.WaitFor(t, "RBAC rejected conn="+other.IP.String()+"(none)->"+s.httpbin1.Addr(whoPort).String())
				if got := seenBy(t, s.outside, s.httpbin1.Addr(whoPort)); got != outsideSeen.String() {
					t.Fatalf("allowed client: app saw %s, want %s", got, outsideSeen)
				}
			})
		})
	}
}

// TestInboundCaptureSwitch: a mesh switched from NAT to TPROXY (the node
// agent re-installs the rules and re-sends AddWorkload with the new mode;
// ztunnel re-adopts the pod) preserves outside clients from then on, on
// the pod that served NAT connections before.
func TestInboundCaptureSwitch(t *testing.T) {
	s := newSourceMesh(t, inboundMode(false))
	if got := seenBy(t, s.outside, s.httpbin1.Addr(whoPort)); got != s.httpbin1.IP.String() {
		t.Fatalf("NAT: app saw %s, want its own %s", got, s.httpbin1.IP)
	}
	s.Redirect = inboundMode(true)
	for _, p := range []*meshtest.Pod{s.httpbin1, s.httpbin2, s.sleep} {
		p.Capture(s.Mesh) // what the rolled node agent does: Install, then AddWorkload
	}
	for i := 0; i < 5; i++ {
		if got := seenBy(t, s.outside, s.httpbin1.Addr(whoPort)); got != s.outside.IP.String() {
			t.Fatalf("TPROXY, connection %d: app saw %s, want the client %s", i, got, s.outside.IP)
		}
	}
	if got := seenBy(t, s.sleep, s.httpbin1.Addr(whoPort)); got != s.sleep.IP.String() {
		t.Fatalf("mesh client after the switch: app saw %s, want %s", got, s.sleep.IP)
	}
}
