package h2_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func TestTunnelEchoAndRequestMetadata(t *testing.T) {
	e := newEnv(t)
	req := e.request(e.echo.Addr)
	req.Header = hbone.SourceHeader(hbone.Source{Addr: netip.MustParseAddr("10.1.1.1"), Namespace: "client-ns", Pod: "sleep-0"})
	st, err := e.dialer.Dial(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	roundTrip(t, st, []byte("hello through HBONE"))
	big := make([]byte, 1<<20)
	rand.Read(big)
	roundTrip(t, st, big)

	got := e.lastReq.Load()
	if got.Peer != e.client || got.Target != e.echo.Addr || got.Protocol != hbone.HTTP2 {
		t.Errorf("handler saw peer=%v target=%v proto=%v", got.Peer, got.Target, got.Protocol)
	}
	src, err := hbone.ParseSource(got.Header)
	if err != nil || src.Addr != netip.MustParseAddr("10.1.1.1") || src.Pod != "sleep-0" {
		t.Errorf("source headers: %+v, %v", src, err)
	}
	if got.Local != e.addr {
		t.Errorf("local = %v, want %v", got.Local, e.addr)
	}
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(st); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: %d bytes, %v; want clean EOF", len(rest), err)
	}
}

func TestPoolReusesConnectionsAndCapsStreams(t *testing.T) {
	e := newEnv(t)
	for range 5 {
		st := e.dial(t, e.echo.Addr)
		roundTrip(t, st, []byte("x"))
		st.Close()
	}
	if s := e.dialer.Stats(); s.Conns != 1 {
		t.Fatalf("sequential tunnels used %d connections, want 1", s.Conns)
	}

	capped := e.newDialer(t, h2.DialerConfig{MaxStreamsPerConn: 2})
	var open []hbone.Stream
	for range 5 {
		st, err := capped.Dial(context.Background(), e.request(e.echo.Addr))
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, st, []byte("y"))
		open = append(open, st)
	}
	if s := capped.Stats(); s.Conns != 3 || s.Streams != 5 {
		t.Fatalf("5 tunnels at 2 per connection: %+v, want 3 conns", s)
	}
	for _, st := range open {
		st.Close()
	}
	eventually(t, "slots released", func() bool { return capped.Stats().Streams == 0 })
}

func TestPoolKeyedBySourceAndExpected(t *testing.T) {
	e := newEnv(t)
	other := e.ca.ID("client-ns", "other")
	e.clientSrc.Set(other, e.ca.Issue(t, other))
	a := e.dial(t, e.echo.Addr)
	defer a.Close()
	req := e.request(e.echo.Addr)
	req.Source = other
	b, err := e.dialer.Dial(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	roundTrip(t, b, []byte("z"))
	if got := e.lastReq.Load().Peer; got != other {
		t.Fatalf("server saw %v, want the second source identity", got)
	}
	req.Expected = []identity.Identity{e.server, e.ca.ID("x", "y")}
	c, err := e.dialer.Dial(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if s := e.dialer.Stats(); s.Conns != 3 {
		t.Fatalf("three distinct (source, expected) keys share %d connections, want 3", s.Conns)
	}
}

func TestConcurrentTunnels(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Go(func() {
			st, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			msg := bytes.Repeat([]byte{byte(i)}, 64<<10)
			st.Write(msg)
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(st, got); err != nil || !bytes.Equal(got, msg) {
				errs <- errors.New("echo mismatch")
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestHandlerRejectCarriesStatus(t *testing.T) {
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
		resp.Reject(http.StatusForbidden, "RBAC: denied")
	})))
	_, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
	if hbone.StatusOf(err) != http.StatusForbidden {
		t.Fatalf("err = %v, want status 403", err)
	}
}

func TestHandlerThatDoesNotAnswerFailsClosed(t *testing.T) {
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(context.Context, *hbone.Request, hbone.Responder) {})))
	_, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
	if hbone.StatusOf(err) != http.StatusServiceUnavailable {
		t.Fatalf("err = %v, want 503", err)
	}
}

func TestDialRequiresExpectedIdentity(t *testing.T) {
	e := newEnv(t)
	req := e.request(e.echo.Addr)
	req.Expected = nil
	if _, err := e.dialer.Dial(context.Background(), req); !errors.Is(err, hbone.ErrNoExpectedIdentity) {
		t.Fatalf("err = %v, want ErrNoExpectedIdentity", err)
	}
}

func TestDialContextBoundsOnlyTheHandshake(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	st, err := e.dialer.Dial(ctx, e.request(e.echo.Addr))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	cancel()
	roundTrip(t, st, []byte("still open after the dial context ended"))
}

func TestUnreachableProxy(t *testing.T) {
	e := newEnv(t)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	req := e.request(e.echo.Addr)
	req.ProxyAddr = dead
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.dialer.Dial(ctx, req); err == nil {
		t.Fatal("dial to a closed port succeeded")
	}
}

func TestIdleConnectionsEvicted(t *testing.T) {
	e := newEnv(t)
	d := e.newDialer(t, h2.DialerConfig{IdleConnTimeout: 100 * time.Millisecond})
	st, err := d.Dial(context.Background(), e.request(e.echo.Addr))
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, st, []byte("x"))
	// An open tunnel keeps its connection however idle the tunnel is.
	time.Sleep(300 * time.Millisecond)
	if s := d.Stats(); s.Conns != 1 {
		t.Fatalf("connection with an open tunnel evicted: %+v", s)
	}
	roundTrip(t, st, []byte("y"))
	st.Close()
	eventually(t, "idle connection eviction", func() bool { return d.Stats().Conns == 0 })
	st, err = d.Dial(context.Background(), e.request(e.echo.Addr))
	if err != nil {
		t.Fatalf("dial after eviction: %v", err)
	}
	roundTrip(t, st, []byte("z"))
	st.Close()
}

// TestUploadUnderSmallWindows: with flow-control windows far below the
// bytes queued in the dialer's body pipe, held frames (the dialer holds a
// frame while more are queued) must still go out and the upload complete.
func TestUploadUnderSmallWindows(t *testing.T) {
	small := h2.Tuning{ConnWindow: 65535, StreamWindow: 65535}
	e := newEnv(t, withHandler(benchHandler()), func(e *env) { e.serverConf.Tuning = small })
	st := e.dial(t, e.echo.Addr)
	defer st.Close()
	const total = 8 << 20
	buf := make([]byte, 64<<10)
	for sent := 0; sent < total; sent += len(buf) {
		if _, err := st.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	st.CloseWrite()
	var n int64
	if err := binary.Read(st, binary.BigEndian, &n); err != nil || n != total {
		t.Fatalf("server counted %d of %d: %v", n, total, err)
	}
}

// TestAcceptWithHeaderReachesTheDialer: extension headers of a 200
// (proxylib/handover's session answer) are readable on the dialed stream;
// a plain Accept sends none.
func TestAcceptWithHeaderReachesTheDialer(t *testing.T) {
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		var st hbone.Stream
		var err error
		if v := req.Header.Get("X-Ambient-Session"); v != "" {
			st, err = resp.(hbone.HeaderAccepter).AcceptWithHeader(http.Header{"X-Ambient-Session": {"answer-to-" + v}})
		} else {
			st, err = resp.Accept()
		}
		if err == nil {
			io.Copy(st, st)
			st.Close()
		}
	})))
	req := e.request(e.echo.Addr)
	req.Header = http.Header{"X-Ambient-Session": {"v1"}}
	st, err := e.dialer.Dial(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if got := st.(hbone.ResponseHeaderer).ResponseHeader().Get("X-Ambient-Session"); got != "answer-to-v1" {
		t.Fatalf("response header %q, want answer-to-v1", got)
	}
	roundTrip(t, st, []byte("after the answer"))
	plain, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if h := plain.(hbone.ResponseHeaderer).ResponseHeader(); len(h) != 0 {
		t.Fatalf("plain Accept sent headers %v", h)
	}
}
