package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"syscall"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/handover"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/proxy/socks5"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// serveOutbound handles a connection from the pod to dst (the original
// destination when dst is unset).
func (p *Proxy) serveOutbound(pd *pod, down net.Conn, dst netip.AddrPort) {
	s := p.newSession(fmt.Sprintf("outbound{id=%d}", p.nextID()), down.RemoteAddr())
	s.attach(down)
	srcW := p.workloadOf(pd.info)
	srcID := p.podIdentity(pd.info)
	s.labels = telemetry.Labels{Reporter: telemetry.ReporterSource, Source: telemetry.PeerOf(srcW, &srcID),
		Destination: telemetry.PeerOf(nil, nil), Service: telemetry.ServiceOf(nil)}
	serve, err := p.outbound(s, pd, down, dst, srcW, srcID)
	s.run(serve, err, down)
}

func (p *Proxy) outbound(s *session, pd *pod, down net.Conn, dst netip.AddrPort, srcW *workloadapi.Workload, srcID identity.Identity) (job, error) {
	if !dst.IsValid() {
		var err error
		if dst, err = netnsutil.OriginalDst(down); err != nil {
			return nil, proxyerr.Wrap(proxyerr.OriginalDstMissing, err, "original destination")
		}
	}
	s.dst = dst
	if err := p.awaitDiscovery(context.Background()); err != nil {
		return nil, err
	}
	if isProxyPort(dst.Port()) && isLocalTarget(down, dst) {
		return nil, proxyerr.New(proxyerr.SelfTarget, "destination %s is ztunnel itself", dst)
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	// A connect that fails at the TCP level (the endpoint or waypoint
	// replica is gone: refused, unreachable) sent nothing of the client's,
	// so another endpoint of the same service is tried, as Envoy's connect
	// retries do; anything else (policy, TLS, the peer's answer) is final.
	var failed []netip.AddrPort
	for attempt := 1; ; attempt++ {
		rt, err := p.router.Resolve(srcW, dst)
		if err != nil {
			return nil, err
		}
		if slices.Contains(failed, peerAddr(rt)) && attempt < maxConnectAttempts {
			continue // round robin moves on; a lone endpoint ends the loop
		}
		j, err := p.outboundRoute(ctx, s, pd, down, dst, rt, srcW, srcID)
		switch {
		case err == nil:
			return j, nil
		case attempt < maxConnectAttempts && rt.fromService() && endpointGone(err):
			failed = append(failed, peerAddr(rt))
			s.info("connect to %s failed (%v): trying another endpoint", peerAddr(rt), err)
		default:
			return nil, err
		}
	}
}

// maxConnectAttempts bounds the endpoints one connection tries.
const maxConnectAttempts = 3

// fromService: the route chose one endpoint (or waypoint replica) of
// several, so another may be tried.
func (rt Route) fromService() bool { return rt.Waypoint || rt.Service != nil }

// peerAddr is the address a route connects to.
func peerAddr(rt Route) netip.AddrPort {
	if rt.Kind == HBONE {
		return rt.ProxyAddr
	}
	return rt.Target
}

// endpointGone: the dial found nobody at the address (no listener, no
// host), as when a replica was killed and discovery has not caught up.
func endpointGone(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH)
}

// outboundRoute serves the connection along rt: the fast path, the
// sidecar's L7 engine, or a relay over the dialed upstream connection (a
// session that can be handed over when the peer offers one).
func (p *Proxy) outboundRoute(ctx context.Context, s *session, pd *pod, down net.Conn, dst netip.AddrPort, rt Route,
	srcW *workloadapi.Workload, srcID identity.Identity) (job, error) {
	s.dst = rt.Target
	var expected *identity.Identity
	if len(rt.Expected) > 0 {
		expected = &rt.Expected[0]
	}
	s.labels.Destination = telemetry.PeerOf(rt.Dest, expected)
	s.labels.Service = telemetry.ServiceOf(rt.Service)
	if rt.Kind == FastPath {
		if dp := p.localPod(rt.Dest.GetUid()); dp != nil {
			return p.fastPath(s, pd, dp, down, rt, srcID)
		}
		// Destination on this node but not captured here (yet): tunnel.
		rt.Kind = HBONE
		rt.ProxyAddr = netip.AddrPortFrom(rt.Target.Addr(), hbone.Port)
		rt.Expected = []identity.Identity{p.router.WorkloadIdentity(rt.Dest)}
	}
	if l7 := p.inboundL7(); l7 != nil && rt.Service != nil && !rt.Waypoint && l7.RoutesService(rt.Service) {
		// The sidecar applies the routes of a Service without a waypoint
		// (with one, the waypoint does: the tunnel goes there as is).
		s.dst = dst
		return func() (int64, int64, error) { return p.serveL7Outbound(s, pd, l7, down, rt, srcW, srcID) }, nil
	}
	switch rt.Kind {
	case HBONE:
		typ := "Direct"
		if rt.Waypoint {
			typ = "ToServerWaypoint"
		}
		s.info("proxy to %s using HBONE via %s type %s", rt.Target, rt.ProxyAddr, typ)
		s.labels.SecurityPolicy = telemetry.MutualTLS
	default:
		s.info("proxying to %s using passthrough", rt.Target)
		s.labels.SecurityPolicy = telemetry.Unknown
	}
	h := forwarded(s.src, srcW)
	offer := p.offerSession(rt, down)
	if offer {
		h.Set(handover.HeaderSession, handover.Version)
	}
	up, err := p.dialRoute(ctx, pd, rt, srcID, h)
	if err != nil {
		return nil, err
	}
	s.attach(up)
	if err := s.track(pd.info.UID, "", rbac.Conn{}); err != nil {
		up.Close()
		return nil, err
	}
	s.open()
	if offer {
		return p.outboundSession(s, pd, down, up, rt, srcID), nil
	}
	return relayJob(down, up), nil
}

// dialRoute opens the pod's outbound connection along rt: an HBONE tunnel
// with the pod's identity, or passthrough.
func (p *Proxy) dialRoute(ctx context.Context, pd *pod, rt Route, srcID identity.Identity, h http.Header) (net.Conn, error) {
	if rt.Kind == HBONE {
		up, err := pd.dialer.Dial(ctx, hbone.DialRequest{Source: srcID, Expected: rt.Expected, ProxyAddr: rt.ProxyAddr,
			Target: rt.Target, Header: h})
		if err != nil {
			return nil, proxyerr.Wrap(proxyerr.HBONEConnectFailed, err, "HBONE to %s via %s", rt.Target, rt.ProxyAddr)
		}
		return up, nil
	}
	up, err := netnsutil.DialTCP(ctx, pd.ns, netip.AddrPort{}, rt.Target, p.dialOptions())
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, err, "dial %s", rt.Target)
	}
	return up, nil
}

// fastPath delivers to a pod on this node without a tunnel, still applying
// the destination's policy with the source's identity (ztunnel holds both).
func (p *Proxy) fastPath(s *session, src, dst *pod, down net.Conn, rt Route, srcID identity.Identity) (job, error) {
	s.info("proxying to %s using node local fast path", rt.Target)
	s.labels.SecurityPolicy = telemetry.MutualTLS
	s.labels.Reporter = telemetry.ReporterDestination
	srcW := p.workloadOf(src.info)
	// Policy sees the address the client used (its IPv6 one when it
	// connected over IPv6), as the destination would across nodes.
	srcAddr := fastPathSource(srcW, s.src.Addr())
	c := rbac.Conn{Source: &srcID, SrcIP: srcAddr, DstIP: rt.Target.Addr(), DstPort: rt.Target.Port()}
	if err := p.authorize(s, rt.Dest, c); err != nil {
		return nil, err
	}
	up, err := p.dialApp(s, dst, netip.AddrPortFrom(srcAddr, 0), rt.Target, false)
	if err != nil {
		return nil, err
	}
	s.attach(up)
	if err := s.track(src.info.UID, rt.Dest.GetUid(), c); err != nil {
		up.Close()
		return nil, err
	}
	s.open()
	return p.localSession(src, down, up, rt, srcID), nil
}

// serveSOCKS5 is outbound with the destination named by the client.
func (p *Proxy) serveSOCKS5(pd *pod, c net.Conn) {
	dst, err := socks5.Handshake(c, nil)
	if err != nil {
		p.log.V(1).Info("socks5 handshake failed", "err", proxyerr.Wrap(proxyerr.Socks5Protocol, err, "").Error())
		c.Close()
		return
	}
	socks5.Reply(c, socks5.Succeeded)
	p.serveOutbound(pd, c, dst)
}

// dialLocal connects to a local pod from inside its own namespace (from
// the pod's own address), marked so the redirection rules let it through.
func (p *Proxy) dialLocal(pd *pod, target netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	up, err := netnsutil.DialTCP(ctx, pd.ns, netip.AddrPort{}, target, p.dialOptions())
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, err, "dial %s", target)
	}
	return up, nil
}

func forwarded(src netip.AddrPort, w *workloadapi.Workload) http.Header {
	h := http.Header{}
	if src.IsValid() {
		h.Set("Forwarded", fmt.Sprintf("for=%q", src.Addr().String()))
	}
	if w != nil {
		h.Set("Baggage", hbone.FormatBaggage([2]string{hbone.BaggageNamespace, w.GetNamespace()},
			[2]string{hbone.BaggagePod, w.GetName()}, [2]string{hbone.BaggageService, w.GetCanonicalName()}))
	}
	return h
}

func isProxyPort(port uint16) bool {
	switch port {
	case OutboundPort, InboundPort, HBONEPort, SOCKS5Port, 15000, 15020, 15021:
		return true
	}
	return false
}

func isLocalTarget(c net.Conn, dst netip.AddrPort) bool {
	local := addrPortOf(c.LocalAddr())
	return dst.Addr().IsLoopback() || dst.Addr() == local.Addr()
}
