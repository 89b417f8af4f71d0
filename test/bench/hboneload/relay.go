package hboneload

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// RelayConfig is one proxy process of the benchmark.
type RelayConfig struct {
	// Mode: "tls-client" | "tls-server" | "<transport>-client" | "<transport>-server".
	Mode   string
	Listen string
	// Upstream: for clients the server proxy's address; for tls-server the sink.
	Upstream string
	// Target: the CONNECT authority HBONE clients ask for (the sink).
	Target   string
	CertsDir string
	// Copy names the copy loop: "shared" (hbone.Relay, default) or "adaptive".
	Copy string
	// FrameFit splits tunnel writes to 16 375 bytes (one DATA frame per TLS
	// record); an experiment for the HTTP/2 transport.
	FrameFit bool
	Log      logr.Logger
}

// Relay is a running proxy: Addr is where it listens, Stop drains it.
type Relay struct {
	Addr string
	Stop func(context.Context) error
}

// StartRelay starts a proxy role.
func StartRelay(cfg RelayConfig) (*Relay, error) {
	raiseFileLimit()
	certs, err := LoadCerts(cfg.CertsDir)
	if err != nil {
		return nil, err
	}
	if cfg.Copy == "" {
		cfg.Copy = "shared"
	}
	pipe, ok := relays[cfg.Copy]
	if !ok {
		return nil, fmt.Errorf("copy loop %q: %w", cfg.Copy, errUsage)
	}
	switch cfg.Mode {
	case "tls-client":
		tlsConf := hbone.ClientTLSConfig(certs, ClientProxyID, []identity.Identity{ServerProxyID}, "bench")
		return serveTCP(cfg.Listen, func(c *net.TCPConn) {
			up, err := tls.Dial("tcp", cfg.Upstream, tlsConf)
			if err != nil {
				resetClose(c)
				return
			}
			pipe(c, up)
		})
	case "tls-server":
		ln, err := tls.Listen("tcp", cfg.Listen, hbone.ServerTLSConfig(certs, ServerProxyID, "bench"))
		if err != nil {
			return nil, err
		}
		go acceptLoop(ln, func(c net.Conn) {
			tc := c.(*tls.Conn)
			if err := tc.Handshake(); err != nil {
				c.Close()
				return
			}
			up, err := net.Dial("tcp", cfg.Upstream)
			if err != nil {
				resetClose(tc)
				return
			}
			pipe(tc, up.(*net.TCPConn))
		})
		return &Relay{Addr: ln.Addr().String(), Stop: func(context.Context) error { return ln.Close() }}, nil
	}
	name, side, ok := cutLast(cfg.Mode, "-")
	if !ok {
		return nil, fmt.Errorf("relay mode %q: %w", cfg.Mode, errUsage)
	}
	tr, err := lookupTransport(name)
	if err != nil {
		return nil, err
	}
	switch side {
	case "client":
		return startHBONEClient(cfg, tr, certs, pipe)
	case "server":
		handler := func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			connectUpstream(ctx, req, fitResponder{resp, cfg.FrameFit}, pipe)
		}
		addr, stop, err := tr.serve(cfg.Listen, certs, hbone.HandlerFunc(handler), cfg.Log)
		if err != nil {
			return nil, err
		}
		return &Relay{Addr: addr.String(), Stop: stop}, nil
	}
	return nil, fmt.Errorf("relay mode %q: %w", cfg.Mode, errUsage)
}

// startHBONEClient is the client-side proxy: every accepted TCP connection
// becomes one tunnel to the server proxy, with the sink as CONNECT target.
func startHBONEClient(cfg RelayConfig, tr transport, certs hbone.CertSource, pipe relayFunc) (*Relay, error) {
	proxy, err := netip.ParseAddrPort(cfg.Upstream)
	if err != nil {
		return nil, fmt.Errorf("upstream: %w", err)
	}
	target, err := netip.ParseAddrPort(cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("target: %w", err)
	}
	d, err := tr.newDialer(certs, cfg.Log)
	if err != nil {
		return nil, err
	}
	r, err := serveTCP(cfg.Listen, func(c *net.TCPConn) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, err := d.Dial(ctx, hbone.DialRequest{
			Source: ClientProxyID, Expected: []identity.Identity{ServerProxyID},
			ProxyAddr: proxy, Target: target,
			Header: http.Header{"Forwarded": {`for="` + addrOf(c.RemoteAddr()) + `"`}},
		})
		cancel()
		if err != nil {
			cfg.Log.V(1).Info("tunnel failed", "error", err.Error())
			resetClose(c)
			return
		}
		if cfg.FrameFit {
			s = frameFitStream{s}
		}
		pipe(c, s)
	})
	if err != nil {
		d.Close()
		return nil, err
	}
	stop := r.Stop
	r.Stop = func(ctx context.Context) error { stop(ctx); return d.Close() }
	return r, nil
}

// connectUpstream is the server-side proxy's handler: connect to the target,
// then answer the CONNECT.
func connectUpstream(ctx context.Context, req *hbone.Request, resp hbone.Responder, pipe relayFunc) {
	var nd net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	up, err := nd.DialContext(dctx, "tcp", req.Target.String())
	cancel()
	if err != nil {
		resp.Reject(http.StatusServiceUnavailable, err.Error())
		return
	}
	s, err := resp.Accept()
	if err != nil {
		up.Close()
		return
	}
	pipe(s, up.(*net.TCPConn))
}

func serveTCP(addr string, handle func(*net.TCPConn)) (*Relay, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	go acceptLoop(ln, func(c net.Conn) { handle(c.(*net.TCPConn)) })
	return &Relay{Addr: ln.Addr().String(), Stop: func(context.Context) error { return ln.Close() }}, nil
}

func acceptLoop(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go handle(c)
	}
}

func addrOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	return a.String()
}

func cutLast(s, sep string) (before, after string, ok bool) {
	for i := len(s) - len(sep); i >= 0; i-- {
		if s[i:i+len(sep)] == sep {
			return s[:i], s[i+len(sep):], true
		}
	}
	return s, "", false
}

// fitResponder wraps accepted streams in frameFitStream when asked to.
type fitResponder struct {
	hbone.Responder
	fit bool
}

func (r fitResponder) Accept() (hbone.Stream, error) {
	s, err := r.Responder.Accept()
	if err != nil || !r.fit {
		return s, err
	}
	return frameFitStream{s}, nil
}
