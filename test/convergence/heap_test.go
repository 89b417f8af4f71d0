//go:build convergence

package convergence

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	k8sruntime "k8s.io/apimachinery/pkg/runtime"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/controllers/controlplane"
	"github.com/ambientmesh/ambient/proxylib/ca"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
)

// typicalPod is pod i as a Deployment makes it and kubectl applied it:
// owner reference, kubectl's last-applied annotation, env, resources,
// probes, a token volume and the default tolerations.
func typicalPod(i int) *corev1.Pod {
	p := minimalPod(i)
	isCtrl := true
	p.Labels["pod-template-hash"] = "7d9f8c6b5"
	p.Labels["version"] = "v1"
	p.Annotations = map[string]string{
		"kubectl.kubernetes.io/last-applied-configuration": `{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"bench","namespace":"bench"},"spec":{"template":{"spec":{"containers":[{"name":"app","image":"registry.example/app:1.2.3","ports":[{"containerPort":8080,"name":"http"}]}]}}}}`,
		"prometheus.io/scrape":                             "true", "prometheus.io/port": "9090",
	}
	p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "bench-7d9f8c6b5", UID: "0b8c1f7e-3f6e-4a55-9f0e-1d2c3b4a5f60", Controller: &isCtrl}}
	grace := int64(30)
	p.Spec = corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: "default", TerminationGracePeriodSeconds: &grace,
		Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1.2.3",
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "metrics", ContainerPort: 9090}},
			Env:   []corev1.EnvVar{{Name: "LOG_LEVEL", Value: "info"}, {Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
			Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("128Mi")},
				Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}}, PeriodSeconds: 5},
			LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/live", Port: intstr.FromString("http")}}, PeriodSeconds: 10},
			VolumeMounts:   []corev1.VolumeMount{{Name: "kube-api-access", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount", ReadOnly: true}}}},
		Volumes: []corev1.Volume{{Name: "kube-api-access", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "kube-root-ca.crt"}, Items: []corev1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}}}}}}},
		Tolerations: []corev1.Toleration{{Key: "node.kubernetes.io/not-ready", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute},
			{Key: "node.kubernetes.io/unreachable", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute}},
	}
	return p
}

// typicalStatus adds what a kubelet reports besides the IP and readiness.
func typicalStatus(i int) corev1.PodStatus {
	st := podStatus(i)
	now := metav1.Now()
	st.HostIP = fmt.Sprintf("192.168.0.%d", i%4+1)
	st.QOSClass = corev1.PodQOSBurstable
	st.StartTime = &now
	st.Conditions = append(st.Conditions,
		corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		corev1.PodCondition{Type: corev1.ContainersReady, Status: corev1.ConditionFalse, LastTransitionTime: now, Reason: "ContainersNotReady", Message: "containers with unready status: [app]"})
	st.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", Image: "registry.example/app:1.2.3", ImageID: "registry.example/app@sha256:" + strings.Repeat("ab", 32),
		ContainerID: "containerd://" + strings.Repeat("cd", 32), Started: new(bool), State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}}}
	return st
}

// TestHeapPerPod measures the manager's Go heap growth (after GC) from 0 to
// N pods with the discovery model built: informer caches, the model and
// the xDS caches, before any proxy connects. One configuration per run:
//
//	HEAP_PODS=10000 HEAP_POD=minimal|typical HEAP_CACHE=production|untrimmed
//
// production is the manager's cache (controllers.CacheOptions and
// NewCache: compact pod records); untrimmed the defaults (full objects, managedFields included).
func TestHeapPerPod(t *testing.T) {
	if os.Getenv("HEAP_PODS") == "" {
		t.Skip("HEAP_PODS not set")
	}
	if os.Getenv("HEAP_PROFILE") != "" {
		runtime.MemProfileRate = 1 // every allocation, for an exact profile
	}
	pods := envInt("HEAP_PODS", 10000)
	kind, cacheMode := os.Getenv("HEAP_POD"), os.Getenv("HEAP_CACHE")
	mk, status := minimalPod, podStatus
	if kind == "typical" {
		mk, status = typicalPod, typicalStatus
	}
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
	rootCert, rootKey, _ := ca.NewSelfSignedRoot("cluster.local", 24*time.Hour, time.Now())
	inter, _ := ca.NewIntermediate(&ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}, "cluster.local", 12*time.Hour)
	keyPEM, _ := ca.EncodeKey(inter.Key)
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS}}))
	must(t, k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}))
	must(t, k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "ambient-ca", Namespace: meshNS},
		Data: map[string][]byte{"ca.crt": ca.EncodeCerts(inter.Cert), "ca.key": keyPEM, "root.crt": ca.EncodeCerts(rootCert)}}))
	for i := 0; i < 4; i++ {
		must(t, k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "svc-" + strconv.Itoa(i), Namespace: "bench"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"shard": strconv.Itoa(i)}, Ports: []corev1.ServicePort{{Port: 80}}}}))
	}
	opts := ctrl.Options{Scheme: sch, Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0", Logger: logr.Discard()}
	if cacheMode == "production" {
		opts.Cache, opts.NewCache, opts.Client = controllers.CacheOptions(), controllers.NewCache, controllers.ClientOptions()
	}
	mgr, err := ctrl.NewManager(cfg, opts)
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
	go func() { _ = mgr.Start(ctx) }()
	eventually(t, 2*time.Minute, func() bool { return cp.Discovery.Synced() })
	base := heap()
	start := time.Now()
	createPodsFrom(t, ctx, k8s, pods, mk, status)
	eventually(t, 10*time.Minute, func() bool { return len(cp.Discovery.Snapshot(xds.AddressType)) >= pods+4 })
	// The last status updates may still be on their way to the cache.
	time.Sleep(2 * time.Second)
	perPod := float64(heap()-base) / float64(pods)
	if path := os.Getenv("HEAP_PROFILE"); path != "" {
		f, err := os.Create(path)
		must(t, err)
		must(t, pprof.WriteHeapProfile(f))
		f.Close()
	}
	t.Logf("RESULT heap pods=%d pod=%s cache=%s heap/pod=%.0fB (created and modelled in %v)", pods, kind, cacheMode, perPod, time.Since(start).Round(time.Second))
}
