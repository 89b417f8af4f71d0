package hboneload

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/h3"
)

// transport builds an HBONE implementation's dialer and server; the harness
// depends only on the hbone interfaces, so a transport is one entry here.
type transport struct {
	newDialer func(certs hbone.CertSource, log logr.Logger) (hbone.Dialer, error)
	// serve listens on addr and returns the bound address and a drain func.
	serve func(addr string, certs hbone.CertSource, h hbone.Handler, log logr.Logger) (netip.AddrPort, func(context.Context) error, error)
}

var transports = map[string]transport{
	"h2": {
		newDialer: func(certs hbone.CertSource, log logr.Logger) (hbone.Dialer, error) {
			return h2.NewDialer(h2.DialerConfig{Certs: certs, Log: log})
		},
		serve: func(addr string, certs hbone.CertSource, h hbone.Handler, log logr.Logger) (netip.AddrPort, func(context.Context) error, error) {
			srv, err := h2.NewServer(h2.ServerConfig{Certs: certs, Identity: ServerProxyID, Handler: h, Log: log})
			if err != nil {
				return netip.AddrPort{}, nil, err
			}
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return netip.AddrPort{}, nil, err
			}
			go srv.Serve(ln)
			return ln.Addr().(*net.TCPAddr).AddrPort(), srv.Shutdown, nil
		},
	},
	"h3": {
		newDialer: func(certs hbone.CertSource, log logr.Logger) (hbone.Dialer, error) {
			return h3.NewDialer(h3.DialerConfig{Certs: certs, Log: log})
		},
		serve: func(addr string, certs hbone.CertSource, h hbone.Handler, log logr.Logger) (netip.AddrPort, func(context.Context) error, error) {
			srv, err := h3.NewServer(h3.ServerConfig{Certs: certs, Identity: ServerProxyID, Handler: h, Log: log})
			if err != nil {
				return netip.AddrPort{}, nil, err
			}
			if err := srv.Listen(addr); err != nil {
				return netip.AddrPort{}, nil, err
			}
			go srv.Serve()
			return srv.Addr().(*net.UDPAddr).AddrPort(), srv.Shutdown, nil
		},
	},
}

// Transports lists the HBONE transports this build can benchmark.
func Transports() []string {
	var names []string
	for n := range transports {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func lookupTransport(name string) (transport, error) {
	t, ok := transports[name]
	if !ok {
		return transport{}, fmt.Errorf("unknown HBONE transport %q (have %v)", name, Transports())
	}
	return t, nil
}

var errUsage = errors.New("usage")
