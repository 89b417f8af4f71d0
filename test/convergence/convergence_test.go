//go:build convergence

// Package convergence measures how fast the control plane converges: with
// N pods in a real API server (envtest, no kubelet), the time from a pod
// becoming Ready to every connected discovery client seeing it HEALTHY, and
// the control plane's heap per pod.
//
//	KUBEBUILDER_ASSETS=$PWD/bin/k8s/1.36.3 go test -tags convergence -run TestConvergence -v -timeout 30m ./test/convergence/
//
// CONVERGENCE_PODS (default "1000,10000"), CONVERGENCE_CLIENTS (default 4)
// and CONVERGENCE_SAMPLES (default 100) tune the run.
package convergence

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/controlplane"
	"github.com/ambientmesh/ambient/proxylib/ca"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"
)

const meshNS = "ambient-system"

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func TestConvergence(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		abs, _ := filepath.Abs("../../bin/k8s/1.36.3")
		os.Setenv("KUBEBUILDER_ASSETS", abs)
	}
	sizes := []int{1000, 10000}
	if v := os.Getenv("CONVERGENCE_PODS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				t.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, n := range sizes {
		t.Run(fmt.Sprintf("pods=%d", n), func(t *testing.T) { run(t, n) })
	}
}

type result struct {
	pods, clients, samples int
	p50, p99, max          time.Duration
	heapPerPod             float64
	createTime, syncTime   time.Duration
}

func run(t *testing.T, pods int) {
	clients := envInt("CONVERGENCE_CLIENTS", 4)
	samples := min(envInt("CONVERGENCE_SAMPLES", 100), pods)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	env := &envtest.Environment{CRDDirectoryPaths: []string{"../../config/crd/bases", "../../controllers/controlplane/testdata/crds"}, ErrorIfCRDPathMissing: true}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = env.Stop() }()
	cfg.QPS, cfg.Burst = 5000, 10000
	sch := k8sruntime.NewScheme()
	_ = clientgoscheme.AddToScheme(sch)
	_ = meshv1.AddToScheme(sch)
	k8s, err := client.New(cfg, client.Options{Scheme: sch})
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(cfg)

	// Mesh namespace, CA secret, ztunnel pods and the benchmark namespace.
	rootCert, rootKey, _ := ca.NewSelfSignedRoot("cluster.local", 24*time.Hour, time.Now())
	root := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}
	inter, _ := ca.NewIntermediate(root, "cluster.local", 12*time.Hour)
	keyPEM, _ := ca.EncodeKey(inter.Key)
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS}}))
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}))
	must(t, k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "ambient-ca", Namespace: meshNS},
		Data: map[string][]byte{"ca.crt": ca.EncodeCerts(inter.Cert), "ca.key": keyPEM, "root.crt": ca.EncodeCerts(rootCert)}}))
	must(t, k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ztunnel", Namespace: meshNS}}))
	must(t, k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: "bench"}}))
	for i := 0; i < 4; i++ {
		must(t, k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("svc-%d", i), Namespace: "bench"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"shard": strconv.Itoa(i)}, Ports: []corev1.ServicePort{{Port: 80}}}}))
	}

	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Scheme: sch, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0", Logger: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cp, err := controlplane.SetupWithManager(mgr, controlplane.Options{Namespace: meshNS, XDSListener: lis, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	var eventAt sync.Map // pod name -> first informer event time after arming
	var armed atomic.Pointer[string]
	cp.Discovery.OnPodEvent = func(ns, name string) {
		if want := armed.Load(); want != nil && *want == name {
			eventAt.LoadOrStore(name, time.Now())
		}
	}
	go func() { _ = mgr.Start(ctx) }()
	eventually(t, 2*time.Minute, func() bool { return cp.Discovery.Synced() })
	heapBase := heap()

	// N pods, created not Ready, as a kubelet would report them.
	start := time.Now()
	createPods(t, ctx, k8s, pods)
	createTime := time.Since(start)
	eventually(t, 10*time.Minute, func() bool { return len(cp.Discovery.Snapshot(xds.AddressType)) >= pods+4 })
	syncTime := time.Since(start)
	heapPerPod := float64(heap()-heapBase) / float64(pods)

	// Connected clients, each a real delta xDS client over TLS.
	pool := x509.NewCertPool()
	pool.AddCert(rootCert)
	tlsConf := &tls.Config{RootCAs: pool, ServerName: "ambient-controlplane." + meshNS + ".svc", MinVersion: tls.VersionTLS13}
	type watcher struct {
		state *xds.State
		seen  sync.Map // uid -> time
	}
	watchers := make([]*watcher, clients)
	var target atomic.Pointer[string]
	for i := range watchers {
		zt := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ztunnel-%d", i), Namespace: meshNS},
			Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%d", i), ServiceAccountName: "ztunnel", Containers: []corev1.Container{{Name: "z", Image: "z"}}}}
		must(t, k8s.Create(ctx, zt))
		exp := int64(3600)
		tr, err := cs.CoreV1().ServiceAccounts(meshNS).CreateToken(ctx, "ztunnel", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
			Audiences: []string{xds.TokenAudience}, ExpirationSeconds: &exp,
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: zt.Name, UID: zt.UID}}}, metav1.CreateOptions{})
		must(t, err)
		w := &watcher{state: xds.NewState(xds.AddressType, xds.AuthorizationType)}
		watchers[i] = w
		w.state.OnChange(func(c xds.Change) {
			want := target.Load()
			if want == nil {
				return
			}
			for _, name := range c.Updated {
				if name == *want {
					if wl := w.state.WorkloadByUID(name); wl != nil && wl.Status == workloadapi.WorkloadStatus_HEALTHY {
						w.seen.LoadOrStore(name, time.Now())
					}
				}
			}
		})
		tok := tr.Status.Token
		c := xds.NewClient(xds.ClientConfig{Address: lis.Addr().String(), TLS: tlsConf, Token: func() (string, error) { return tok, nil },
			Node: xds.NodeInfo{NodeName: zt.Spec.NodeName, PodName: zt.Name, PodNamespace: meshNS, Role: xds.RoleZtunnel}, Log: logr.Discard()}, w.state)
		go func() { _ = c.Run(ctx) }()
	}
	for _, w := range watchers {
		eventually(t, 5*time.Minute, func() bool { return w.state.Ready() && len(w.state.Workloads()) >= pods })
	}

	// Sequential readiness flips: latency until the last client has it.
	var lat, cpLat []time.Duration
	for i := 0; i < samples; i++ {
		name := fmt.Sprintf("pod-%d", (i*7919)%pods)
		uid := xds.PodUID("Kubernetes", "bench", name)
		target.Store(&uid)
		armed.Store(&name)
		var pod corev1.Pod
		must(t, k8s.Get(ctx, client.ObjectKey{Namespace: "bench", Name: name}, &pod))
		pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		t0 := time.Now()
		must(t, k8s.Status().Update(ctx, &pod))
		var last time.Time
		eventually(t, time.Minute, func() bool {
			last = time.Time{}
			for _, w := range watchers {
				v, ok := w.seen.Load(uid)
				if !ok {
					return false
				}
				if ts := v.(time.Time); ts.After(last) {
					last = ts
				}
			}
			return true
		})
		lat = append(lat, last.Sub(t0))
		if ev, ok := eventAt.Load(name); ok {
			cpLat = append(cpLat, last.Sub(ev.(time.Time)))
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	sort.Slice(cpLat, func(i, j int) bool { return cpLat[i] < cpLat[j] })
	if len(cpLat) > 0 {
		t.Logf("RESULT pods=%d control-plane only (informer event -> all clients) p50=%v p99=%v max=%v",
			pods, pct(cpLat, 50).Round(time.Millisecond), pct(cpLat, 99).Round(time.Millisecond), cpLat[len(cpLat)-1].Round(time.Millisecond))
	}
	r := result{pods: pods, clients: clients, samples: samples, p50: pct(lat, 50), p99: pct(lat, 99), max: lat[len(lat)-1],
		heapPerPod: heapPerPod, createTime: createTime, syncTime: syncTime}
	t.Logf("RESULT pods=%d clients=%d samples=%d ready->all-clients p50=%v p99=%v max=%v heap/pod=%.0fB (pods created in %v, model built %v)",
		r.pods, r.clients, r.samples, r.p50.Round(time.Millisecond), r.p99.Round(time.Millisecond), r.max.Round(time.Millisecond),
		r.heapPerPod, r.createTime.Round(time.Second), r.syncTime.Round(time.Second))
}

func pct(sorted []time.Duration, p int) time.Duration {
	idx := (len(sorted)*p + 99) / 100
	return sorted[max(0, min(len(sorted)-1, idx-1))]
}

func heap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// createPods creates n pods with IPs, not Ready, 32 at a time.
func createPods(t *testing.T, ctx context.Context, k8s client.Client, n int) {
	createPodsFrom(t, ctx, k8s, n, minimalPod, podStatus)
}

// minimalPod is pod i of the benchmark: a name, two labels, one container.
func minimalPod(i int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%d", i), Namespace: "bench",
			Labels: map[string]string{"app": "bench", "shard": strconv.Itoa(i % 4)}},
		Spec: corev1.PodSpec{NodeName: fmt.Sprintf("node-%d", i%4), Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
}

// podStatus is pod i's status as a kubelet reports it: running, an IP,
// not Ready.
func podStatus(i int) corev1.PodStatus {
	ip := fmt.Sprintf("10.%d.%d.%d", 100+i/65536, (i/256)%256, i%256)
	return corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}}
}

// createPodsFrom creates n pods made by mk and sets their status, 32 at a
// time.
func createPodsFrom(t *testing.T, ctx context.Context, k8s client.Client, n int, mk func(int) *corev1.Pod, status func(int) corev1.PodStatus) {
	t.Helper()
	work := make(chan int)
	var wg sync.WaitGroup
	var failed atomic.Value
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				pod := mk(i)
				if err := k8s.Create(ctx, pod); err != nil {
					failed.Store(err)
					continue
				}
				pod.Status = status(i)
				if err := k8s.Status().Update(ctx, pod); err != nil {
					failed.Store(err)
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	if err, ok := failed.Load().(error); ok {
		t.Fatal(err)
	}
}

func eventually(t *testing.T, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
