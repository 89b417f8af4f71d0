package waypoint

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/l7"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// ingressFirstBytes bounds how long an ingress client may connect without
// sending its request (a mesh peer gets SniffTimeout; the internet is slower).
const ingressFirstBytes = 10 * time.Second

// Gateway is the Gateway this ingress serves, as last received from the
// control plane (nil before it arrives or once it is deleted).
func (s *Server) Gateway() *gwv1.Gateway {
	if cfg := s.l7.Load(); cfg != nil {
		return cfg.gateway
	}
	return nil
}

// Plan is what the ingress serves of its Gateway's listeners
// (route.Plan, with the ReferenceGrants received), from one snapshot.
func (s *Server) Plan() []route.Port {
	cfg := s.l7.Load()
	if cfg == nil || cfg.gateway == nil {
		return nil
	}
	ports, _ := route.Plan(cfg.gateway, cfg.grants)
	return ports
}

// OnGatewayChange registers f, called after each change of Gateway() or
// of the ReferenceGrants (listeners to open or close, certificates). The
// caller syncs once after registering: a change just before is not
// replayed.
func (s *Server) OnGatewayChange(f func()) { s.onGateway.Store(&f) }

// ServeIngress serves one client connection accepted on the Gateway
// listener port: HTTP/1.1 or h2c, routed by the routes attached to that
// listener, sent to backends as this gateway's mesh identity. Anything that
// is not HTTP is closed.
func (s *Server) ServeIngress(ctx context.Context, conn net.Conn, port uint16) {
	defer conn.Close()
	client := addrPortOf(conn.RemoteAddr())
	local := addrPortOf(conn.LocalAddr())
	c := s.newIngressConn(client, netip.AddrPortFrom(local.Addr(), port))
	proto, br := l7.Sniff(conn, ingressFirstBytes)
	if proto == l7.TCP {
		s.log.V(1).Info("ingress connection is not HTTP: closed", "client", client.String(), "port", port)
		return
	}
	s.http.ServeConnWith(ctx, conn, br, proto, c)
}

// newIngressConn describes a client of the gateway: no mesh identity, its
// address as seen on the listener.
func (s *Server) newIngressConn(client, listener netip.AddrPort) *connInfo {
	c := &connInfo{s: s, dst: destination{target: listener, ingress: true}}
	c.peer.PeerAddr = client
	c.srcIP = client.Addr()
	self := s.cfg.State.WorkloadByAddr(listener.Addr())
	c.source = telemetry.PeerOf(self, &s.cfg.Identity)
	c.fwd = l7.Forwarding{ClientIP: c.srcIP, ProxyID: s.cfg.Identity.String()}
	c.current()
	return c
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if tcp, ok := a.(*net.TCPAddr); ok {
		ap := tcp.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// ingressRoute matches a request against the routes of its listener; a
// request no route matches gets 404.
func (c *connInfo) ingressRoute(snap snapshot, in *http.Request, o *outcome) (route.Match, *http.Response) {
	m, ok := snap.cfg.routes.LookupGateway(c.dst.target.Port(), in)
	if !ok {
		o.flags = "no_route"
		return m, textResponse(in, http.StatusNotFound, "no route matched")
	}
	return m, nil
}

// waypointTarget: a backend Service with a waypoint is sent to as a whole
// (its VIP, through the waypoint, which applies its L7 policy and picks the
// endpoint), as ztunnel would send a mesh client's connection.
func waypointTarget(svc *workloadapi.Service, port uint16) (netip.AddrPort, bool) {
	if svc.GetWaypoint() == nil {
		return netip.AddrPort{}, false
	}
	for _, a := range svc.GetAddresses() {
		if ip, ok := netip.AddrFromSlice(a.GetAddress()); ok {
			return netip.AddrPortFrom(ip.Unmap(), port), true
		}
	}
	return netip.AddrPort{}, false
}

// ingressUsesWaypoint: whether the gateway sends to svc through its
// waypoint (the control plane's IngressUseWaypoint resources).
func (s *Server) ingressUsesWaypoint(svc *workloadapi.Service) bool {
	cfg := s.l7.Load()
	return cfg != nil && cfg.ingressWaypoint[svc.GetNamespace()+"/"+svc.GetName()]
}

// dialAsClient opens the gateway's onward stream to ep the way a mesh
// client's ztunnel would: HBONE with the gateway's own identity to the
// waypoint or the destination pod, plain TCP to workloads outside the mesh.
func (s *Server) dialAsClient(ctx context.Context, ep netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	rt, err := s.router.Resolve(nil, ep)
	if err != nil {
		return nil, err
	}
	if rt.Kind == proxy.Passthrough {
		if s.cfg.State.WorkloadByAddr(ep.Addr()) == nil && s.cfg.State.ServiceByVIP(ep.Addr()) == nil {
			return nil, proxyerr.New(proxyerr.UnknownDestination, "endpoint %s is not a known workload", ep)
		}
		c, err := s.cfg.DialTCP(ctx, ep)
		return c, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, err, "dial %s", ep)
	}
	src := hbone.Source{Namespace: s.cfg.Namespace, Workload: s.cfg.Name}
	st, err := s.cfg.Dialer.Dial(ctx, hbone.DialRequest{
		Source:    s.cfg.Identity,
		Expected:  append([]identity.Identity(nil), rt.Expected...),
		ProxyAddr: rt.ProxyAddr,
		Target:    rt.Target,
		Header:    hbone.SourceHeader(src),
	})
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.HBONEConnectFailed, err, "HBONE to %s via %s", rt.Target, rt.ProxyAddr)
	}
	return st, nil
}
