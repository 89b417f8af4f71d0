package waypoint

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// serveTCP is opaque passthrough for traffic that is not HTTP: L4 policy
// (rules needing L7 attributes fail closed), then load balancing for a
// service or the addressed pod, then HBONE onward and a byte relay.
func (s *Server) serveTCP(ctx context.Context, c *connInfo, stream hbone.Stream, br *bufio.Reader) {
	labels := telemetry.Labels{Reporter: s.reporter, Source: c.source, SecurityPolicy: telemetry.MutualTLS}
	if c.dst.service != nil {
		labels.Service = telemetry.ServiceOf(c.dst.service)
	}
	if d := c.authorize(c.current(), nil); !d.Allowed {
		labels.ResponseFlags = string(proxyerr.AuthorizationPolicyRejection)
		s.tcp.ConnOpened(labels)
		s.tcp.ConnClosed(labels, 0, 0)
		s.log.Info("RBAC rejected conn", "peer", c.callerID(), "target", c.dst.target.String(), "policy", d.Policy, "reason", d.Reason)
		return
	}
	ep := c.dst.target
	dstWL := c.dst.workload // nil for a service, until an endpoint is picked
	done := func(bool) {}
	if c.dst.service != nil {
		tiers, addrs := s.endpointsOf(c.dst.service, c.dst.target.Port(), c.dst.target.Addr())
		k, fin, ok := s.balancer(discovery.ServiceKey(c.dst.service.Namespace, c.dst.service.Hostname)).PickTiered(tiers)
		if !ok {
			labels.ResponseFlags = string(proxyerr.NoHealthyUpstream)
			s.tcp.ConnOpened(labels)
			s.tcp.ConnClosed(labels, 0, 0)
			s.log.Info("no healthy upstream", "target", c.dst.target.String())
			return
		}
		ep, dstWL = addrs[k].addr, addrs[k].w
		done = func(failed bool) {
			if failed {
				fin(lb.ConnectFailure)
			} else {
				fin(lb.Success)
			}
		}
	}
	if dstWL == nil {
		dstWL = s.cfg.State.WorkloadByAddr(ep.Addr())
	}
	labels.Destination = telemetry.PeerOf(dstWL, nil)
	s.tcp.ConnOpened(labels)
	up, err := s.dial(withPickedEndpoint(context.WithValue(ctx, sourceAddrKey{}, c.srcIP), dstWL), ep)
	if err != nil {
		done(true)
		labels.ResponseFlags = string(proxyerr.ReasonOf(err))
		s.tcp.ConnClosed(labels, 0, 0)
		s.log.Info("upstream connect failed", "endpoint", ep.String(), "err", err.Error())
		return
	}
	done(false)
	s.relay(c, &bufferedStream{Stream: stream, r: br}, up, labels, ep)
}

// relay copies between the client's side (down) and the upstream until
// both directions end, closing both when a policy change revokes the
// connection, then records the connection's metrics and access log.
func (s *Server) relay(c *connInfo, down hbone.Stream, up net.Conn, labels telemetry.Labels, ep netip.AddrPort) {
	defer up.Close()
	hc, ok := up.(hbone.HalfCloser)
	if !ok {
		hc = noHalfClose{up}
	}
	var revoked atomic.Bool
	stop := s.revalidate(c, func() {
		revoked.Store(true)
		down.Close()
		up.Close()
	})
	received, sent, err := hbone.Relay(down, hc)
	stop()
	labels.ResponseFlags = string(proxyerr.ReasonOf(err))
	if revoked.Load() {
		labels.ResponseFlags = string(proxyerr.PolicyChanged)
	}
	s.tcp.ConnClosed(labels, received, sent)
	s.log.Info("access", "protocol", "tcp", "src.addr", c.srcIP.String(), "src.identity", c.callerID(),
		"dst.addr", c.dst.target.String(), "upstream", ep.String(), "bytes_received", received, "bytes_sent", sent)
}

// noHalfClose adapts a stream without half-close (ends both directions).
type noHalfClose struct{ io.ReadWriteCloser }

func (n noHalfClose) CloseWrite() error { return n.Close() }

// revalidate re-authorizes an open tunnel whenever the L7 configuration
// changes and calls kill when it is no longer allowed. The returned func
// stops watching.
func (s *Server) revalidate(c *connInfo, kill func()) func() {
	done := make(chan struct{})
	go func() {
		for {
			cfg := s.l7.Load()
			select {
			case <-done:
				return
			case <-cfg.changed:
			}
			if d := c.authorize(c.current(), nil); !d.Allowed {
				s.log.Info("policy changed: closing tunnel", "peer", c.callerID(), "target", c.dst.target.String(), "policy", d.Policy)
				kill()
				return
			}
		}
	}()
	return func() { close(done) }
}
