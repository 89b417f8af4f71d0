// Package meshtransport is the one place the HBONE transports (h2, the
// default; h3 with fallback to h2) are wired for the mesh's proxies: which
// dialer and which listeners a proxy gets for the mesh's HBONE_TRANSPORT.
// ztunnel uses it with a pod's network namespace (sockets created inside
// the pod, so tunnels leave with the pod's address and the HBONE listener
// lives in the pod); the waypoint uses it in its own namespace (ns nil).
package meshtransport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/fallback"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
)

// ParseProtocol reads the HBONE_TRANSPORT setting ("" is HTTP2).
func ParseProtocol(s string) (hbone.Protocol, error) {
	switch p := hbone.Protocol(s); p {
	case hbone.HTTP2, "":
		return hbone.HTTP2, nil
	case hbone.HTTP3:
		return p, nil
	}
	return "", fmt.Errorf("unknown HBONE transport %q (HTTP2 or HTTP3)", s)
}

// Config describes a proxy's HBONE transport.
type Config struct {
	Protocol hbone.Protocol
	Certs    hbone.CertSource
	Log      logr.Logger
	// Registerer (may be nil) receives hbone_transport_fallback_total.
	Registerer prometheus.Registerer
	// ForbiddenTargets are never accepted as CONNECT targets (the proxy's
	// own ports: recursion).
	ForbiddenTargets []netip.AddrPort
	// ListenOptions are the HBONE listeners' socket options (ztunnel:
	// SO_REUSEPORT for upgrades without a gap).
	ListenOptions netnsutil.SocketOptions
	// DialOptions are the tunnels' socket options (ztunnel: its mark, so the
	// pod's redirection lets them out).
	DialOptions netnsutil.SocketOptions
}

// ForPods is cfg with the socket options of ztunnel's sockets inside pods.
func ForPods(cfg Config) Config {
	cfg.ListenOptions, cfg.DialOptions = netnsutil.PodListenOptions, netnsutil.PodDialOptions
	return cfg
}

// ForSidecar is cfg with the socket options of the sidecar, serving its own
// pod from inside it unprivileged: no mark (the pod's redirection lets the
// sidecar's user out instead), port sharing as ztunnel's.
func ForSidecar(cfg Config) Config {
	cfg.ListenOptions = netnsutil.SocketOptions{ReuseAddr: true, ReusePort: true}
	cfg.DialOptions = netnsutil.SocketOptions{}
	return cfg
}

// Transport builds dialers and servers for one Config.
type Transport struct{ cfg Config }

// New checks cfg.
func New(cfg Config) (*Transport, error) {
	p, err := ParseProtocol(string(cfg.Protocol))
	if err != nil {
		return nil, err
	}
	if cfg.Certs == nil {
		return nil, errors.New("meshtransport: no certificate source")
	}
	cfg.Protocol = p
	return &Transport{cfg: cfg}, nil
}

// Protocol is the transport's protocol.
func (t *Transport) Protocol() hbone.Protocol { return t.cfg.Protocol }

// NewDialer returns the dialer for tunnels leaving from ns (nil: the
// proxy's own namespace). With HTTP3 it dials QUIC first and falls back to
// HTTP/2 when the peer gives no QUIC answer (a log line and the metric).
func (t *Transport) NewDialer(ns *os.File) (hbone.Dialer, error) {
	d2, err := t.newH2Dialer(ns)
	if err != nil || t.cfg.Protocol != hbone.HTTP3 {
		return d2, err
	}
	var d3 *h3.Dialer
	if err := inNS(ns, func() (err error) {
		d3, err = h3.NewDialer(h3.DialerConfig{Certs: t.cfg.Certs, Log: t.cfg.Log.WithName("h3")})
		return err
	}); err != nil {
		d2.Close()
		return nil, err
	}
	d, err := fallback.New(fallback.Config{H2: d2, H3: d3, Protocol: hbone.HTTP3, Log: t.cfg.Log, Registerer: t.cfg.Registerer})
	if err != nil {
		d3.Close()
		d2.Close()
		return nil, err
	}
	return d, nil
}

func (t *Transport) newH2Dialer(ns *os.File) (hbone.Dialer, error) {
	opts := t.cfg.DialOptions
	return h2.NewDialer(h2.DialerConfig{Certs: t.cfg.Certs, Log: t.cfg.Log.WithName("h2"),
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			dst, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, err
			}
			return netnsutil.DialTCP(ctx, ns, netip.AddrPort{}, dst, opts)
		}})
}

// NewServer listens on host:15008 in ns (nil: the proxy's own namespace;
// host "": every address) and serves h as local. HTTP/2 on TCP is always
// served, so HTTP/2 peers and HTTP/3 peers that fell back reach it; with
// HTTP3, QUIC on UDP too.
func (t *Transport) NewServer(ns *os.File, host string, local identity.Identity, h hbone.Handler) (hbone.Server, error) {
	addr := net.JoinHostPort(host, strconv.Itoa(hbone.Port))
	s2, err := t.newH2Server(ns, addr, local, h)
	if err != nil || t.cfg.Protocol != hbone.HTTP3 {
		return s2, err
	}
	s3, err := t.newH3Server(ns, addr, local, h)
	if err != nil {
		s2.Close()
		return nil, err
	}
	return bothServers{s3, s2}, nil
}

func (t *Transport) newH2Server(ns *os.File, addr string, local identity.Identity, h hbone.Handler) (hbone.Server, error) {
	srv, err := h2.NewServer(h2.ServerConfig{Certs: t.cfg.Certs, Identity: local, Handler: h, Log: t.cfg.Log.WithName("h2"),
		ForbiddenTargets: t.cfg.ForbiddenTargets})
	if err != nil {
		return nil, err
	}
	ln, err := netnsutil.ListenTCP(ns, addr, t.cfg.ListenOptions)
	if err != nil {
		return nil, fmt.Errorf("HBONE (HTTP/2): listen %s: %w", addr, err)
	}
	return &h2Server{srv: srv, ln: ln}, nil
}

func (t *Transport) newH3Server(ns *os.File, addr string, local identity.Identity, h hbone.Handler) (hbone.Server, error) {
	srv, err := h3.NewServer(h3.ServerConfig{Certs: t.cfg.Certs, Identity: local, Handler: h, Log: t.cfg.Log.WithName("h3"),
		ForbiddenTargets: t.cfg.ForbiddenTargets})
	if err != nil {
		return nil, err
	}
	// SO_REUSEPORT so an upgrade's new ztunnel can listen too. UDP has no
	// handover: when the second socket joins, the kernel re-spreads
	// datagrams, so some of the old instance's QUIC connections may break;
	// new ones work throughout.
	udp, err := netnsutil.ListenUDP(ns, addr, netnsutil.SocketOptions{ReusePort: t.cfg.ListenOptions.ReusePort})
	if err != nil {
		return nil, fmt.Errorf("HBONE (HTTP/3): listen %s: %w", addr, err)
	}
	if err := srv.ListenOn(udp); err != nil {
		return nil, err
	}
	return h3Server{srv}, nil
}

// inNS runs fn in ns, or directly when ns is nil.
func inNS(ns *os.File, fn func() error) error {
	if ns == nil {
		return fn()
	}
	return netnsutil.Run(ns, fn)
}

type h2Server struct {
	srv *h2.Server
	ln  net.Listener
}

func (s *h2Server) Serve() error {
	// Closing the listener (Drain, Close) ends Serve: that is a clean stop.
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, h2.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
func (s *h2Server) Close() error { s.ln.Close(); return s.srv.Close() }
func (s *h2Server) Drain()       { s.ln.Close(); go s.srv.Shutdown(context.Background()) }
func (s *h2Server) Shutdown(ctx context.Context) error {
	s.ln.Close()
	return s.srv.Shutdown(ctx)
}

type h3Server struct{ *h3.Server }

func (s h3Server) Serve() error {
	if err := s.Server.Serve(); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
func (s h3Server) Drain() { go s.Shutdown(context.Background()) }

// bothServers serves HBONE over HTTP/3 (UDP) and HTTP/2 (TCP) on one port.
type bothServers [2]hbone.Server

// Serve runs both until one stops, then stops the other too: a proxy must
// not be left reachable over one transport only without anyone noticing.
func (b bothServers) Serve() error {
	errs := make(chan error, 2)
	for _, s := range b {
		go func() { errs <- s.Serve() }()
	}
	err := <-errs
	b.Close()
	<-errs
	return err
}

func (b bothServers) Drain() {
	for _, s := range b {
		s.Drain()
	}
}

func (b bothServers) Shutdown(ctx context.Context) error {
	errs := make(chan error, 2)
	for _, s := range b {
		go func() { errs <- s.Shutdown(ctx) }()
	}
	return errors.Join(<-errs, <-errs)
}

func (b bothServers) Close() error {
	return errors.Join(b[0].Close(), b[1].Close())
}
