// Package gateway runs an ingress Gateway's listeners: one TCP listener per
// listener port of the Gateway the control plane sends, each accepted
// connection served by the mesh's L7 engine in ingress mode
// (proxylib/waypoint with Config.Ingress), so ingress and waypoints share
// one implementation of HTTP routing, policy and telemetry.
package gateway

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"sync"

	"github.com/go-logr/logr"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// Listeners keeps one TCP listener open per served port of the engine's
// Gateway, opening and closing them as the Gateway changes.
type Listeners struct {
	Engine *waypoint.Server
	// Host is the address to bind ("" for every address).
	Host string
	Log  logr.Logger

	mu   sync.Mutex
	ctx  context.Context
	open map[uint16]net.Listener
	// failed holds ports that could not be opened, with the error.
	failed map[uint16]error
}

// Run opens the listeners of the current Gateway and follows its changes
// until ctx ends, then closes them all.
func (l *Listeners) Run(ctx context.Context) {
	l.mu.Lock()
	l.ctx, l.open, l.failed = ctx, map[uint16]net.Listener{}, map[uint16]error{}
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

// Ports lists the ports a Gateway's HTTP listeners need. HTTPS and other
// protocols are not served yet: the control plane reports those listeners
// as unsupported, and no port is opened for them.
func Ports(gw *gwv1.Gateway) []uint16 {
	if gw == nil {
		return nil
	}
	var out []uint16
	for _, ls := range gw.Spec.Listeners {
		if ls.Protocol == gwv1.HTTPProtocolType && !slices.Contains(out, uint16(ls.Port)) {
			out = append(out, uint16(ls.Port))
		}
	}
	slices.Sort(out)
	return out
}

// Sync opens the ports the Gateway needs and closes the others.
func (l *Listeners) Sync() {
	want := Ports(l.Engine.Gateway())
	l.mu.Lock()
	defer l.mu.Unlock()
	for p, ln := range l.open {
		if !slices.Contains(want, p) {
			ln.Close()
			delete(l.open, p)
			l.Log.Info("listener closed", "port", p)
		}
	}
	clear(l.failed)
	for _, p := range want {
		if _, ok := l.open[p]; ok {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(l.Host, strconv.Itoa(int(p))))
		if err != nil {
			l.failed[p] = err
			l.Log.Error(err, "listener not opened", "port", p)
			continue
		}
		l.open[p] = ln
		l.Log.Info("listening", "port", p)
		go l.serve(l.ctx, ln, p)
	}
}

func (l *Listeners) serve(ctx context.Context, ln net.Listener, port uint16) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				l.Log.Error(err, "accept", "port", port)
			}
			return
		}
		go l.Engine.ServeIngress(ctx, conn, port)
	}
}

// Ready reports whether the Gateway has arrived and every listener port it
// needs is open.
func (l *Listeners) Ready() bool {
	gw := l.Engine.Gateway()
	if gw == nil {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range Ports(gw) {
		if _, ok := l.open[p]; !ok {
			return false
		}
	}
	return true
}
