// Package transport adapts the HBONE implementations (proxylib/hbone/h2,
// the default, and h3) to the proxy's per-pod factories: sockets are
// created inside the pod's network namespace, so tunnels leave with the
// pod's address and the HBONE listener lives in the pod.
package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
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
	"github.com/ambientmesh/ambient/proxylib/proxy"
)

// Factories are the two hooks proxy.Config needs.
type Factories struct {
	NewDialer      func(ns *os.File) (hbone.Dialer, error)
	NewHBONEServer func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (proxy.HBONEServer, error)
}

// inNS runs fn in ns, or directly when ns is nil.
func inNS(ns *os.File, fn func() error) error {
	if ns == nil {
		return fn()
	}
	return netnsutil.Run(ns, fn)
}

// HTTP3 builds experimental HBONE over HTTP/3 with HTTP/2 beside it:
// tunnels are dialled over QUIC first and over HTTP/2 when the peer gives no
// QUIC answer (fallback: a log line and hbone_transport_fallback_total on
// reg); each pod serves both, so HTTP/2 peers (a mesh being switched, a
// waypoint, a peer that fell back) still reach it. Sockets live in the pod
// namespace.
func HTTP3(certs hbone.CertSource, log logr.Logger, reg prometheus.Registerer) Factories {
	return Factories{
		NewDialer: func(ns *os.File) (hbone.Dialer, error) {
			return newH3Dialer(ns, certs, log, reg)
		},
		NewHBONEServer: func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (proxy.HBONEServer, error) {
			s3, err := newH3Server(ns, host, certs, local, h, log)
			if err != nil {
				return nil, err
			}
			s2, err := newH2Server(ns, host, certs, local, h, log)
			if err != nil {
				s3.Close()
				return nil, err
			}
			return bothServers{s3, s2}, nil
		},
	}
}

func newH3Dialer(ns *os.File, certs hbone.CertSource, log logr.Logger, reg prometheus.Registerer) (hbone.Dialer, error) {
	var d3 *h3.Dialer
	if err := inNS(ns, func() (err error) {
		d3, err = h3.NewDialer(h3.DialerConfig{Certs: certs, Log: log})
		return err
	}); err != nil {
		return nil, err
	}
	d2, err := newH2Dialer(ns, certs, log)
	if err != nil {
		d3.Close()
		return nil, err
	}
	d, err := fallback.New(fallback.Config{H2: d2, H3: d3, Protocol: hbone.HTTP3, Log: log, Registerer: reg})
	if err != nil {
		d3.Close()
		d2.Close()
		return nil, err
	}
	return d, nil
}

func newH3Server(ns *os.File, host string, certs hbone.CertSource, local identity.Identity, h hbone.Handler, log logr.Logger) (proxy.HBONEServer, error) {
	srv, err := h3.NewServer(h3.ServerConfig{Certs: certs, Identity: local, Handler: h, Log: log})
	if err != nil {
		return nil, err
	}
	// SO_REUSEPORT so an upgrade's new ztunnel can listen too. UDP has no
	// handover: when the second socket joins, the kernel re-spreads
	// datagrams, so some of the old instance's QUIC connections may break;
	// new ones work throughout.
	udp, err := netnsutil.ListenUDP(ns, net.JoinHostPort(host, strconv.Itoa(hbone.Port)), netnsutil.SocketOptions{ReusePort: true})
	if err != nil {
		return nil, fmt.Errorf("h3: listen :%d: %w", hbone.Port, err)
	}
	if err := srv.ListenOn(udp); err != nil {
		return nil, err
	}
	return h3Server{srv}, nil
}

// bothServers serves HBONE over HTTP/3 (UDP) and HTTP/2 (TCP) on one port.
type bothServers [2]proxy.HBONEServer

// Serve runs both until one stops, then stops the other too: a pod must
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

func (b bothServers) Close() error {
	return errors.Join(b[0].Close(), b[1].Close())
}

// HTTP2 builds HBONE over HTTP/2 (the default): tunnels are dialled from
// inside the pod namespace with ztunnel's mark; the listener lives there too.
func HTTP2(certs hbone.CertSource, log logr.Logger) Factories {
	return Factories{
		NewDialer: func(ns *os.File) (hbone.Dialer, error) {
			return newH2Dialer(ns, certs, log)
		},
		NewHBONEServer: func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (proxy.HBONEServer, error) {
			return newH2Server(ns, host, certs, local, h, log)
		},
	}
}

func newH2Server(ns *os.File, host string, certs hbone.CertSource, local identity.Identity, h hbone.Handler, log logr.Logger) (proxy.HBONEServer, error) {
	srv, err := h2.NewServer(h2.ServerConfig{Certs: certs, Identity: local, Handler: h, Log: log})
	if err != nil {
		return nil, err
	}
	ln, err := netnsutil.ListenTCP(ns, net.JoinHostPort(host, strconv.Itoa(hbone.Port)), proxy.ListenOptions)
	if err != nil {
		return nil, err
	}
	return &h2Server{srv: srv, ln: ln}, nil
}

func newH2Dialer(ns *os.File, certs hbone.CertSource, log logr.Logger) (hbone.Dialer, error) {
	d, err := h2.NewDialer(h2.DialerConfig{Certs: certs, Log: log,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			dst, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, err
			}
			return netnsutil.DialTCP(ctx, ns, netip.AddrPort{}, dst, netnsutil.SocketOptions{Mark: netnsutil.Mark})
		}})
	if err != nil {
		return nil, err
	}
	return d, nil
}

type h2Server struct {
	srv *h2.Server
	ln  net.Listener
}

func (s *h2Server) Serve() error { return s.srv.Serve(s.ln) }
func (s *h2Server) Close() error { s.ln.Close(); return s.srv.Close() }
func (s *h2Server) Drain() {
	s.ln.Close()
	go s.srv.Shutdown(context.Background())
}

// For returns the factories of protocol p ("HTTP2" or "HTTP3"); reg (may
// be nil) receives the HTTP/3 fallback counter.
func For(p hbone.Protocol, certs hbone.CertSource, log logr.Logger, reg prometheus.Registerer) (Factories, error) {
	switch p {
	case hbone.HTTP2, "":
		return HTTP2(certs, log), nil
	case hbone.HTTP3:
		return HTTP3(certs, log, reg), nil
	}
	return Factories{}, fmt.Errorf("unknown HBONE transport %q (HTTP2 or HTTP3)", p)
}

type h3Server struct{ *h3.Server }

func (s h3Server) Drain() { go s.Shutdown(context.Background()) }
