package fallback

import (
	"context"

	"io"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// env has two real peers: "dual" answers HBONE over HTTP/2 (TCP) and
// HTTP/3 (UDP) on the same port, "silent" only over HTTP/2 and swallows
// QUIC ("no answer"); and real dialers for both transports.
type env struct {
	ca             *hbonetest.CA
	client, server identity.Identity
	h3, h2         *countingDialer
	dual, silent   netip.AddrPort
	reg            *prometheus.Registry
	logs           *logLines
	// h3Timeout is the dialers' HTTP/3 budget: generous, so a peer that
	// answers QUIC is never given up on because the machine is slow (an
	// emulated or loaded one took over a second); the silent-peer test
	// shortens it to wait less.
	h3Timeout time.Duration
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{ca: hbonetest.NewCA(t, hbonetest.DefaultTrustDomain), reg: prometheus.NewRegistry(), logs: &logLines{}, h3Timeout: 30 * time.Second}
	e.client, e.server = e.ca.ID("client", "client"), e.ca.ID("server", "server")
	e.silent = startH2Server(t, e.ca, e.server, true)
	e.dual = startH2Server(t, e.ca, e.server, false)

	srv, err := h3.NewServer(h3.ServerConfig{Certs: e.ca.Source(t, e.server), Identity: e.server, Log: logr.Discard(),
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
	if err := srv.Listen(e.dual.String()); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })

	d3, err := h3.NewDialer(h3.DialerConfig{Certs: e.ca.Source(t, e.client), Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	e.h3 = &countingDialer{Dialer: d3}
	e.h2 = &countingDialer{Dialer: newH2Dialer(t, e.ca, e.client)}
	return e
}

func (e *env) dialer(t *testing.T, proto hbone.Protocol, now func() time.Time) *Dialer {
	t.Helper()
	d, err := New(Config{H2: e.h2, H3: e.h3, Protocol: proto, H3Timeout: e.h3Timeout,
		Remember: time.Minute, Log: funcr.New(e.logs.add, funcr.Options{}), Registerer: e.reg, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func (e *env) req(proxy netip.AddrPort) hbone.DialRequest {
	return hbone.DialRequest{Source: e.client, Expected: []identity.Identity{e.server}, ProxyAddr: proxy,
		Target: netip.MustParseAddrPort("10.1.2.3:80")}
}

func (e *env) fallbacks(t *testing.T, reason string) int {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "hbone_transport_fallback_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return int(m.GetCounter().GetValue())
				}
			}
		}
	}
	return 0
}

func TestFallsBackToHTTP2WhenPeerDoesNotAnswerQUIC(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	var clock atomic.Pointer[time.Time]
	clock.Store(&now)
	e.h3Timeout = 300 * time.Millisecond
	d := e.dialer(t, hbone.HTTP3, func() time.Time { return *clock.Load() })

	s, err := d.Dial(context.Background(), e.req(e.silent))
	if err != nil {
		t.Fatalf("dial with fallback: %v", err)
	}
	echo(t, s)
	if e.h3.calls.Load() != 1 || e.h2.calls.Load() != 1 {
		t.Fatalf("h3 calls %d, h2 calls %d; want 1 and 1", e.h3.calls.Load(), e.h2.calls.Load())
	}
	if n := e.fallbacks(t, ReasonNoQUICAnswer); n != 1 {
		t.Errorf("hbone_transport_fallback_total{reason=no_quic_answer} = %d, want 1", n)
	}
	if !e.logs.contains("falling back to HTTP/2") {
		t.Errorf("no fallback log line; logs: %v", e.logs.all())
	}

	// remembered: HTTP/3 is not tried again for a while
	s, err = d.Dial(context.Background(), e.req(e.silent))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if e.h3.calls.Load() != 1 || e.fallbacks(t, ReasonRemembered) != 1 {
		t.Errorf("second dial: h3 calls %d (want 1), remembered fallbacks %d (want 1)", e.h3.calls.Load(), e.fallbacks(t, ReasonRemembered))
	}

	// after the memory expires HTTP/3 is tried again
	later := now.Add(2 * time.Minute)
	clock.Store(&later)
	s, err = d.Dial(context.Background(), e.req(e.silent))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if e.h3.calls.Load() != 2 {
		t.Errorf("after expiry: h3 calls %d, want 2", e.h3.calls.Load())
	}
}

func TestUsesHTTP3WhenPeerAnswers(t *testing.T) {
	e := newEnv(t)
	d := e.dialer(t, hbone.HTTP3, nil)
	s, err := d.Dial(context.Background(), e.req(e.dual))
	if err != nil {
		t.Fatal(err)
	}
	echo(t, s)
	if e.h2.calls.Load() != 0 || e.fallbacks(t, ReasonNoQUICAnswer) != 0 {
		t.Fatalf("HTTP/2 used (%d calls) although the peer answers QUIC", e.h2.calls.Load())
	}
}

// A peer that answers over QUIC and refuses (wrong identity) is a security
// decision: no retry over HTTP/2.
func TestNoFallbackWhenPeerRefuses(t *testing.T) {
	e := newEnv(t)
	d := e.dialer(t, hbone.HTTP3, nil)
	req := e.req(e.dual)
	req.Expected = []identity.Identity{e.ca.ID("other", "other")}
	if s, err := d.Dial(context.Background(), req); err == nil {
		s.Close()
		t.Fatal("dial to an unexpected identity succeeded")
	}
	if e.h2.calls.Load() != 0 {
		t.Fatal("refused HTTP/3 dial was retried over HTTP/2")
	}
}

func TestProtocolSelection(t *testing.T) {
	tests := []struct {
		name        string
		mesh, dial  hbone.Protocol
		wantH3Calls int32
	}{
		{"mesh HTTP2", hbone.HTTP2, "", 0},
		{"mesh HTTP3", hbone.HTTP3, "", 1},
		{"mesh HTTP3, dial HTTP2", hbone.HTTP3, hbone.HTTP2, 0},
		{"mesh HTTP2, dial HTTP3", hbone.HTTP2, hbone.HTTP3, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			d := e.dialer(t, tt.mesh, nil)
			var s hbone.Stream
			var err error
			if tt.dial == "" {
				s, err = d.Dial(context.Background(), e.req(e.dual))
			} else {
				s, err = d.DialProtocol(context.Background(), tt.dial, e.req(e.dual))
			}
			if err != nil {
				t.Fatal(err)
			}
			s.Close()
			if got := e.h3.calls.Load(); got != tt.wantH3Calls {
				t.Errorf("h3 calls = %d, want %d", got, tt.wantH3Calls)
			}
			if got := e.h2.calls.Load(); got != 1-tt.wantH3Calls {
				t.Errorf("h2 calls = %d, want %d", got, 1-tt.wantH3Calls)
			}
		})
	}
}

func echo(t *testing.T, s hbone.Stream) {
	t.Helper()
	defer s.Close()
	if _, err := s.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	b, err := io.ReadAll(s)
	if err != nil || string(b) != "ping" {
		t.Fatalf("echo = %q, %v", b, err)
	}
}

type countingDialer struct {
	hbone.Dialer
	calls atomic.Int32
}

func (c *countingDialer) Dial(ctx context.Context, req hbone.DialRequest) (hbone.Stream, error) {
	c.calls.Add(1)
	return c.Dialer.Dial(ctx, req)
}

type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) add(prefix, args string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, args)
}

func (l *logLines) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}

func (l *logLines) contains(s string) bool {
	for _, line := range l.all() {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}
