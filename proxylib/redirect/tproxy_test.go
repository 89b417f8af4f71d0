package redirect_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
)

// serveTransparentRelay is a minimal inbound ztunnel on an IP_TRANSPARENT
// listener: it takes the original destination from the accepted socket's
// local address (TPROXY does no NAT) and dials the app there from the
// client's own address (transparent, marked), relaying the app's answer
// prefixed with what it saw.
func serveTransparentRelay(t *testing.T, ns *os.File, addr string) {
	t.Helper()
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{Transparent: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go relay(ns, c)
		}
	}()
}

func relay(ns *os.File, c net.Conn) {
	defer c.Close()
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	dst := netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	src := netip.AddrPortFrom(c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(), 0)
	app, err := netnsutil.DialTCP(context.Background(), ns, src, dst,
		netnsutil.SocketOptions{Transparent: true, Mark: netnsutil.Mark})
	if err != nil {
		fmt.Fprintf(c, "relay dial %v from %v: %v", dst, src, err)
		return
	}
	defer app.Close()
	b, _ := io.ReadAll(app)
	fmt.Fprintf(c, "ztunnel dst=%v | %s", dst, b)
}

// serveEcho answers with the peer address the app sees.
func serveEcho(t *testing.T, ns *os.File, addr string) {
	t.Helper()
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "app sees %v", c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			c.Close()
		}
	}()
}

// TestTPROXYInboundSeesClient: with InboundTPROXY a plaintext client from
// outside the mesh reaches ztunnel's transparent listener with the app's
// address as local address, and the app sees the client's own address
// (ztunnel dials from it; the replies return to ztunnel by the connmark
// policy route). Remove leaves no table, rule or route.
func TestTPROXYInboundSeesClient(t *testing.T) {
	tp := newTopo(t)
	serveTransparentRelay(t, tp.podNS, "[::]:15006")
	serveEcho(t, tp.podNS, "[::]:8080")

	cfg := redirect.DefaultConfig()
	cfg.PreserveSource, cfg.InboundTPROXY = true, true
	r := redirect.NewNFTables(cfg)
	for i := 0; i < 2; i++ { // idempotent
		if err := r.Install(tp.podNS); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := r.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("Installed = %v, %v", ok, err)
	}
	if rs := nftList(t, tp.pod); !strings.Contains(rs, "tproxy") || strings.Contains(rs, "redirect to :15006") {
		t.Fatalf("ruleset has no tproxy (or still a redirect):\n%s", rs)
	}
	for _, c := range []struct {
		name     string
		app, cli netip.Addr
	}{{"v4", tp.pod.IP, tp.peer.IP}, {"v6", tp.pod.IP6, tp.peer.IP6}} {
		t.Run(c.name, func(t *testing.T) {
			app := netip.AddrPortFrom(c.app, 8080)
			want := fmt.Sprintf("ztunnel dst=%v | app sees %v", app, c.cli)
			for i := 0; i < 3; i++ { // repeated: tuples reused, no stale state
				if got := ask(t, tp.peerNS, app, 0); got != want {
					t.Fatalf("got %q, want %q", got, want)
				}
			}
		})
	}

	if err := r.Remove(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if ok, err := redirect.HasSourceRouting(tp.podNS); err != nil || ok {
		t.Fatalf("policy routing left after Remove: %v, %v", ok, err)
	}
	if rs := nftList(t, tp.pod); strings.Contains(rs, redirect.TableName) {
		t.Fatalf("table left after Remove:\n%s", rs)
	}
}

// TestTPROXYFailsClosedWithoutListener: with no transparent socket on
// :15006 (ztunnel not there yet, or one too old to open it transparent)
// nftables' tproxy lets the packet go on; the rules must then refuse the
// connection, never hand it to the app past ztunnel.
func TestTPROXYFailsClosedWithoutListener(t *testing.T) {
	tp := newTopo(t)
	serveEcho(t, tp.podNS, "[::]:8080")
	// A plain (not transparent) listener, as an older ztunnel opens.
	ln, err := netnsutil.ListenTCP(tp.podNS, "[::]:15006", netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := redirect.DefaultConfig()
	cfg.PreserveSource, cfg.InboundTPROXY = true, true
	if err := redirect.NewNFTables(cfg).Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := netnsutil.DialTCP(ctx, tp.peerNS, netip.AddrPort{}, netip.AddrPortFrom(tp.pod.IP, 8080), netnsutil.SocketOptions{})
	if err == nil {
		b, _ := io.ReadAll(c)
		c.Close()
		t.Fatalf("connection reached the app past ztunnel: %q", b)
	}
}

// TestInboundModeSwitch: Installed tells NAT rules from TPROXY rules (same
// rule layout otherwise), so a node agent switched to the other mode
// replaces them; a connection NATed to :15006 before the switch keeps
// working after it (its packets are not diverted to the new listener).
func TestInboundModeSwitch(t *testing.T) {
	tp := newTopo(t)
	nat := redirect.DefaultConfig()
	nat.PreserveSource = true
	tpx := nat
	tpx.InboundTPROXY = true
	natR, tpxR := redirect.NewNFTables(nat), redirect.NewNFTables(tpx)

	// An echo on the inbound port answering line by line: the NATed
	// connection stays open across the switch.
	ln, err := netnsutil.ListenTCP(tp.podNS, "[::]:15006", netnsutil.SocketOptions{Transparent: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go io.Copy(c, c)
		}
	}()
	if err := natR.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if ok, _ := tpxR.Installed(tp.podNS); ok {
		t.Fatal("TPROXY redirector reports NAT rules as its own")
	}
	c, err := netnsutil.DialTCP(context.Background(), tp.peerNS, netip.AddrPort{}, netip.AddrPortFrom(tp.pod.IP, 8080), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip := func(msg string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatalf("write %q: %v", msg, err)
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo of %q: %q, %v", msg, buf, err)
		}
	}
	roundTrip("before")
	if err := tpxR.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	if ok, err := tpxR.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("TPROXY Installed = %v, %v", ok, err)
	}
	if ok, _ := natR.Installed(tp.podNS); ok {
		t.Fatal("NAT redirector reports TPROXY rules as its own")
	}
	roundTrip("after the switch to TPROXY")
}

// TestIPTablesRefusesTPROXY: the iptables backend never pretends to
// capture with TPROXY. A pod it captured with NAT is not reported as
// installed for a TPROXY configuration (so the node agent re-installs, and
// fails, instead of announcing TPROXY over NAT rules), Install refuses, and
// the NAT rules stay as they were (capture keeps going through ztunnel).
func TestIPTablesRefusesTPROXY(t *testing.T) {
	tp := newTopo(t)
	nat := redirect.DefaultConfig()
	natR := redirect.NewIPTables(nat)
	if err := natR.Install(tp.podNS); err != nil {
		t.Fatal(err)
	}
	tpx := nat
	tpx.InboundTPROXY = true
	tpxR := redirect.NewIPTables(tpx)
	if ok, err := tpxR.Installed(tp.podNS); err != nil || ok {
		t.Fatalf("TPROXY config reports NAT rules as installed: %v, %v", ok, err)
	}
	if err := tpxR.Install(tp.podNS); err == nil || !strings.Contains(err.Error(), "TPROXY") {
		t.Fatalf("Install with TPROXY on iptables: %v, want a refusal naming TPROXY", err)
	}
	if ok, err := natR.Installed(tp.podNS); err != nil || !ok {
		t.Fatalf("NAT rules after the refusal: %v, %v", ok, err)
	}
}
