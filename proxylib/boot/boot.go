// Package boot is what the in-pod proxies' processes (ztunnel, which serves
// every captured pod of its node, and the sidecar, which serves its own pod)
// start with: the mesh settings they read from the operator's environment,
// a logger, the trust bundle, a certificate store fed by the mesh CA, the
// discovery client, the in-pod data path (proxylib/proxy) over the mesh's
// HBONE transport, the admin, metrics and readiness endpoints, and the
// drain on SIGTERM. The commands are wiring over it.
package boot

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/zapr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/ambientmesh/ambient/proxylib/admin"
	"github.com/ambientmesh/ambient/proxylib/caclient"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/dnsproxy"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/handover"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/identity/trustbundle"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/logging"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
	"github.com/ambientmesh/ambient/proxylib/workerthreads"
)

// Options are the settings every in-pod proxy reads (docs/interfaces.md).
type Options struct {
	Node, PodName, PodNamespace, Cluster string
	XDSAddr, XDSServerName               string
	CAAddr, CAServerName                 string
	TokenPath, RootCertPath              string
	TrustDomain, Transport               string
	AdminAddr, MetricsAddr, ReadyAddr    string
	DrainGrace, CertTTL                  time.Duration
	LogLevel                             string
	// WorkerThreads is the most scheduler threads (GOMAXPROCS) the proxy
	// uses; it runs on one and adds threads while busy (workerthreads).
	WorkerThreads int
	// DNS, when set, enables the DNS proxy for pods whose DNS the node
	// agent captures (ztunnel only; the commands set it).
	DNS *DNSOptions
	// FullDiscovery makes a ztunnel subscribe to every address instead of
	// its node's scope plus on-demand lookups.
	FullDiscovery bool
	// HandoverSocket, when set, enables connection hand-over across an
	// upgrade (ztunnel only; proxylib/handover): resumable sessions, taking
	// connections over on this unix socket, handing ours over on SIGTERM.
	HandoverSocket string
}

// DNSOptions configure ztunnel's DNS proxy.
type DNSOptions struct {
	// ClusterDomain builds service hostnames (env CLUSTER_DOMAIN).
	ClusterDomain string
	// ResolvConf names the resolvers used for pods whose own resolvers the
	// node agent did not find (ztunnel's own /etc/resolv.conf).
	ResolvConf string
}

// Flags registers the options on fs, each defaulting from its environment
// variable in e; defaultPodName is POD_NAME's default. The control plane's
// addresses default to the pod's own namespace (ztunnel runs in the mesh
// namespace; the operator sets them on every other proxy).
func Flags(fs *flag.FlagSet, e *envconfig.Env, defaultPodName string) (*Options, error) {
	o := &Options{}
	env := e.Get
	ns := env("POD_NAMESPACE", "ambient-system")
	cp := "ambient-controlplane." + ns + ".svc"
	fs.StringVar(&o.Node, "node-name", env("NODE_NAME", ""), "this node's name (env NODE_NAME)")
	fs.StringVar(&o.PodName, "pod-name", env("POD_NAME", defaultPodName), "env POD_NAME")
	fs.StringVar(&o.PodNamespace, "pod-namespace", ns, "env POD_NAMESPACE")
	// Every address by default, as Istio's ztunnel: the seeds' proxy-config
	// view lists all workloads. -full-discovery=false opts into the node scope.
	fs.BoolVar(&o.FullDiscovery, "full-discovery", true, "ztunnel: receive every address (false: the node's scope plus on-demand lookups)")
	fs.StringVar(&o.Cluster, "cluster-id", env("CLUSTER_ID", "Kubernetes"), "env CLUSTER_ID")
	fs.StringVar(&o.XDSAddr, "xds-address", env("XDS_ADDRESS", cp+":15010"), "discovery server (env XDS_ADDRESS)")
	fs.StringVar(&o.XDSServerName, "xds-server-name", env("XDS_SERVER_NAME", cp), "TLS server name of the discovery server")
	fs.StringVar(&o.CAAddr, "ca-address", env("CA_ADDRESS", cp+":15012"), "CA server (env CA_ADDRESS)")
	fs.StringVar(&o.CAServerName, "ca-server-name", env("CA_SERVER_NAME", cp), "TLS server name of the CA")
	fs.StringVar(&o.TokenPath, "token-path", env("TOKEN_PATH", "/var/run/secrets/tokens/ambient-token"), "projected SA token (audience ambient-mesh)")
	fs.StringVar(&o.RootCertPath, "root-cert", env("ROOT_CERT", "/var/run/secrets/ambient/root-cert.pem"), "mesh trust bundle (PEM)")
	fs.StringVar(&o.TrustDomain, "trust-domain", env("TRUST_DOMAIN", "cluster.local"), "SPIFFE trust domain")
	fs.StringVar(&o.Transport, "transport", env("HBONE_TRANSPORT", "HTTP2"), "HBONE transport: HTTP2 or HTTP3")
	fs.StringVar(&o.AdminAddr, "admin-address", "127.0.0.1:15000", "admin endpoint")
	fs.StringVar(&o.MetricsAddr, "metrics-address", ":15020", "Prometheus metrics")
	fs.StringVar(&o.ReadyAddr, "ready-address", ":15021", "readiness (/healthz/ready)")
	ttl, err := time.ParseDuration(env("WORKLOAD_CERT_TTL", "0s"))
	if err != nil || ttl < 0 {
		return o, fmt.Errorf("bad WORKLOAD_CERT_TTL %q: want a Go duration such as 6h (0: the mesh CA's workloadCertTTL)", env("WORKLOAD_CERT_TTL", ""))
	}
	fs.DurationVar(&o.CertTTL, "workload-cert-ttl", ttl, "requested workload certificate lifetime, capped by the mesh CA; 0 takes the CA's spec.ca.workloadCertTTL (env WORKLOAD_CERT_TTL)")
	grace, err := time.ParseDuration(env("DRAIN_GRACE", "25s"))
	if err != nil || grace < 0 {
		return o, fmt.Errorf("bad DRAIN_GRACE %q: want a Go duration such as 25s", env("DRAIN_GRACE", ""))
	}
	fs.DurationVar(&o.DrainGrace, "drain-grace", grace, "time open connections get after SIGTERM, shorter than the pod's terminationGracePeriodSeconds (env DRAIN_GRACE)")
	fs.StringVar(&o.LogLevel, "log-level", env("LOG_LEVEL", "info"), "trace|debug|info|warn|error")
	return o, WorkerThreadsFlag(fs, e, &o.WorkerThreads)
}

// WorkerThreadsFlag registers -worker-threads (env WORKER_THREADS, default
// 2 as Istio's ZTUNNEL_WORKER_THREADS) into p.
func WorkerThreadsFlag(fs *flag.FlagSet, e *envconfig.Env, p *int) error {
	v := e.Get("WORKER_THREADS", "2")
	threads, err := strconv.Atoi(v)
	if err != nil || threads < 1 {
		return fmt.Errorf("bad WORKER_THREADS %q: want a whole number of threads, at least 1", v)
	}
	fs.IntVar(p, "worker-threads", threads, "most threads running Go code at once; one while one is enough (env WORKER_THREADS)")
	return nil
}

// NewLogger is the proxies' console logger at level name.
func NewLogger(name string) (logr.Logger, zap.AtomicLevel, error) {
	level, err := logging.NewAtomicLevel(name)
	if err != nil {
		return logr.Logger{}, level, err
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	zl := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(os.Stderr), level))
	return zapr.NewLogger(zl), level, nil
}

// Proxy is a running in-pod proxy and what it was built from.
type Proxy struct {
	*proxy.Proxy
	Opts    *Options
	Log     logr.Logger
	Bundle  *trustbundle.Bundle
	Store   *identity.Store
	State   *discovery.State
	Metrics *prometheus.Registry
	// Handler takes pods: it fetches a pod's certificate before serving it.
	Handler *CertsFirst
	// Demand looks up what the proxy's scope lacks (nil: everything is
	// pushed).
	Demand func(ctx context.Context, names ...string) error
	// handover takes connections from a draining predecessor (nil: off).
	handover *handover.Listener
}

// Mesh is a proxy's link to the control plane: the trust bundle (watched
// for root rotation), a certificate store fed by the CA, and the discovery
// State a delta-xDS client keeps up to date.
type Mesh struct {
	Bundle *trustbundle.Bundle
	Store  *identity.Store
	State  *discovery.State
	// Demand looks up addresses on demand (ztunnels; a no-op for others).
	Demand func(ctx context.Context, names ...string) error
}

// Connect starts the mesh link for a proxy of role subscribed to types
// (default: addresses and authorizations). Background work runs until ctx
// ends; the caller closes Store.
func Connect(ctx context.Context, o *Options, log logr.Logger, role string, types ...string) (*Mesh, error) {
	if len(types) == 0 {
		types = []string{discovery.AddressType, discovery.AuthorizationType}
	}
	bundle, err := trustbundle.Load(o.RootCertPath)
	if err != nil {
		return nil, err
	}
	token := func() (string, error) {
		b, err := os.ReadFile(o.TokenPath)
		return strings.TrimSpace(string(b)), err
	}
	caClient, err := caclient.New(caclient.Config{Address: o.CAAddr, Token: token, TLS: bundle.ClientTLS(o.CAServerName)})
	if err != nil {
		return nil, err
	}
	store, err := identity.NewStore(identity.StoreConfig{Client: caClient, TrustDomain: o.TrustDomain, Roots: bundle.Pool(), TTL: o.CertTTL, Log: log.WithName("certs")})
	if err != nil {
		return nil, err
	}
	// Root rotation: new handshakes verify against the bundle of now.
	go bundle.Watch(ctx, trustbundle.DefaultInterval, log.WithName("trust-bundle"), store.SetRoots)
	state := discovery.NewState(types...)
	xds := discovery.NewClient(discovery.ClientConfig{Address: o.XDSAddr, Token: token, Log: log.WithName("xds"),
		TLS: bundle.ClientTLS(o.XDSServerName), TypeURLs: types,
		Node:     discovery.NodeInfo{NodeName: o.Node, PodName: o.PodName, PodNamespace: o.PodNamespace, Role: role},
		OnDemand: onDemand(role, o)}, state)
	go xds.Run(ctx)
	return &Mesh{Bundle: bundle, Store: store, State: state, Demand: xds.Demand}, nil
}

// onDemand says whether a proxy subscribes to its scope and looks up the
// rest: a ztunnel when -full-discovery=false, a sidecar always (its scope:
// every service, its own workload, waypoints; the endpoints of what its
// pod calls are looked up, as Istio's default Sidecar scope holds every
// service but a sidecar needs few workloads).
func onDemand(role string, o *Options) bool {
	return role == discovery.RoleSidecar || role == discovery.RoleZtunnel && !o.FullDiscovery
}

// Start connects to the mesh (CA, trust bundle, discovery as role) and
// builds the data path; unprivileged is proxy.Config.Unprivileged (the
// sidecar). Background work runs until ctx ends; Close releases the rest.
func Start(ctx context.Context, o *Options, log logr.Logger, role string, unprivileged bool) (*Proxy, error) {
	AdaptWorkerThreads(ctx, o.WorkerThreads, log)
	var types []string
	if role == discovery.RoleSidecar {
		types = discovery.SidecarTypes
	}
	m, err := Connect(ctx, o, log, role, types...)
	if err != nil {
		return nil, err
	}
	store, state, bundle := m.Store, m.State, m.Bundle
	demand := m.Demand
	if !onDemand(role, o) {
		demand = nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(RuntimeCollectors()...)
	tcfg := meshtransport.Config{Protocol: hbone.Protocol(o.Transport), Certs: store, Log: log.WithName("hbone"), Registerer: reg}
	if unprivileged {
		tcfg = meshtransport.ForSidecar(tcfg)
	} else {
		tcfg = meshtransport.ForPods(tcfg)
	}
	tr, err := meshtransport.New(tcfg)
	if err != nil {
		store.Close()
		return nil, err
	}
	h := &CertsFirst{store: store, trustDomain: o.TrustDomain}
	var dns *dnsproxy.Proxy
	if o.DNS != nil {
		ups, err := dnsproxy.ResolvConf(o.DNS.ResolvConf)
		if err != nil {
			log.Info("DNS proxy has no default upstream (pods whose resolvers are unknown get SERVFAIL for names it cannot answer)", "resolvConf", o.DNS.ResolvConf, "err", err.Error())
		}
		if dns, err = dnsproxy.New(dnsproxy.Config{Services: state, ClusterDomain: o.DNS.ClusterDomain, Upstreams: ups,
			Metrics: dnsproxy.NewMetrics(reg), Log: log.WithName("dns")}); err != nil {
			store.Close()
			return nil, err
		}
	}
	var sessions *handover.Registry
	var hln *handover.Listener
	if o.HandoverSocket != "" {
		sessions = handover.NewRegistry(0)
		if hln, err = handover.Listen(o.HandoverSocket, log.WithName("handover")); err != nil {
			store.Close()
			return nil, err
		}
	}
	p, err := proxy.New(proxy.Config{Log: log.WithName("proxy"), State: state, Certs: store, Node: o.Node, TrustDomain: o.TrustDomain,
		Metrics: telemetry.NewMetrics(reg), NewDialer: tr.NewDialer, NewHBONEServer: tr.NewServer, CertsReady: h.ready,
		Unprivileged: unprivileged, DNS: dns, Demand: demand, Handover: sessions})
	if err != nil {
		store.Close()
		if hln != nil {
			hln.Close()
		}
		return nil, err
	}
	h.proxy = p
	if hln != nil {
		go hln.Serve(p.TakeOver)
	}
	return &Proxy{Proxy: p, Opts: o, Log: log, Bundle: bundle, Store: store, State: state, Metrics: reg, Handler: h, Demand: demand, handover: hln}, nil
}

// AdaptWorkerThreads sizes GOMAXPROCS to the load, up to limit and the
// runtime's own default (the container's CPU limit), until ctx ends. A
// GOMAXPROCS set in the environment is obeyed as it is.
func AdaptWorkerThreads(ctx context.Context, limit int, log logr.Logger) {
	if v := os.Getenv("GOMAXPROCS"); v != "" {
		log.Info("GOMAXPROCS set in the environment: worker threads fixed", "GOMAXPROCS", v)
		return
	}
	limit = min(limit, runtime.GOMAXPROCS(0))
	go workerthreads.Run(ctx, limit, log.WithName("worker-threads"))
}

// RuntimeCollectors are the Go runtime and process metrics every proxy
// exports besides its traffic metrics (go_*, process_cpu_seconds_total,
// process_resident_memory_bytes, ...).
func RuntimeCollectors() []prometheus.Collector {
	return []prometheus.Collector{collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}
}

// Close releases the certificate store.
func (p *Proxy) Close() { p.Store.Close() }

// ServeEndpoints serves admin, metrics and readiness (ready when discovery
// synced, certificates are there, extra reports true and no drain started).
// A non-nil appHealth serves /app-health/ beside the metrics (the status
// port, as Istio's pilot-agent: a sidecar's rewritten app probes).
func (p *Proxy) ServeEndpoints(level zap.AtomicLevel, extra func() bool, appHealth http.Handler) {
	Serve(p.Log, p.Opts.AdminAddr, admin.Handler(admin.Config{State: p.State, Certificates: p.Store.Status, Roots: p.Bundle.Certs, DNS: p.DNSStatus,
		SetLogLevel: func(l string) error { return logging.SetLevel(level, l) }}))
	status := admin.MetricsHandler(p.Metrics)
	if appHealth != nil {
		mux := http.NewServeMux()
		mux.Handle("/", status)
		mux.Handle("/app-health/", appHealth)
		status = mux
	}
	Serve(p.Log, p.Opts.MetricsAddr, status)
	Serve(p.Log, p.Opts.ReadyAddr, admin.ReadinessHandler(func() bool { return p.Ready() && extra() && !p.Draining() }))
}

// Drain is the SIGTERM path. During a ztunnel upgrade the new instance
// already listens on every pod's ports (SO_REUSEPORT): closing ours at once
// sends all new connections there, while ours run on until they end or the
// grace period (shorter than terminationGracePeriodSeconds) is over.
func (p *Proxy) Drain(grace time.Duration) {
	p.Log.Info("draining: in-pod listeners closed, open connections continue", "grace", grace.String(), "open", p.Tracker().Len())
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	p.StopAccepting()
	if p.handover != nil {
		p.handOver(ctx)
	}
	if p.Proxy.Drain(ctx) {
		p.Log.Info("drained: every connection ended")
	} else {
		p.Log.Info("drain grace elapsed; remaining connections closed")
	}
}

// handOver passes our resumable connections to the newest ztunnel on the
// node (the one whose socket file is at the path now); ours is closed first,
// so without a newer one nothing is handed over.
func (p *Proxy) handOver(ctx context.Context) {
	p.handover.Close()
	c, err := handover.DialSocket(ctx, p.Opts.HandoverSocket)
	if err != nil {
		p.Log.Info("no newer ztunnel takes connections over; they drain", "err", err.Error())
		return
	}
	defer c.Close()
	handed, kept := p.HandOver(ctx, c)
	p.Log.Info("connection hand-over done", "handedOver", handed, "kept", kept)
}

// CertsFirst fetches a pod's certificate before serving it, and reports
// certificates ready when every served pod has one.
type CertsFirst struct {
	proxy       *proxy.Proxy
	store       *identity.Store
	trustDomain string
}

var _ inpod.WorkloadHandler = (*CertsFirst)(nil)

// AddWorkload implements inpod.WorkloadHandler.
func (c *CertsFirst) AddWorkload(uid string, info inpod.WorkloadInfo, ns *os.File) error {
	sa := info.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	if err := c.store.Prefetch(identity.Identity{TrustDomain: c.trustDomain, Namespace: info.Namespace, ServiceAccount: sa}); err != nil {
		return err
	}
	return c.proxy.AddWorkload(uid, info, ns)
}

// DelWorkload implements inpod.WorkloadHandler.
func (c *CertsFirst) DelWorkload(uid string) error { return c.proxy.DelWorkload(uid) }

// SnapshotDone implements inpod.WorkloadHandler.
func (c *CertsFirst) SnapshotDone() { c.proxy.SnapshotDone() }

// ready backs the readiness probe; connections wait for the certificate
// they need instead.
func (c *CertsFirst) ready() bool {
	for _, st := range c.store.Status() {
		if st.Serial == "" {
			return false
		}
	}
	return true
}

// Serve serves h on addr in the background; a listen error is logged.
func Serve(log logr.Logger, addr string, h http.Handler) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error(err, "listen", "addr", addr)
		return
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
}

// Main is a proxy command's main: it parses the flags of os.Args (defaults
// from the environment), makes the logger at the parsed level and runs;
// exit status 2 for bad flags, 1 when run fails.
func Main[O any](name string, parse func(*flag.FlagSet, []string, *envconfig.Env) (O, error), logLevel func(O) string,
	run func(O, logr.Logger, zap.AtomicLevel) error) {
	o, err := parse(flag.CommandLine, os.Args[1:], envconfig.New(nil))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log, level, err := NewLogger(logLevel(o))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad -log-level:", err)
		os.Exit(2)
	}
	if err := run(o, log, level); err != nil {
		log.Error(err, name+" failed")
		os.Exit(1)
	}
}
