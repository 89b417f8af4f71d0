package meshtransport

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"os"
	"testing"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

type peer struct {
	certs          hbone.CertSource
	client, server identity.Identity
}

func newPeer(t *testing.T) peer {
	ca := hbonetest.NewCA(t, "cluster.local")
	client, server := ca.ID("app", "sleep"), ca.ID("app", "httpbin")
	return peer{certs: ca.Source(t, client, server), client: client, server: server}
}

// transports are the two ways the mesh wires its transport: ztunnel's, with
// in-pod socket options (SO_MARK needs root), and the waypoint's.
func transports(t *testing.T) map[string]func(Config) Config {
	out := map[string]func(Config) Config{"waypoint": func(c Config) Config { return c }}
	if os.Geteuid() == 0 {
		out["ztunnel in pods"] = ForPods
	}
	return out
}

func newTransport(t *testing.T, cfg Config) *Transport {
	t.Helper()
	tr, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// serve starts tr's HBONE server for the peer on the fixed HBONE port of a
// loopback address of its own, so no other test's listener can share it.
func serve(t *testing.T, tr *Transport, p peer) netip.AddrPort {
	t.Helper()
	host := netip.AddrFrom4([4]byte{127, 88, byte(rand.IntN(250) + 1), byte(rand.IntN(250) + 1)})
	srv, err := tr.NewServer(nil, host.String(), p.server, hbonetest.Hello)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve after Close: %v, want nil", err)
		}
	})
	return netip.AddrPortFrom(host, hbone.Port)
}

// TestHTTP3ServesBoth: a proxy of an HTTP3 mesh answers HTTP/3 and HTTP/2
// peers on its HBONE port; an HTTP2 mesh's proxy answers HTTP/2 only.
func TestHTTP3ServesBoth(t *testing.T) {
	p := newPeer(t)
	for name, wire := range transports(t) {
		for _, c := range []struct {
			proto    hbone.Protocol
			h3Served bool
		}{{hbone.HTTP3, true}, {hbone.HTTP2, false}, {"", false}} {
			t.Run(name+"/"+string(c.proto), func(t *testing.T) {
				// Fresh dialers: a pooled connection to the previous case's
				// (closed) server must not be what is tested.
				d2, err := h2.NewDialer(h2.DialerConfig{Certs: p.certs})
				if err != nil {
					t.Fatal(err)
				}
				defer d2.Close()
				d3, err := h3.NewDialer(h3.DialerConfig{Certs: p.certs})
				if err != nil {
					t.Fatal(err)
				}
				defer d3.Close()
				addr := serve(t, newTransport(t, wire(Config{Protocol: c.proto, Certs: p.certs, Log: logr.Discard()})), p)
				if err := hbonetest.SayHello(d2, p.client, p.server, addr); err != nil {
					t.Fatalf("HTTP/2 peer: %v", err)
				}
				if err := hbonetest.SayHello(d3, p.client, p.server, addr); (err == nil) != c.h3Served {
					t.Fatalf("HTTP/3 peer: %v, want served=%v", err, c.h3Served)
				}
			})
		}
	}
}

// TestHTTP3DialerFallsBack: an HTTP3 mesh's dialer reaches an HTTP/2-only
// peer, and says so in hbone_transport_fallback_total.
func TestHTTP3DialerFallsBack(t *testing.T) {
	p := newPeer(t)
	for name, wire := range transports(t) {
		t.Run(name, func(t *testing.T) {
			addr := serve(t, newTransport(t, wire(Config{Protocol: hbone.HTTP2, Certs: p.certs, Log: logr.Discard()})), p)
			reg := prometheus.NewRegistry()
			d, err := newTransport(t, wire(Config{Protocol: hbone.HTTP3, Certs: p.certs, Log: logr.Discard(), Registerer: reg})).NewDialer(nil)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if err := hbonetest.SayHello(d, p.client, p.server, addr); err != nil {
				t.Fatal(err)
			}
			if n := counterSum(t, reg, "hbone_transport_fallback_total"); n < 1 {
				t.Fatalf("fallback not counted: %v", n)
			}
		})
	}
}

// TestForbiddenTargetsRefused: the proxy's own ports are never tunnelled to.
func TestForbiddenTargetsRefused(t *testing.T) {
	p := newPeer(t)
	own := netip.MustParseAddrPort("127.0.0.1:15020")
	tr := newTransport(t, Config{Certs: p.certs, Log: logr.Discard(), ForbiddenTargets: []netip.AddrPort{own}})
	addr := serve(t, tr, p)
	d, err := h2.NewDialer(h2.DialerConfig{Certs: p.certs})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := d.Dial(context.Background(), hbone.DialRequest{Source: p.client, Expected: []identity.Identity{p.server}, ProxyAddr: addr, Target: own})
	if err == nil {
		st.Close()
		t.Fatal("a forbidden target was accepted")
	}
}

func TestParseProtocol(t *testing.T) {
	for in, want := range map[string]hbone.Protocol{"": hbone.HTTP2, "HTTP2": hbone.HTTP2, "HTTP3": hbone.HTTP3} {
		if got, err := ParseProtocol(in); err != nil || got != want {
			t.Errorf("ParseProtocol(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"SPDY", "http2"} {
		if _, err := ParseProtocol(bad); err == nil {
			t.Errorf("ParseProtocol(%q) accepted", bad)
		}
		if _, err := New(Config{Protocol: hbone.Protocol(bad), Certs: newPeer(t).certs}); err == nil {
			t.Errorf("New accepted transport %q", bad)
		}
	}
}

func counterSum(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
