package fallback

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// startH2Server runs a real HTTP/2 HBONE echo server on 127.0.0.1 (TCP).
// With swallowQUIC, a socket on the same UDP port swallows every QUIC packet
// (a peer without HTTP/3, or a firewall dropping UDP).
func startH2Server(t *testing.T, ca *hbonetest.CA, server identity.Identity, swallowQUIC bool) netip.AddrPort {
	t.Helper()
	srv, err := h2.NewServer(h2.ServerConfig{Certs: ca.Source(t, server), Identity: server, Log: logr.Discard(),
		Handler: hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err == nil {
				io.Copy(s, s)
				s.CloseWrite()
				s.Close()
			}
		})})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	if swallowQUIC {
		silent, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { silent.Close() })
	}
	return addr
}

func newH2Dialer(t *testing.T, ca *hbonetest.CA, client identity.Identity) hbone.Dialer {
	d, err := h2.NewDialer(h2.DialerConfig{Certs: ca.Source(t, client), Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	return d
}
