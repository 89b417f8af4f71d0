// Package waypoint is the mesh's L7 proxy engine. As a waypoint it accepts
// HBONE tunnels whose target is a pod it manages or a service containing
// such pods (anything else is refused), sniffs the protocol, applies L4+L7
// authorization, routes (HTTPRoute/GRPCRoute), load-balances, and sends the
// request onward over HBONE to the destination pod's ztunnel
// (<pod ip>:15008). As an ingress gateway (Config.Ingress) the same engine
// serves plain connections from outside the mesh on the Gateway's
// listeners, routes by the routes attached to that Gateway and sends to
// mesh backends as a mesh client over HBONE (ingress.go).
package waypoint

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/authz"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/l7"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// Config configures a waypoint.
type Config struct {
	// Name and Namespace of this waypoint (its Gateway or WaypointPolicy,
	// and its Service of the same name).
	Name, Namespace string
	// Identity is the waypoint's own workload identity.
	Identity identity.Identity
	// ClusterDomain builds service hostnames; default cluster.local.
	ClusterDomain string
	// RootNamespace is the mesh root namespace for mesh-wide policies until
	// the control plane's Mesh resource names it (a sidecar leaves it
	// empty and learns it from there; without either, policy fails closed).
	RootNamespace string
	State         *discovery.State
	// Dialer opens onward HBONE tunnels.
	Dialer hbone.Dialer
	// DialTCP opens plain TCP to destinations outside the mesh; default net.Dialer.
	DialTCP func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// LookupHost resolves endpoints known by hostname only (ServiceEntry
	// DNS resolution); default: the system resolver.
	LookupHost func(ctx context.Context, host string) ([]netip.Addr, error)
	// PodUID is the workload uid of this proxy's own pod: endpoints are
	// chosen closest to its locality when a Service prefers close ones
	// (trafficDistribution). Empty: no locality preference is applied.
	PodUID string
	// Registry receives HTTP and TCP metrics (may be nil).
	Registry prometheus.Registerer
	// Tracing generates a traceparent when a request has none.
	Tracing bool
	// SniffTimeout bounds the wait for a client's first bytes before its
	// tunnel is taken for opaque TCP (server-first protocols send none).
	// Default 1s: a client-first HTTP client delayed past it by a busy
	// node would be served as TCP and refused by L7 policy (100ms did that
	// under load). Istio's protocolDetectionTimeout default is 0, no bound.
	SniffTimeout time.Duration
	LBPolicy     lb.Policy
	Outlier      lb.Outlier
	// ConnectTimeout bounds one onward tunnel setup; default 5s.
	ConnectTimeout time.Duration
	// Ingress makes this the ingress gateway of Gateway Name/Namespace:
	// ServeIngress instead of ServeHBONE (ingress.go).
	Ingress bool
	// Sidecar makes this the L7 engine of the sidecar of pod Name/Namespace:
	// ServeInbound (called by the pod's proxy) instead of ServeHBONE
	// (sidecar.go). Dialer is then not needed.
	Sidecar bool
	// Demand, when discovery is scoped (a sidecar's), looks up the
	// endpoints of a Service before picking one.
	Demand func(ctx context.Context, names ...string) error
	// TCPMetrics records opaque TCP connections; default: new istio_tcp_*
	// metrics on Registry. The sidecar's proxy records its connections
	// itself and passes an unregistered set.
	TCPMetrics *telemetry.Metrics
	Log        logr.Logger
}

// Server is the waypoint. It implements hbone.Handler.
type Server struct {
	cfg      Config
	l7       atomic.Pointer[l7Config]
	upstream *l7.Upstream
	// clientUpstream pools a sidecar's outbound requests (upstream for
	// every other mode).
	clientUpstream *l7.Upstream
	http           *l7.Server
	metrics        *httpMetrics
	tcp            *telemetry.Metrics
	balancers      sync.Map // service key -> *lb.Balancer
	router         *proxy.Router
	reporter       string
	// dial opens the onward stream to an endpoint (HBONE to its pod, as a
	// mesh client at ingress, to the app in sidecar mode).
	dial l7.DialFunc
	log  logr.Logger
	// onGateway is called when the Gateway (ingress mode) changes; set by
	// the listeners' goroutine while discovery may already be rebuilding.
	onGateway atomic.Pointer[func()]
}

var _ hbone.Handler = (*Server)(nil)

// New builds a waypoint and subscribes it to State changes.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Name == "" || cfg.Namespace == "":
		return nil, fmt.Errorf("waypoint: name and namespace are required")
	case cfg.Identity.IsZero():
		return nil, fmt.Errorf("waypoint: identity is required")
	case cfg.State == nil || (cfg.Dialer == nil && !cfg.Sidecar):
		return nil, fmt.Errorf("waypoint: state and dialer are required")
	}
	if cfg.ClusterDomain == "" {
		cfg.ClusterDomain = "cluster.local"
	}
	if cfg.SniffTimeout <= 0 {
		cfg.SniffTimeout = time.Second
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	if cfg.DialTCP == nil {
		cfg.DialTCP = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", a.String())
		}
	}
	s := &Server{cfg: cfg, log: cfg.Log.WithName("waypoint"), reporter: Reporter,
		router: &proxy.Router{State: cfg.State, TrustDomain: cfg.Identity.TrustDomain, LookupHost: cfg.LookupHost}}
	s.dial = s.dialEndpoint
	switch {
	case cfg.Ingress:
		s.log, s.reporter, s.dial = cfg.Log.WithName("gateway"), ReporterSource, s.dialAsClient
	case cfg.Sidecar:
		s.log, s.reporter, s.dial = cfg.Log.WithName("sidecar-l7"), ReporterDestination, dialFromContext
	}
	s.metrics = newHTTPMetrics(cfg.Registry)
	s.tcp = cfg.TCPMetrics
	if s.tcp == nil {
		s.tcp = telemetry.NewMetrics(cfg.Registry)
	}
	s.upstream = l7.NewUpstream(s.dial)
	s.clientUpstream = s.upstream
	if cfg.Sidecar {
		s.clientUpstream = l7.NewUpstream(s.dial)
	}
	s.http = &l7.Server{Handler: nil, OnRefused: func(status int, reason string) {
		s.log.Info("request refused", "status", status, "reason", reason)
	}}
	s.rebuild()
	cfg.State.OnChange(func(c discovery.Change) {
		if c.TypeURL == discovery.L7ResourceType {
			s.rebuild()
		}
	})
	return s, nil
}

// Close releases pooled upstream connections.
func (s *Server) Close() {
	s.upstream.Close()
	s.clientUpstream.Close()
}

// ServiceHostname is the FQDN of a service in the mesh.
func (s *Server) ServiceHostname(ns, name string) string {
	return name + "." + ns + ".svc." + s.cfg.ClusterDomain
}

// destination is what a tunnel is addressed to, after validation.
type destination struct {
	target   netip.AddrPort
	service  *workloadapi.Service  // set when a service VIP was addressed
	workload *workloadapi.Workload // set when a pod was addressed
	ingress  bool                  // a client of the ingress gateway: target is the listener
}

// ServeHBONE admits tunnels to pods and services this waypoint serves.
func (s *Server) ServeHBONE(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
	log := s.log.WithValues("peer", req.Peer.String(), "target", req.Target.String())
	if s.cfg.Ingress || s.cfg.Sidecar {
		s.reject(log, resp, proxyerr.New(proxyerr.UnknownDestination, "an ingress gateway or a sidecar's L7 engine accepts no HBONE tunnels"))
		return
	}
	if err := s.awaitDiscovery(ctx); err != nil {
		s.reject(log, resp, err)
		return
	}
	dst, err := s.classify(req.Target)
	if err != nil {
		s.reject(log, resp, err)
		return
	}
	stream, err := resp.Accept()
	if err != nil {
		log.Info("accept failed", "err", err)
		return
	}
	defer stream.Close()
	s.serveStream(ctx, log, newConnInfo(s, req, dst), stream)
}

// serveStream sniffs an accepted stream's protocol and serves it: HTTP
// request by request (policy, routes, telemetry), anything else as opaque
// TCP under L4 policy.
func (s *Server) serveStream(ctx context.Context, log logr.Logger, conn *connInfo, stream hbone.Stream) {
	proto, br := l7.Sniff(stream, s.cfg.SniffTimeout)
	log.V(1).Info("tunnel accepted", "protocol", proto.String())
	if proto == l7.TCP {
		s.serveTCP(ctx, conn, stream, br)
		return
	}
	s.http.ServeConnWith(ctx, stream, br, proto, conn)
	// End our direction gracefully; Close alone would reset the tunnel.
	stream.CloseWrite()
}

// awaitDiscovery holds a connection that arrives before discovery has
// synced, for at most ConnectTimeout, then refuses it (fail closed: routes
// and policy are unknown until then). A replica starting beside others can
// be reached before its first discovery response.
func (s *Server) awaitDiscovery(ctx context.Context) error {
	if err := s.cfg.State.HoldUntilReady(ctx, s.cfg.ConnectTimeout); err != nil {
		return proxyerr.New(proxyerr.NotReady, "%v", err)
	}
	return nil
}

func (s *Server) reject(log logr.Logger, resp hbone.Responder, err error) {
	reason := proxyerr.ReasonOf(err)
	log.Info("tunnel rejected", "reason", reason, "err", err.Error())
	resp.Reject(proxyerr.HTTPStatus(reason), err.Error())
}

// classify checks that target is a service this waypoint serves (its
// waypoint is us, or it contains pods whose waypoint is us) or a pod whose
// waypoint is us.
func (s *Server) classify(target netip.AddrPort) (destination, error) {
	st := s.cfg.State
	if svc := st.ServiceByVIP(target.Addr()); svc != nil {
		if !s.servesService(svc) {
			return destination{}, proxyerr.New(proxyerr.UnknownDestination, "service %s/%s is not served by waypoint %s/%s", svc.Namespace, svc.Hostname, s.cfg.Namespace, s.cfg.Name)
		}
		if !hasPort(svc, target.Port()) {
			return destination{}, proxyerr.New(proxyerr.NoTargetPort, "service %s/%s has no port %d", svc.Namespace, svc.Hostname, target.Port())
		}
		return destination{target: target, service: svc}, nil
	}
	if w := st.WorkloadByAddr(target.Addr()); w != nil {
		if !s.isMe(w.GetWaypoint()) {
			return destination{}, proxyerr.New(proxyerr.UnknownDestination, "workload %s/%s is not served by waypoint %s/%s", w.Namespace, w.Name, s.cfg.Namespace, s.cfg.Name)
		}
		return destination{target: target, workload: w}, nil
	}
	return destination{}, proxyerr.New(proxyerr.UnknownDestination, "%s is neither a workload nor a service served by waypoint %s/%s", target, s.cfg.Namespace, s.cfg.Name)
}

func hasPort(svc *workloadapi.Service, port uint16) bool {
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() == uint32(port) {
			return true
		}
	}
	return false
}

func (s *Server) servesService(svc *workloadapi.Service) bool {
	if s.isMe(svc.GetWaypoint()) {
		return true
	}
	for _, ep := range s.cfg.State.Endpoints(discovery.ServiceKey(svc.Namespace, svc.Hostname)) {
		if ep != nil && s.isMe(ep.GetWaypoint()) {
			return true
		}
	}
	return false
}

// isMe reports whether a waypoint address names this waypoint: our Service's
// hostname, or one of its VIPs.
func (s *Server) isMe(gw *workloadapi.GatewayAddress) bool {
	if gw == nil {
		return false
	}
	if h := gw.GetHostname(); h != nil {
		return h.Namespace == s.cfg.Namespace && (h.Hostname == s.ServiceHostname(s.cfg.Namespace, s.cfg.Name) || h.Hostname == s.cfg.Name)
	}
	if a := gw.GetAddress(); a != nil {
		ip, ok := netip.AddrFromSlice(a.Address)
		if !ok {
			return false
		}
		own := s.cfg.State.ServiceByKey(discovery.ServiceKey(s.cfg.Namespace, s.ServiceHostname(s.cfg.Namespace, s.cfg.Name)))
		for _, na := range own.GetAddresses() {
			if vip, ok := netip.AddrFromSlice(na.Address); ok && vip.Unmap() == ip.Unmap() {
				return true
			}
		}
	}
	return false
}

// workloadIdentity is the SPIFFE identity a workload's certificate carries.
func (s *Server) workloadIdentity(w *workloadapi.Workload) identity.Identity {
	td := w.GetTrustDomain()
	if td == "" {
		td = s.cfg.Identity.TrustDomain
	}
	sa := w.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	return identity.Identity{TrustDomain: td, Namespace: w.GetNamespace(), ServiceAccount: sa}
}

// dialEndpoint opens the onward stream to a pod: HBONE to its ztunnel
// (<pod ip>:15008, expecting the pod's identity), or plain TCP when the pod
// is not in the mesh.
func (s *Server) dialEndpoint(ctx context.Context, ep netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	w := s.cfg.State.WorkloadByAddr(ep.Addr())
	if w == nil {
		w = pickedEndpointFrom(ctx) // known by hostname only (a DNS ServiceEntry)
	}
	if w == nil {
		return nil, proxyerr.New(proxyerr.UnknownDestination, "endpoint %s is not a known workload", ep)
	}
	if w.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE {
		c, err := s.cfg.DialTCP(ctx, ep)
		return c, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, err, "dial %s", ep)
	}
	src := hbone.Source{Addr: sourceAddrFrom(ctx), Namespace: s.cfg.Namespace, Workload: s.cfg.Name}
	st, err := s.cfg.Dialer.Dial(ctx, hbone.DialRequest{
		Source:    s.cfg.Identity,
		Expected:  []identity.Identity{s.workloadIdentity(w)},
		ProxyAddr: netip.AddrPortFrom(ep.Addr(), hbone.Port),
		Target:    ep,
		Header:    hbone.SourceHeader(src),
	})
	if err != nil {
		return nil, proxyerr.Wrap(proxyerr.HBONEConnectFailed, err, "HBONE to %s", ep)
	}
	return st, nil
}

type sourceAddrKey struct{}

// pickedEndpointKey carries the workload of the endpoint the load balancer
// picked to the dial: an endpoint known by hostname has no address of its
// own in discovery to look it up by.
type pickedEndpointKey struct{}

func withPickedEndpoint(ctx context.Context, w *workloadapi.Workload) context.Context {
	if w == nil {
		return ctx
	}
	return context.WithValue(ctx, pickedEndpointKey{}, w)
}

func pickedEndpointFrom(ctx context.Context) *workloadapi.Workload {
	w, _ := ctx.Value(pickedEndpointKey{}).(*workloadapi.Workload)
	return w
}

func sourceAddrFrom(ctx context.Context) netip.Addr {
	a, _ := ctx.Value(sourceAddrKey{}).(netip.Addr)
	return a
}

// balancer returns the balancer of a service.
func (s *Server) balancer(key string) *lb.Balancer {
	if b, ok := s.balancers.Load(key); ok {
		return b.(*lb.Balancer)
	}
	b, _ := s.balancers.LoadOrStore(key, lb.New(s.cfg.LBPolicy, s.cfg.Outlier, nil))
	return b.(*lb.Balancer)
}

// endpointsOf lists the healthy endpoints of svc for service port port, as
// "ip:targetPort" keys in locality tiers, with a lookup back to the
// workload. Each endpoint's address is of the family of dst, the address
// the client used (proxy.PickAddr), when it has one.
func (s *Server) endpointsOf(svc *workloadapi.Service, port uint16, dst netip.Addr) ([][]string, map[string]endpoint) {
	s.demandEndpoints(svc)
	key := discovery.ServiceKey(svc.Namespace, svc.Hostname)
	type candidate struct {
		key string
		w   *workloadapi.Workload
	}
	var eps []candidate
	addrs := map[string]endpoint{}
	for _, ep := range s.cfg.State.Endpoints(key) {
		if ep == nil || !proxy.Eligible(svc, ep) {
			continue
		}
		ip, ok := proxy.PickAddr(ep.GetAddresses(), dst, svc.GetIpFamilies())
		if !ok && ep.GetHostname() != "" {
			var err error
			if ip, err = s.router.EndpointAddr(ep, dst, svc.GetIpFamilies()); err != nil {
				s.log.Info("endpoint did not resolve", "endpoint", ep.GetHostname(), "err", err.Error())
				continue
			}
			ok = true
		}
		if !ok {
			continue
		}
		ap := netip.AddrPortFrom(ip, targetPort(svc, key, ep, port))
		k := ap.String()
		eps = append(eps, candidate{k, ep})
		addrs[k] = endpoint{ap, ep}
	}
	var tiers [][]string
	for _, t := range lb.Tiers(svc.GetLoadBalancing(), s.self(), eps, func(c candidate) *workloadapi.Workload { return c.w }) {
		keys := make([]string, len(t))
		for i, c := range t {
			keys[i] = c.key
		}
		tiers = append(tiers, keys)
	}
	return tiers, addrs
}

// endpoint is a service endpoint picked for a connection: its address
// (resolved for one known by hostname) and its workload, which names it in
// metrics and logs: an address may also be another workload's (a
// ServiceEntry host that resolves to a mesh workload's address).
type endpoint struct {
	addr netip.AddrPort
	w    *workloadapi.Workload
}

// self is this proxy's own workload, whose locality is the client's in
// locality-aware endpoint choice (nil when unknown: no preference).
func (s *Server) self() *workloadapi.Workload {
	if s.cfg.PodUID == "" {
		return nil
	}
	return s.cfg.State.WorkloadByUID(s.cfg.PodUID)
}

func targetPort(svc *workloadapi.Service, key string, ep *workloadapi.Workload, port uint16) uint16 {
	if pl, ok := ep.GetServices()[key]; ok {
		for _, p := range pl.GetPorts() {
			if p.GetServicePort() == uint32(port) && p.GetTargetPort() != 0 {
				return uint16(p.GetTargetPort())
			}
		}
	}
	for _, p := range svc.GetPorts() {
		if p.GetServicePort() == uint32(port) && p.GetTargetPort() != 0 {
			return uint16(p.GetTargetPort())
		}
	}
	return port
}

// policyTarget says which policies bind to a destination, root being the
// mesh root namespace.
func (s *Server) policyTarget(dst destination, root string) authz.Target {
	t := authz.Target{
		WaypointName: s.cfg.Name, WaypointNamespace: s.cfg.Namespace,
		RootNamespace: root, SelectedBy: map[string]bool{},
	}
	add := func(w *workloadapi.Workload) {
		for _, p := range w.GetAuthorizationPolicies() {
			t.SelectedBy[p] = true
		}
	}
	switch {
	case s.cfg.Sidecar:
		// The sidecar's own pod: its namespace's and root's policies and
		// those selecting it; targetRefs name gateways, waypoints and
		// services, which Istio's sidecars do not enforce.
		t = authz.Target{Namespace: dst.workload.Namespace, RootNamespace: root, SelectedBy: t.SelectedBy, Sidecar: true}
		add(dst.workload)
	case dst.ingress:
		// The gateway's own namespace and the policies selecting its pods
		// (as for an Istio gateway); targetRefs name its Gateway.
		t.Namespace = s.cfg.Namespace
		add(s.cfg.State.WorkloadByAddr(dst.target.Addr()))
	case dst.service != nil:
		t.Namespace, t.ServiceName = dst.service.Namespace, dst.service.Name
		t.ServiceEntry = !discovery.IsKubernetesServiceHost(dst.service.Name, dst.service.Namespace, dst.service.Hostname)
		for _, ep := range s.cfg.State.Endpoints(discovery.ServiceKey(dst.service.Namespace, dst.service.Hostname)) {
			if ep != nil && s.isMe(ep.GetWaypoint()) {
				add(ep)
			}
		}
	default:
		t.Namespace = dst.workload.Namespace
		add(dst.workload)
	}
	return t
}

// bufferedStream reads through the sniffing reader and keeps half-close.
type bufferedStream struct {
	hbone.Stream
	r *bufio.Reader
}

func (b *bufferedStream) Read(p []byte) (int, error) { return b.r.Read(p) }
