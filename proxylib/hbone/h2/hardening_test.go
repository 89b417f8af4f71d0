package h2_test

// Cases 1-16 of reliability.md ("Tunnel and identity", "HTTP/2 and QUIC
// abuse") against a real server on 127.0.0.1 over real TLS.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Case 1: a CONNECT authority that is not ip:port is refused with 400 and
// nothing is dialled.
func TestBadAuthorityIs400(t *testing.T) {
	e := newEnv(t)
	rc := e.rawConn(t)
	id := uint32(1)
	for _, authority := range []string{
		"127.0.0.1",       // no port
		"127.0.0.1:0",     // port 0
		"127.0.0.1:65536", // port > 65535
		"127.0.0.1:99999",
		"::1",            // bare IPv6
		"[::1]",          // IPv6 without port
		"::1:80",         // ambiguous IPv6 without brackets
		"localhost:80",   // hostname
		"example.com:80", // hostname
		"127.0.0.1:http", // named port
		"0.0.0.0:80",     // unspecified
		"127.0.0.1:080",  // non-canonical
	} {
		rc.writeHeaders(id, false, ":method", "CONNECT", ":authority", authority)
		if got := rc.status(id); got != http.StatusBadRequest {
			t.Errorf("CONNECT %q: status %d, want 400", authority, got)
		}
		id += 2
	}
	if n := e.dials.Load(); n != 0 {
		t.Fatalf("%d upstream dials for invalid authorities, want 0", n)
	}
	// The connection is still usable for a valid request.
	rc.writeHeaders(id, false, ":method", "CONNECT", ":authority", e.echo.Addr.String())
	if got := rc.status(id); got != http.StatusOK {
		t.Fatalf("valid CONNECT after bad ones: status %d", got)
	}
}

// Case 3: other methods get 405; HTTP/1.1, h2c and missing ALPN are refused.
func TestOnlyConnectOverTLSH2(t *testing.T) {
	e := newEnv(t)
	rc := e.rawConn(t)
	for i, m := range []string{"GET", "POST", "PUT"} {
		id := uint32(2*i + 1)
		rc.writeHeaders(id, true, ":method", m, ":scheme", "https", ":path", "/", ":authority", e.echo.Addr.String())
		if got := rc.status(id); got != http.StatusMethodNotAllowed {
			t.Errorf("%s: status %d, want 405", m, got)
		}
	}

	cert := e.ca.Issue(t, e.client)
	if c, err := tls.Dial("tcp", e.addr.String(), clientTLS(cert, "http/1.1")); err == nil {
		rc := &rawConn{t: t, conn: c}
		if c.ConnectionState().NegotiatedProtocol != "" || !rc.closed(10*time.Second) {
			t.Error("TLS with ALPN http/1.1 only was served")
		}
	}
	// No ALPN at all: the handshake may complete but the server hangs up.
	if c, err := tls.Dial("tcp", e.addr.String(), &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS13}); err == nil {
		rc := &rawConn{t: t, conn: c}
		if !rc.closed(10 * time.Second) {
			t.Error("connection without ALPN h2 stayed open")
		}
	}
	// h2c: the HTTP/2 preface in plaintext.
	plain, err := net.Dial("tcp", e.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	plain.Write([]byte(http2.ClientPreface))
	plain.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 1024)
	for {
		n, err := plain.Read(buf)
		if bytes.Contains(buf[:n], []byte("HTTP/")) || bytes.Contains(buf[:n], []byte{0, 0, 0, 4}) {
			t.Fatal("server answered h2c/HTTP in plaintext")
		}
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("plaintext connection not closed")
			}
			break
		}
	}
	if e.dials.Load() != 0 {
		t.Fatal("refused requests dialled upstream")
	}
}

// Cases 4, 5, 7: client certificates the server must refuse in the handshake.
func TestServerRefusesBadClientCertificates(t *testing.T) {
	e := newEnv(t)
	otherCA := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	now := time.Now()
	id := e.client.String()
	tests := []struct {
		name string
		cert *tls.Certificate
	}{
		{"other CA", otherCA.Issue(t, e.client)},
		{"expired", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{id}, NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour)})},
		{"not yet valid", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{id}, NotBefore: now.Add(time.Hour), NotAfter: now.Add(2 * time.Hour)})},
		{"other trust domain", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{"spiffe://evil.local/ns/client-ns/sa/sleep"}})},
		{"no URI SAN", e.ca.IssueCert(t, hbonetest.CertOptions{DNSNames: []string{"sleep.client-ns.svc"}})},
		{"two URI SANs", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{id, "spiffe://cluster.local/ns/a/sa/b"}})},
		{"malformed SPIFFE path", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{"spiffe://cluster.local/sa/sleep"}})},
		{"not spiffe", e.ca.IssueCert(t, hbonetest.CertOptions{URIs: []string{"https://cluster.local/ns/client-ns/sa/sleep"}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := identity.NewStaticSource(hbonetest.DefaultTrustDomain, e.ca.Roots())
			src.Set(e.client, tt.cert)
			d := e.newDialer(t, h2.DialerConfig{Certs: src})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if st, err := d.Dial(ctx, e.request(e.echo.Addr)); err == nil {
				st.Close()
				t.Fatal("tunnel opened with a bad client certificate")
			}
		})
	}
	if e.lastReq.Load() != nil {
		t.Fatal("a refused client reached the handler")
	}
}

// Case 5 with a multi-root bundle: another trust domain's CA is trusted as a
// root, yet its identities are refused before authorization.
func TestServerRefusesTrustedRootOfOtherTrustDomain(t *testing.T) {
	evil := hbonetest.NewCA(t, "evil.local")
	mesh := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	roots := mesh.Roots()
	roots.AddCert(evil.Root)
	server := mesh.ID("server-ns", "httpbin")
	serverSrc := identity.NewStaticSource(hbonetest.DefaultTrustDomain, roots)
	serverSrc.Set(server, mesh.Issue(t, server))
	reached := atomic.Bool{}
	srv, err := h2.NewServer(h2.ServerConfig{Certs: serverSrc, Identity: server, Handler: hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, r hbone.Responder) {
		reached.Store(true)
		r.Reject(403, "test")
	})})
	if err != nil {
		t.Fatal(err)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(ln)
	defer srv.Close()
	client := evil.ID("client-ns", "sleep")
	clientSrc := identity.NewStaticSource("evil.local", roots)
	clientSrc.Set(client, evil.Issue(t, client))
	// The client side would also refuse the server (other trust domain), so
	// drive the handshake by hand and check the server's verdict.
	conn, err := tls.Dial("tcp", ln.Addr().String(), clientTLS(evil.Issue(t, client)))
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil || reached.Load() {
		t.Fatalf("identity of another trust domain was accepted (err=%v)", err)
	}
}

// Cases 6 and 7, client side: the server's certificate must carry exactly
// one expected SPIFFE identity; a right DNS name does not help.
func TestClientRefusesWrongServerIdentity(t *testing.T) {
	expected := "spiffe://cluster.local/ns/server-ns/sa/httpbin"
	tests := []struct {
		name string
		cert func(c *hbonetest.CA) *tls.Certificate
		want error
	}{
		{"other identity, correct DNS name", func(c *hbonetest.CA) *tls.Certificate {
			return c.IssueCert(t, hbonetest.CertOptions{URIs: []string{"spiffe://cluster.local/ns/server-ns/sa/other"}, DNSNames: []string{"httpbin.server-ns.svc.cluster.local", "localhost"}})
		}, hbone.ErrUnexpectedPeer},
		{"no URI SAN", func(c *hbonetest.CA) *tls.Certificate {
			return c.IssueCert(t, hbonetest.CertOptions{DNSNames: []string{"localhost"}})
		}, hbone.ErrPeerIdentity},
		{"two URI SANs", func(c *hbonetest.CA) *tls.Certificate {
			return c.IssueCert(t, hbonetest.CertOptions{URIs: []string{expected, "spiffe://cluster.local/ns/x/sa/y"}})
		}, hbone.ErrPeerIdentity},
		{"malformed SPIFFE ID", func(c *hbonetest.CA) *tls.Certificate {
			return c.IssueCert(t, hbonetest.CertOptions{URIs: []string{expected + "/extra"}})
		}, hbone.ErrPeerIdentity},
		{"other trust domain", func(c *hbonetest.CA) *tls.Certificate {
			return c.IssueCert(t, hbonetest.CertOptions{URIs: []string{"spiffe://evil.local/ns/server-ns/sa/httpbin"}})
		}, hbone.ErrWrongTrustDomain},
		{"other CA", func(*hbonetest.CA) *tls.Certificate {
			return hbonetest.NewCA(t, hbonetest.DefaultTrustDomain).Issue(t, identity.MustParse(expected))
		}, hbone.ErrUntrustedPeer},
		{"expired", func(c *hbonetest.CA) *tls.Certificate {
			now := time.Now()
			return c.IssueCert(t, hbonetest.CertOptions{URIs: []string{expected}, NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour)})
		}, hbone.ErrUntrustedPeer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.serverSrc.Set(e.server, tt.cert(e.ca))
			_, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
			if err == nil {
				t.Fatal("client accepted the server")
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
			if e.lastReq.Load() != nil {
				t.Fatal("CONNECT was sent to an unverified server")
			}
		})
	}
}

// Case 8: tunnels to the proxy itself are refused.
func TestRecursionRefused(t *testing.T) {
	admin := netip.MustParseAddrPort("127.0.0.1:15000")
	e := newEnv(t, withForbidden(admin))
	for _, target := range []netip.AddrPort{e.addr, admin} {
		_, err := e.dialer.Dial(context.Background(), e.request(target))
		if hbone.StatusOf(err) != http.StatusBadRequest {
			t.Errorf("CONNECT to %v: err = %v, want 400", target, err)
		}
	}
	if e.dials.Load() != 0 {
		t.Fatal("recursive target was dialled")
	}
}

// Case 9: a refused upstream fails the tunnel with 503 and leaks nothing.
func TestUpstreamRefusedNoLeak(t *testing.T) {
	e := newEnv(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	st := e.dial(t, e.echo.Addr) // warm the pool
	st.Close()
	base := runtime.NumGoroutine()
	for range 50 {
		_, err := e.dialer.Dial(context.Background(), e.request(closed))
		if hbone.StatusOf(err) != http.StatusServiceUnavailable {
			t.Fatalf("err = %v, want 503", err)
		}
	}
	if n := settle(base + 2); n > base+2 {
		t.Fatalf("goroutines %d after failed tunnels, baseline %d", n, base)
	}
	if s := e.dialer.Stats(); s.Conns != 1 || s.Streams != 0 {
		t.Fatalf("pool after failures: %+v, want 1 conn, 0 streams", s)
	}
}

// upstream runs fn on each accepted connection of a fresh listener.
func upstream(t *testing.T, fn func(*net.TCPConn)) netip.AddrPort {
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
				defer c.Close()
				fn(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// Case 10: half-close and reset propagation.
func TestHalfCloseClientEndsWhileServerWrites(t *testing.T) {
	e := newEnv(t)
	payload := make([]byte, 4<<20)
	rand.Read(payload)
	target := upstream(t, func(c *net.TCPConn) {
		io.Copy(io.Discard, c) // until the client's half-close arrives
		c.Write(payload)
		c.CloseWrite()
	})
	st := e.dial(t, target)
	defer st.Close()
	st.Write([]byte("request"))
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(st)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("read %d of %d bytes after half-close, err %v", len(got), len(payload), err)
	}
}

func TestHalfCloseServerEndsFirst(t *testing.T) {
	e := newEnv(t)
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	target := upstream(t, func(c *net.TCPConn) {
		c.Write(payload)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	st := e.dial(t, target)
	defer st.Close()
	got, err := io.ReadAll(st)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("read %d of %d bytes, err %v", len(got), len(payload), err)
	}
}

func TestUpstreamResetPropagates(t *testing.T) {
	e := newEnv(t)
	target := upstream(t, func(c *net.TCPConn) {
		c.Read(make([]byte, 16))
		c.SetLinger(0) // RST
	})
	st := e.dial(t, target)
	defer st.Close()
	st.Write([]byte("hi"))
	_, err := io.ReadAll(st)
	if err == nil {
		t.Fatal("upstream reset arrived as a clean EOF")
	}
}

func TestClientResetReachesUpstream(t *testing.T) {
	e := newEnv(t)
	gotEOF := make(chan error, 1)
	target := upstream(t, func(c *net.TCPConn) {
		_, err := io.Copy(io.Discard, c)
		gotEOF <- err
	})
	st := e.dial(t, target)
	st.Write([]byte("data"))
	st.Close()
	select {
	case <-gotEOF:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream connection not closed after the client reset the tunnel")
	}
}

// Case 11: drain: listeners close, in-flight tunnels finish, new ones fail.
func TestShutdownDrainsGracefully(t *testing.T) {
	e := newEnv(t)
	st := e.dial(t, e.echo.Addr)
	roundTrip(t, st, []byte("before"))
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	eventually(t, "server to stop serving", func() bool {
		select {
		case err := <-e.serveErr:
			return errors.Is(err, h2.ErrServerClosed)
		default:
			return false
		}
	})
	fresh := e.newDialer(t, h2.DialerConfig{})
	if _, err := fresh.Dial(context.Background(), e.request(e.echo.Addr)); err == nil {
		t.Fatal("new connection accepted while draining")
	}
	roundTrip(t, st, []byte("in-flight tunnel still works"))
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) with a tunnel open", err)
	default:
	}
	st.CloseWrite()
	io.ReadAll(st)
	st.Close()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown = %v after tunnels ended", err)
	}
}

func TestShutdownForcesAfterGrace(t *testing.T) {
	e := newEnv(t)
	st := e.dial(t, e.echo.Addr)
	roundTrip(t, st, []byte("x"))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want DeadlineExceeded", err)
	}
	if _, err := io.ReadAll(st); err == nil {
		t.Fatal("tunnel ended cleanly after a forced close")
	}
}

// Case 12: Rapid Reset: thousands of streams opened and cancelled.
func TestRapidResetBounded(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{MaxConcurrentStreams: 100, MaxEarlyResets: 500}))
	base := runtime.NumGoroutine()
	peak := samplePeak()
	rc := e.rawConn(t)
	go func() {
		for i := range 5000 {
			id := uint32(2*i + 1)
			if err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.headerBlock(":method", "CONNECT", ":authority", e.echo.Addr.String()), EndHeaders: true}); err != nil {
				return
			}
			if err := rc.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
				return
			}
		}
	}()
	closed := rc.closed(20 * time.Second)
	maxG := peak.done()
	if !closed {
		t.Fatal("connection survived 5000 rapid resets")
	}
	if maxG > base+1000 {
		t.Fatalf("goroutines peaked at %d (baseline %d)", maxG, base)
	}
	if n := settle(base + 5); n > base+5 {
		t.Fatalf("goroutines %d after the attack, baseline %d", n, base)
	}
	// Other clients are unaffected.
	st := e.dial(t, e.echo.Addr)
	roundTrip(t, st, []byte("ok"))
	st.Close()
}

// Case 13: CONTINUATION flood / header list over the limit closes the
// connection without buffering it.
func TestContinuationFloodClosesConnection(t *testing.T) {
	e := newEnv(t)
	base := runtime.NumGoroutine()
	rc := e.rawConn(t)
	junk := rc.headerBlock("x-junk", strings.Repeat("a", 4000))
	var sent atomic.Int64
	go func() {
		first := rc.headerBlock(":method", "CONNECT", ":authority", e.echo.Addr.String())
		if rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: first}) != nil {
			return
		}
		for range 4096 { // 16 MiB of header block if never stopped
			if rc.fr.WriteContinuation(1, false, junk) != nil {
				return
			}
			sent.Add(int64(len(junk)))
		}
	}()
	if !rc.closed(20 * time.Second) {
		t.Fatal("connection survived a CONTINUATION flood")
	}
	if n := sent.Load(); n >= 4096*int64(len(junk)) {
		t.Fatalf("server read the whole %d-byte flood before closing", n)
	}
	if e.lastReq.Load() != nil {
		t.Fatal("flooded request reached the handler")
	}
	if n := settle(base + 5); n > base+5 {
		t.Fatalf("goroutines %d after the flood, baseline %d", n, base)
	}
}

// Case 14: slowloris on the handshake and on request headers.
func TestSlowlorisClosedByDeadlines(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{HandshakeTimeout: 300 * time.Millisecond, HeaderTimeout: 300 * time.Millisecond, PingInterval: 300 * time.Millisecond, PingTimeout: 300 * time.Millisecond}))
	t.Run("silent TCP", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if !(&rawConn{conn: nil}).closedPlain(c, 10*time.Second) {
			t.Fatal("silent connection not closed")
		}
	})
	t.Run("partial ClientHello", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // record header + 1 byte
		if !(&rawConn{}).closedPlain(c, 10*time.Second) {
			t.Fatal("stalled handshake not closed")
		}
	})
	t.Run("headers dripping", func(t *testing.T) {
		rc := e.rawConn(t)
		var frame bytes.Buffer
		fr := http2.NewFramer(&frame, nil)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: rc.headerBlock(":method", "CONNECT", ":authority", e.echo.Addr.String()), EndHeaders: true})
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			for _, b := range frame.Bytes() {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				if _, err := rc.conn.Write([]byte{b}); err != nil {
					return
				}
			}
		}()
		if !rc.closed(10 * time.Second) {
			t.Fatal("dripping headers not closed by deadline")
		}
		if e.lastReq.Load() != nil {
			t.Fatal("dripped request reached the handler")
		}
	})
}

// A peer that stalls mid-frame after its first request is caught by the
// PING deadline: it cannot answer a PING in the middle of a frame.
func TestStalledMidFrameClosedByPing(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{PingInterval: 200 * time.Millisecond, PingTimeout: 200 * time.Millisecond}))
	rc := e.rawConn(t)
	rc.writeHeaders(1, false, ":method", "CONNECT", ":authority", e.echo.Addr.String())
	if got := rc.status(1); got != http.StatusOK {
		t.Fatalf("first request: status %d", got)
	}
	var frame bytes.Buffer
	http2.NewFramer(&frame, nil).WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: rc.headerBlock(":method", "CONNECT", ":authority", e.echo.Addr.String()), EndHeaders: true})
	rc.conn.Write(frame.Bytes()[:5]) // half a frame header, then nothing
	if !rc.closed(10 * time.Second) {
		t.Fatal("connection stalled mid-frame was not closed")
	}
}

func (*rawConn) closedPlain(c net.Conn, within time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 4096)
	for {
		if _, err := c.Read(buf); err != nil {
			ne, ok := err.(net.Error)
			return !(ok && ne.Timeout())
		}
	}
}

// Case 15: streams beyond the per-connection limit are refused; tunnels
// beyond one identity's quota get 429; neither grows memory.
func TestStreamLimitRefusesExtraStreams(t *testing.T) {
	var running, maxRunning atomic.Int32
	e := newEnv(t, withLimits(h2.Limits{MaxConcurrentStreams: 3}), withHandler(hbone.HandlerFunc(func(ctx context.Context, _ *hbone.Request, r hbone.Responder) {
		n := running.Add(1)
		defer running.Add(-1)
		for {
			m := maxRunning.Load()
			if n <= m || maxRunning.CompareAndSwap(m, n) {
				break
			}
		}
		st, _ := r.Accept()
		<-ctx.Done()
		st.Close()
	})))
	rc := e.rawConn(t)
	// Ack the server's SETTINGS so its stream limit is in force.
	rc.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			rc.fr.WriteSettingsAck()
			break
		}
	}
	for i := range 10 {
		rc.writeHeaders(uint32(2*i+1), false, ":method", "CONNECT", ":authority", e.echo.Addr.String())
	}
	ok, refused := 0, 0
	for ok+refused < 10 {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			ok++
		case *http2.RSTStreamFrame:
			if f.ErrCode == http2.ErrCodeRefusedStream || f.ErrCode == http2.ErrCodeProtocol {
				refused++
			}
		}
	}
	if ok != 3 || refused != 7 || maxRunning.Load() > 3 {
		t.Fatalf("accepted %d, refused %d, max concurrent handlers %d; want 3, 7, ≤3", ok, refused, maxRunning.Load())
	}
}

func TestPerIdentityTunnelQuota(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{MaxTunnelsPerIdentity: 2}))
	a, b := e.dial(t, e.echo.Addr), e.dial(t, e.echo.Addr)
	_, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
	if hbone.StatusOf(err) != http.StatusTooManyRequests {
		t.Fatalf("third tunnel: err = %v, want 429", err)
	}
	// Another identity has its own quota.
	other := e.ca.ID("client-ns", "other")
	e.clientSrc.Set(other, e.ca.Issue(t, other))
	req := e.request(e.echo.Addr)
	req.Source = other
	c, err := e.dialer.Dial(context.Background(), req)
	if err != nil {
		t.Fatalf("other identity refused: %v", err)
	}
	c.Close()
	// Closing a tunnel frees a slot.
	a.Close()
	eventually(t, "quota slot released", func() bool {
		st, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
		if err != nil {
			return false
		}
		st.Close()
		return true
	})
	b.Close()
}

// Case 16: idle tunnels are reset; old connections get a graceful GOAWAY.
func TestStreamIdleTimeout(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{StreamIdleTimeout: 300 * time.Millisecond}))
	active := e.dial(t, e.echo.Addr)
	defer active.Close()
	idle := e.dial(t, e.echo.Addr)
	defer idle.Close()
	readErr := make(chan error, 1)
	go func() { _, err := io.ReadAll(idle); readErr <- err }()
	// The active tunnel keeps moving bytes while the idle one times out.
	for {
		roundTrip(t, active, []byte("keepalive"))
		select {
		case err := <-readErr:
			if err == nil {
				t.Fatal("idle tunnel ended with a clean EOF, want a reset")
			}
			roundTrip(t, active, []byte("active tunnel survived"))
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func TestMaxConnectionAgeGoAway(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{MaxConnectionAge: 200 * time.Millisecond, MaxConnectionAgeGrace: time.Hour}))
	old := e.dial(t, e.echo.Addr)
	defer old.Close()
	roundTrip(t, old, []byte("x"))
	eventually(t, "GOAWAY on the aged connection", func() bool { return e.dialer.Stats().Conns == 0 })
	roundTrip(t, old, []byte("tunnel on the aged connection still works"))
	fresh := e.dial(t, e.echo.Addr)
	defer fresh.Close()
	roundTrip(t, fresh, []byte("new tunnel on a new connection"))
	if s := e.dialer.Stats(); s.Conns != 1 {
		t.Fatalf("pool %+v, want the new connection only", s)
	}
}

func TestMaxConnectionAgeGraceForcesClose(t *testing.T) {
	e := newEnv(t, withLimits(h2.Limits{MaxConnectionAge: 100 * time.Millisecond, MaxConnectionAgeGrace: 200 * time.Millisecond}))
	st := e.dial(t, e.echo.Addr)
	defer st.Close()
	if _, err := io.ReadAll(st); err == nil {
		t.Fatal("tunnel ended cleanly; want it cut after the grace period")
	}
}

// TLS resumption would skip peer verification: the server must not resume.
func TestNoTLSResumption(t *testing.T) {
	e := newEnv(t)
	conf := clientTLS(e.ca.Issue(t, e.client))
	conf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	for i := range 2 {
		c, err := tls.Dial("tcp", e.addr.String(), conf)
		if err != nil {
			t.Fatal(err)
		}
		// Read once so a NewSessionTicket message, if any, is processed.
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		c.Read(make([]byte, 1))
		if c.ConnectionState().DidResume {
			t.Fatalf("connection %d resumed a TLS session", i)
		}
		c.Close()
	}
}
