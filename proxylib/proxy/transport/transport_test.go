package transport

import (
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
	"github.com/ambientmesh/ambient/proxylib/proxy"
)

type peer struct {
	certs          hbone.CertSource
	client, server identity.Identity
}

// serve starts f's HBONE server for the peer on the fixed HBONE port of a
// loopback address of its own, so no other test's listener can share it.
func serve(t *testing.T, f Factories, p peer) netip.AddrPort {
	t.Helper()
	host := netip.AddrFrom4([4]byte{127, 88, byte(rand.IntN(250) + 1), byte(rand.IntN(250) + 1)})
	srv, err := f.NewHBONEServer(nil, host.String(), p.server, hbonetest.Hello)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return netip.AddrPortFrom(host, hbone.Port)
}

func newPeer(t *testing.T) peer {
	ca := hbonetest.NewCA(t, "cluster.local")
	client, server := ca.ID("app", "sleep"), ca.ID("app", "httpbin")
	return peer{certs: ca.Source(t, client, server), client: client, server: server}
}

// TestHTTP3ServesBoth: a pod of an HTTP3 mesh answers HTTP/3 and HTTP/2
// peers on its HBONE port; an HTTP2 mesh's pod answers HTTP/2 only.
func TestHTTP3ServesBoth(t *testing.T) {
	netnsRequiresRoot(t)
	p := newPeer(t)
	for _, c := range []struct {
		name     string
		f        Factories
		h3Served bool
	}{
		{"HTTP3", HTTP3(p.certs, logr.Discard(), nil), true},
		{"HTTP2", HTTP2(p.certs, logr.Discard()), false},
	} {
		t.Run(c.name, func(t *testing.T) {
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
			addr := serve(t, c.f, p)
			if err := hbonetest.SayHello(d2, p.client, p.server, addr); err != nil {
				t.Fatalf("HTTP/2 peer: %v", err)
			}
			if err := hbonetest.SayHello(d3, p.client, p.server, addr); (err == nil) != c.h3Served {
				t.Fatalf("HTTP/3 peer: %v, want served=%v", err, c.h3Served)
			}
		})
	}
}

// TestHTTP3DialerFallsBack: an HTTP3 mesh's dialer reaches an HTTP/2-only
// peer, and says so in hbone_transport_fallback_total.
func TestHTTP3DialerFallsBack(t *testing.T) {
	netnsRequiresRoot(t)
	p := newPeer(t)
	addr := serve(t, HTTP2(p.certs, logr.Discard()), p)
	reg := prometheus.NewRegistry()
	d, err := HTTP3(p.certs, logr.Discard(), reg).NewDialer(nil)
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
}

var _ proxy.HBONEServer = bothServers{}

func netnsRequiresRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: ztunnel's sockets carry SO_MARK")
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
