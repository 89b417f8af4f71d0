// Package transport adapts the HBONE implementations (proxylib/hbone/h2,
// the default, and h3) to the proxy's per-pod factories: sockets are
// created inside the pod's network namespace, so tunnels leave with the
// pod's address and the HBONE listener lives in the pod.
package transport

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
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

// HTTP3 builds HBONE over HTTP/3: the dialer's UDP socket and the server's
// UDP listener are created inside the pod namespace.
func HTTP3(certs hbone.CertSource, log logr.Logger) Factories {
	return Factories{
		NewDialer: func(ns *os.File) (hbone.Dialer, error) {
			var d *h3.Dialer
			err := inNS(ns, func() (err error) {
				d, err = h3.NewDialer(h3.DialerConfig{Certs: certs, Log: log})
				return err
			})
			return d, err
		},
		NewHBONEServer: func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (proxy.HBONEServer, error) {
			srv, err := h3.NewServer(h3.ServerConfig{Certs: certs, Identity: local, Handler: h, Log: log})
			if err != nil {
				return nil, err
			}
			// SO_REUSEPORT so an upgrade's new ztunnel can listen too. UDP
			// has no handover: when the second socket joins, the kernel
			// re-spreads datagrams, so some of the old instance's QUIC
			// connections may break; new ones work throughout.
			udp, err := netnsutil.ListenUDP(ns, net.JoinHostPort(host, strconv.Itoa(hbone.Port)), netnsutil.SocketOptions{ReusePort: true})
			if err != nil {
				return nil, fmt.Errorf("h3: listen :%d: %w", hbone.Port, err)
			}
			if err := srv.ListenOn(udp); err != nil {
				return nil, err
			}
			return h3Server{srv}, nil
		},
	}
}

// HTTP2 builds HBONE over HTTP/2 (the default): tunnels are dialled from
// inside the pod namespace with ztunnel's mark; the listener lives there too.
func HTTP2(certs hbone.CertSource, log logr.Logger) Factories {
	return Factories{
		NewDialer: func(ns *os.File) (hbone.Dialer, error) {
			return newH2Dialer(ns, certs, log)
		},
		NewHBONEServer: func(ns *os.File, host string, local identity.Identity, h hbone.Handler) (proxy.HBONEServer, error) {
			srv, err := h2.NewServer(h2.ServerConfig{Certs: certs, Identity: local, Handler: h, Log: log})
			if err != nil {
				return nil, err
			}
			ln, err := netnsutil.ListenTCP(ns, net.JoinHostPort(host, strconv.Itoa(hbone.Port)), proxy.ListenOptions)
			if err != nil {
				return nil, err
			}
			return &h2Server{srv: srv, ln: ln}, nil
		},
	}
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
	return retryUnusable{d}, nil
}

// retryUnusable retries, once, a tunnel whose pooled connection had just
// received GOAWAY (an upgrading peer ztunnel draining): x/net refuses it
// with "client conn not usable" before sending anything, and h2.Dialer's
// own retry does not recognise that message. The retry gets a fresh
// connection, which reaches the peer's new instance. Drop this once
// h2's retryable matches it.
type retryUnusable struct{ hbone.Dialer }

func (d retryUnusable) Dial(ctx context.Context, req hbone.DialRequest) (hbone.Stream, error) {
	st, err := d.Dialer.Dial(ctx, req)
	if err != nil && strings.Contains(err.Error(), "http2: client conn not usable") && ctx.Err() == nil {
		return d.Dialer.Dial(ctx, req)
	}
	return st, err
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

// For returns the factories of protocol p ("HTTP2" or "HTTP3").
func For(p hbone.Protocol, certs hbone.CertSource, log logr.Logger) (Factories, error) {
	switch p {
	case hbone.HTTP2, "":
		return HTTP2(certs, log), nil
	case hbone.HTTP3:
		return HTTP3(certs, log), nil
	}
	return Factories{}, fmt.Errorf("unknown HBONE transport %q (HTTP2 or HTTP3)", p)
}

type h3Server struct{ *h3.Server }

func (s h3Server) Drain() { go s.Shutdown(context.Background()) }
