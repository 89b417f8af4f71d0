package h3

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Server defaults; zero fields in ServerConfig take these.
const (
	DefaultMaxIncomingStreams    = 1000
	DefaultHandshakeTimeout      = 5 * time.Second
	DefaultIdleTimeout           = 60 * time.Second
	DefaultMaxTunnelsPerIdentity = 10000
	maxHeaderBytes               = 64 << 10 // reliability case 13: header list limit near 64 KiB
)

// ServerConfig configures an HBONE-over-HTTP/3 listener.
type ServerConfig struct {
	Certs    hbone.CertSource
	Identity identity.Identity // the certificate this listener presents
	Handler  hbone.Handler
	Log      logr.Logger
	// ForbiddenTargets are refused with 400 (recursion: the proxy's own
	// listeners and admin ports). The listener's own address always is.
	ForbiddenTargets []netip.AddrPort

	// MaxIncomingStreams caps concurrent tunnels per QUIC connection; further
	// streams wait for QUIC stream credit.
	MaxIncomingStreams int64
	// HandshakeTimeout bounds a TLS handshake that never completes.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a QUIC connection without any traffic (keep-alives count).
	IdleTimeout time.Duration
	// StreamIdleTimeout resets a tunnel with no bytes in either direction for
	// this long; 0 disables it.
	StreamIdleTimeout time.Duration
	// MaxTunnelsPerIdentity caps open tunnels per peer identity across all
	// connections; more are answered 429. Default DefaultMaxTunnelsPerIdentity.
	MaxTunnelsPerIdentity int
}

// Server accepts HBONE tunnels over HTTP/3.
type Server struct {
	cfg  ServerConfig
	h3   *http3.Server
	mu   sync.Mutex
	udp  *net.UDPConn
	tr   *quic.Transport
	ln   *quic.Listener
	addr net.Addr

	quotaMu sync.Mutex
	perPeer map[identity.Identity]int
}

type connKey struct{}

// NewServer validates cfg and returns a server that is not yet listening.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Certs == nil || cfg.Handler == nil || cfg.Identity.IsZero() {
		return nil, errors.New("h3: server needs Certs, Handler and Identity")
	}
	if cfg.MaxIncomingStreams <= 0 {
		cfg.MaxIncomingStreams = DefaultMaxIncomingStreams
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxTunnelsPerIdentity <= 0 {
		cfg.MaxTunnelsPerIdentity = DefaultMaxTunnelsPerIdentity
	}
	s := &Server{cfg: cfg, perPeer: map[identity.Identity]int{}}
	s.h3 = &http3.Server{
		Handler:        http.HandlerFunc(s.serveHTTP),
		MaxHeaderBytes: maxHeaderBytes,
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	return s, nil
}

// Listen binds the UDP address (e.g. "10.0.0.5:15008"); Addr reports it.
func (s *Server) Listen(addr string) error {
	udp, err := listenUDP(s.cfg.Log, addr)
	if err != nil {
		return fmt.Errorf("h3: listen %s: %w", addr, err)
	}
	return s.listenOn(udp, addr)
}

// ListenOn serves on a socket the caller opened (e.g. inside a pod's network
// namespace); the server owns and closes it.
func (s *Server) ListenOn(udp *net.UDPConn) error {
	tuneUDP(s.cfg.Log, udp)
	return s.listenOn(udp, udp.LocalAddr().String())
}

func (s *Server) listenOn(udp *net.UDPConn, addr string) error {
	tr := &quic.Transport{Conn: udp}
	ln, err := tr.Listen(hbone.ServerTLSConfig(s.cfg.Certs, s.cfg.Identity, "h3"), s.quicConfig())
	if err != nil {
		udp.Close()
		return fmt.Errorf("h3: listen %s: %w", addr, err)
	}
	s.mu.Lock()
	s.udp, s.tr, s.ln, s.addr = udp, tr, ln, udp.LocalAddr()
	s.mu.Unlock()
	return nil
}

// Addr is the bound UDP address after Listen.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

// Serve accepts connections until Shutdown or Close; it then returns
// http.ErrServerClosed.
func (s *Server) Serve() error {
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	if ln == nil {
		return errors.New("h3: Serve before Listen")
	}
	return s.h3.ServeListener(ln)
}

// Shutdown drains: no new connections, GOAWAY on existing ones, tunnels in
// flight may finish until ctx ends (the grace period); then everything is
// closed forcibly and ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeListener()
	err := s.h3.Shutdown(ctx)
	s.closeTransport()
	return err
}

// Close closes every connection at once.
func (s *Server) Close() error {
	s.closeListener()
	err := s.h3.Close()
	s.closeTransport()
	return err
}

func (s *Server) closeListener() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		s.ln.Close()
	}
}

func (s *Server) closeTransport() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tr != nil {
		s.tr.Close()
		s.udp.Close()
		s.tr = nil
	}
}

func (s *Server) quicConfig() *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:  s.cfg.HandshakeTimeout,
		MaxIdleTimeout:        s.cfg.IdleTimeout,
		MaxIncomingStreams:    s.cfg.MaxIncomingStreams,
		MaxIncomingUniStreams: 8, // HTTP/3 control and QPACK streams only
		Allow0RTT:             false,
	}
}

// serveHTTP turns one HTTP/3 request into an hbone.Request for the handler.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	conn, _ := r.Context().Value(connKey{}).(*quic.Conn)
	log := s.cfg.Log.WithValues("peer_addr", r.RemoteAddr)
	if r.Method != http.MethodConnect {
		reject(log, w, http.StatusMethodNotAllowed, "method "+r.Method+" is not CONNECT")
		return
	}
	target, err := hbone.ParseAuthority(r.Host)
	if err != nil {
		reject(log, w, http.StatusBadRequest, err.Error())
		return
	}
	if r.TLS == nil || conn == nil {
		reject(log, w, http.StatusForbidden, "no TLS state")
		return
	}
	if s.forbidden(target, conn.LocalAddr()) {
		reject(log, w, http.StatusBadRequest, "target "+target.String()+" is this proxy (recursion)")
		return
	}
	peer, err := hbone.PeerIdentity(*r.TLS)
	if err != nil {
		reject(log, w, http.StatusForbidden, err.Error())
		return
	}
	req := &hbone.Request{
		Target:   target,
		Peer:     peer,
		PeerAddr: addrPort(conn.RemoteAddr()),
		Local:    addrPort(conn.LocalAddr()),
		Header:   r.Header,
		Protocol: hbone.HTTP3,
	}
	log = log.WithValues("peer_id", peer.String(), "target", target.String())
	release, ok := s.acquire(peer)
	if !ok {
		reject(log, w, http.StatusTooManyRequests, "tunnel quota of the peer identity exhausted")
		return
	}
	// The quota is returned when the tunnel closes, or with its connection.
	stop := context.AfterFunc(conn.Context(), release)
	done := func() { stop(); release() }
	resp := &responder{w: w, log: log, local: conn.LocalAddr(), remote: conn.RemoteAddr(),
		release: done, idleTimeout: s.cfg.StreamIdleTimeout}
	defer func() {
		if !resp.accepted {
			done()
		}
	}()
	// The request context ends when our send side closes (quic-go ties it to
	// the stream's write side); a half-closed tunnel must outlive that, so the
	// handler gets the connection's context instead.
	s.cfg.Handler.ServeHBONE(conn.Context(), req, resp)
	if !resp.answered {
		reject(resp.log, w, http.StatusInternalServerError, "handler answered neither Accept nor Reject")
	}
}

// acquire takes one tunnel of peer's quota; release is idempotent.
func (s *Server) acquire(peer identity.Identity) (release func(), ok bool) {
	s.quotaMu.Lock()
	defer s.quotaMu.Unlock()
	if s.perPeer[peer] >= s.cfg.MaxTunnelsPerIdentity {
		return nil, false
	}
	s.perPeer[peer]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.quotaMu.Lock()
			defer s.quotaMu.Unlock()
			if s.perPeer[peer]--; s.perPeer[peer] <= 0 {
				delete(s.perPeer, peer)
			}
		})
	}, true
}

// forbidden reports a target that would loop back into this proxy.
func (s *Server) forbidden(target netip.AddrPort, local net.Addr) bool {
	if target == addrPort(local) {
		return true
	}
	for _, f := range s.cfg.ForbiddenTargets {
		if f == target {
			return true
		}
	}
	return false
}

func reject(log logr.Logger, w http.ResponseWriter, status int, reason string) {
	log.V(1).Info("HBONE CONNECT rejected", "status", status, "reason", reason)
	w.WriteHeader(status)
}

type responder struct {
	w             http.ResponseWriter
	log           logr.Logger
	local, remote net.Addr
	release       func()
	idleTimeout   time.Duration
	answered      bool
	accepted      bool
}

func (r *responder) Accept() (hbone.Stream, error) {
	if r.answered {
		return nil, errors.New("h3: CONNECT already answered")
	}
	r.answered = true
	r.w.WriteHeader(http.StatusOK)
	str, err := r.w.(http3.HTTPStreamer).HTTPStream()
	if err != nil {
		return nil, fmt.Errorf("h3: taking over CONNECT stream: %w", err)
	}
	r.accepted = true
	st := newStream(str, r.local, r.remote, r.release)
	st.idle = newIdleTimer(r.idleTimeout, func() {
		r.log.V(1).Info("HBONE tunnel idle, resetting", "timeout", r.idleTimeout.String())
		st.Close()
	})
	return st, nil
}

func (r *responder) Reject(status int, reason string) {
	if r.answered {
		return
	}
	r.answered = true
	reject(r.log, r.w, status, reason)
}

func addrPort(a net.Addr) netip.AddrPort {
	if ua, ok := a.(*net.UDPAddr); ok {
		return ua.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
