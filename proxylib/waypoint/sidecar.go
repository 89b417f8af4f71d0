package waypoint

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/l7"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/proxyerr"
	"github.com/ambientmesh/ambient/proxylib/route"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

// Sidecar mode (Config.Sidecar): the engine is the L7 of one pod's sidecar,
// as an Envoy sidecar's inbound listener is. The pod's proxy
// (proxylib/proxy) accepts the connection, applies PeerAuthentication and
// the L4 policies, and hands the stream to ServeInbound; here, as for a
// waypoint's pod destination, HTTP requests are authorized one by one
// against the policies selecting the pod (paths, methods, headers,
// principals), recorded with reporter="destination" and forwarded to the
// app; other protocols pass under L4 policy with L7 rules failing closed.
//
// On the pod's outbound the engine is the client side of the mesh for a
// Service without a waypoint that has routes attached (GAMMA): each
// request is routed and load-balanced as the Service's waypoint would do
// it, reported with reporter="source", and sent to the chosen endpoint
// through the proxy (HBONE with the pod's identity). No policy is checked
// there: the destination enforces its own.

var _ proxy.L7 = (*Server)(nil)

type appDialKey struct{}

// ServeInbound implements proxy.L7: it serves one inbound connection to the
// sidecar's own pod until it ends.
func (s *Server) ServeInbound(ctx context.Context, in proxy.L7Inbound, down hbone.Stream) {
	log := s.log.WithValues("peer", in.Peer.String(), "target", in.Target.String())
	if !s.cfg.Sidecar || in.Workload == nil || in.Dial == nil {
		log.Info("inbound connection refused: not a sidecar's L7 engine or no destination")
		return
	}
	if err := s.awaitDiscovery(ctx); err != nil {
		log.Info("inbound connection refused", "reason", proxyerr.NotReady, "err", err.Error())
		return
	}
	h := in.Header
	if h == nil {
		h = http.Header{}
	}
	req := &hbone.Request{Peer: in.Peer, PeerAddr: in.PeerAddr, Target: in.Target, Header: h}
	c := newConnInfo(s, req, destination{target: in.Target, workload: in.Workload})
	c.plaintext = in.Peer.IsZero()
	s.serveStream(context.WithValue(ctx, appDialKey{}, in.Dial), log, c, down)
}

// RoutesService implements proxy.L7: whether routes are attached to svc.
func (s *Server) RoutesService(svc *workloadapi.Service) bool {
	cfg := s.l7.Load()
	return s.cfg.Sidecar && cfg != nil && cfg.routes.HasRoutes(route.ServiceKey{Namespace: svc.GetNamespace(), Name: svc.GetName()})
}

// ServeOutbound implements proxy.L7: it routes the requests of one
// outbound connection of the sidecar's pod to a Service until it ends.
func (s *Server) ServeOutbound(ctx context.Context, out proxy.L7Outbound, down hbone.Stream) {
	log := s.log.WithValues("target", out.Target.String(), "direction", "outbound")
	if !s.cfg.Sidecar || out.Service == nil || out.Dial == nil {
		log.Info("outbound connection refused: not a sidecar's L7 engine or no service")
		return
	}
	c := &connInfo{s: s, peer: hbone.Request{Peer: out.Source, Target: out.Target}, outbound: true,
		dst: destination{target: out.Target, service: out.Service}, srcIP: out.SourceAddr, srcWL: out.SourceWorkload}
	c.source = telemetry.PeerOf(out.SourceWorkload, &out.Source)
	c.fwd = l7.Forwarding{ClientIP: out.SourceAddr}
	c.current()
	s.serveStream(context.WithValue(ctx, appDialKey{}, out.Dial), log, c, down)
}

// demandEndpoints looks up svc's endpoints when discovery is scoped (a
// sidecar's): a route may send to a backend Service the pod's own
// connection never named. Best effort: without them the pick finds no
// healthy upstream (503).
func (s *Server) demandEndpoints(svc *workloadapi.Service) {
	if s.cfg.Demand == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ConnectTimeout)
	defer cancel()
	key := discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())
	if err := s.cfg.Demand(ctx, key); err != nil {
		s.log.Info("looking up a backend's endpoints failed", "service", key, "err", err.Error())
	}
}

// inboundService is the Service a request to the sidecar's own pod was
// for, for destination_service (as Istio's sidecar reports the inbound
// cluster's service): the pod's Service whose hostname the Host header
// names, else its only Service; nil when that is ambiguous.
func (s *Server) inboundService(w *workloadapi.Workload, host string) *workloadapi.Service {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	var only *workloadapi.Service
	for key := range w.GetServices() {
		svc := s.cfg.State.ServiceByKey(key)
		if svc == nil {
			continue
		}
		if h := svc.GetHostname(); host == h || host == svc.GetName() || host == svc.GetName()+"."+svc.GetNamespace() {
			return svc
		}
		if len(w.GetServices()) == 1 {
			only = svc
		}
	}
	return only
}

// dialFromContext connects through the pod's proxy: to the app (inbound)
// or to an endpoint (outbound), with the dialer ServeInbound or
// ServeOutbound put in ctx.
func dialFromContext(ctx context.Context, ep netip.AddrPort) (net.Conn, error) {
	d, _ := ctx.Value(appDialKey{}).(func(context.Context, netip.AddrPort) (net.Conn, error))
	if d == nil {
		return nil, proxyerr.Wrap(proxyerr.UpstreamConnectFailed, errors.New("no dialer"), "dial %s", ep)
	}
	return d(ctx, ep)
}

// reporter is the reporter label of a request: a sidecar's client side
// reports as the source.
func (c *connInfo) reporter() string {
	if c.outbound {
		return ReporterSource
	}
	return c.s.reporter
}

// upstream is the connection pool of a request: a sidecar's outbound
// requests have their own, so a pod calling itself through a Service
// never reuses a connection its inbound side opened to the app.
func (c *connInfo) upstream() *l7.Upstream {
	if c.outbound {
		return c.s.clientUpstream
	}
	return c.s.upstream
}

// securityPolicy is the connection_security_policy of a request: a
// sidecar's plaintext caller (PERMISSIVE) is "none", as Istio reports.
func (c *connInfo) securityPolicy() string {
	if c.outbound {
		return telemetry.MutualTLS
	}
	if c.plaintext {
		return "none"
	}
	return telemetry.MutualTLS
}

// SidecarConfig configures a sidecar's L7 engine.
type SidecarConfig struct {
	// Pod and Namespace name the sidecar's pod; Identity is its identity.
	Pod, Namespace string
	Identity       identity.Identity
	State          *discovery.State
	// Registry receives istio_requests_* (the proxy's istio_tcp_* are
	// its own).
	Registry prometheus.Registerer
	// Demand looks up the endpoints of route backends the sidecar's scoped
	// discovery does not hold yet (boot.Proxy.Demand).
	Demand func(ctx context.Context, names ...string) error
	// PodUID is the pod's workload uid (locality-aware choice, Config.PodUID).
	PodUID string
	Log    logr.Logger
}

// NewSidecar builds the L7 engine of a sidecar (Config.Sidecar), for its
// proxy's SetL7.
func NewSidecar(c SidecarConfig) (*Server, error) {
	// No RootNamespace: the control plane's Mesh resource names it.
	return New(Config{Name: c.Pod, Namespace: c.Namespace, Identity: c.Identity,
		State: c.State, Registry: c.Registry, TCPMetrics: telemetry.NewMetrics(nil), Sidecar: true, Demand: c.Demand, PodUID: c.PodUID, Log: c.Log})
}
