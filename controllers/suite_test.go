package controllers

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// The suite runs one real kube-apiserver + etcd (envtest) and one manager
// with every controller and webhook, as in production. Tests run one after
// another: there is one AmbientMesh per cluster.
var (
	k8s        client.Client // direct client (no cache), admin
	restConfig *rest.Config
	testScheme = runtime.NewScheme()
	suiteCtx   context.Context
)

const (
	testRetryInterval  = 500 * time.Millisecond
	testReleaseTimeout = 4 * time.Second
	operatorNamespace  = "ambient-operator"
)

var testDefaults = Defaults{
	ZtunnelImage:      "ambient/ztunnel:test",
	NodeAgentImage:    "ambient/ambient-cni:test",
	WaypointImage:     "ambient/waypoint:test",
	SidecarImage:      "ambient/sidecar:test",
	OperatorNamespace: operatorNamespace,
	ManagerPodLabels:  map[string]string{"app.kubernetes.io/name": "ambient-manager"},
}

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run 'make envtest' and use 'make test' (or export KUBEBUILDER_ASSETS=$PWD/bin/k8s/<version>)")
		os.Exit(1)
	}
	flag.Parse()
	if fuzzing() {
		os.Exit(m.Run()) // fuzz targets are pure; workers must not each start an API server
	}
	os.Exit(runSuite(m))
}

// fuzzing reports whether this process runs fuzz targets (or is a fuzz worker).
func fuzzing() bool {
	for _, name := range []string{"test.fuzz", "test.fuzzworker"} {
		if f := flag.Lookup(name); f != nil && f.Value.String() != "" && f.Value.String() != "false" {
			return true
		}
	}
	return false
}

func runSuite(m *testing.M) int {
	zl, _ := zap.NewDevelopment()
	if os.Getenv("TEST_VERBOSE_LOGS") == "" {
		zl = zap.NewNop()
	}
	logf.SetLogger(zapr.NewLogger(zl))
	must(clientgoscheme.AddToScheme(testScheme))
	must(meshv1.AddToScheme(testScheme))
	must(gwv1.Install(testScheme))
	must(gwv1beta1.Install(testScheme))

	gatewayCRDs, err := gatewayAPICRDs()
	must(err)
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "config", "crd", "bases"), gatewayCRDs},
		ErrorIfCRDPathMissing: true,
		WebhookInstallOptions: envtest.WebhookInstallOptions{Paths: []string{filepath.Join("..", "config", "webhook", "manifests.yaml"),
			filepath.Join("..", "config", "webhook", "sidecar_injector.yaml")}},
	}
	// Stop even when Start fails half-way, so no API server is left behind.
	defer func() { _ = env.Stop() }()
	cfg, err := env.Start()
	must(err)
	restConfig = cfg
	k8s, err = client.New(cfg, client.Options{Scheme: testScheme})
	must(err)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	suiteCtx = ctx
	wo := env.WebhookInstallOptions
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:   testScheme,
		Metrics:  metricsserver.Options{BindAddress: "0"},
		Cache:    CacheOptions(),
		NewCache: NewCache,
		Client:   ClientOptions(),
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: wo.LocalServingHost, Port: wo.LocalServingPort, CertDir: wo.LocalServingCertDir,
		}),
	})
	must(err)
	must(Setup(mgr, Options{
		Defaults: testDefaults, RetryInterval: testRetryInterval, ReleaseTimeout: testReleaseTimeout, EnableWebhooks: true,
	}))
	must(k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: operatorNamespace}}))
	go func() {
		if err := mgr.Start(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "manager stopped:", err)
		}
	}()
	if !mgr.GetCache().WaitForCacheSync(ctx) {
		panic("cache did not sync")
	}
	return m.Run()
}

// gatewayAPICRDs is the standard-channel CRD directory of the Gateway API
// module in go.mod (so the Gateway waypoint path runs against real CRDs).
func gatewayAPICRDs() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/gateway-api").Output()
	if err != nil {
		return "", fmt.Errorf("locating the gateway-api module: %w", err)
	}
	return filepath.Join(strings.TrimSpace(string(out)), "config", "crd", "standard"), nil
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}
