package waypoint

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/controllers/controlplane"
	cpdiscovery "github.com/ambientmesh/ambient/controllers/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// k8sModel runs the control plane's real discovery model
// (controllers/discovery) against a real kube-apiserver and etcd (envtest)
// and copies every address and L7 resource it pushes into the mesh's test
// control plane (the test's own resources stay),
// so the proxies in the network namespaces act on what the control plane
// makes of the Kubernetes objects a test creates (labels, Gateways,
// Services, pods). Pods created here must carry the IPs, node names and
// service accounts of their network-namespace twins.
type k8sModel struct {
	c  client.Client
	cp *cpdiscovery.Controller
}

// startK8sModel starts envtest and the discovery model; KUBEBUILDER_ASSETS
// must name the envtest binaries (the Makefile exports it; `make envtest`
// builds them). A missing input fails the test: it never skips.
func startK8sModel(t *testing.T, m *meshtest.Mesh) *k8sModel {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run `make envtest` and export KUBEBUILDER_ASSETS=$PWD/bin/k8s/<version> (the Makefile does both)")
	}
	env := &envtest.Environment{CRDDirectoryPaths: []string{"../../config/crd/bases", "../../controllers/controlplane/testdata/crds"},
		ErrorIfCRDPathMissing: true}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	sch := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, meshv1.AddToScheme, controlplane.AddToScheme} {
		if err := add(sch); err != nil {
			t.Fatal(err)
		}
	}
	c, err := client.New(cfg, client.Options{Scheme: sch})
	if err != nil {
		t.Fatal(err)
	}
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mapper, err := apiutil.NewDynamicRESTMapper(cfg, hc)
	if err != nil {
		t.Fatal(err)
	}
	opts := controllers.CacheOptions()
	opts.Scheme, opts.Mapper = sch, mapper
	informers, err := cache.New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	model := cpdiscovery.NewController(informers, cpdiscovery.Options{MeshNamespace: meshtest.RootNamespace,
		Log: m.Logs.LoggerV("controlplane", 0), Debounce: 10 * time.Millisecond, MaxDebounce: 200 * time.Millisecond})
	if err := model.Register(ctx, informers, mapper); err != nil {
		t.Fatal(err)
	}
	go informers.Start(ctx)
	if !informers.WaitForCacheSync(ctx) {
		t.Fatal("informers did not sync")
	}
	var mu sync.Mutex
	pushed := map[string]bool{}
	model.OnPush = func(int) {
		mu.Lock()
		defer mu.Unlock()
		now := map[string]bool{}
		for _, typeURL := range []string{discovery.AddressType, discovery.L7ResourceType} {
			for _, r := range model.Snapshot(typeURL) {
				now[typeURL+" "+r.Name] = true
				m.CP.Push(typeURL, r.Name, r.Resource)
			}
		}
		for key := range pushed {
			if !now[key] {
				typeURL, name, _ := strings.Cut(key, " ")
				m.CP.Remove(typeURL, name)
			}
		}
		pushed = now
	}
	go model.Run(ctx)
	return &k8sModel{c: c, cp: model}
}

func (k *k8sModel) create(t *testing.T, objs ...client.Object) {
	t.Helper()
	for _, o := range objs {
		if err := k.c.Create(context.Background(), o); err != nil {
			t.Fatalf("create %T %s: %v", o, o.GetName(), err)
		}
	}
}

// pod creates pod namespace/name for its network-namespace twin p, ready.
func (k *k8sModel) pod(t *testing.T, namespace string, p *meshtest.Pod, labels map[string]string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.PodName, Namespace: namespace, Labels: labels},
		Spec: corev1.PodSpec{NodeName: p.Node.NodeName, ServiceAccountName: p.ServiceAccount,
			Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
	k.create(t, pod)
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.IP.String(), PodIPs: []corev1.PodIP{{IP: p.IP.String()}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	if err := k.c.Status().Update(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
	return pod
}

// label sets (value != "") or removes (value == "") labels of obj.
func (k *k8sModel) label(t *testing.T, obj client.Object, kv ...string) {
	t.Helper()
	ctx := context.Background()
	if err := k.c.Get(ctx, client.ObjectKeyFromObject(obj), obj); err != nil {
		t.Fatal(err)
	}
	l := obj.GetLabels()
	if l == nil {
		l = map[string]string{}
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(l, kv[i])
		} else {
			l[kv[i]] = kv[i+1]
		}
	}
	obj.SetLabels(l)
	if err := k.c.Update(ctx, obj); err != nil {
		t.Fatal(err)
	}
}
