// Command manager is the ambient mesh operator and control plane: it
// reconciles AmbientMesh and WaypointPolicy resources and serves the mesh's
// admission webhooks (discovery and CA servers are added by their packages).
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/controllers/controlplane"
	"github.com/ambientmesh/ambient/controllers/httpauth"
	"github.com/ambientmesh/ambient/controllers/webhookcert"
	"github.com/ambientmesh/ambient/proxylib/logging"
)

// version is the release; images default to the same tag (-ldflags -X main.version=...).
var version = "dev"

type config struct {
	metricsAddr, probeAddr  string
	metricsSecure           bool
	leaderElect             bool
	operatorNamespace       string
	imageRegistry           string
	ztunnelImage            string
	nodeAgentImage          string
	waypointImage           string
	sidecarImage            string
	enableWebhooks          bool
	webhookPort             int
	webhookCertDir          string
	webhookSelfSigned       bool
	webhookService          string
	webhookConfigName       string
	injectorConfigName      string
	webhookSecret           string
	controlPlane            bool
	meshNamespace           string
	logLevel                string
	logDevelopment          bool
	managerPodLabelSelector string
	leaseDuration           time.Duration
	renewDeadline           time.Duration
	retryPeriod             time.Duration
	xdsAddr, caAddr         string
	debugAddr               string
}

func parseFlags() *config {
	c := &config{}
	ns := os.Getenv("POD_NAMESPACE")
	if ns == "" {
		ns = "ambient-system"
	}
	flag.StringVar(&c.metricsAddr, "metrics-bind-address", ":8443", "Prometheus metrics address (\"0\" disables)")
	flag.BoolVar(&c.metricsSecure, "metrics-secure", true, "serve metrics over HTTPS to callers whose RBAC grants GET /metrics (TokenReview + SubjectAccessReview); false serves plain HTTP to anyone")
	flag.StringVar(&c.probeAddr, "health-probe-bind-address", ":8081", "health (/healthz) and readiness (/readyz) probe address")
	flag.BoolVar(&c.leaderElect, "leader-elect", false, "elect a leader so only one replica reconciles and writes (every replica serves discovery, the CA and the webhooks)")
	flag.DurationVar(&c.leaseDuration, "leader-elect-lease-duration", 15*time.Second, "how long a follower waits after the leader's last renewal before taking over (a killed leader's successor starts writing after at most this)")
	flag.DurationVar(&c.renewDeadline, "leader-elect-renew-deadline", 10*time.Second, "how long the leader retries renewing before it gives up leading")
	flag.DurationVar(&c.retryPeriod, "leader-elect-retry-period", 2*time.Second, "how often candidates try to acquire or renew the Lease")
	flag.StringVar(&c.operatorNamespace, "operator-namespace", ns, "namespace the manager runs in (defaults to $POD_NAMESPACE)")
	flag.StringVar(&c.imageRegistry, "image-registry", "ambient", "registry/prefix of the default component images")
	flag.StringVar(&c.ztunnelImage, "ztunnel-image", "", "default ztunnel image (default <registry>/ztunnel:<version>)")
	flag.StringVar(&c.nodeAgentImage, "node-agent-image", "", "node agent / CNI image (default <registry>/ambient-cni:<version>)")
	flag.StringVar(&c.waypointImage, "waypoint-image", "", "default waypoint image (default <registry>/waypoint:<version>)")
	flag.StringVar(&c.sidecarImage, "sidecar-image", "", "injected sidecar image, also its init container (default <registry>/sidecar:<version>)")
	flag.BoolVar(&c.enableWebhooks, "enable-webhooks", true, "serve the validating admission webhooks")
	flag.IntVar(&c.webhookPort, "webhook-port", 9443, "webhook server port")
	flag.StringVar(&c.webhookCertDir, "webhook-cert-dir", "/tmp/k8s-webhook-server/serving-certs", "directory holding tls.crt/tls.key for the webhook server")
	flag.BoolVar(&c.webhookSelfSigned, "webhook-self-signed", true, "issue the webhook certificate ourselves and inject its CA (disable when OLM or cert-manager provides it)")
	flag.StringVar(&c.webhookService, "webhook-service", "ambient-webhook-service", "webhook Service name (for the self-signed certificate)")
	flag.StringVar(&c.webhookConfigName, "webhook-config", "ambient-validating-webhook-configuration", "ValidatingWebhookConfiguration to inject the CA into")
	flag.StringVar(&c.injectorConfigName, "injector-webhook-config", "ambient-sidecar-injector", "MutatingWebhookConfiguration of the sidecar injector to inject the CA into (\"\" for none)")
	flag.StringVar(&c.webhookSecret, "webhook-secret", "ambient-webhook-server-cert", "Secret holding the self-signed webhook certificate")
	flag.StringVar(&c.managerPodLabelSelector, "manager-pod-labels", "app.kubernetes.io/name=ambient-manager", "labels of the manager pods, selected by the ambient-controlplane Service")
	flag.BoolVar(&c.controlPlane, "controlplane", true, "serve discovery, the CA and debug")
	flag.StringVar(&c.xdsAddr, "xds-address", ":15010", "discovery (delta xDS) listen address")
	flag.StringVar(&c.caAddr, "ca-address", ":15012", "CA (CreateCertificate) listen address")
	flag.StringVar(&c.debugAddr, "debug-address", ":15014", "control-plane debug listen address")
	flag.StringVar(&c.meshNamespace, "mesh-namespace", "ambient-system", "mesh namespace the control plane assumes until an AmbientMesh names one")
	flag.StringVar(&c.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	flag.BoolVar(&c.logDevelopment, "log-development", false, "human-readable console logs")
	flag.Parse()
	image := func(flagValue, name string) string {
		return componentImage(flagValue, name, c.imageRegistry, version, os.Getenv)
	}
	c.ztunnelImage = image(c.ztunnelImage, "ztunnel")
	c.nodeAgentImage = image(c.nodeAgentImage, "ambient-cni")
	c.waypointImage = image(c.waypointImage, "waypoint")
	c.sidecarImage = image(c.sidecarImage, "sidecar")
	return c
}

// componentImage is a component's default image: the flag when set, else
// RELATED_IMAGE_<NAME> (a release pins it to a digest; OLM rewrites it to
// the mirror's under disconnected mirroring), else
// <registry>/<name>:<version>.
func componentImage(flagValue, name, registry, version string, getenv func(string) string) string {
	if flagValue != "" {
		return flagValue
	}
	if env := getenv(controllers.RelatedImageEnv(name)); env != "" {
		return env
	}
	return fmt.Sprintf("%s/%s:%s", registry, name, version)
}

func newLogger(c *config) (*zap.Logger, error) {
	level, err := logging.ParseLevel(c.logLevel)
	if err != nil {
		return nil, err
	}
	zc := zap.NewProductionConfig()
	if c.logDevelopment {
		zc = zap.NewDevelopmentConfig()
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	return zc.Build()
}

func parseLabels(s string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(kv), "="); ok {
			out[k] = v
		}
	}
	return out
}

func main() {
	c := parseFlags()
	zl, err := newLogger(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log := zapr.NewLogger(zl)
	ctrl.SetLogger(log)
	if err := run(ctrl.SetupSignalHandler(), c); err != nil {
		log.Error(err, "manager failed")
		os.Exit(1)
	}
}

// metricsOptions: by default metrics are served like kube-controller-manager
// serves its own, over TLS with a self-signed certificate, to callers the
// API server authenticates and RBAC authorizes (config/rbac's metrics
// reader role). HTTP/2 is off on this port (Rapid Reset, CVE-2023-44487).
func metricsOptions(c *config) metricsserver.Options {
	o := metricsserver.Options{BindAddress: c.metricsAddr}
	if c.metricsSecure {
		o.SecureServing = true
		o.FilterProvider = httpauth.FilterProvider
		o.TLSOpts = []func(*tls.Config){func(cfg *tls.Config) { cfg.NextProtos = []string{"http/1.1"} }}
	}
	return o
}

func run(ctx context.Context, c *config) error {
	log := ctrl.Log.WithName("setup")
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := meshv1.AddToScheme(scheme); err != nil {
		return err
	}
	restConfig, err := ctrl.GetConfig()
	if err != nil {
		return err
	}
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsOptions(c),
		HealthProbeBindAddress: c.probeAddr,
		LeaderElection:         c.leaderElect,
		LeaderElectionID:       "ambient-operator.mesh.ambient.dev",
		// The Lease lives next to the manager (also when run outside a
		// cluster, where there is no service-account namespace file).
		LeaderElectionNamespace: c.operatorNamespace,
		LeaseDuration:           &c.leaseDuration,
		RenewDeadline:           &c.renewDeadline,
		RetryPeriod:             &c.retryPeriod,
		// Release the Lease on shutdown so a successor takes over at once.
		LeaderElectionReleaseOnCancel: true,
		Cache:                         controllers.CacheOptions(),
		NewCache:                      controllers.NewCache,
		Client:                        controllers.ClientOptions(),
		WebhookServer:                 webhook.NewServer(webhook.Options{Port: c.webhookPort, CertDir: c.webhookCertDir}),
	})
	if err != nil {
		return fmt.Errorf("create manager: %w", err)
	}
	if c.enableWebhooks && c.webhookSelfSigned {
		if err := setupWebhookCert(ctx, mgr, c); err != nil {
			return err
		}
	}
	err = controllers.Setup(mgr, controllers.Options{
		Defaults: controllers.Defaults{
			ZtunnelImage:      c.ztunnelImage,
			NodeAgentImage:    c.nodeAgentImage,
			WaypointImage:     c.waypointImage,
			SidecarImage:      c.sidecarImage,
			OperatorNamespace: c.operatorNamespace,
			ManagerPodLabels:  parseLabels(c.managerPodLabelSelector),
		},
		EnableWebhooks: c.enableWebhooks,
	})
	if err != nil {
		return fmt.Errorf("set up controllers: %w", err)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return err
	}
	// Readiness puts the replica behind the webhook and control-plane
	// Services; it never depends on leadership (followers serve too).
	ready := healthz.Ping
	if c.enableWebhooks {
		ready = mgr.GetWebhookServer().StartedChecker()
	}
	if err := mgr.AddReadyzCheck("webhooks", ready); err != nil {
		return err
	}
	if c.controlPlane {
		cp, err := controlplane.SetupWithManager(mgr, controlplane.Options{
			Namespace:  c.meshNamespace,
			XDSAddress: c.xdsAddr, CAAddress: c.caAddr, DebugAddress: c.debugAddr,
			ServiceName: controllers.ControlPlaneService,
			Log:         ctrl.Log.WithName("controlplane"),
		})
		if err != nil {
			return fmt.Errorf("set up control plane: %w", err)
		}
		if err := mgr.AddReadyzCheck("controlplane", cp.Ready); err != nil {
			return err
		}
	}
	log.Info("starting manager", "version", version, "namespace", c.operatorNamespace, "ztunnelImage", c.ztunnelImage)
	go func() {
		select {
		case <-mgr.Elected():
			// Which replica writes (kubectl logs tells the replicas apart).
			log.Info("elected leader: reconciling and writing")
		case <-ctx.Done():
		}
	}()
	return mgr.Start(ctx)
}

// setupWebhookCert issues the webhook certificate before the webhook server
// starts (it needs the files) and keeps it current afterwards.
func setupWebhookCert(ctx context.Context, mgr ctrl.Manager, c *config) error {
	direct, err := client.New(mgr.GetConfig(), client.Options{Scheme: mgr.GetScheme()})
	if err != nil {
		return err
	}
	wc := &webhookcert.Manager{
		Client: direct, Namespace: c.operatorNamespace, SecretName: c.webhookSecret,
		ServiceName: c.webhookService, WebhookConfigName: c.webhookConfigName, MutatingWebhookConfigName: c.injectorConfigName,
		CertDir: c.webhookCertDir, Log: ctrl.Log.WithName("webhook-cert"),
	}
	if err := wc.Ensure(ctx); err != nil {
		return fmt.Errorf("webhook certificate: %w", err)
	}
	return mgr.Add(wc)
}
