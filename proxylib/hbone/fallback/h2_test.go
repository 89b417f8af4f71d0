package fallback

import (
	"context"
	"io"
	"net"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// tcpDialer stands in for the HTTP/2 transport until proxylib/hbone/h2
// lands: it tunnels over plain TCP to an echo server, which is all the
// fallback logic needs to observe (which transport carried the tunnel).
type tcpDialer struct{ addr string }

func newTCPDialer(t *testing.T) *tcpDialer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
			go func() {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
				c.Close()
			}()
		}
	}()
	return &tcpDialer{addr: ln.Addr().String()}
}

func (d *tcpDialer) Dial(ctx context.Context, _ hbone.DialRequest) (hbone.Stream, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (d *tcpDialer) Close() error { return nil }
