package redirect_test

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

// serveUDP answers every datagram with name.
func serveUDP(t *testing.T, ns *os.File, addr, name string) {
	t.Helper()
	pc, err := netnsutil.ListenUDP(ns, addr, netnsutil.SocketOptions{Mark: netnsutil.Mark})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(name), from)
		}
	}()
}

// askUDP sends one datagram from ns to dst and returns the answer.
func askUDP(t *testing.T, ns *os.File, dst netip.AddrPort, mark uint32) string {
	t.Helper()
	c, err := netnsutil.Dial(context.Background(), ns, "udp", dst.String(), netnsutil.SocketOptions{Mark: mark})
	if err != nil {
		t.Fatalf("dial udp %v: %v", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("q")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		return "error: " + err.Error()
	}
	return string(buf[:n])
}

func TestDNSRedirection(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { testDNSRedirection(t, b.new) })
	}
}

func testDNSRedirection(t *testing.T, newRedirector func(redirect.Config) redirect.Redirector) {
	tp := newTopo(t)
	// ztunnel's DNS proxy on the pod's loopback, a resolver outside.
	serveUDP(t, tp.podNS, "127.0.0.1:15053", "dns-proxy")
	serve(t, tp.podNS, "127.0.0.1:15053", "dns-proxy")
	serveUDP(t, tp.podNS, "[::1]:15053", "dns-proxy6")
	serveUDP(t, tp.peerNS, "[::]:53", "resolver")
	serve(t, tp.peerNS, "[::]:53", "resolver")
	serveUDP(t, tp.peerNS, "[::]:5353", "mdns")
	serve(t, tp.podNS, "[::]:15001", "outbound")
	dns4, dns6 := netip.AddrPortFrom(tp.peer.IP, 53), netip.AddrPortFrom(tp.peer.IP6, 53)

	plain := newRedirector(redirect.DefaultConfig())
	if err := plain.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if got := askUDP(t, tp.podNS, dns4, 0); got != "resolver" {
		t.Fatalf("without DNS capture, UDP 53 went to %q, want the resolver", got)
	}
	if got := ask(t, tp.podNS, dns4, 0); got != "outbound "+dns4.String() {
		t.Fatalf("without DNS capture, TCP 53 went to %q, want ztunnel's outbound capture", got)
	}

	cfg := redirect.DefaultConfig().WithDNS()
	cfg.SkipOutboundPorts = []uint16{5353}
	r := newRedirector(cfg)
	if ok, _ := r.Installed(tp.podNS); ok {
		t.Fatal("rules without DNS capture count as installed with it: a pod switching would keep the old rules")
	}
	if err := r.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed = %v, %v", ok, err)
	}
	if ok, _ := plain.Installed(tp.podNS); ok {
		t.Fatal("rules with DNS capture count as installed without it")
	}
	for _, tc := range []struct {
		name string
		got  func() string
		want string
	}{
		{"udp v4 53 to the proxy", func() string { return askUDP(t, tp.podNS, dns4, 0) }, "dns-proxy"},
		{"udp v6 53 to the proxy", func() string { return askUDP(t, tp.podNS, dns6, 0) }, "dns-proxy6"},
		{"tcp 53 to the proxy", func() string { return ask(t, tp.podNS, dns4, 0) }, "dns-proxy " + dns4.String()},
		{"marked udp (ztunnel forwarding) passes", func() string { return askUDP(t, tp.podNS, dns4, netnsutil.Mark) }, "resolver"},
		{"marked tcp passes", func() string { return ask(t, tp.podNS, dns4, netnsutil.Mark) }, "resolver none"},
		{"excluded udp port passes", func() string { return askUDP(t, tp.podNS, netip.AddrPortFrom(tp.peer.IP, 5353), 0) }, "mdns"},
	} {
		if got := tc.got(); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}
	if err := r.Remove(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if got := askUDP(t, tp.podNS, dns4, 0); got != "resolver" {
		t.Fatalf("after remove, UDP 53 went to %q", got)
	}
	if out := nftList(t, tp.pod); strings.Contains(out, "15053") {
		t.Fatalf("rules left after remove:\n%s", out)
	}
}
