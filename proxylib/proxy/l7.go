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
	"github.com/ambientmesh/ambient/proxylib/rbac"
)

// L7 is an L7 engine serving the inbound connections of the proxy's own
// pod (the sidecar: proxylib/waypoint in sidecar mode). The proxy keeps
// what it does for every connection (PeerAuthentication, the L4 policies,
// tracking, istio_tcp_* metrics) and hands the accepted stream over; the
// engine enforces the L7-derived policies whole (HTTP: paths, methods,
// headers; anything else: their L7 rules fail closed) and forwards to the
// app through Dial.
type L7 interface {
	ServeInbound(ctx context.Context, in L7Inbound, down hbone.Stream)
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
