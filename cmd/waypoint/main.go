// Command waypoint is the mesh's L7 proxy. As a waypoint (the default):
// HBONE only on :15008 (mTLS, verified SPIFFE peers). With -role ingress
// (PROXY_ROLE=ingress) it is the ingress gateway of Gateway WAYPOINT_NAME:
// plain listeners from the Gateway's listeners, onward to the mesh over
// HBONE with its own identity (one image, as Istio's proxy serves both).
// Configuration comes from the control plane (workload discovery plus L7
// resources: Gateway, HTTPRoute, GRPCRoute, AuthorizationPolicy),
// certificates from the mesh CA. The behaviour lives in proxylib/waypoint
// and proxylib/gateway; this file is wiring only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/ambientmesh/ambient/proxylib/admin"
	"github.com/ambientmesh/ambient/proxylib/boot"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/gateway"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/lb"
	"github.com/ambientmesh/ambient/proxylib/logging"
	"github.com/ambientmesh/ambient/proxylib/waypoint"
)

// The roles of the L7 proxy.
const roleWaypoint, roleIngress = "waypoint", "ingress"

type options struct {
	name, podName, namespace, serviceAccount, node string
	cluster                                        string
	trustDomain, clusterDomain, rootNamespace      string
	xdsAddr, xdsServerName, caAddr, caServerName   string
	tokenPath, rootCertPath                        string
	listen, adminAddr, metricsAddr, readyAddr      string
	lbPolicy, logLevel, transport, role            string
	certDir                                        string
	tracing                                        bool
	drainGrace, drainDelay, certTTL                time.Duration
	workerThreads                                  int
}

func hostOf(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return h
}

// parseFlags reads the flags in args, defaulting each from its environment
// variable in env (the operator's contract, docs/interfaces.md).
func parseFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (options, error) {
	var o options
	env := e.Get
	fs.StringVar(&o.role, "role", env("PROXY_ROLE", roleWaypoint), "waypoint, or ingress: the ingress gateway of Gateway -name (env PROXY_ROLE)")
	fs.StringVar(&o.certDir, "gateway-cert-dir", env("GATEWAY_CERT_DIR", "/etc/ambient/gateway-certs"), "ingress: HTTPS listeners' certificates, <secret>/tls.crt and tls.key (env GATEWAY_CERT_DIR)")
	fs.StringVar(&o.name, "name", env("WAYPOINT_NAME", ""), "waypoint name: its Gateway/WaypointPolicy and Service (env WAYPOINT_NAME)")
	fs.StringVar(&o.podName, "pod-name", env("POD_NAME", "waypoint"), "env POD_NAME")
	fs.StringVar(&o.namespace, "namespace", env("POD_NAMESPACE", ""), "env POD_NAMESPACE")
	fs.StringVar(&o.serviceAccount, "service-account", env("SERVICE_ACCOUNT", ""), "own service account (default: the waypoint name)")
	fs.StringVar(&o.node, "node-name", env("NODE_NAME", ""), "env NODE_NAME")
	fs.StringVar(&o.cluster, "cluster-id", env("CLUSTER_ID", "Kubernetes"), "cluster of this pod's workload uid (env CLUSTER_ID)")
	fs.StringVar(&o.trustDomain, "trust-domain", env("TRUST_DOMAIN", "cluster.local"), "SPIFFE trust domain")
	fs.StringVar(&o.clusterDomain, "cluster-domain", env("CLUSTER_DOMAIN", "cluster.local"), "Kubernetes cluster domain")
	fs.StringVar(&o.rootNamespace, "root-namespace", env("ROOT_NAMESPACE", ""), "mesh root namespace: its policies are mesh-wide (required; the operator sets the mesh namespace)")
	fs.StringVar(&o.xdsAddr, "xds-address", env("XDS_ADDRESS", ""), "discovery server host:port")
	fs.StringVar(&o.xdsServerName, "xds-server-name", env("XDS_SERVER_NAME", ""), "TLS name of the discovery server (default: host of -xds-address)")
	fs.StringVar(&o.caAddr, "ca-address", env("CA_ADDRESS", ""), "CA server host:port")
	fs.StringVar(&o.caServerName, "ca-server-name", env("CA_SERVER_NAME", ""), "TLS name of the CA (default: host of -ca-address)")
	fs.StringVar(&o.tokenPath, "token-path", env("TOKEN_PATH", "/var/run/secrets/tokens/ambient-token"), "projected SA token (audience ambient-mesh)")
	fs.StringVar(&o.rootCertPath, "root-cert", env("ROOT_CERT", "/var/run/secrets/ambient/root-cert.pem"), "mesh trust bundle (PEM)")
	fs.StringVar(&o.listen, "listen", ":15008", "HBONE listener ([host]:15008)")
	fs.StringVar(&o.transport, "transport", env("HBONE_TRANSPORT", "HTTP2"), "HBONE transport: HTTP2, or HTTP3 (also serves and falls back to HTTP/2)")
	fs.StringVar(&o.adminAddr, "admin-address", "127.0.0.1:15000", "admin endpoint")
	fs.StringVar(&o.metricsAddr, "metrics-address", ":15020", "Prometheus metrics")
	fs.StringVar(&o.readyAddr, "ready-address", ":15021", "readiness (/healthz/ready)")
	fs.StringVar(&o.lbPolicy, "lb-policy", env("LB_POLICY", "LEAST_REQUEST"), "ROUND_ROBIN or LEAST_REQUEST")
	fs.BoolVar(&o.tracing, "tracing", env("TRACING", "") == "true", "start a trace (traceparent) for requests without one")
	fs.StringVar(&o.logLevel, "log-level", env("LOG_LEVEL", "info"), "trace|debug|info|warn|error")
	fs.DurationVar(&o.drainGrace, "drain-grace", 30*time.Second, "time after SIGTERM until the remaining tunnels are closed")
	delay, err := time.ParseDuration(env("DRAIN_DELAY", "5s"))
	if err != nil || delay < 0 {
		return o, fmt.Errorf("DRAIN_DELAY %q: want a Go duration such as 5s", env("DRAIN_DELAY", ""))
	}
	fs.DurationVar(&o.drainDelay, "drain-delay", delay, "after SIGTERM, new tunnels are still accepted this long (not ready meanwhile) while clients learn the replica is going (env DRAIN_DELAY)")
	ttl, err := time.ParseDuration(env("WORKLOAD_CERT_TTL", "0s"))
	if err != nil || ttl < 0 {
		return o, fmt.Errorf("WORKLOAD_CERT_TTL %q: want a Go duration such as 6h (0: the mesh CA's workloadCertTTL)", env("WORKLOAD_CERT_TTL", ""))
	}
	fs.DurationVar(&o.certTTL, "workload-cert-ttl", ttl, "requested certificate lifetime, capped by the mesh CA; 0 takes the CA's spec.ca.workloadCertTTL (env WORKLOAD_CERT_TTL)")
	if err := boot.WorkerThreadsFlag(fs, e, &o.workerThreads); err != nil {
		return o, err
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if o.role != roleWaypoint && o.role != roleIngress {
		return o, fmt.Errorf("-role %q: want %s or %s", o.role, roleWaypoint, roleIngress)
	}
	if o.serviceAccount == "" {
		o.serviceAccount = o.name
	}
	if o.xdsServerName == "" {
		o.xdsServerName = hostOf(o.xdsAddr)
	}
	if o.caServerName == "" {
		o.caServerName = hostOf(o.caAddr)
	}
	return o, nil
}

func main() {
	boot.Main("waypoint", parseFlags, func(o options) string { return o.logLevel }, run)
}

var newLogger = boot.NewLogger

func run(o options, log logr.Logger, level zap.AtomicLevel) error {
	if o.name == "" || o.namespace == "" || o.xdsAddr == "" || o.caAddr == "" || o.rootNamespace == "" {
		// No guessed root namespace: one that differs from the control
		// plane's would leave mesh-wide policies enforced nowhere.
		return errors.New("WAYPOINT_NAME, POD_NAMESPACE, XDS_ADDRESS, CA_ADDRESS and ROOT_NAMESPACE are required")
	}
	proto, err := meshtransport.ParseProtocol(o.transport)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	boot.AdaptWorkerThreads(ctx, o.workerThreads, log)
	m, err := boot.Connect(ctx, &boot.Options{Node: o.node, PodName: o.podName, PodNamespace: o.namespace,
		XDSAddr: o.xdsAddr, XDSServerName: o.xdsServerName, CAAddr: o.caAddr, CAServerName: o.caServerName,
		TokenPath: o.tokenPath, RootCertPath: o.rootCertPath, TrustDomain: o.trustDomain, CertTTL: o.certTTL},
		log, discovery.RoleWaypoint, discovery.AddressType, discovery.AuthorizationType, discovery.L7ResourceType)
	if err != nil {
		return err
	}
	store, state := m.Store, m.State
	defer store.Close()
	self := identity.Identity{TrustDomain: o.trustDomain, Namespace: o.namespace, ServiceAccount: o.serviceAccount}
	if err := store.Prefetch(self); err != nil {
		return fmt.Errorf("certificate for %s: %w", self, err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(boot.RuntimeCollectors()...)
	// The mesh's HBONE transport (HBONE_TRANSPORT, from the AmbientMesh or
	// WaypointPolicy): HTTP/2 is always served; with HTTP3, QUIC too, and
	// tunnels onward try HTTP/3 first, falling back as ztunnel does.
	tr, err := meshtransport.New(meshtransport.Config{Protocol: proto, Certs: store, Log: log.WithName("hbone"),
		Registerer: reg, ForbiddenTargets: forbidden(o)})
	if err != nil {
		return err
	}
	dialer, err := tr.NewDialer(nil)
	if err != nil {
		return err
	}
	defer dialer.Close()
	policy := lb.LeastRequest
	if strings.EqualFold(o.lbPolicy, "ROUND_ROBIN") {
		policy = lb.RoundRobin
	}
	wp, err := waypoint.New(waypoint.Config{Name: o.name, Namespace: o.namespace, Identity: self,
		ClusterDomain: o.clusterDomain, RootNamespace: o.rootNamespace, State: state, Dialer: dialer,
		Registry: reg, Tracing: o.tracing, LBPolicy: policy, Log: log, Ingress: o.role == roleIngress,
		PodUID: discovery.PodUID(o.cluster, o.namespace, o.podName)})
	if err != nil {
		return err
	}
	defer wp.Close()
	serveAdmin := func(ready func() bool) {
		boot.Serve(log, o.adminAddr, admin.Handler(admin.Config{State: state, Certificates: store.Status,
			SetLogLevel: func(l string) error { return logging.SetLevel(level, l) }}))
		boot.Serve(log, o.metricsAddr, admin.MetricsHandler(reg))
		boot.Serve(log, o.readyAddr, admin.ReadinessHandler(ready))
	}
	if o.role == roleIngress {
		ls := &gateway.Listeners{Engine: wp, CertDir: o.certDir, Log: log.WithName("listeners")}
		go ls.Run(ctx)
		serveAdmin(func() bool { return state.Ready() && ls.Ready() })
		log.Info("ingress gateway started", "gateway", o.namespace+"/"+o.name, "identity", self.String(), "transport", proto)
		<-ctx.Done()
		return nil
	}
	host, port, err := net.SplitHostPort(o.listen)
	if err != nil || port != strconv.Itoa(hbone.Port) {
		return fmt.Errorf("listen address %q: want [host]:%d, the HBONE port", o.listen, hbone.Port)
	}
	srv, err := tr.NewServer(nil, host, self, wp)
	if err != nil {
		return err
	}
	go func() {
		if err := srv.Serve(); err != nil {
			log.Error(err, "HBONE listener stopped")
		}
		stop()
	}()

	var draining atomic.Bool
	serveAdmin(func() bool { return state.Ready() && !draining.Load() })
	log.Info("waypoint started", "name", o.name, "namespace", o.namespace, "identity", self.String(), "listen", o.listen, "transport", proto)

	<-ctx.Done()
	drain(log, srv, &draining, o.drainDelay, o.drainGrace)
	return nil
}

// drain is the SIGTERM path. Clients keep choosing this replica until the
// control plane tells them its endpoint is terminating (an xDS push after
// the EndpointSlice changes); refusing tunnels at once fails their new
// connections meanwhile. So, as Envoy's drain period in Istio's waypoints:
// report not ready, keep accepting for delay, then stop accepting (GOAWAY)
// and give in-flight tunnels the rest of grace.
func drain(log logr.Logger, srv interface{ Shutdown(context.Context) error }, draining *atomic.Bool, delay, grace time.Duration) {
	draining.Store(true)
	delay = min(delay, grace/2)
	log.Info("draining: still accepting while clients learn the replica is going", "delay", delay.String(), "grace", grace.String())
	time.Sleep(delay)
	dctx, cancel := context.WithTimeout(context.Background(), grace-delay)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Info("drain grace elapsed; remaining tunnels closed")
	}
}

// forbidden: the waypoint's own admin/metrics/readiness ports are never
// CONNECT targets (recursion).
func forbidden(o options) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range []string{o.adminAddr, o.metricsAddr, o.readyAddr} {
		if ap, err := netip.ParseAddrPort(a); err == nil {
			out = append(out, ap)
		}
	}
	return out
}

var _ hbone.Handler = (*waypoint.Server)(nil)
