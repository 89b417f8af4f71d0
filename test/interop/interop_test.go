// Package interop proves our HTTP/2 HBONE is the HBONE Istio speaks, by
// running Istio's own Go implementation (istio.io/istio/pkg/hbone) against
// ours in both directions, over real TLS on 127.0.0.1 with certificates from
// our mesh CA. It is a separate module because Istio's dependencies are heavy.
package interop

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	istiohbone "istio.io/istio/pkg/hbone"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

type mesh struct {
	ca             *hbonetest.CA
	client, server identity.Identity
	clientSrc      *identity.StaticSource
	serverSrc      *identity.StaticSource
	echo           *hbonetest.Echo
}

func newMesh(t *testing.T) *mesh {
	c := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	m := &mesh{ca: c, client: c.ID("client-ns", "sleep"), server: c.ID("server-ns", "httpbin"), echo: hbonetest.StartEcho(t)}
	m.clientSrc = c.Source(t, m.client)
	m.serverSrc = c.Source(t, m.server)
	return m
}

func echoCheck(t *testing.T, c io.ReadWriter, size int) {
	t.Helper()
	if err := echoBoth(c, size); err != nil {
		t.Fatal(err)
	}
}

// Istio's dialer → our server → echo upstream.
func TestIstioDialerThroughOurServer(t *testing.T) {
	m := newMesh(t)
	seen := make(chan *hbone.Request, 4)
	addr := startOurServer(t, m, func(req *hbone.Request) { seen <- req })

	tlsConf := hbone.ClientTLSConfig(m.clientSrc, m.client, []identity.Identity{m.server}, "h2")
	d := istiohbone.NewDialer(istiohbone.Config{
		ProxyAddress: addr.String(),
		TLS:          tlsConf,
		Headers:      hbone.SourceHeader(hbone.Source{Namespace: "client-ns"}),
	})
	conn, err := d.DialContext(context.Background(), "tcp", m.echo.Addr.String())
	if err != nil {
		t.Fatalf("Istio dialer through our server: %v", err)
	}
	defer conn.Close()
	echoCheck(t, conn, 256<<10)

	req := <-seen
	if req.Peer != m.client || req.Target != m.echo.Addr || req.Protocol != hbone.HTTP2 {
		t.Fatalf("our server saw peer=%v target=%v", req.Peer, req.Target)
	}

	// Our strict authority rules apply to their client too.
	if c, err := d.DialContext(context.Background(), "tcp", "localhost:80"); err == nil {
		c.Close()
		t.Fatal("hostname authority accepted")
	} else if !strings.Contains(err.Error(), "400") {
		t.Fatalf("hostname authority: %v, want 400", err)
	}
}

// Our dialer → Istio's server → echo upstream.
func TestOurDialerThroughIstioServer(t *testing.T) {
	m := newMesh(t)
	proxyAddr := startIstioServer(t, m)

	d, err := h2.NewDialer(h2.DialerConfig{Certs: m.clientSrc})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	req := hbone.DialRequest{
		Source:    m.client,
		Expected:  []identity.Identity{m.server},
		ProxyAddr: proxyAddr,
		Target:    m.echo.Addr,
		Header:    hbone.SourceHeader(hbone.Source{Namespace: "client-ns"}),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := d.Dial(ctx, req)
	if err != nil {
		t.Fatalf("our dialer through Istio's server: %v", err)
	}
	defer st.Close()
	echoCheck(t, st, 256<<10)
	// Half-close: Istio's server forwards our END_STREAM as EOF upstream, the
	// echo server closes, and we read a clean EOF.
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(st); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: %d bytes, %v", len(rest), err)
	}

	// Several tunnels share one pooled connection to their server too.
	for range 3 {
		s, err := d.Dial(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		echoCheck(t, s, 1024)
		s.Close()
	}
	if s := d.Stats(); s.Conns != 1 {
		t.Fatalf("pool: %+v, want 1 connection", s)
	}

	// Their server must not be trusted unless it proves the expected identity.
	req.Expected = []identity.Identity{m.ca.ID("server-ns", "other")}
	if s, err := d.Dial(ctx, req); err == nil {
		s.Close()
		t.Fatal("dialer accepted Istio's server under an unexpected identity")
	} else if !errors.Is(err, hbone.ErrUnexpectedPeer) {
		t.Fatalf("err = %v, want ErrUnexpectedPeer", err)
	}
}

// TestManyTunnelsBothWaysLargeTransfers: 50 concurrent tunnels, each echoing
// 1 MiB, multiplexed on pooled connections, with each side's dialer against
// the other side's server.
func TestManyTunnelsBothWaysLargeTransfers(t *testing.T) {
	const tunnels, size = 50, 1 << 20
	run := func(t *testing.T, dial func() (io.ReadWriteCloser, error)) {
		var wg sync.WaitGroup
		errs := make(chan error, tunnels)
		for range tunnels {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := dial()
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				errs <- echoBoth(c, size)
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Run("Istio dialer, our server", func(t *testing.T) {
		m := newMesh(t)
		addr := startOurServer(t, m, nil)
		d := istiohbone.NewDialer(istiohbone.Config{
			ProxyAddress: addr.String(),
			TLS:          hbone.ClientTLSConfig(m.clientSrc, m.client, []identity.Identity{m.server}, "h2"),
		})
		run(t, func() (io.ReadWriteCloser, error) {
			return d.DialContext(context.Background(), "tcp", m.echo.Addr.String())
		})
	})
	t.Run("our dialer, Istio server", func(t *testing.T) {
		m := newMesh(t)
		proxyAddr := startIstioServer(t, m)
		d, err := h2.NewDialer(h2.DialerConfig{Certs: m.clientSrc})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		req := hbone.DialRequest{Source: m.client, Expected: []identity.Identity{m.server},
			ProxyAddr: proxyAddr, Target: m.echo.Addr}
		run(t, func() (io.ReadWriteCloser, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			return d.Dial(ctx, req)
		})
		if s := d.Stats(); s.Conns != 1 {
			t.Fatalf("pool: %+v, want all tunnels on 1 connection", s)
		}
	})
}

// echoBoth writes size random bytes while reading the echo, and compares.
func echoBoth(c io.ReadWriter, size int) error {
	msg := make([]byte, size)
	rand.Read(msg)
	errc := make(chan error, 1)
	go func() { _, err := c.Write(msg); errc <- err }()
	got := make([]byte, size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo mismatch")
	}
	return nil
}

// startOurServer serves our HBONE server relaying to CONNECT targets;
// seen, if set, is told of every request.
func startOurServer(t *testing.T, m *mesh, seen func(*hbone.Request)) net.Addr {
	t.Helper()
	srv, err := h2.NewServer(h2.ServerConfig{Certs: m.serverSrc, Identity: m.server, Handler: hbone.HandlerFunc(
		func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			if seen != nil {
				seen(req)
			}
			up, err := net.Dial("tcp", req.Target.String())
			if err != nil {
				resp.Reject(http.StatusServiceUnavailable, err.Error())
				return
			}
			st, err := resp.Accept()
			if err != nil {
				up.Close()
				return
			}
			hbone.Relay(up.(*net.TCPConn), st)
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
	return ln.Addr()
}

// startIstioServer serves Istio's HBONE server (pkg/hbone) for the mesh's
// server identity.
func startIstioServer(t *testing.T, m *mesh) netip.AddrPort {
	t.Helper()
	srv := istiohbone.NewServer()
	srv.TLSConfig = hbone.ServerTLSConfig(m.serverSrc, m.server, "h2")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}
