package ztunnel

import (
	"strings"
	"testing"
)

// TestIdleRelayHoldsNoSetupStack: an idle tunnel's relay must not run on
// the goroutine that accepted, routed and dialed it. That goroutine's stack
// grew during the TLS handshake and network-namespace dials, and a
// goroutine parked deep in those frames can never shrink it back: with
// thousands of idle tunnels the stacks are most of a ztunnel's memory.
// Read from both ztunnels' goroutine dumps (client side: outbound; server
// side: HBONE inbound), which also show no goroutine reading an idle
// session's tunnel.
func TestIdleRelayHoldsNoSetupStack(t *testing.T) {
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "ztunnels ready")
	const tunnels = 5
	for range tunnels {
		c, err := pm.sleep.Dial(pm.httpbin.Addr(9001))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTrip(t, c, "x") // the relay ran and is idle again
	}
	setup := []string{"serveOutbound", "serveHBONE", "servePlaintextInbound"}
	for i, zt := range pm.zts {
		dump := zt.get(t, "127.0.0.1:15000", "/debug/pprof/goroutine?debug=2")
		relays := 0
		for _, g := range strings.Split(dump, "\n\n") {
			// A plain tunnel's relay, or a resumable session's
			// (proxylib/handover, on direct tunnels between our proxies).
			if !strings.Contains(g, "proxy.Relay(") && !strings.Contains(g, "handover.(*Relay).Run(") {
				continue
			}
			relays++
			for _, f := range setup {
				if strings.Contains(g, f) {
					t.Errorf("ztunnel %d: an idle relay runs on the goroutine that set it up (%s):\n%s", i, f, g)
				}
			}
		}
		// A session's tunnel pushes what it receives into the app socket:
		// no goroutine waits on an idle tunnel.
		if n := strings.Count(dump, "handover.(*Relay).down("); n != 0 {
			t.Errorf("ztunnel %d: %d goroutines read idle session tunnels, want 0", i, n)
		}
		if relays < tunnels {
			t.Errorf("ztunnel %d: %d relays in the goroutine dump, want at least %d (is the dump complete?)", i, relays, tunnels)
		}
	}
}
