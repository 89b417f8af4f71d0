package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/zapr"
	"go.uber.org/zap"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/ca"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
)

const meshNS = "ambient-system"

// suite is one real API server with the manager's caches and the control
// plane serving on loopback over TLS.
type suite struct {
	env       *envtest.Environment
	cfg       *rest.Config
	k8s       client.Client
	cs        kubernetes.Interface
	cp        *ControlPlane
	xdsAddr   string
	caAddr    string
	debugAddr string
	root      *x509.Certificate
	roots     *x509.CertPool
	pushes    chan int
	log       logr.Logger
}

var s *suite

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		if _, err := os.Stat("../../bin/k8s/1.36.3/kube-apiserver"); err == nil {
			abs, _ := filepath.Abs("../../bin/k8s/1.36.3")
			os.Setenv("KUBEBUILDER_ASSETS", abs)
		}
	}
	code, err := runSuite(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "suite:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func testScheme() *runtime.Scheme {
	sch := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		clientgoscheme.AddToScheme, meshv1.AddToScheme, securityv1.AddToScheme, networkingv1.AddToScheme, securityv1beta1.AddToScheme, gwv1.Install, gwv1beta1.Install,
	} {
		if err := add(sch); err != nil {
			panic(err)
		}
	}
	return sch
}

func runSuite(m *testing.M) (int, error) {
	zl, _ := zap.NewDevelopment(zap.IncreaseLevel(zap.WarnLevel))
	log := zapr.NewLogger(zl)
	ctrl.SetLogger(log)
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{"../../config/crd/bases", "testdata/crds"},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		return 0, err
	}
	defer func() { _ = env.Stop() }()
	sch := testScheme()
	k8s, err := client.New(cfg, client.Options{Scheme: sch})
	if err != nil {
		return 0, err
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The mesh CA the operator would have written.
	now := time.Now()
	rootCert, rootKey, err := ca.NewSelfSignedRoot("cluster.local", 24*time.Hour, now)
	if err != nil {
		return 0, err
	}
	root := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}
	inter, err := ca.NewIntermediate(root, "cluster.local", 12*time.Hour)
	if err != nil {
		return 0, err
	}
	keyPEM, err := ca.EncodeKey(inter.Key)
	if err != nil {
		return 0, err
	}
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS}}); err != nil {
		return 0, err
	}
	if err := k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "ambient-ca", Namespace: meshNS}, Data: map[string][]byte{
		"ca.crt": ca.EncodeCerts(inter.Cert), "ca.key": keyPEM, "root.crt": ca.EncodeCerts(rootCert),
	}}); err != nil {
		return 0, err
	}

	// The manager's production cache and client settings (trimmed pods,
	// no managedFields, Secrets read from the API server).
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 sch,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  controllers.CacheOptions(),
		NewCache:               controllers.NewCache,
		Client:                 controllers.ClientOptions(),
	})
	if err != nil {
		return 0, err
	}
	listeners := make([]net.Listener, 3)
	for i := range listeners {
		if listeners[i], err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			return 0, err
		}
	}
	// CAReload: an hour, so only the CA Secret watch can deliver a new CA
	// (TestCAFollowsSecretChange).
	opts := Options{Namespace: meshNS, XDSListener: listeners[0], CAListener: listeners[1], DebugListener: listeners[2], Log: log, CAReload: time.Hour}
	cp, err := SetupWithManager(mgr, opts)
	if err != nil {
		return 0, err
	}
	pushes := make(chan int, 1000)
	cp.Discovery.OnPush = func(n int) {
		select {
		case pushes <- n:
		default:
		}
	}
	go func() {
		if err := mgr.Start(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "manager:", err)
		}
	}()
	pool := x509.NewCertPool()
	pool.AddCert(rootCert)
	s = &suite{
		env: env, cfg: cfg, k8s: k8s, cs: cs, cp: cp, root: rootCert, roots: pool, pushes: pushes, log: log,
		xdsAddr: listeners[0].Addr().String(), caAddr: listeners[1].Addr().String(), debugAddr: listeners[2].Addr().String(),
	}
	return m.Run(), nil
}

func (s *suite) clientTLS() *tls.Config {
	return &tls.Config{RootCAs: s.roots, ServerName: "ambient-controlplane." + meshNS + ".svc", MinVersion: tls.VersionTLS13}
}

func ensureNamespace(t *testing.T, name string, labels map[string]string) {
	t.Helper()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if err := s.k8s.Create(context.Background(), ns); err != nil && !isAlreadyExists(err) {
		t.Fatal(err)
	}
}

func ensureServiceAccount(t *testing.T, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	if err := s.k8s.Create(context.Background(), sa); err != nil {
		if !isAlreadyExists(err) {
			t.Fatal(err)
		}
		if err := s.k8s.Get(context.Background(), client.ObjectKeyFromObject(sa), sa); err != nil {
			t.Fatal(err)
		}
	}
	return sa
}

type podSpec struct {
	ns, name, node, sa, ip string
	labels, annotations    map[string]string
	hostNetwork            bool
	notReady               bool
	namedPort              string
	namedPortNumber        int32
	// sidecar: the pod as the injector leaves it (status annotation, tunnel
	// label, native istio-proxy sidecar container).
	sidecar bool
}

// createPod creates a pod and sets its status as a kubelet would.
func createPod(t *testing.T, p podSpec) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	if p.sa == "" {
		p.sa = "default"
	}
	ensureServiceAccount(t, p.ns, p.sa)
	c := corev1.Container{Name: "app", Image: "app"}
	if p.namedPort != "" {
		c.Ports = []corev1.ContainerPort{{Name: p.namedPort, ContainerPort: p.namedPortNumber}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns, Labels: p.labels, Annotations: p.annotations},
		Spec: corev1.PodSpec{NodeName: p.node, ServiceAccountName: p.sa, HostNetwork: p.hostNetwork,
			Containers: []corev1.Container{c}},
	}
	if p.sidecar {
		if pod.Labels == nil {
			pod.Labels = map[string]string{}
		}
		if pod.Annotations == nil {
			pod.Annotations = map[string]string{}
		}
		pod.Labels["networking.istio.io/tunnel"] = "http"
		pod.Annotations["sidecar.istio.io/status"] = `{"initContainers":["istio-init","istio-proxy"]}`
		always := corev1.ContainerRestartPolicyAlways
		pod.Spec.InitContainers = []corev1.Container{{Name: "istio-proxy", Image: "sidecar", RestartPolicy: &always}}
	}
	if err := s.k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	setPodStatus(t, pod, p.ip, !p.notReady)
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), pod, client.GracePeriodSeconds(0)) })
	return pod
}

func setPodStatus(t *testing.T, pod *corev1.Pod, ip string, ready bool) {
	t.Helper()
	cond := corev1.ConditionFalse
	if ready {
		cond = corev1.ConditionTrue
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: cond}}}
	if err := s.k8s.Status().Update(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
}

// token issues a projected service-account token bound to pod.
func token(t *testing.T, pod *corev1.Pod, audience string) string {
	t.Helper()
	exp := int64(3600)
	tr, err := s.cs.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(context.Background(), pod.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{
			Audiences: []string{audience}, ExpirationSeconds: &exp,
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// ztunnel creates a ztunnel pod on node and returns it.
func ztunnel(t *testing.T, name, node, ip string) *corev1.Pod {
	return createPod(t, podSpec{ns: meshNS, name: name, node: node, sa: "ztunnel", ip: ip})
}

// startClient runs our real discovery client with tok and returns its state.
func startClient(t *testing.T, tok string, pod string, role string, types ...string) *xds.State {
	t.Helper()
	if len(types) == 0 {
		types = []string{xds.AddressType, xds.AuthorizationType}
	}
	state := xds.NewState(types...)
	c := xds.NewClient(xds.ClientConfig{
		Address: s.xdsAddr, TLS: s.clientTLS(), Token: func() (string, error) { return tok, nil },
		Node:     xds.NodeInfo{NodeName: "node-a", PodName: pod, PodNamespace: meshNS, Role: role},
		TypeURLs: types, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Log: s.log,
	}, state)
	runClient(t, c)
	return state
}

// runClient runs c until the test ends.
func runClient(t *testing.T, c *xds.Client) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func isAlreadyExists(err error) bool {
	return client.IgnoreAlreadyExists(err) == nil
}

// createWaypointPod creates what the operator and Kubernetes' controllers
// make of waypoint name: its Deployment (with the operator's waypoint
// label), a ReplicaSet it controls, and a pod that ReplicaSet controls,
// running as the waypoint's service account. envtest runs no controllers,
// so the test writes each object itself.
func createWaypointPod(t *testing.T, ns, name, node, ip string) *corev1.Pod {
	t.Helper()
	return createL7ProxyPod(t, ns, name, name, node, ip)
}

// createL7ProxyPod creates a pod of the operator's Deployment account (its
// service account too) for the L7 proxy of Gateway name: a waypoint's
// account is its name, an ingress gateway's <name>-istio.
func createL7ProxyPod(t *testing.T, ns, name, account, node, ip string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	labels := map[string]string{"gateway.networking.k8s.io/gateway-name": name}
	tmpl := corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
		Spec: corev1.PodSpec{ServiceAccountName: account, Containers: []corev1.Container{{Name: "waypoint", Image: "waypoint"}}}}
	name = account
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns,
		Labels: map[string]string{"gateway.istio.io/managed": "istio.io-mesh-controller"}},
		Spec: appsv1.DeploymentSpec{Selector: &metav1.LabelSelector{MatchLabels: labels}, Template: tmpl}}
	if err := s.k8s.Create(ctx, dep); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), dep) })
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: name + "-5d8f", Namespace: ns,
		OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(dep, appsv1.SchemeGroupVersion.WithKind("Deployment"))}},
		Spec: appsv1.ReplicaSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels}, Template: tmpl}}
	if err := s.k8s.Create(ctx, rs); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), rs) })
	ensureServiceAccount(t, ns, name)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name + "-5d8f-x1", Namespace: ns, Labels: labels,
		OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(rs, appsv1.SchemeGroupVersion.WithKind("ReplicaSet"))}},
		Spec: tmpl.Spec}
	pod.Spec.NodeName = node
	if err := s.k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	setPodStatus(t, pod, ip, true)
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), pod, client.GracePeriodSeconds(0)) })
	return pod
}
