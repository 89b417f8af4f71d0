package proxy

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// L7 is an L7 engine serving the inbound connections of the proxy's own
// pod (the sidecar: proxylib/waypoint in sidecar mode). The proxy keeps
// what it does for every connection (PeerAuthentication, the L4 policies,
// tracking, istio_tcp_* metrics) and hands the accepted stream over; the
// engine enforces the L7-derived policies whole (HTTP: paths, methods,
// headers; anything else: their L7 rules fail closed) and forwards to the
// app through Dial.
//
// On outbound the engine takes the connections to a Service without a
// waypoint that has routes attached (GAMMA HTTPRoute/GRPCRoute): it routes
// and load-balances each request as the destination's waypoint would,
// reaching each endpoint through Dial (HBONE with the pod's identity).
type L7 interface {
	ServeInbound(ctx context.Context, in L7Inbound, down hbone.Stream)
	// RoutesService reports whether routes are attached to svc.
	RoutesService(svc *workloadapi.Service) bool
	ServeOutbound(ctx context.Context, out L7Outbound, down hbone.Stream)
}

// L7Outbound is one outbound connection of the proxy's own pod to a
// Service the L7 engine routes.
type L7Outbound struct {
	// Source is the pod's identity, SourceWorkload its workload.
	Source         identity.Identity
	SourceWorkload *workloadapi.Workload
	SourceAddr     netip.Addr
	// Service and Target (a VIP and service port) are what the app called.
	Service *workloadapi.Service
	Target  netip.AddrPort
	// Dial reaches an endpoint as the pod's own connection would (HBONE to
	// its pod or its waypoint, passthrough outside the mesh).
	Dial func(ctx context.Context, target netip.AddrPort) (net.Conn, error)
}

// L7Inbound is one inbound connection to the proxy's own pod, accepted and
// L4-authorized by the proxy.
type L7Inbound struct {
	// Peer is the verified caller; zero for a plaintext caller.
	Peer     identity.Identity
	PeerAddr netip.AddrPort
	// Header is the HBONE CONNECT's header (nil for plaintext).
	Header   http.Header
	Target   netip.AddrPort
	Workload *workloadapi.Workload
	// Dial connects to the app inside the pod.
	Dial func(ctx context.Context, target netip.AddrPort) (net.Conn, error)
}

// SetL7 makes the proxy hand its pods' inbound connections to l (before
// the first AddWorkload). Only the sidecar has one: ztunnel pods' L7 is
// their waypoint's.
func (p *Proxy) SetL7(l L7) { p.l7.Store(&l) }

func (p *Proxy) inboundL7() L7 {
	if l := p.l7.Load(); l != nil {
		return *l
	}
	return nil
}

// serveL7 accepts an authorized inbound connection and hands it to the
// L7 engine, counting its bytes for the connection's metrics.
func (p *Proxy) serveL7(ctx context.Context, s *session, pd *pod, l L7, in L7Inbound, down hbone.Stream, c rbac.Conn) (int64, int64, error) {
	if err := s.track(pd.info.UID, in.Workload.GetUid(), c); err != nil {
		return 0, 0, err
	}
	// Pooled upstream connections carry many callers' requests: they come
	// from the pod's own address, each caller named in X-Forwarded-For.
	in.Dial = func(_ context.Context, target netip.AddrPort) (net.Conn, error) { return p.dialLocal(pd, target) }
	cd := &countedStream{Stream: down}
	s.attach(down)
	s.open()
	l.ServeInbound(ctx, in, cd)
	return cd.received.Load(), cd.sent.Load(), nil
}

// serveL7Outbound hands an outbound connection to a routed Service to the
// L7 engine; each request's endpoint is dialed as an outbound connection
// of the pod to that endpoint.
func (p *Proxy) serveL7Outbound(s *session, pd *pod, l L7, down net.Conn, rt Route, srcW *workloadapi.Workload, srcID identity.Identity) (int64, int64, error) {
	st, ok := down.(hbone.Stream)
	if !ok {
		return 0, 0, proxyerr.New(proxyerr.ConnectionClosed, "outbound connection cannot half-close")
	}
	if err := s.track(pd.info.UID, "", rbac.Conn{}); err != nil {
		return 0, 0, err
	}
	s.info("proxy to %s using the L7 engine (routes attached to %s)", s.dst, rt.Service.GetHostname())
	s.labels.SecurityPolicy = telemetry.MutualTLS
	out := L7Outbound{Source: srcID, SourceWorkload: srcW, SourceAddr: s.src.Addr(), Service: rt.Service, Target: s.dst,
		Dial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			ert, err := p.router.Resolve(srcW, target)
			if err != nil {
				return nil, err
			}
			if ert.Kind == FastPath { // a proxy without a node has none: tunnel
				ert.Kind, ert.ProxyAddr = HBONE, netip.AddrPortFrom(ert.Target.Addr(), hbone.Port)
				ert.Expected = []identity.Identity{p.router.WorkloadIdentity(ert.Dest)}
			}
			ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
			defer cancel()
			return p.dialRoute(ctx, pd, ert, srcID, forwarded(s.src, srcW))
		}}
	cd := &countedStream{Stream: st}
	s.open()
	l.ServeOutbound(context.Background(), out, cd)
	return cd.received.Load(), cd.sent.Load(), nil
}

// countedStream counts the bytes read from (received) and written to
// (sent) the caller.
type countedStream struct {
	hbone.Stream
	received, sent atomic.Int64
}

func (c *countedStream) Read(b []byte) (int, error) {
	n, err := c.Stream.Read(b)
	c.received.Add(int64(n))
	return n, err
}

func (c *countedStream) Write(b []byte) (int, error) {
	n, err := c.Stream.Write(b)
	c.sent.Add(int64(n))
	return n, err
}
