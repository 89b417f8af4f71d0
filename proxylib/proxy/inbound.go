package proxy

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/rbac"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// serveHBONE handles a CONNECT arriving on the pod's :15008.
func (p *Proxy) serveHBONE(ctx context.Context, pd *pod, req *hbone.Request, resp hbone.Responder) {
	peer := req.Peer
	req.PeerAddr = netip.AddrPortFrom(req.PeerAddr.Addr().Unmap(), req.PeerAddr.Port())
	if p.serveControl(pd, req, resp) {
		return
	}
	s := p.newSession(fmt.Sprintf("inbound{id=%d peer_ip=%s peer_id=%s}", p.nextID(), req.PeerAddr.Addr(), peer), net.TCPAddrFromAddrPort(req.PeerAddr))
	s.dst = req.Target
	s.info("got CONNECT request to %s", req.Target)
	p.router.learnSource(req.PeerAddr.Addr())
	s.labels = telemetry.Labels{Reporter: telemetry.ReporterDestination, Source: telemetry.PeerOf(p.cfg.State.WorkloadByAddr(req.PeerAddr.Addr()), &peer),
		Destination: telemetry.PeerOf(nil, nil), Service: telemetry.ServiceOf(nil), SecurityPolicy: telemetry.MutualTLS}
	serve, err := p.inboundHBONE(ctx, s, pd, req, resp)
	s.run(serve, err, nil)
}

func (p *Proxy) inboundHBONE(ctx context.Context, s *session, pd *pod, req *hbone.Request, resp hbone.Responder) (job, error) {
	reject := func(err error) (job, error) {
		resp.Reject(proxyerr.HTTPStatus(proxyerr.ReasonOf(err)), err.Error())
		return nil, err
	}
	dstW, err := p.inboundDestination(ctx, pd, req.Target)
	if err != nil {
		return reject(err)
	}
	s.labels.Destination = telemetry.PeerOf(dstW, nil)
	peer := req.Peer
	src, origin := hboneSource(req.PeerAddr, p.trustsForwarded(dstW, peer), req.Header)
	if origin == ignoredForwarded {
		p.log.V(1).Info(s.prefix+": Forwarded header ignored, peer is not a waypoint of the destination", "forwarded", truncate(req.Header.Get(hbone.HeaderForwarded), 64))
	}
	c := rbac.Conn{Source: &peer, SrcIP: req.PeerAddr.Addr().Unmap(), DstIP: req.Target.Addr(), DstPort: req.Target.Port()}
	if wp := dstW.GetWaypoint(); wp != nil && !p.fromWaypoint(wp, peer) {
		c.ToDestinationWaypoint = true
		if err := p.authorize(s, dstW, c); err != nil {
			return reject(err)
		}
		// The waypoint believes our Forwarded and caller headers: they name
		// the client we decided on, never what the peer wrote.
		up, err := p.hairpin(ctx, s, pd, dstW, req.Target, hairpinHeader(withForwarded(req.Header, src), &peer))
		if err != nil {
			return reject(err)
		}
		return p.acceptAndRelay(s, pd, resp, up, dstW.GetUid(), c)
	}
	l7 := p.inboundL7()
	c.L7EnforcedHere = l7 != nil
	if err := p.authorize(s, dstW, c); err != nil {
		return reject(err)
	}
	if l7 != nil {
		down, err := resp.Accept()
		if err != nil {
			return nil, proxyerr.Wrap(proxyerr.ConnectionClosed, err, "accept CONNECT")
		}
		in := L7Inbound{Peer: peer, PeerAddr: req.PeerAddr, Header: req.Header, Target: req.Target, Workload: dstW}
		return func() (int64, int64, error) {
			defer down.Close()
			return p.serveL7(ctx, s, pd, l7, in, down, c)
		}, nil
	}
	// A trusted waypoint may name a client outside the mesh: usable when
	// the pod's inbound capture makes no NAT entries (TPROXY).
	up, err := p.dialApp(s, pd, netip.AddrPortFrom(src, 0), req.Target, pd.tproxy.Load())
	if err != nil {
		return reject(err)
	}
	return p.acceptSession(s, pd, req, resp, up, dstW.GetUid(), c)
}

func (p *Proxy) acceptAndRelay(s *session, pd *pod, resp hbone.Responder, up net.Conn, dstUID string, c rbac.Conn) (job, error) {
	if err := s.track(pd.info.UID, dstUID, c); err != nil {
		up.Close()
		resp.Reject(http.StatusServiceUnavailable, err.Error())
		return nil, err
	}
	down, err := resp.Accept()
	if err != nil {
		up.Close()
		return nil, proxyerr.Wrap(proxyerr.ConnectionClosed, err, "accept CONNECT")
	}
	s.attach(down, up)
	s.open()
	return relayJob(down, up), nil
}

// inboundDestination waits for discovery and checks that target is this
// pod on a port that is not ztunnel's own.
func (p *Proxy) inboundDestination(ctx context.Context, pd *pod, target netip.AddrPort) (*workloadapi.Workload, error) {
	if err := p.awaitDiscovery(ctx); err != nil {
		return nil, err
	}
	if isProxyPort(target.Port()) {
		return nil, proxyerr.New(proxyerr.SelfTarget, "target %s is a ztunnel port", target)
	}
	w := p.workloadOf(pd.info)
	if w == nil {
		return nil, proxyerr.New(proxyerr.UnknownDestination, "workload %s not in discovery", pd.info.UID)
	}
	for _, b := range w.GetAddresses() {
		if a, ok := netip.AddrFromSlice(b); ok && a.Unmap() == target.Addr().Unmap() {
			return w, nil
		}
	}
	return nil, proxyerr.New(proxyerr.UnknownDestination, "target %s is not workload %s", target, w.GetUid())
}

// servePlaintextInbound handles traffic from outside the mesh captured to
// :15006: no identity, so STRICT (Istio's converted DENY policy) refuses it.
func (p *Proxy) servePlaintextInbound(pd *pod, down net.Conn) {
	src := addrPortOf(down.RemoteAddr())
	s := p.newSession(fmt.Sprintf("inbound{id=%d peer_ip=%s peer_id=none}", p.nextID(), src.Addr()), down.RemoteAddr())
	s.attach(down)
	p.router.learnSource(src.Addr())
	s.labels = telemetry.Labels{Reporter: telemetry.ReporterDestination, Source: telemetry.PeerOf(p.cfg.State.WorkloadByAddr(src.Addr()), nil),
		Destination: telemetry.PeerOf(nil, nil), Service: telemetry.ServiceOf(nil), SecurityPolicy: telemetry.Unknown}
	serve, err := p.plaintextInbound(s, pd, down, src)
	s.run(serve, err, down)
}

func (p *Proxy) plaintextInbound(s *session, pd *pod, down net.Conn, src netip.AddrPort) (job, error) {
	dst, tproxied, err := inboundOriginalDst(down)
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.OriginalDstMissing, err, "original destination")
	}
	s.dst = dst
	dstW, err := p.inboundDestination(context.Background(), pd, dst)
	if err != nil {
		return nil, err
	}
	s.labels.Destination = telemetry.PeerOf(dstW, nil)
	var up net.Conn
	c := rbac.Conn{SrcIP: src.Addr(), DstIP: dst.Addr(), DstPort: dst.Port()}
	if wp := dstW.GetWaypoint(); wp != nil {
		// Authorized here as what it is, a caller without identity (STRICT
		// refuses it), then by the waypoint, told there is no identity.
		c.ToDestinationWaypoint = true
		if err := p.authorize(s, dstW, c); err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
		defer cancel()
		if up, err = p.hairpin(ctx, s, pd, dstW, dst, hairpinHeader(forwarded(src, nil), nil)); err != nil {
			return nil, err
		}
	} else {
		l7 := p.inboundL7()
		c.L7EnforcedHere = l7 != nil
		if err := p.authorize(s, dstW, c); err != nil {
			return nil, err
		}
		if l7 != nil {
			tc, ok := down.(hbone.Stream)
			if !ok {
				return nil, proxyerr.New(proxyerr.ConnectionClosed, "inbound connection cannot half-close")
			}
			in := L7Inbound{PeerAddr: src, Target: dst, Workload: dstW}
			return func() (int64, int64, error) { return p.serveL7(context.Background(), s, pd, l7, in, tc, c) }, nil
		}
		// Arrived by TPROXY: no NAT entry holds the client's tuple, so an
		// outside client is preserved too (source.go).
		if up, err = p.dialApp(s, pd, src, dst, tproxied); err != nil {
			return nil, err
		}
	}
	s.attach(up)
	if err := s.track(pd.info.UID, dstW.GetUid(), c); err != nil {
		up.Close()
		return nil, err
	}
	s.open()
	return relayJob(down, up), nil
}

// inboundOriginalDst is where a plaintext inbound connection was going.
// A NAT REDIRECT delivers it to the listener's own port (:15006) and
// conntrack keeps the original destination (SO_ORIGINAL_DST); TPROXY
// delivers it unchanged to the transparent listener, so the accepted
// socket's local address is the original destination (tproxied). Both
// can arrive at one pod while a mesh switches modes.
func inboundOriginalDst(c net.Conn) (dst netip.AddrPort, tproxied bool, err error) {
	local := addrPortOf(c.LocalAddr())
	if local.Port() != InboundPort {
		return netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), true, nil
	}
	dst, err = netnsutil.OriginalDst(c)
	return dst, false, err
}

// authorize applies dst's policies, logging Istio's "RBAC rejected" line.
func (p *Proxy) authorize(s *session, dst *workloadapi.Workload, c rbac.Conn) error {
	d := p.router.Authorize(dst, c)
	if d.Allowed {
		return nil
	}
	src := "none"
	if c.Source != nil {
		src = c.Source.String()
	}
	s.info("RBAC rejected conn=%s(%s)->%s policy=%q", c.SrcIP, src, netip.AddrPortFrom(c.DstIP, c.DstPort), d.Policy)
	if d.Policy != "" {
		return proxyerr.New(proxyerr.AuthorizationPolicyRejection, "denied by %s", d.Policy)
	}
	return proxyerr.New(proxyerr.AuthorizationPolicyRejection, "no ALLOW policy matched")
}

// fromWaypoint reports whether peer is the identity of waypoint wp.
func (p *Proxy) fromWaypoint(wp *workloadapi.GatewayAddress, peer identity.Identity) bool {
	return p.router.isWaypointIdentity(wp, peer)
}

// hairpinHeader names the hair-pinned connection's real caller for the
// waypoint: its verified identity, or none for a plaintext caller. A value
// the peer sent is always replaced.
func hairpinHeader(h http.Header, caller *identity.Identity) http.Header {
	if h == nil {
		h = http.Header{}
	}
	h.Del(hbone.HeaderHairpinCaller)
	if caller != nil {
		h.Set(hbone.HeaderHairpinCaller, caller.String())
	}
	return h
}

// hairpin sends a connection for a waypoint-enabled destination through its
// waypoint, presenting the destination pod's identity (the only one this
// node may use on its behalf) and naming the real caller in
// hbone.HeaderHairpinCaller. The caller was authorized first.
func (p *Proxy) hairpin(ctx context.Context, s *session, pd *pod, dstW *workloadapi.Workload, target netip.AddrPort, h http.Header) (net.Conn, error) {
	rt, err := p.router.toWaypoint(dstW.GetWaypoint(), target)
	if err != nil {
		return nil, err
	}
	s.info("proxy to %s using HBONE via %s type Hairpin", target, rt.ProxyAddr)
	up, err := pd.dialer.Dial(ctx, hbone.DialRequest{Source: p.router.WorkloadIdentity(dstW), Expected: rt.Expected,
		ProxyAddr: rt.ProxyAddr, Target: target, Header: h})
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.HBONEConnectFailed, err, "hairpin to waypoint %s", rt.ProxyAddr)
	}
	return up, nil
}
