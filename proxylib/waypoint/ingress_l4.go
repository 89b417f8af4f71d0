package waypoint

import (
	"bufio"
	"context"
	"net"
	"net/netip"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/l7"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// ServeIngressL4 serves one client connection on a TLS passthrough or TCP
// listener port: the gateway's L4 policy (rules needing HTTP attributes
// fail closed, as for opaque TCP at a waypoint), the TLSRoute the
// ClientHello's server name picks (the handshake is relayed untouched) or
// the port's TCPRoute, then onward as a mesh client exactly as for HTTP —
// through the backend Service's waypoint when it has one, else to the
// chosen pod over HBONE, plain TCP outside the mesh — and a byte relay.
// A connection no route takes is closed.
func (s *Server) ServeIngressL4(ctx context.Context, conn net.Conn, p route.Port) {
	defer conn.Close()
	client, local := addrPortOf(conn.RemoteAddr()), addrPortOf(conn.LocalAddr())
	c := s.newIngressConn(client, netip.AddrPortFrom(local.Addr(), p.Port))
	labels := telemetry.Labels{Reporter: s.reporter, Source: c.source, SecurityPolicy: telemetry.MutualTLS}
	refuse := func(reason proxyerr.Reason, msg string, kv ...any) {
		labels.ResponseFlags = string(reason)
		s.tcp.ConnOpened(labels)
		s.tcp.ConnClosed(labels, 0, 0)
		s.log.Info(msg, append([]any{"client", client.String(), "port", p.Port}, kv...)...)
	}
	var sni string
	var br *bufio.Reader
	if p.Protocol == gwv1.TLSProtocolType {
		name, r, err := l7.PeekServerName(conn, ingressFirstBytes)
		if err != nil {
			refuse(proxyerr.ConnectionClosed, "TLS passthrough: no ClientHello: closed", "err", err.Error())
			return
		}
		sni, br = name, r
	} else {
		br = bufio.NewReaderSize(conn, hbone.SmallBufferSize)
	}
	snap := c.current()
	if d := c.authorize(snap, nil); !d.Allowed {
		refuse(proxyerr.AuthorizationPolicyRejection, "RBAC rejected conn", "sni", sni, "policy", d.Policy, "reason", d.Reason)
		return
	}
	rule, ok := snap.cfg.routes.LookupL4(p.Port, sni)
	if !ok {
		refuse("no_route", "no route for connection: closed", "sni", sni)
		return
	}
	b, ok := rule.PickBackend(nil)
	if !ok || b.Invalid != "" {
		refuse("invalid_backend", "no valid backend: closed", "route", rule.Route, "reason", b.Invalid)
		return
	}
	bsvc := s.cfg.State.ServiceByKey(discovery.ServiceKey(b.Service.Namespace, s.ServiceHostname(b.Service.Namespace, b.Service.Name)))
	if bsvc == nil {
		refuse("backend_not_found", "backend service not found: closed", "route", rule.Route, "backend", b.Service.String())
		return
	}
	labels.Service = telemetry.ServiceOf(bsvc)
	o := &outcome{}
	ep, done, ok := c.pickFrom(bsvc, b.Port, o)()
	if !ok {
		refuse(proxyerr.NoHealthyUpstream, "no healthy upstream: closed", "route", rule.Route, "backend", b.Service.String())
		return
	}
	labels.Destination = telemetry.PeerOf(o.endpoint, nil)
	s.tcp.ConnOpened(labels)
	up, err := s.dialAsClient(ctx, ep)
	if err != nil {
		done(lb.ConnectFailure)
		labels.ResponseFlags = string(proxyerr.ReasonOf(err))
		s.tcp.ConnClosed(labels, 0, 0)
		s.log.Info("upstream connect failed", "route", rule.Route, "endpoint", ep.String(), "err", err.Error())
		return
	}
	done(lb.Success)
	down, ok := conn.(hbone.Stream)
	if !ok {
		s.log.Info("listener connection cannot half-close: closed", "port", p.Port)
		up.Close()
		return
	}
	s.relay(c, &bufferedStream{Stream: down, r: br}, up, labels, ep)
}
