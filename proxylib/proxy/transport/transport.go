// Package transport adapts the HBONE implementations (proxylib/hbone/h3,
// and h2 once it lands) to the proxy's per-pod factories: sockets are
// created inside the pod's network namespace, so tunnels leave with the
// pod's address and the HBONE listener lives in the pod.
package transport

import (
	"net"
	"os"
	"strconv"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/hbone"
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
			if err := inNS(ns, func() error { return srv.Listen(net.JoinHostPort(host, strconv.Itoa(hbone.Port))) }); err != nil {
				return nil, err
			}
			return srv, nil
		},
	}
}
