// Package gateway runs an ingress Gateway's listeners: one TCP listener per
// listener port of the Gateway the control plane sends, each accepted
// connection served by the mesh's L7 engine in ingress mode
// (proxylib/waypoint with Config.Ingress), so ingress and waypoints share
// one implementation of HTTP routing, policy and telemetry.
package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strconv"
	"sync"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// Listeners keeps one TCP listener open per served port of the engine's
// Gateway, opening and closing them as the Gateway changes.
type Listeners struct {
	Engine *waypoint.Server
	// Host is the address to bind ("" for every address).
	Host string
	Log  logr.Logger

	// CertDir holds the HTTPS listeners' certificates: <dir>/tls.crt and
	// <dir>/tls.key, dir as route.CertificateDir names a Secret (the
	// Secrets the operator mounts).
	CertDir string

	mu   sync.Mutex
	ctx  context.Context
	open map[uint16]net.Listener
	// plan is what each port serves as of the last Sync (TLS listeners pick
	// their certificates from it).
	plan  map[uint16]route.Port
	certs certCache
}

// Run opens the listeners of the current Gateway and follows its changes
// until ctx ends, then closes them all.
func (l *Listeners) Run(ctx context.Context) {
	l.mu.Lock()
	l.ctx, l.open, l.plan = ctx, map[uint16]net.Listener{}, map[uint16]route.Port{}
	l.mu.Unlock()
	changed := make(chan struct{}, 1)
	l.Engine.OnGatewayChange(func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	})
	l.Sync()
	for {
		select {
		case <-ctx.Done():
			l.mu.Lock()
			for p, ln := range l.open {
				ln.Close()
				delete(l.open, p)
			}
			l.mu.Unlock()
			return
		case <-changed:
			l.Sync()
		}
	}
}

// Sync opens the ports the Gateway needs (route.Plan: HTTP, HTTPS
// terminating TLS, TLS passthrough, TCP) and closes the others; a port
// whose protocol changed is reopened.
func (l *Listeners) Sync() {
	ports := l.Engine.Plan()
	l.mu.Lock()
	defer l.mu.Unlock()
	want := map[uint16]route.Port{}
	for _, p := range ports {
		want[p.Port] = p
	}
	for p, ln := range l.open {
		if np, ok := want[p]; !ok || np.Protocol != l.plan[p].Protocol {
			ln.Close()
			delete(l.open, p)
			l.Log.Info("listener closed", "port", p)
		}
	}
	l.plan = want
	for _, p := range ports {
		if _, ok := l.open[p.Port]; ok {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(l.Host, strconv.Itoa(int(p.Port))))
		if err != nil {
			l.Log.Error(err, "listener not opened (retried on the next change)", "port", p.Port)
			continue
		}
		if p.Terminates() {
			ln = tls.NewListener(ln, l.tlsConfig(p.Port))
		}
		l.open[p.Port] = ln
		l.Log.Info("listening", "port", p.Port, "protocol", p.Protocol)
		go l.serve(l.ctx, ln, p)
	}
}

// serve accepts on one port: HTTP (HTTPS after the TLS listener's
// handshake) to the L7 engine, TLS passthrough and TCP to its relay.
func (l *Listeners) serve(ctx context.Context, ln net.Listener, p route.Port) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				l.Log.Error(err, "accept", "port", p.Port)
			}
			return
		}
		if p.L4() {
			go l.Engine.ServeIngressL4(ctx, conn, p)
		} else {
			go l.Engine.ServeIngress(ctx, conn, p.Port)
		}
	}
}

// Ready reports whether the Gateway has arrived and every listener port it
// needs is open.
func (l *Listeners) Ready() bool {
	if l.Engine.Gateway() == nil {
		return false
	}
	ports := l.Engine.Plan()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range ports {
		if _, ok := l.open[p.Port]; !ok {
			return false
		}
	}
	return true
}
