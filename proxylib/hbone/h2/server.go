package h2

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/net/http2"

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

// serverConn is one accepted TLS connection.
type serverConn struct {
	s        *Server
	raw      net.Conn
	peer     identity.Identity
	peerAddr netip.AddrPort
	local    netip.AddrPort
	hs       *http.Server // per connection, so one connection can be sent GOAWAY

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
		sc.goAway()
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
	h2s := &http2.Server{
		MaxConcurrentStreams:         s.limits.MaxConcurrentStreams,
		MaxReadFrameSize:             s.tuning.MaxReadFrameSize,
		MaxUploadBufferPerConnection: s.tuning.ConnWindow,
		MaxUploadBufferPerStream:     s.tuning.StreamWindow,
		IdleTimeout:                  s.limits.ConnIdleTimeout,
		ReadIdleTimeout:              s.limits.PingInterval,
		PingTimeout:                  s.limits.PingTimeout,
	}
	sc.hs = &http.Server{
		MaxHeaderBytes: int(s.limits.MaxHeaderListSize),
		ErrorLog:       log.New(io.Discard, "", 0),
	}
	if err := http2.ConfigureServer(sc.hs, h2s); err != nil {
		s.log.Error(err, "configuring HTTP/2")
		return
	}
	if !s.track(sc) {
		return // drained while handshaking
	}
	defer s.untrack(sc)

	if s.limits.HeaderTimeout > 0 {
		raw.SetReadDeadline(time.Now().Add(s.limits.HeaderTimeout))
	}
	if age := s.limits.MaxConnectionAge; age > 0 {
		t := time.AfterFunc(age, func() {
			sc.goAway()
			time.AfterFunc(s.limits.MaxConnectionAgeGrace, func() { raw.Close() })
		})
		defer t.Stop()
	}
	h2s.ServeConn(tc, &http2.ServeConnOpts{BaseConfig: sc.hs, Handler: http.HandlerFunc(sc.handle)})
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

// goAway starts a graceful GOAWAY on this connection only. x/net registers
// the connection for it only once ServeConn has started, so the request is
// repeated shortly after to cover a connection that was just accepted
// (x/net sends GOAWAY once per connection).
func (sc *serverConn) goAway() {
	shutdown := func() { sc.hs.Shutdown(context.Background()) } // returns at once: no HTTP/1 conns
	go shutdown()
	time.AfterFunc(50*time.Millisecond, shutdown)
	time.AfterFunc(500*time.Millisecond, shutdown)
}

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

// handle is the HTTP/2 handler for one stream.
func (sc *serverConn) handle(w http.ResponseWriter, r *http.Request) {
	s := sc.s
	sc.firstRequest.Do(func() { sc.raw.SetReadDeadline(time.Time{}) })
	log := s.log.WithValues("peer_id", sc.peer.String(), "peer", sc.peerAddr.String())
	if r.Method != http.MethodConnect {
		log.Info("rejected: method not allowed", "method", r.Method)
		http.Error(w, "only CONNECT is served here", http.StatusMethodNotAllowed)
		return
	}
	target, err := hbone.ParseAuthority(r.Host)
	if err != nil {
		log.Info("rejected: bad CONNECT authority", "error", err.Error())
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if s.forbidden[target] || target == sc.local {
		log.Info("rejected: CONNECT target is the proxy itself", "target", target.String())
		http.Error(w, "CONNECT target is this proxy", http.StatusBadRequest)
		return
	}
	if !s.acquire(sc.peer) {
		log.Info("rejected: tunnel quota of peer identity exhausted", "limit", s.limits.MaxTunnelsPerIdentity)
		http.Error(w, "too many tunnels for this identity", http.StatusTooManyRequests)
		return
	}
	defer s.release(sc.peer)

	req := &hbone.Request{
		Target:   target,
		Peer:     sc.peer,
		PeerAddr: sc.peerAddr,
		Local:    sc.local,
		Header:   r.Header,
		Protocol: hbone.HTTP2,
	}
	resp := &responder{w: w, r: r, sc: sc, answered: make(chan struct{})}
	// The handler runs beside this HTTP handler goroutine, which must stay
	// alive while the tunnel is open and return to end the stream.
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		s.cfg.Handler.ServeHBONE(r.Context(), req, resp)
	}()
	select {
	case <-resp.answered:
	case <-returned:
		resp.Reject(http.StatusServiceUnavailable, "handler did not answer") // fail closed
	case <-r.Context().Done():
		// A no-op if Accept won the race (it may still be running: Reject
		// waits for it); then the stream must be finished below like any
		// other, or the tunnel handler would use it after we return.
		resp.Reject(http.StatusServiceUnavailable, "stream reset before an answer")
		if resp.accepted() == nil {
			sc.noteEarlyReset()
			return
		}
	}
	st := resp.accepted()
	if st == nil {
		return // rejected
	}
	// Nothing may touch the stream's ResponseWriter or body once we return.
	defer st.handlerReturned()
	select {
	case <-st.done:
	case <-r.Context().Done(): // peer reset the stream or the connection died
		st.finish(true)
		<-st.done // another caller may be finishing it: wait for its writer
	}
	if st.aborted.Load() {
		panic(http.ErrAbortHandler) // RST_STREAM to the peer
	}
}

// responder answers one CONNECT exactly once.
type responder struct {
	w  http.ResponseWriter
	r  *http.Request
	sc *serverConn

	once     sync.Once
	answered chan struct{} // closed after the answer is written
	stream   *serverStream // set before answered closes when accepted
}

func (rp *responder) Accept() (hbone.Stream, error) {
	var st *serverStream
	var err error = errors.New("hbone: CONNECT already answered")
	rp.once.Do(func() {
		defer close(rp.answered)
		rp.w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(rp.w)
		if err = rc.Flush(); err != nil {
			return
		}
		st = &serverStream{
			w:      rp.w,
			rc:     rc,
			body:   rp.r.Body,
			local:  tunnelAddr(rp.sc.local.String()),
			remote: tunnelAddr(rp.sc.peerAddr.String()),
			done:   make(chan struct{}),
		}
		st.idle = newIdleWatch(rp.sc.s.limits.StreamIdleTimeout, func() { st.finish(true) })
		rp.stream = st
	})
	if st == nil {
		return nil, err
	}
	return st, nil
}

func (rp *responder) Reject(status int, reason string) {
	rp.once.Do(func() {
		defer close(rp.answered)
		if status < 400 || status > 599 {
			status = http.StatusInternalServerError
		}
		rp.sc.s.log.Info("CONNECT rejected", "peer_id", rp.sc.peer.String(), "target", rp.r.Host, "status", status, "reason", reason)
		http.Error(rp.w, reason, status)
	})
}

// accepted returns the stream after the answer, or nil if it was a rejection.
func (rp *responder) accepted() *serverStream {
	<-rp.answered
	return rp.stream
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
