package proxy

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
)

// RouteKind says how an outbound connection leaves.
type RouteKind int

const (
	// Passthrough: destination outside the mesh, plain TCP.
	Passthrough RouteKind = iota
	// HBONE: tunnel to ProxyAddr (destination pod or waypoint :15008).
	HBONE
	// FastPath: destination is a captured workload on this node; skip the
	// tunnel, apply destination policy locally, connect from its netns.
	FastPath
)

func (k RouteKind) String() string {
	switch k {
	case HBONE:
		return "HBONE"
	case FastPath:
		return "FastPath"
	}
	return "Passthrough"
}

// Route is where an outbound connection goes.
type Route struct {
	Kind RouteKind
	// Target is the final destination: the CONNECT authority for HBONE (the
	// service VIP when a waypoint serves a service), the pod address
	// otherwise.
	Target netip.AddrPort
	// ProxyAddr is the HBONE peer (pod or waypoint :15008).
	ProxyAddr netip.AddrPort
	// Expected is the identity the HBONE peer must present.
	Expected []identity.Identity
	// Dest is the destination workload (the waypoint's when Waypoint).
	Dest     *workloadapi.Workload
	Service  *workloadapi.Service
	Waypoint bool
}

// Router resolves original destinations against discovery state.
type Router struct {
	State       *discovery.State
	Node        string // this node: destinations here take the fast path
	TrustDomain string // default when a workload does not carry one
	// LookupHost resolves endpoints known by hostname only (ServiceEntry
	// DNS resolution, WorkloadEntries with a hostname); default: the
	// system resolver of the proxy's own network namespace.
	LookupHost func(ctx context.Context, host string) ([]netip.Addr, error)

	// Demand, when set (a node-scoped ztunnel: discovery.Client.Demand),
	// looks up addresses and service endpoints the control plane has not
	// pushed; the connection waits for the answer. Nil: every address is
	// known already.
	Demand func(ctx context.Context, names ...string) error
	// DemandTimeout bounds that wait (default 5s); a lookup that does not
	// finish refuses the connection.
	DemandTimeout time.Duration

	rr sync.Map // service key -> *atomic.Uint64 round robin cursor
}

// lookupTimeout bounds one endpoint hostname resolution.
const lookupTimeout = 5 * time.Second

// EndpointAddr is the address of endpoint w for a connection the client
// addressed to dst (a service address, or one of w's own): PickAddr of its
// addresses, else its hostname resolved (an answer of dst's family first).
func (r *Router) EndpointAddr(w *workloadapi.Workload, dst netip.Addr, families workloadapi.IPFamilies) (netip.Addr, error) {
	if a, ok := PickAddr(w.GetAddresses(), dst, families); ok {
		return a, nil
	}
	host := w.GetHostname()
	if host == "" {
		return netip.Addr{}, proxyerr.New(proxyerr.EndpointUnresolved, "workload %s has no %s address", w.GetUid(), familyName(families))
	}
	lookup := r.LookupHost
	if lookup == nil {
		lookup = func(ctx context.Context, h string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", h)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), lookupTimeout)
	defer cancel()
	addrs, err := lookup(ctx, host)
	if err != nil || len(addrs) == 0 {
		return netip.Addr{}, proxyerr.Wrap(proxyerr.EndpointUnresolved, err, "resolving %s", host)
	}
	raw := make([][]byte, len(addrs))
	for i, a := range addrs {
		raw[i] = a.Unmap().AsSlice()
	}
	if !dst.IsValid() {
		dst = netip.IPv4Unspecified() // no client choice: IPv4 first, as before
	}
	if a, ok := PickAddr(raw, dst, families); ok {
		return a, nil
	}
	return netip.Addr{}, proxyerr.New(proxyerr.EndpointUnresolved, "%s has no %s address", host, familyName(families))
}

// PickAddr chooses among a workload's addresses (one per family on a
// dual-stack pod) for a connection the client addressed to dst, as Istio's
// ztunnel does: dst itself when it is one of them; else, among those the
// service's families allow (families of a single-family Service), the
// first of dst's family, else the first allowed. A client that chose IPv6
// thus stays on IPv6 through a dual-stack Service.
func PickAddr(addrs [][]byte, dst netip.Addr, families workloadapi.IPFamilies) (netip.Addr, bool) {
	dst = dst.Unmap()
	var first netip.Addr
	for _, b := range addrs {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			continue
		}
		a = a.Unmap()
		if a == dst {
			return a, true
		}
		if !familyAllows(families, a) {
			continue
		}
		if dst.IsValid() && a.Is6() == dst.Is6() {
			return a, true
		}
		if !first.IsValid() {
			first = a
		}
	}
	return first, first.IsValid()
}

func familyAllows(f workloadapi.IPFamilies, a netip.Addr) bool {
	switch f {
	case workloadapi.IPFamilies_IPV4_ONLY:
		return a.Is4()
	case workloadapi.IPFamilies_IPV6_ONLY:
		return a.Is6()
	}
	return true
}

func familyName(f workloadapi.IPFamilies) string {
	switch f {
	case workloadapi.IPFamilies_IPV4_ONLY:
		return "IPv4"
	case workloadapi.IPFamilies_IPV6_ONLY:
		return "IPv6"
	}
	return "usable"
}

// hasAddr reports whether ip is one of w's addresses.
func hasAddr(w *workloadapi.Workload, ip netip.Addr) bool {
	for _, b := range w.GetAddresses() {
		if a, ok := netip.AddrFromSlice(b); ok && a.Unmap() == ip.Unmap() {
			return true
		}
	}
	return false
}

// WorkloadIdentity is the SPIFFE identity of w.
func (r *Router) WorkloadIdentity(w *workloadapi.Workload) identity.Identity {
	td := w.GetTrustDomain()
	if td == "" {
		td = r.TrustDomain
	}
	sa := w.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	return identity.Identity{TrustDomain: td, Namespace: w.GetNamespace(), ServiceAccount: sa}
}

// WorkloadAddr is w's first address.
func WorkloadAddr(w *workloadapi.Workload) (netip.Addr, bool) {
	for _, b := range w.GetAddresses() {
		if a, ok := netip.AddrFromSlice(b); ok {
			return a.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// Resolve decides where src's connection to dst goes. src may be nil (a
// hair-pin from inbound, where the caller is not a local client).
func (r *Router) Resolve(src *workloadapi.Workload, dst netip.AddrPort) (Route, error) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if err := r.lookup(dst.Addr()); err != nil {
		return Route{}, err
	}
	if svc := r.State.ServiceByVIP(dst.Addr()); svc != nil {
		return r.resolveService(src, svc, dst)
	}
	return r.resolveAddr(src, dst)
}

// lookup asks the control plane about ip when this proxy may not hold what
// routing it needs: an address it has never seen, or a service whose
// endpoints it has not asked for. An address the control plane does not
// know is outside the mesh (passthrough, as before); a lookup that fails
// refuses the connection rather than guess.
func (r *Router) lookup(ip netip.Addr) error {
	if r.Demand == nil {
		return nil
	}
	var name string
	switch svc := r.State.ServiceByVIP(ip); {
	case svc != nil:
		name = discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())
	case r.State.WorkloadByAddr(ip) != nil:
		return nil
	default:
		name = discovery.AddressAlias("", ip)
	}
	timeout := r.DemandTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := r.Demand(ctx, name); err != nil {
		return proxyerr.Wrap(proxyerr.DiscoveryLookupFailed, err, "looking up %s", name)
	}
	return nil
}

// learnSource looks up the workload behind a caller's address so that
// inbound telemetry names it (as Istio's ztunnel does). Best effort and
// bounded by a second: identity and policy do not depend on it.
func (r *Router) learnSource(ip netip.Addr) {
	if r.Demand == nil || r.State.WorkloadByAddr(ip) != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = r.Demand(ctx, discovery.AddressAlias("", ip))
}

func (r *Router) resolveService(src *workloadapi.Workload, svc *workloadapi.Service, dst netip.AddrPort) (Route, error) {
	if wp := svc.GetWaypoint(); wp != nil && !r.isWaypointOf(src, wp) {
		rt, err := r.toWaypoint(wp, dst)
		rt.Service = svc
		return rt, err
	}
	key := discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())
	ep, port := r.pickEndpoint(src, svc, key, dst.Port(), dst.Addr())
	if ep == nil {
		if svc.GetLoadBalancing().GetMode() == workloadapi.LoadBalancing_PASSTHROUGH {
			// No endpoints to choose (ServiceEntry resolution NONE): keep
			// the destination the client dialed.
			rt, err := r.resolveAddr(src, dst)
			rt.Service = svc
			return rt, err
		}
		return Route{}, proxyerr.New(proxyerr.NoHealthyUpstream, "service %s has no healthy endpoint", key)
	}
	addr, err := r.EndpointAddr(ep, dst.Addr(), svc.GetIpFamilies())
	if err != nil {
		return Route{}, err
	}
	return r.resolveWorkload(src, ep, netip.AddrPortFrom(addr, port), svc)
}

// resolveAddr routes to a workload address, or plain TCP when unknown.
func (r *Router) resolveAddr(src *workloadapi.Workload, dst netip.AddrPort) (Route, error) {
	if w := r.State.WorkloadByAddr(dst.Addr()); w != nil {
		return r.resolveWorkload(src, w, dst, nil)
	}
	return Route{Kind: Passthrough, Target: dst}, nil
}

func (r *Router) resolveWorkload(src, w *workloadapi.Workload, dst netip.AddrPort, svc *workloadapi.Service) (Route, error) {
	if wp := w.GetWaypoint(); wp != nil && !r.isWaypointOf(src, wp) {
		rt, err := r.toWaypoint(wp, dst)
		rt.Service = svc
		return rt, err
	}
	rt := Route{Target: dst, Dest: w, Service: svc}
	switch {
	case w.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE:
		rt.Kind = Passthrough
	case w.GetNode() != "" && w.GetNode() == r.Node:
		rt.Kind = FastPath
	default:
		rt.Kind = HBONE
		rt.ProxyAddr = netip.AddrPortFrom(dst.Addr(), hbone.Port)
		rt.Expected = []identity.Identity{r.WorkloadIdentity(w)}
	}
	return rt, nil
}

// toWaypoint routes to the waypoint, keeping dst (service VIP or pod
// address) as the CONNECT target.
func (r *Router) toWaypoint(wp *workloadapi.GatewayAddress, dst netip.AddrPort) (Route, error) {
	w := r.waypointWorkload(wp, dst.Addr())
	if w == nil {
		return Route{}, proxyerr.New(proxyerr.WaypointUnresolved, "waypoint %v has no healthy workload", wp)
	}
	// The waypoint's address of the client's family (an IPv6 client keeps
	// IPv6 up to the waypoint too).
	addr, _ := PickAddr(w.GetAddresses(), dst.Addr(), workloadapi.IPFamilies_AUTOMATIC)
	port := uint16(wp.GetHboneMtlsPort())
	if port == 0 {
		port = hbone.Port
	}
	return Route{Kind: HBONE, Target: dst, ProxyAddr: netip.AddrPortFrom(addr, port), Waypoint: true,
		Expected: []identity.Identity{r.WorkloadIdentity(w)}, Dest: w}, nil
}

func (r *Router) waypointWorkload(wp *workloadapi.GatewayAddress, dst netip.Addr) *workloadapi.Workload {
	var svc *workloadapi.Service
	switch d := wp.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Address:
		ip, ok := netip.AddrFromSlice(d.Address.GetAddress())
		if !ok {
			return nil
		}
		if w := r.State.WorkloadByAddr(ip); w != nil {
			return w
		}
		svc = r.State.ServiceByVIP(ip)
	case *workloadapi.GatewayAddress_Hostname:
		svc = r.State.ServiceByKey(discovery.ServiceKey(d.Hostname.GetNamespace(), d.Hostname.GetHostname()))
	}
	if svc == nil {
		return nil
	}
	ep, _ := r.pickEndpoint(nil, svc, discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname()), hbone.Port, dst)
	return ep
}

// isWaypointOf reports whether src is (a replica of) waypoint wp.
func (r *Router) isWaypointOf(src *workloadapi.Workload, wp *workloadapi.GatewayAddress) bool {
	if src == nil {
		return false
	}
	switch d := wp.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Address:
		ip, ok := netip.AddrFromSlice(d.Address.GetAddress())
		if !ok {
			return false
		}
		ip = ip.Unmap()
		if hasAddr(src, ip) {
			return true
		}
		if svc := r.State.ServiceByVIP(ip); svc != nil {
			_, in := src.GetServices()[discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())]
			return in
		}
	case *workloadapi.GatewayAddress_Hostname:
		_, in := src.GetServices()[discovery.ServiceKey(d.Hostname.GetNamespace(), d.Hostname.GetHostname())]
		return in
	}
	return false
}

// pickEndpoint round-robins over the healthy endpoints closest to the
// client src by the Service's locality preference (lb.Closest; all of them
// without one) that have an address the Service's IP families allow (or a
// hostname), and maps the service port to the endpoint's target port.
func (r *Router) pickEndpoint(src *workloadapi.Workload, svc *workloadapi.Service, key string, svcPort uint16, dst netip.Addr) (*workloadapi.Workload, uint16) {
	var healthy []*workloadapi.Workload
	for _, ep := range r.State.Endpoints(key) {
		if ep == nil || !Eligible(svc, ep) {
			continue
		}
		if _, ok := PickAddr(ep.GetAddresses(), dst, svc.GetIpFamilies()); ok || ep.GetHostname() != "" {
			healthy = append(healthy, ep)
		}
	}
	healthy = lb.Closest(svc.GetLoadBalancing(), src, healthy, func(w *workloadapi.Workload) *workloadapi.Workload { return w })
	if len(healthy) == 0 {
		return nil, 0
	}
	c, _ := r.rr.LoadOrStore(key, new(atomic.Uint64))
	ep := healthy[(c.(*atomic.Uint64).Add(1)-1)%uint64(len(healthy))]
	return ep, targetPort(svc, key, ep, svcPort)
}

// Eligible reports whether ep may receive svc's traffic: healthy, or any
// state when the Service admits unready endpoints
// (publishNotReadyAddresses: health policy ALLOW_ALL).
func Eligible(svc *workloadapi.Service, ep *workloadapi.Workload) bool {
	return ep.GetStatus() == workloadapi.WorkloadStatus_HEALTHY ||
		svc.GetLoadBalancing().GetHealthPolicy() == workloadapi.LoadBalancing_ALLOW_ALL
}

func targetPort(svc *workloadapi.Service, key string, ep *workloadapi.Workload, svcPort uint16) uint16 {
	if pl, ok := ep.GetServices()[key]; ok {
		for _, p := range pl.GetPorts() {
			if p.GetServicePort() == uint32(svcPort) && p.GetTargetPort() != 0 {
				return uint16(p.GetTargetPort())
			}
		}
	}
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() == uint32(svcPort) && p.GetTargetPort() != 0 {
			return uint16(p.GetTargetPort())
		}
	}
	return svcPort
}
