package main

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// greeter answers every tunnel with "hello" and ends it.
var greeter = hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
	st, err := resp.Accept()
	if err != nil {
		return
	}
	io.WriteString(st, "hello")
	st.CloseWrite() // a clean end; Close alone would reset the tunnel
	st.Close()
})

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func tunnel(t *testing.T, d hbone.Dialer, client, server identity.Identity, addr string) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ap := netip.MustParseAddrPort(addr)
	st, err := d.Dial(ctx, hbone.DialRequest{Source: client, Expected: []identity.Identity{server}, ProxyAddr: ap,
		Target: netip.MustParseAddrPort("127.0.0.1:8080")})
	if err != nil {
		return err
	}
	defer st.Close()
	b, err := io.ReadAll(st)
	if err == nil && string(b) != "hello" {
		t.Fatalf("tunnel answered %q", b)
	}
	return err
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
			srv, err := startHBONE(proto, addr, certs, wpID, greeter, nil, log, func(err error) { t.Error(err) })
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Shutdown(context.Background())
			if err := tunnel(t, h2d, clientID, wpID, addr); err != nil {
				t.Fatalf("HTTP/2 peer: %v", err)
			}
			if err := tunnel(t, h3d, clientID, wpID, addr); (err == nil) != c.h3Served {
				t.Fatalf("HTTP/3 peer: err %v, want served=%v", err, c.h3Served)
			}
		})
	}

	t.Run("HTTP3 onward dialer falls back to an HTTP/2-only peer", func(t *testing.T) {
		addr := freeAddr(t)
		srv, err := startHBONE(hbone.HTTP2, addr, certs, wpID, greeter, nil, log, func(err error) { t.Error(err) })
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Shutdown(context.Background())
		d, err := newDialer(hbone.HTTP3, certs, prometheus.NewRegistry(), log)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if err := tunnel(t, d, clientID, wpID, addr); err != nil {
			t.Fatal(err)
		}
	})

	if _, err := parseTransport("SPDY"); err == nil {
		t.Fatal("unknown transport accepted")
	}
}
