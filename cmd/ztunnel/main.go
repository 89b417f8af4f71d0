// Command ztunnel is the per-node L4 proxy: it learns workloads, services
// and policies from the control plane (delta xDS), gets certificates from
// the mesh CA, receives captured pods' network namespaces from the node
// agent (ZDS over a unix socket), and serves the L4 data path inside each
// pod (proxylib/proxy). This file is wiring only.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
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
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/identity/trustbundle"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/logging"
	"github.com/ambientmesh/ambient/proxylib/proxy"
	"github.com/ambientmesh/ambient/proxylib/telemetry"
)

type options struct {
	node, podName, podNamespace, cluster string
	xdsAddr, xdsServerName               string
	caAddr, caServerName                 string
	tokenPath, rootCertPath              string
	trustDomain, transport               string
	zdsSocket                            string
	adminAddr, metricsAddr, readyAddr    string
	drainGrace, certTTL                  time.Duration
	logLevel                             string
}

// parseFlags reads the flags in args, defaulting each from its environment
// variable in e (the operator's contract, docs/interfaces.md).
func parseFlags(fs *flag.FlagSet, args []string, e *envconfig.Env) (options, error) {
	var o options
	env := e.Get
	ns := env("POD_NAMESPACE", "ambient-system")
	fs.StringVar(&o.node, "node-name", env("NODE_NAME", ""), "this node's name (env NODE_NAME)")
	fs.StringVar(&o.podName, "pod-name", env("POD_NAME", "ztunnel"), "env POD_NAME")
	fs.StringVar(&o.podNamespace, "pod-namespace", ns, "env POD_NAMESPACE")
	fs.StringVar(&o.cluster, "cluster-id", env("CLUSTER_ID", "Kubernetes"), "env CLUSTER_ID")
	fs.StringVar(&o.xdsAddr, "xds-address", env("XDS_ADDRESS", "ambient-controlplane."+ns+".svc:15010"), "discovery server (env XDS_ADDRESS)")
	fs.StringVar(&o.xdsServerName, "xds-server-name", env("XDS_SERVER_NAME", "ambient-controlplane."+ns+".svc"), "TLS server name of the discovery server")
	fs.StringVar(&o.caAddr, "ca-address", env("CA_ADDRESS", "ambient-controlplane."+ns+".svc:15012"), "CA server (env CA_ADDRESS)")
	fs.StringVar(&o.caServerName, "ca-server-name", env("CA_SERVER_NAME", "ambient-controlplane."+ns+".svc"), "TLS server name of the CA")
	fs.StringVar(&o.tokenPath, "token-path", env("TOKEN_PATH", "/var/run/secrets/tokens/ambient-token"), "projected SA token (audience ambient-mesh)")
	fs.StringVar(&o.rootCertPath, "root-cert", env("ROOT_CERT", "/var/run/secrets/ambient/root-cert.pem"), "mesh trust bundle (PEM)")
	fs.StringVar(&o.trustDomain, "trust-domain", env("TRUST_DOMAIN", "cluster.local"), "SPIFFE trust domain")
	fs.StringVar(&o.transport, "transport", env("HBONE_TRANSPORT", "HTTP2"), "HBONE transport: HTTP2 or HTTP3")
	fs.StringVar(&o.zdsSocket, "zds-socket", env("ZDS_SOCKET", "/var/run/ambient/ztunnel.sock"), "node agent socket")
	fs.StringVar(&o.adminAddr, "admin-address", "127.0.0.1:15000", "admin endpoint")
	fs.StringVar(&o.metricsAddr, "metrics-address", ":15020", "Prometheus metrics")
	fs.StringVar(&o.readyAddr, "ready-address", ":15021", "readiness (/healthz/ready)")
	ttl, err := time.ParseDuration(env("WORKLOAD_CERT_TTL", "24h"))
	if err != nil {
		return o, fmt.Errorf("bad WORKLOAD_CERT_TTL: %w", err)
	}
	fs.DurationVar(&o.certTTL, "workload-cert-ttl", ttl, "requested workload certificate lifetime (env WORKLOAD_CERT_TTL)")
	grace, err := time.ParseDuration(env("DRAIN_GRACE", "25s"))
	if err != nil || grace < 0 {
		return o, fmt.Errorf("bad DRAIN_GRACE %q: want a Go duration such as 25s", env("DRAIN_GRACE", ""))
	}
	fs.DurationVar(&o.drainGrace, "drain-grace", grace, "time open connections get after SIGTERM, shorter than the pod's terminationGracePeriodSeconds (env DRAIN_GRACE)")
	fs.StringVar(&o.logLevel, "log-level", env("LOG_LEVEL", "info"), "trace|debug|info|warn|error")
	return o, fs.Parse(args)
}

func main() {
	o, err := parseFlags(flag.CommandLine, os.Args[1:], envconfig.New(nil))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log, level, err := newLogger(o.logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bad -log-level:", err)
		os.Exit(2)
	}
	if err := run(o, log, level); err != nil {
		log.Error(err, "ztunnel failed")
		os.Exit(1)
	}
}

// newLogger is ztunnel's console logger at level name.
func newLogger(name string) (logr.Logger, zap.AtomicLevel, error) {
	level, err := logging.NewAtomicLevel(name)
	if err != nil {
		return logr.Logger{}, level, err
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	zl := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(os.Stderr), level))
	return zapr.NewLogger(zl), level, nil
}

func run(o options, log logr.Logger, level zap.AtomicLevel) error {
	if o.node == "" {
		return errors.New("NODE_NAME is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	bundle, err := trustbundle.Load(o.rootCertPath)
	if err != nil {
		return err
	}
	token := func() (string, error) {
		b, err := os.ReadFile(o.tokenPath)
		return strings.TrimSpace(string(b)), err
	}
	caClient, err := caclient.New(caclient.Config{Address: o.caAddr, Token: token,
		TLS: bundle.ClientTLS(o.caServerName)})
	if err != nil {
		return err
	}
	store, err := identity.NewStore(identity.StoreConfig{Client: caClient, TrustDomain: o.trustDomain, Roots: bundle.Pool(), TTL: o.certTTL, Log: log.WithName("certs")})
	if err != nil {
		return err
	}
	defer store.Close()
	// Root rotation: new handshakes verify against the bundle of now.
	go bundle.Watch(ctx, trustbundle.DefaultInterval, log.WithName("trust-bundle"), store.SetRoots)

	state := discovery.NewState(discovery.AddressType, discovery.AuthorizationType)
	xds := discovery.NewClient(discovery.ClientConfig{Address: o.xdsAddr, Token: token, Log: log.WithName("xds"),
		TLS:  bundle.ClientTLS(o.xdsServerName),
		Node: discovery.NodeInfo{NodeName: o.node, PodName: o.podName, PodNamespace: o.podNamespace, Role: discovery.RoleZtunnel}}, state)
	go xds.Run(ctx)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	tr, err := meshtransport.New(meshtransport.ForPods(meshtransport.Config{Protocol: hbone.Protocol(o.transport),
		Certs: store, Log: log.WithName("hbone"), Registerer: reg}))
	if err != nil {
		return err
	}
	h := &certsFirst{store: store, trustDomain: o.trustDomain}
	p, err := proxy.New(proxy.Config{Log: log.WithName("proxy"), State: state, Certs: store, Node: o.node, TrustDomain: o.trustDomain,
		Metrics: telemetry.NewMetrics(reg), NewDialer: tr.NewDialer, NewHBONEServer: tr.NewServer, CertsReady: h.ready})
	if err != nil {
		return err
	}
	h.proxy = p
	// The node agent stays connected while we drain, so a pod deleted
	// meanwhile is still released here.
	zdsCtx, stopZDS := context.WithCancel(context.Background())
	defer stopZDS()
	zds := inpod.NewServer(o.zdsSocket, h, log.WithName("zds"))
	go func() {
		if err := zds.ListenAndServe(zdsCtx); err != nil && zdsCtx.Err() == nil {
			log.Error(err, "node agent socket stopped")
		}
	}()

	serve(log, o.adminAddr, admin.Handler(admin.Config{State: state, Certificates: store.Status, Roots: bundle.Certs,
		SetLogLevel: func(l string) error { return logging.SetLevel(level, l) }}))
	serve(log, o.metricsAddr, admin.MetricsHandler(reg))
	serve(log, o.readyAddr, admin.ReadinessHandler(func() bool { return p.Ready() && p.SnapshotReceived() && !p.Draining() }))
	log.Info("ztunnel started", "node", o.node, "transport", o.transport)

	<-ctx.Done()
	drain(log, p, o.drainGrace)
	return nil
}

// drain is the SIGTERM path. During an upgrade the new ztunnel already
// listens on every pod's ports (SO_REUSEPORT): closing ours at once sends
// all new connections there, while ours run on until they end or the grace
// period (shorter than terminationGracePeriodSeconds) is over.
func drain(log logr.Logger, p *proxy.Proxy, grace time.Duration) {
	log.Info("draining: in-pod listeners closed, open connections continue", "grace", grace.String(), "open", p.Tracker().Len())
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if p.Drain(ctx) {
		log.Info("drained: every connection ended")
	} else {
		log.Info("drain grace elapsed; remaining connections closed")
	}
}

// certsFirst fetches a pod's certificate before serving it, and reports
// certificates ready when every served pod has one.
type certsFirst struct {
	proxy       *proxy.Proxy
	store       *identity.Store
	trustDomain string
	checked     atomic.Int64 // unix nanos of the last positive check
}

func (c *certsFirst) AddWorkload(uid string, info inpod.WorkloadInfo, ns *os.File) error {
	sa := info.ServiceAccount
	if sa == "" {
		sa = "default"
	}
	if err := c.store.Prefetch(identity.Identity{TrustDomain: c.trustDomain, Namespace: info.Namespace, ServiceAccount: sa}); err != nil {
		return err
	}
	return c.proxy.AddWorkload(uid, info, ns)
}

func (c *certsFirst) DelWorkload(uid string) error { return c.proxy.DelWorkload(uid) }
func (c *certsFirst) SnapshotDone()                { c.proxy.SnapshotDone() }

// ready is asked on every connection; a positive answer is reused for a
// second (the store never serves an expired certificate anyway).
func (c *certsFirst) ready() bool {
	now := time.Now().UnixNano()
	if now-c.checked.Load() < int64(time.Second) {
		return true
	}
	for _, st := range c.store.Status() {
		if st.Serial == "" {
			return false
		}
	}
	c.checked.Store(now)
	return true
}

func serve(log logr.Logger, addr string, h http.Handler) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Error(err, "listen", "addr", addr)
		return
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
}
