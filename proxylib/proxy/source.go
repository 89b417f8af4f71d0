package proxy

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"syscall"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
)

// Source preservation (docs/interfaces.md, "Inbound source address"): like
// Istio's in-pod ztunnel, inbound connections reach the app from the
// client's address (a transparent dial inside the pod's namespace; the
// node agent's connmark and policy routing bring the replies back to us).
//
// Which address is "the client" is a security decision, because apps use it
// for logging, rate limits and allow lists:
//   - HBONE: the outer connection's peer address (the kernel saw it complete
//     a TCP or QUIC handshake from there). The Forwarded header is believed
//     only when the verified peer identity is a waypoint of this destination
//     (its own, or one of its services'), according to discovery: a waypoint
//     terminates the client's tunnel and reports its peer. Any other peer
//     could write anything there, so its Forwarded header is ignored.
//   - Plaintext inbound and the node-local fast path: the accepted socket's
//     peer, seen by the kernel in the pod's own namespace.
//
// With NAT capture (the default) only clients that are captured mesh
// workloads (or waypoints) are preserved. Inbound capture is then a NAT
// REDIRECT to :15006, so a client outside the mesh has conntrack entries
// <client>:<port> -> <app>:<port> in the pod; a transparent connection
// from that client could pick the same tuple (or the client could later
// reuse ours) and be NATed into the wrong socket, failing at random. Mesh
// workloads never reach the pod that way (their traffic arrives over HBONE
// on 15008 or from ztunnel), so their tuples cannot collide.
//
// With TPROXY capture (AmbientMesh spec.capture.inboundMode, ZDS
// inbound_tproxy) no NAT entry is made for inbound connections, so every
// client is preserved, as Istio's in-pod mode does: plaintext clients from
// outside the mesh too (a connection that still arrived NATed, from before
// a switch of modes, is not), and outside clients named by a trusted
// waypoint. ztunnel's connection never takes the client's own port
// (netnsutil.DialFrom). What remains, as in Istio: an outside client that
// opens, while ztunnel's connection lives, a new connection to the same
// app port from exactly the port the kernel picked for ztunnel's.
//
// Istio's ztunnel always uses the outer peer address, so behind a waypoint
// its apps see the waypoint; trusting only verified waypoints keeps that
// safety while showing the real client.

// sourceOrigin says where an inbound source address came from (for logs).
type sourceOrigin string

const (
	fromPeer          sourceOrigin = "peer"               // outer connection's peer
	fromWaypointFwd   sourceOrigin = "waypoint forwarded" // trusted Forwarded header
	fromWaypointNoFwd sourceOrigin = "waypoint (no for=)" // trusted peer without a usable header
	ignoredForwarded  sourceOrigin = "peer (Forwarded ignored: not a waypoint of this destination)"
)

// hboneSource decides the client address of an HBONE CONNECT. trusted says
// whether the verified peer is a waypoint of the destination.
func hboneSource(peer netip.AddrPort, trusted bool, h http.Header) (netip.Addr, sourceOrigin) {
	peerAddr := peer.Addr().Unmap()
	fwd := h.Get(hbone.HeaderForwarded)
	if !trusted {
		if fwd != "" {
			return peerAddr, ignoredForwarded
		}
		return peerAddr, fromPeer
	}
	if fwd == "" {
		return peerAddr, fromWaypointNoFwd
	}
	a, err := hbone.ParseForwardedFor(fwd)
	if err != nil || unusableSource(a.Unmap()) {
		return peerAddr, fromWaypointNoFwd
	}
	return a.Unmap(), fromWaypointFwd
}

// unusableSource rejects addresses no real client has: a forwarded
// loopback, unspecified or multicast address would let a waypoint bug turn
// into an app trusting "localhost".
func unusableSource(a netip.Addr) bool {
	return !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.IsInterfaceLocalMulticast()
}

// trustsForwarded reports whether the verified peer is a waypoint serving
// dst: dst's own waypoint or the waypoint of a service dst backs. Decided
// from discovery and the certificate, never from anything the peer sent.
func (p *Proxy) trustsForwarded(dst *workloadapi.Workload, peer identity.Identity) bool {
	if wp := dst.GetWaypoint(); wp != nil && p.router.isWaypointIdentity(wp, peer) {
		return true
	}
	for key := range dst.GetServices() {
		svc := p.cfg.State.ServiceByKey(key)
		if wp := svc.GetWaypoint(); wp != nil && p.router.isWaypointIdentity(wp, peer) {
			return true
		}
	}
	return false
}

// fastPathSource is the source pod's address for a node-local delivery: the
// connection's own source when it is one of the pod's addresses, else the
// pod's first address in discovery.
func fastPathSource(srcW *workloadapi.Workload, observed netip.Addr) netip.Addr {
	observed = observed.Unmap()
	for _, b := range srcW.GetAddresses() {
		if a, ok := netip.AddrFromSlice(b); ok && a.Unmap() == observed {
			return observed
		}
	}
	if a, ok := WorkloadAddr(srcW); ok {
		return a.Unmap()
	}
	return observed
}

// preserveSkip says why src cannot be used for a transparent dial to
// target ("" = it can). client is src's workload in discovery; noNAT says
// the pod's inbound capture makes no NAT entries (TPROXY), so clients
// outside the mesh are safe to use too.
func preserveSkip(src netip.Addr, target netip.AddrPort, client *workloadapi.Workload, noNAT bool) string {
	switch {
	case unusableSource(src):
		return "no usable client address"
	case src.Is4() != target.Addr().Unmap().Is4():
		return "client and app address families differ"
	case !noNAT && client.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE:
		return "client is not a captured mesh workload (its redirected connections could collide in conntrack)"
	}
	return ""
}

// dialApp connects to the app in pd's namespace, from src's address when
// the pod has the return-path rules (pod.preserve) and src is usable, else
// from the pod's own address. src's port, when set, is the client's own,
// which ztunnel's connection never takes. noNAT: the client's connection
// came without NAT (TPROXY capture; see preserveSkip). A transparent dial
// that fails for a local reason (no permission, address not usable) falls
// back to the pod's address, which is always routable, with a log line;
// refusals and timeouts do not fall back (the app would refuse us from any
// address).
func (p *Proxy) dialApp(s *session, pd *pod, src netip.AddrPort, target netip.AddrPort, noNAT bool) (net.Conn, error) {
	if !pd.preserve.Load() || !src.Addr().IsValid() {
		return p.dialLocal(pd, target)
	}
	src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
	if why := preserveSkip(src.Addr(), target, p.cfg.State.WorkloadByAddr(src.Addr()), noNAT); why != "" {
		p.log.V(1).Info(s.prefix+": connecting from the pod's own address", "client", src.Addr(), "reason", why)
		return p.dialLocal(pd, target)
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	up, err := netnsutil.DialFrom(ctx, pd.ns, src, target,
		netnsutil.SocketOptions{Mark: netnsutil.Mark, Transparent: true})
	if err == nil {
		return up, nil
	}
	if !localDialFailure(err) {
		return nil, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, err, "dial %s from %s", target, src.Addr())
	}
	s.info("source preservation failed, connecting to %s from the pod's own address: %v", target, err)
	return p.dialLocal(pd, target)
}

// localDialFailure: the transparent socket could not be set up here; the
// app never saw a packet, so a normal dial is safe to try.
func localDialFailure(err error) bool {
	for _, e := range []error{syscall.EPERM, syscall.EACCES, syscall.EADDRNOTAVAIL, syscall.EADDRINUSE,
		syscall.EINVAL, syscall.EAFNOSUPPORT, syscall.ENOPROTOOPT} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// withForwarded copies h with Forwarded naming src (dropped when src is
// not usable), for a hop whose receiver trusts our header.
func withForwarded(h http.Header, src netip.Addr) http.Header {
	out := h.Clone()
	if out == nil {
		out = http.Header{}
	}
	out.Del(hbone.HeaderForwarded)
	if !unusableSource(src) {
		out.Set(hbone.HeaderForwarded, hbone.FormatForwarded(src))
	}
	return out
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
