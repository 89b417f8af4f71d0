package h2_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// env is one HBONE server on 127.0.0.1 whose handler dials the CONNECT
// target and relays, a dialer, and an echo upstream: all real sockets and
// real TLS with certificates from an in-process mesh CA.
type env struct {
	ca         *hbonetest.CA
	client     identity.Identity
	server     identity.Identity
	clientSrc  *identity.StaticSource
	serverSrc  *identity.StaticSource
	srv        *h2.Server
	addr       netip.AddrPort
	echo       *hbonetest.Echo
	dialer     *h2.Dialer
	dials      atomic.Int32 // upstream dials made by the handler
	lastReq    atomic.Pointer[hbone.Request]
	handler    hbone.Handler // overrides the relaying handler when set
	serveErr   chan error
	serverConf h2.ServerConfig
}

type envOption func(*env)

func withLimits(l h2.Limits) envOption {
	return func(e *env) { e.serverConf.Limits = l }
}

func withHandler(h hbone.Handler) envOption { return func(e *env) { e.handler = h } }

func withForbidden(ap ...netip.AddrPort) envOption {
	return func(e *env) { e.serverConf.ForbiddenTargets = ap }
}

func newEnv(t testing.TB, opts ...envOption) *env {
	t.Helper()
	c := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	e := &env{ca: c, client: c.ID("client-ns", "sleep"), server: c.ID("server-ns", "httpbin"), serveErr: make(chan error, 1)}
	e.clientSrc = c.Source(t, e.client)
	e.serverSrc = c.Source(t, e.server)
	e.echo = hbonetest.StartEcho(t)
	e.serverConf = h2.ServerConfig{Certs: e.serverSrc, Identity: e.server, Handler: hbone.HandlerFunc(e.serve)}
	for _, o := range opts {
		o(e)
	}
	srv, err := h2.NewServer(e.serverConf)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.srv, e.addr = srv, ln.Addr().(*net.TCPAddr).AddrPort()
	go func() { e.serveErr <- srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	e.dialer = e.newDialer(t, h2.DialerConfig{})
	return e
}

func (e *env) newDialer(t testing.TB, cfg h2.DialerConfig) *h2.Dialer {
	t.Helper()
	if cfg.Certs == nil {
		cfg.Certs = e.clientSrc
	}
	d, err := h2.NewDialer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// serve is the default handler: dial the target and relay, like ztunnel's
// inbound path without authorization.
func (e *env) serve(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
	e.lastReq.Store(req)
	if e.handler != nil {
		e.handler.ServeHBONE(ctx, req, resp)
		return
	}
	e.dials.Add(1)
	up, err := (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, "tcp", req.Target.String())
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
}

func (e *env) request(target netip.AddrPort) hbone.DialRequest {
	return hbone.DialRequest{Source: e.client, Expected: []identity.Identity{e.server}, ProxyAddr: e.addr, Target: target}
}

func (e *env) dial(t testing.TB, target netip.AddrPort) hbone.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := e.dialer.Dial(ctx, e.request(target))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	return st
}

// roundTrip writes msg and reads the same number of bytes back.
func roundTrip(t testing.TB, st io.ReadWriter, msg []byte) {
	t.Helper()
	if _, err := st.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(st, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo mismatch")
	}
}

// clientTLS is a TLS 1.3 client config presenting cert and trusting
// anything: the raw-protocol tests attack the server, not the client.
func clientTLS(cert *tls.Certificate, protos ...string) *tls.Config {
	if protos == nil {
		protos = []string{"h2"}
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         protos,
		InsecureSkipVerify: true,
		Certificates:       []tls.Certificate{*cert},
	}
}

// rawConn is an HTTP/2 connection driven frame by frame.
type rawConn struct {
	t    testing.TB
	conn *tls.Conn
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
}

func (e *env) rawConn(t testing.TB) *rawConn {
	t.Helper()
	return e.rawConnWith(t, e.ca.Issue(t, e.client))
}

func (e *env) rawConnWith(t testing.TB, cert *tls.Certificate) *rawConn {
	t.Helper()
	conn, err := tls.Dial("tcp", e.addr.String(), clientTLS(cert))
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	rc := &rawConn{t: t, conn: conn, fr: http2.NewFramer(conn, conn)}
	rc.enc = hpack.NewEncoder(&rc.hbuf)
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return rc
}

// headerBlock hpack-encodes pseudo and regular headers in order.
func (rc *rawConn) headerBlock(kv ...string) []byte {
	rc.hbuf.Reset()
	for i := 0; i < len(kv); i += 2 {
		rc.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return bytes.Clone(rc.hbuf.Bytes())
}

func (rc *rawConn) writeHeaders(id uint32, endStream bool, kv ...string) {
	rc.t.Helper()
	err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.headerBlock(kv...), EndHeaders: true, EndStream: endStream})
	if err != nil {
		rc.t.Fatal(err)
	}
}

// status reads frames until stream id gets its response status, the
// stream is reset (-1) or the connection ends (0).
func (rc *rawConn) status(id uint32) int {
	rc.t.Helper()
	rc.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			return 0
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				rc.fr.WriteSettingsAck()
			}
		case *http2.MetaHeadersFrame:
			if f.StreamID == id {
				for _, hf := range f.Fields {
					if hf.Name == ":status" {
						var n int
						for _, c := range hf.Value {
							n = n*10 + int(c-'0')
						}
						return n
					}
				}
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return -1
			}
		case *http2.GoAwayFrame:
			if id > f.LastStreamID {
				return 0
			}
		}
	}
}

// closed reads until the server closes the connection, and reports whether
// it did before the deadline (GOAWAY frames are skipped).
func (rc *rawConn) closed(within time.Duration) bool {
	rc.conn.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 32<<10)
	for {
		if _, err := rc.conn.Read(buf); err != nil {
			ne, ok := err.(net.Error)
			return !(ok && ne.Timeout())
		}
	}
}

// settle waits until the number of goroutines is at most limit; it returns
// the last count.
func settle(limit int) int {
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= limit || time.Now().After(deadline) {
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// peakSampler records the maximum goroutine count while running.
type peakSampler struct {
	peak atomic.Int64
	stop chan struct{}
	wg   sync.WaitGroup
}

func samplePeak() *peakSampler {
	p := &peakSampler{stop: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			if n := int64(runtime.NumGoroutine()); n > p.peak.Load() {
				p.peak.Store(n)
			}
			select {
			case <-p.stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return p
}

func (p *peakSampler) done() int {
	close(p.stop)
	p.wg.Wait()
	return int(p.peak.Load())
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
