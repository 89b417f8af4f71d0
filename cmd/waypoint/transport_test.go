package main

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
)

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestTransports: with HTTP3 the waypoint serves both HTTP/3 and HTTP/2
// on its port, and dials onward HTTP/3 first with HTTP/2 fallback; with
// HTTP2 it serves and dials HTTP/2 only.
func TestTransports(t *testing.T) {
	ca := hbonetest.NewCA(t, "cluster.local")
	wpID, clientID := ca.ID("app", "waypoint"), ca.ID("app", "sleep")
	certs := ca.Source(t, wpID, clientID)
	log := logr.Discard()
	h2d, err := h2.NewDialer(h2.DialerConfig{Certs: certs})
	if err != nil {
		t.Fatal(err)
	}
	defer h2d.Close()
	h3d, err := h3.NewDialer(h3.DialerConfig{Certs: certs})
	if err != nil {
		t.Fatal(err)
	}
	defer h3d.Close()

	for _, c := range []struct {
		transport string
		h3Served  bool
	}{{"HTTP2", false}, {"HTTP3", true}} {
		t.Run(c.transport, func(t *testing.T) {
			proto, err := parseTransport(c.transport)
			if err != nil {
				t.Fatal(err)
			}
			addr := freeAddr(t)
			srv, err := startHBONE(proto, addr, certs, wpID, hbonetest.Hello, nil, log, func(err error) { t.Error(err) })
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Shutdown(context.Background())
			if err := hbonetest.SayHello(h2d, clientID, wpID, netip.MustParseAddrPort(addr)); err != nil {
				t.Fatalf("HTTP/2 peer: %v", err)
			}
			if err := hbonetest.SayHello(h3d, clientID, wpID, netip.MustParseAddrPort(addr)); (err == nil) != c.h3Served {
				t.Fatalf("HTTP/3 peer: err %v, want served=%v", err, c.h3Served)
			}
		})
	}

	t.Run("HTTP3 onward dialer falls back to an HTTP/2-only peer", func(t *testing.T) {
		addr := freeAddr(t)
		srv, err := startHBONE(hbone.HTTP2, addr, certs, wpID, hbonetest.Hello, nil, log, func(err error) { t.Error(err) })
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Shutdown(context.Background())
		d, err := newDialer(hbone.HTTP3, certs, prometheus.NewRegistry(), log)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := hbonetest.SayHello(d, clientID, wpID, netip.MustParseAddrPort(addr)); err != nil {
			t.Fatal(err)
		}
	})

	if _, err := parseTransport("SPDY"); err == nil {
		t.Fatal("unknown transport accepted")
	}
}
