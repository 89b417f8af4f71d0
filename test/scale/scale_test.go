//go:build scale

// Package scale runs the control plane against a simulated cluster: a real
// kube-apiserver and etcd (the envtest binaries), the manager's informers
// and control plane with its production cache options, kwok (built from the
// Go module proxy into bin/kwok by `make scale`) making fake nodes and their
// pods Running with addresses, and one real node-scoped delta-xDS client
// per node (discovery.Client over TLS with a projected token bound to that
// node's ztunnel pod), as that node's ztunnel.
//
//	make scale    # SCALE_NODES=10 SCALE_PODS_PER_NODE=20 (the smoke, as CI runs it)
//	make scale SCALE_TEST=TestScaleScenarios SCALE_NODES=1000 SCALE_PODS_PER_NODE=10 \
//	    SCALE_OUT=/tmp/scale.jsonl   # the scenarios of issue 14 (scenarios_test.go)
package scale

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/controllers/controlplane"
	"github.com/ambientmesh/ambient/proxylib/ca"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
)

const (
	meshNS = "ambient-system"
	appNS  = "scale"
	// kwok manages the nodes carrying this annotation.
	kwokAnnotation = "kwok.x-k8s.io/node"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// kwokModule is kwok's module in the module cache (KWOK_VERSION, as the
// Makefile pins it).
func kwokModule(t *testing.T) string {
	version := os.Getenv("KWOK_VERSION")
	if version == "" {
		version = "v0.8.0"
	}
	out, err := exec.Command("go", "env", "GOMODCACHE").Output()
	must(t, err)
	return filepath.Join(strings.TrimSpace(string(out)), "sigs.k8s.io", "kwok@"+version)
}

// cluster is the simulated cluster and the control plane under test.
type cluster struct {
	k8s         client.Client
	cs          kubernetes.Interface
	cfg         *rest.Config
	sch         *k8sruntime.Scheme
	cp          *controlplane.ControlPlane
	xdsAddr     string
	tls         *tls.Config
	pushed      *atomic.Int64 // bytes written by the xDS server, across restarts
	accepted    *atomic.Int64 // connections the xDS server accepted, across restarts
	stopManager func()
	beforeStart func() // called by startManager just before the manager starts
}

func startCluster(t *testing.T, ctx context.Context) *cluster {
	t.Helper()
	kwok, err := filepath.Abs("../../bin/kwok")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(kwok); err != nil {
		t.Skip("bin/kwok missing: run `make scale` (builds it from the Go module proxy)")
	}
	ctrl.SetLogger(logr.Discard())
	env := &envtest.Environment{CRDDirectoryPaths: []string{"../../config/crd/bases", "../../controllers/controlplane/testdata/crds"}, ErrorIfCRDPathMissing: true}
	// Bursts of creates (64 at a time) and 1,000 watchers and TokenReviews
	// at once: raise the in-flight limits from 400/200 so the API server
	// queues rather than answers 429.
	env.ControlPlane.GetAPIServer().Configure().
		Set("max-requests-inflight", "3000").Set("max-mutating-requests-inflight", "1000")
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	cfg.QPS, cfg.Burst = 5000, 10000
	sch := k8sruntime.NewScheme()
	_ = clientgoscheme.AddToScheme(sch)
	_ = meshv1.AddToScheme(sch)
	_ = securityv1.AddToScheme(sch)
	k8s, err := client.New(cfg, client.Options{Scheme: sch})
	if err != nil {
		t.Fatal(err)
	}

	// kwok, as a cluster admin of this API server.
	user, err := env.ControlPlane.AddUser(envtest.User{Name: "kwok", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	kcPath := filepath.Join(t.TempDir(), "kwok.kubeconfig")
	must(t, os.WriteFile(kcPath, kc, 0o600))
	args := []string{"--kubeconfig", kcPath, "--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector", kwokAnnotation + "=fake", "--cidr", "10.64.0.1/12", "--node-ip", "10.250.0.1",
		"--server-address", "127.0.0.1:0",
		// No node leases: nothing here reads them, and 1,000 nodes renewing
		// every 10 s are 100 writes/s the API server and etcd would spend
		// beside the scenario's.
		"--node-lease-duration-seconds", "0"}
	// kwok's "fast" stages (nodes Ready at once, pods Running with an
	// address), from the module make scale installed kwok from.
	for _, f := range []string{"node/fast/node-initialize.yaml", "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml"} {
		args = append(args, "--config", filepath.Join(kwokModule(t), "kustomize/stage", f))
	}
	cmd := exec.CommandContext(ctx, kwok, args...)
	logf, err := os.Create(filepath.Join(t.TempDir(), "kwok.log"))
	must(t, err)
	cmd.Stdout, cmd.Stderr = logf, logf
	must(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); logf.Close() })

	rootCert, rootKey, _ := ca.NewSelfSignedRoot("cluster.local", 24*time.Hour, time.Now())
	inter, _ := ca.NewIntermediate(&ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}, "cluster.local", 12*time.Hour)
	keyPEM, _ := ca.EncodeKey(inter.Key)
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS}}))
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: appNS, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}))
	must(t, k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "ambient-ca", Namespace: meshNS},
		Data: map[string][]byte{"ca.crt": ca.EncodeCerts(inter.Cert), "ca.key": keyPEM, "root.crt": ca.EncodeCerts(rootCert)}}))
	must(t, k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel", Namespace: meshNS}}))
	must(t, k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: appNS}}))

	pool := x509.NewCertPool()
	pool.AddCert(rootCert)
	c := &cluster{k8s: k8s, cs: kubernetes.NewForConfigOrDie(cfg), cfg: cfg, sch: sch, pushed: &atomic.Int64{}, accepted: &atomic.Int64{},
		tls: &tls.Config{RootCAs: pool, ServerName: "ambient-controlplane." + meshNS + ".svc", MinVersion: tls.VersionTLS13}}
	c.stopManager = c.startManager(t, ctx, "127.0.0.1:0")
	t.Cleanup(func() { c.stopManager() })
	return c
}

// startManager runs the manager's informers and control plane with the
// production cache options, its xDS server on addr; the returned func
// stops it and waits until it has.
func (c *cluster) startManager(t *testing.T, ctx context.Context, addr string) func() {
	t.Helper()
	mgr, err := ctrl.NewManager(c.cfg, ctrl.Options{Scheme: c.sch, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0",
		Logger: logr.Discard(), Cache: controllers.CacheOptions(), NewCache: controllers.NewCache, Client: controllers.ClientOptions()})
	must(t, err)
	var lis net.Listener
	if c.xdsAddr == "" { // the first start picks the port
		l, err := net.Listen("tcp", addr)
		must(t, err)
		c.xdsAddr = l.Addr().String()
		lis = l
	} else {
		lis = &lateListener{addr: c.xdsAddr}
	}
	cp, err := controlplane.SetupWithManager(mgr, controlplane.Options{Namespace: meshNS, XDSListener: countingListener{lis, c.pushed, c.accepted}, Log: logr.Discard()})
	must(t, err)
	c.cp = cp
	if c.beforeStart != nil {
		c.beforeStart()
	}
	mctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = mgr.Start(mctx) }()
	eventually(t, 5*time.Minute, "control plane synced", cp.Discovery.Synced)
	var once sync.Once
	return func() { once.Do(func() { cancel(); <-done }) }
}

// lateListener binds addr when the control plane first accepts on it. The
// manager binds its xDS port when the control plane starts, after its
// informers synced; bound earlier (here, to keep the clients' address), the
// port would queue every proxy's connection through the sync instead of
// refusing it.
type lateListener struct {
	addr string
	once sync.Once
	l    net.Listener
	err  error
}

func (l *lateListener) bind() (net.Listener, error) {
	l.once.Do(func() { l.l, l.err = net.Listen("tcp", l.addr) })
	return l.l, l.err
}

func (l *lateListener) Accept() (net.Conn, error) {
	lis, err := l.bind()
	if err != nil {
		return nil, err
	}
	return lis.Accept()
}

func (l *lateListener) Close() error {
	lis, err := l.bind()
	if err != nil {
		return err
	}
	return lis.Close()
}

func (l *lateListener) Addr() net.Addr {
	a, _ := net.ResolveTCPAddr("tcp", l.addr)
	return a
}

// countingListener counts the bytes the xDS server writes (TLS records
// included): what the control plane pushes to its clients.
type countingListener struct {
	net.Listener
	n, accepted *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.accepted.Add(1)
	return countingConn{c, l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// addNode creates a kwok node and its ztunnel pod, and connects that
// ztunnel's node-scoped discovery client.
func (c *cluster) addNode(t *testing.T, ctx context.Context, name string) (*xds.Client, *xds.State) {
	t.Helper()
	c.createNode(t, ctx, name)
	return c.connect(t, ctx, name)
}

// createNode creates a kwok node and its ztunnel pod.
func (c *cluster) createNode(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	must(t, c.k8s.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{kwokAnnotation: "fake"},
		Labels: map[string]string{"type": "kwok"}}}))
	zt := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel-" + name, Namespace: meshNS},
		Spec: corev1.PodSpec{NodeName: name, ServiceAccountName: "ztunnel", Containers: []corev1.Container{{Name: "ztunnel", Image: "ztunnel"}}}}
	must(t, c.k8s.Create(ctx, zt))
}

// connect starts the node-scoped discovery client of node's ztunnel, with a
// token bound to its pod; it runs until ctx ends.
func (c *cluster) connect(t *testing.T, ctx context.Context, name string) (*xds.Client, *xds.State) {
	t.Helper()
	zt := &corev1.Pod{}
	must(t, c.k8s.Get(ctx, client.ObjectKey{Namespace: meshNS, Name: "ztunnel-" + name}, zt))
	exp := int64(3600)
	tr, err := c.cs.CoreV1().ServiceAccounts(meshNS).CreateToken(ctx, "ztunnel", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{xds.TokenAudience}, ExpirationSeconds: &exp,
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: zt.Name, UID: zt.UID}}}, metav1.CreateOptions{})
	must(t, err)
	tok := tr.Status.Token
	state := xds.NewState(xds.AddressType, xds.AuthorizationType)
	addr := c.xdsAddr
	cl := xds.NewClient(xds.ClientConfig{Address: addr, TLS: c.tls, Token: func() (string, error) { return tok, nil }, OnDemand: true,
		Node: xds.NodeInfo{NodeName: name, PodName: zt.Name, PodNamespace: meshNS, Role: xds.RoleZtunnel}, Log: logr.Discard()}, state)
	go func() { _ = cl.Run(ctx) }()
	return cl, state
}

// createPods creates per pods on node (kwok makes them Running with an
// address), labelled for one of services Services.
func (c *cluster) createPods(t *testing.T, ctx context.Context, node string, per, services int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, per)
	for i := 0; i < per; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- c.k8s.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-app-%d", node, i), Namespace: appNS,
				Labels: map[string]string{"app": "svc-" + strconv.Itoa(i%services)}},
				Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "app"}},
					Tolerations: []corev1.Toleration{{Key: kwokAnnotation, Operator: corev1.TolerationOpExists}}}})
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must(t, err)
	}
}

// TestScaleSmoke: every simulated ztunnel converges on its node's pods and
// no other node's, finds a remote pod on demand, and the time from a pod
// created to its node's ztunnel holding it is measured.
func TestScaleSmoke(t *testing.T) {
	nodes, per, services := envInt("SCALE_NODES", 10), envInt("SCALE_PODS_PER_NODE", 20), 5
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := startCluster(t, ctx)
	for i := 0; i < services; i++ {
		must(t, c.k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "svc-" + strconv.Itoa(i), Namespace: appNS},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "svc-" + strconv.Itoa(i)}, Ports: []corev1.ServicePort{{Port: 80}}}}))
	}
	clients := make([]*xds.Client, nodes)
	states := make([]*xds.State, nodes)
	for i := range nodes {
		clients[i], states[i] = c.addNode(t, ctx, fmt.Sprintf("kwok-%d", i))
	}
	start := time.Now()
	for i := range nodes {
		c.createPods(t, ctx, fmt.Sprintf("kwok-%d", i), per, services)
	}
	// Each ztunnel holds exactly its node's app pods (kwok gave them
	// addresses) and the services.
	eventually(t, 10*time.Minute, "every ztunnel holds its node's pods", func() bool {
		for i, s := range states {
			if !s.Ready() || countOn(s, fmt.Sprintf("kwok-%d", i)) != per || len(s.Services()) < services {
				return false
			}
		}
		return true
	})
	converged := time.Since(start)
	for i, s := range states {
		for _, w := range s.Workloads() {
			if w.Namespace == appNS && w.Node != fmt.Sprintf("kwok-%d", i) {
				t.Fatalf("kwok-%d's ztunnel holds %s of %s", i, w.Name, w.Node)
			}
		}
	}
	// On demand: node 0 finds a pod of the last node by its address.
	var remote corev1.Pod
	must(t, c.k8s.Get(ctx, client.ObjectKey{Namespace: appNS, Name: fmt.Sprintf("kwok-%d-app-0", nodes-1)}, &remote))
	ip, err := netip.ParseAddr(remote.Status.PodIP)
	must(t, err)
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	defer dcancel()
	must(t, clients[0].Demand(dctx, xds.AddressAlias("", ip)))
	if w := states[0].WorkloadByAddr(ip); w == nil || w.Name != remote.Name {
		t.Fatalf("on-demand lookup of %s gave %v", ip, w)
	}

	// Pod created -> its node's ztunnel holds it, sequentially.
	samples := envInt("SCALE_SAMPLES", 20)
	lat := make([]time.Duration, 0, samples)
	for i := range samples {
		node := fmt.Sprintf("kwok-%d", i%nodes)
		name := fmt.Sprintf("%s-late-%d", node, i)
		t0 := time.Now()
		must(t, c.k8s.Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: appNS, Labels: map[string]string{"app": "svc-0"}},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "app"}}}}))
		uid := xds.PodUID("Kubernetes", appNS, name)
		eventually(t, time.Minute, "new pod at its ztunnel", func() bool { return states[i%nodes].WorkloadByUID(uid) != nil })
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	held := 0
	for _, s := range states {
		held += len(s.Workloads())
	}
	t.Logf("RESULT scale nodes=%d pods=%d converged=%v pod-created->node-ztunnel p50=%v p99=%v max=%v workloads held per ztunnel=%.1f (of %d)",
		nodes, nodes*per, converged.Round(time.Millisecond), lat[len(lat)/2].Round(time.Millisecond), lat[(len(lat)*99+99)/100-1].Round(time.Millisecond),
		lat[len(lat)-1].Round(time.Millisecond), float64(held)/float64(nodes), nodes*(per+1)+samples)
}

func countOn(s *xds.State, node string) int {
	n := 0
	for _, w := range s.Workloads() {
		if w.Namespace == appNS && w.Node == node {
			n++
		}
	}
	return n
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
