package h2

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// ServerConfig configures a Server. Certs, Identity and Handler are required.
type ServerConfig struct {
	Certs hbone.CertSource
	// Identity is the local identity whose certificate the server presents.
	Identity identity.Identity
	Handler  hbone.Handler
	// ForbiddenTargets are refused with 400 (recursion: the proxy's own
	// listeners and admin ports). The listener's own address always is.
	ForbiddenTargets []netip.AddrPort
	Limits           Limits
	Tuning           Tuning
	Log              logr.Logger
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("hbone: server closed")

// Server accepts HBONE tunnels on listeners it is given.
type Server struct {
	cfg       ServerConfig
	limits    Limits
	tuning    Tuning
	tlsConfig *tls.Config
	log       logr.Logger
	forbidden map[netip.AddrPort]bool

	mu        sync.Mutex
	listeners map[net.Listener]bool
	conns     map[*serverConn]bool
	perPeer   map[identity.Identity]int
	draining  bool
	connWG    sync.WaitGroup
}

// NewServer validates cfg.
func NewServer(cfg ServerConfig) (*Server, error) {
	switch {
	case cfg.Certs == nil:
		return nil, errors.New("hbone/h2: server needs a certificate source")
	case cfg.Identity.IsZero():
		return nil, errors.New("hbone/h2: server needs a local identity")
	case cfg.Handler == nil:
		return nil, errors.New("hbone/h2: server needs a handler")
	}
	s := &Server{
		cfg:       cfg,
		limits:    cfg.Limits.withDefaults(),
		tuning:    cfg.Tuning.withDefaults(),
		tlsConfig: hbone.ServerTLSConfig(cfg.Certs, cfg.Identity, "h2"),
		log:       cfg.Log.WithName("hbone-server"),
		forbidden: map[netip.AddrPort]bool{},
		listeners: map[net.Listener]bool{},
		conns:     map[*serverConn]bool{},
		perPeer:   map[identity.Identity]int{},
	}
	for _, t := range cfg.ForbiddenTargets {
		s.forbidden[t] = true
	}
	return s, nil
}

// Serve accepts connections on ln until Shutdown or Close; it closes ln.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.draining {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isDraining() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// EMFILE and friends: back off and keep serving.
			s.log.Error(err, "accept failed; retrying", "in", backoff)
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		s.connWG.Add(1)
		go func() {
			defer s.connWG.Done()
			s.serveConn(c)
		}()
	}
}

func (s *Server) isDraining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

// Shutdown drains: listeners close (new connections are refused), every
// connection gets a graceful GOAWAY, in-flight tunnels may finish until ctx
// ends, then the rest are closed. It returns ctx.Err() if it had to force.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	for ln := range s.listeners {
		ln.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.goAway()
	}
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.closeConns()
		<-done
		return ctx.Err()
	}
}

// Close stops at once: listeners and connections are closed.
func (s *Server) Close() error {
	s.mu.Lock()
	s.draining = true
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	s.closeConns()
	s.connWG.Wait()
	return nil
}

func (s *Server) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.raw.Close()
	}
}

// serverConn is one accepted connection and who is on the other end.
type serverConn struct {
	s        *Server
	c        *conn
	raw      net.Conn
	peer     identity.Identity
	peerAddr netip.AddrPort
	local    netip.AddrPort

	firstRequest sync.Once

	resetMu     sync.Mutex
	resetWindow time.Time
	resets      int
	resetClosed bool
}

// noteEarlyReset counts a tunnel the peer reset before it was answered;
// past the limit the connection is sent GOAWAY and closed shortly after.
func (sc *serverConn) noteEarlyReset() {
	l := sc.s.limits
	sc.resetMu.Lock()
	now := time.Now()
	if now.Sub(sc.resetWindow) > l.EarlyResetWindow {
		sc.resetWindow, sc.resets = now, 0
	}
	sc.resets++
	trip := sc.resets > l.MaxEarlyResets && !sc.resetClosed
	if trip {
		sc.resetClosed = true
	}
	sc.resetMu.Unlock()
	if trip {
		sc.s.log.Info("closing connection: too many early stream resets (rapid reset)", "peer_id", sc.peer.String(), "peer", sc.peerAddr.String(), "resets", l.MaxEarlyResets)
		sc.c.goAway(http2.ErrCodeEnhanceYourCalm)
		time.AfterFunc(time.Second, func() { sc.raw.Close() })
	}
}

func (s *Server) serveConn(raw net.Conn) {
	defer raw.Close()
	tc, peer, err := s.handshake(raw)
	if err != nil {
		s.log.V(1).Info("handshake refused", "peer", raw.RemoteAddr().String(), "error", err.Error())
		return
	}
	sc := &serverConn{s: s, raw: raw, peer: peer, peerAddr: addrPort(raw.RemoteAddr()), local: addrPort(raw.LocalAddr())}
	c := newConn(raw, tc, true, s.tuning, s.limits)
	c.idleTimeout = s.limits.ConnIdleTimeout
	c.onHeaders = sc.onHeaders
	sc.c = c
	if !s.track(sc) {
		return // drained while handshaking
	}
	defer s.untrack(sc)

	if s.limits.HeaderTimeout > 0 {
		raw.SetReadDeadline(time.Now().Add(s.limits.HeaderTimeout))
	}
	if age := s.limits.MaxConnectionAge; age > 0 {
		t := time.AfterFunc(age, func() {
			c.goAway(http2.ErrCodeNo)
			time.AfterFunc(s.limits.MaxConnectionAgeGrace, func() { raw.Close() })
		})
		defer t.Stop()
	}
	if err := c.start(); err != nil {
		return
	}
	c.keepalive(s.limits.PingInterval, s.limits.PingTimeout)
	c.serve()
}

// handshake runs TLS under a deadline and requires ALPN h2: HTTP/1.1 and
// h2c (plaintext) are refused here.
func (s *Server) handshake(raw net.Conn) (*batchedTLS, identity.Identity, error) {
	ctx := context.Background()
	if d := s.limits.HandshakeTimeout; d > 0 {
		raw.SetDeadline(time.Now().Add(d))
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	batch := newRecordBatcher(raw)
	tc := tls.Server(batch, s.tlsConfig)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, identity.Identity{}, err
	}
	raw.SetDeadline(time.Time{})
	state := tc.ConnectionState()
	if state.NegotiatedProtocol != "h2" {
		return nil, identity.Identity{}, fmt.Errorf("ALPN %q, want h2", state.NegotiatedProtocol)
	}
	peer, err := hbone.PeerIdentity(state)
	return newBatchedTLS(tc, batch), peer, err
}

func (s *Server) track(sc *serverConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.conns[sc] = true
	return true
}

func (s *Server) untrack(sc *serverConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, sc)
}

// goAway starts a graceful GOAWAY on this connection only.
func (sc *serverConn) goAway() { sc.c.goAway(http2.ErrCodeNo) }

// acquire takes one of peer's tunnel slots.
func (s *Server) acquire(peer identity.Identity) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.perPeer[peer] >= s.limits.MaxTunnelsPerIdentity {
		return false
	}
	s.perPeer[peer]++
	return true
}

func (s *Server) release(peer identity.Identity) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.perPeer[peer]--; s.perPeer[peer] <= 0 {
		delete(s.perPeer, peer)
	}
}

// onHeaders runs on the connection's reader for each new stream: it only
// checks the stream limits and starts the stream's goroutine.
func (sc *serverConn) onHeaders(c *conn, f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	refuse := c.goAwaySent || c.closed || uint32(len(c.streams)) >= sc.s.limits.MaxConcurrentStreams
	var t *tunnel
	if !refuse {
		t = newTunnel(c, f.StreamID)
		t.sendWindow = int64(c.peerInitialWindow)
		t.remoteEnded = f.StreamEnded()
		t.local = tunnelAddr(sc.local.String())
		t.remote = tunnelAddr(sc.peerAddr.String())
		t.idle = newIdleWatch(sc.s.limits.StreamIdleTimeout, func() { t.abort(http2.ErrCodeCancel, ErrStreamIdle, true) })
		c.addLocked(t)
	}
	c.mu.Unlock()
	if refuse {
		return c.w.control(func(fr *http2.Framer) error { return fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream) })
	}
	sc.firstRequest.Do(func() { sc.raw.SetReadDeadline(time.Time{}) })
	ctx, cancel := context.WithCancel(context.Background())
	t.onRelease(func() {
		cancel()
		if !t.answered.Load() && t.resetByPeer() {
			sc.noteEarlyReset()
		}
	})
	go sc.serveStream(ctx, t, f)
	return nil
}

// serveStream validates one CONNECT and hands it to the Handler.
func (sc *serverConn) serveStream(ctx context.Context, t *tunnel, f *http2.MetaHeadersFrame) {
	s := sc.s
	rp := &responder{t: t, sc: sc, authority: f.PseudoValue("authority")}
	log := s.log.WithValues("peer_id", sc.peer.String(), "peer", sc.peerAddr.String())
	if f.Truncated {
		log.Info("rejected: request headers too large")
		rp.Reject(http.StatusRequestHeaderFieldsTooLarge, "request headers too large")
		return
	}
	if m := f.PseudoValue("method"); m != http.MethodConnect {
		log.Info("rejected: method not allowed", "method", m)
		rp.Reject(http.StatusMethodNotAllowed, "only CONNECT is served here")
		return
	}
	target, err := hbone.ParseAuthority(rp.authority)
	if err != nil {
		log.Info("rejected: bad CONNECT authority", "error", err.Error())
		rp.Reject(http.StatusBadRequest, err.Error())
		return
	}
	if s.forbidden[target] || target == sc.local {
		log.Info("rejected: CONNECT target is the proxy itself", "target", target.String())
		rp.Reject(http.StatusBadRequest, "CONNECT target is this proxy")
		return
	}
	if !s.acquire(sc.peer) {
		log.Info("rejected: tunnel quota of peer identity exhausted", "limit", s.limits.MaxTunnelsPerIdentity)
		rp.Reject(http.StatusTooManyRequests, "too many tunnels for this identity")
		return
	}
	if !t.onRelease(func() { s.release(sc.peer) }) {
		s.release(sc.peer) // reset before we got here
		return
	}
	header := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		k := http.CanonicalHeaderKey(hf.Name)
		header[k] = append(header[k], hf.Value)
	}
	req := &hbone.Request{
		Target:   target,
		Peer:     sc.peer,
		PeerAddr: sc.peerAddr,
		Local:    sc.local,
		Header:   header,
		Protocol: hbone.HTTP2,
	}
	s.cfg.Handler.ServeHBONE(ctx, req, rp)
	rp.Reject(http.StatusServiceUnavailable, "handler did not answer") // fail closed; no-op if answered
}

// responder answers one CONNECT exactly once.
type responder struct {
	t         *tunnel
	sc        *serverConn
	authority string
	once      sync.Once
}

func (rp *responder) Accept() (hbone.Stream, error) { return rp.AcceptWithHeader(nil) }

// AcceptWithHeader is Accept with h added to the 200 (hbone.HeaderAccepter).
func (rp *responder) AcceptWithHeader(h http.Header) (hbone.Stream, error) {
	err := errors.New("hbone: CONNECT already answered")
	rp.once.Do(func() {
		err = rp.respond(http.StatusOK, h)
		if err == nil {
			rp.t.answered.Store(true)
		}
	})
	if err != nil {
		return nil, err
	}
	return rp.t, nil
}

func (rp *responder) Reject(status int, reason string) {
	rp.once.Do(func() {
		if status < 400 || status > 599 {
			status = http.StatusInternalServerError
		}
		rp.sc.s.log.Info("CONNECT rejected", "peer_id", rp.sc.peer.String(), "target", rp.authority, "status", status, "reason", reason)
		rp.t.answered.Store(true)
		if rp.respond(status, nil) == nil {
			rp.t.Write([]byte(reason + "\n"))
			rp.t.CloseWrite()
		}
		// A peer still sending gets RST_STREAM(NO_ERROR) (RFC 9113 §8.1).
		rp.t.abort(http2.ErrCodeNo, net.ErrClosed, true)
	})
}

// respond sends the response HEADERS (extra: regular fields of a 200).
func (rp *responder) respond(status int, extra http.Header) error {
	t := rp.t
	t.mu.Lock()
	err := t.reset
	t.mu.Unlock()
	if err != nil {
		return err
	}
	fields := []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)}}
	for k, vs := range extra {
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: strings.ToLower(k), Value: v})
		}
	}
	if status != http.StatusOK {
		fields = append(fields,
			hpack.HeaderField{Name: "content-type", Value: "text/plain; charset=utf-8"},
			hpack.HeaderField{Name: "x-content-type-options", Value: "nosniff"})
	}
	c := t.c
	c.mu.Lock()
	maxFrame := c.peerMaxFrame
	c.mu.Unlock()
	_, err = c.w.headers(func() uint32 { return t.id }, fields, false, maxFrame)
	return err
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
