package podcache

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
)

// recorder keeps the pods an informer handler was given.
type recorder struct {
	mu      sync.Mutex
	added   map[string]*corev1.Pod
	deleted map[string]*corev1.Pod
	other   []any
}

func (r *recorder) pod(obj any) (*corev1.Pod, bool) {
	if t, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		r.other = append(r.other, obj)
	}
	return p, ok
}

func (r *recorder) OnAdd(obj any, _ bool) { r.OnUpdate(nil, obj) }
func (r *recorder) OnUpdate(_, obj any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.pod(obj); ok {
		r.added[p.Name] = p
	}
}
func (r *recorder) OnDelete(obj any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.pod(obj); ok {
		r.deleted[p.Name] = p
	}
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	for end := time.Now().Add(30 * time.Second); !f(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting: %s", what)
		}
	}
}

// TestCacheServesCompactPods: against a real API server, the cache holds
// pod records, not corev1.Pods, and every way the manager reads pods (Get,
// List by namespace, labels and a field index, informer handlers, the
// manager's client) gives the expanded pod; copies are the reader's own,
// other kinds pass through.
func TestCacheServesCompactPods(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("KUBEBUILDER_ASSETS not set (envtest)")
	}
	log.SetLogger(logr.Discard())
	env := &envtest.Environment{BinaryAssetsDirectory: filepath.Clean(os.Getenv("KUBEBUILDER_ASSETS"))}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	k8s, err := client.New(cfg, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCache(cfg, cache.Options{Scheme: k8s.Scheme()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "x"}, &corev1.Pod{}); !errors.As(err, new(*cache.ErrCacheNotStarted)) {
		t.Fatalf("Get before the cache started: %v, want ErrCacheNotStarted", err)
	}
	if err := c.IndexField(ctx, &corev1.Pod{}, "spec.nodeName", func(o client.Object) []string { return []string{o.(*corev1.Pod).Spec.NodeName} }); err != nil {
		t.Fatal(err)
	}
	inf, err := c.GetInformer(ctx, &corev1.Pod{})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{added: map[string]*corev1.Pod{}, deleted: map[string]*corev1.Pod{}}
	if _, err := inf.AddEventHandler(rec); err != nil {
		t.Fatal(err)
	}
	if err := inf.AddIndexers(toolscache.Indexers{"sa": func(obj any) ([]string, error) {
		return []string{obj.(*corev1.Pod).Spec.ServiceAccountName}, nil
	}}); err != nil {
		t.Fatal(err)
	}
	go func() { _ = c.Start(ctx) }()
	if !c.WaitForCacheSync(ctx) {
		t.Fatal("cache did not sync")
	}

	always := corev1.ContainerRestartPolicyAlways
	mk := func(ns, name, node string, lbls map[string]string) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: lbls,
				Annotations: map[string]string{lastApplied: "{}", selection.RedirectionAnnotation: selection.RedirectionEnabled, "other": "x"}},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "web",
				InitContainers: []corev1.Container{{Name: selection.SidecarContainer, Image: "sidecar", RestartPolicy: &always}},
				Containers: []corev1.Container{{Name: "app", Image: "app", Env: []corev1.EnvVar{{Name: "A", Value: "b"}},
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}, {ContainerPort: 9000, Protocol: corev1.ProtocolTCP}}}}},
		}
		if err := k8s.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.7", PodIPs: []corev1.PodIP{{IP: "10.0.0.7"}},
			HostIP:     "192.168.0.1",
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}, {Type: corev1.PodScheduled, Status: corev1.ConditionTrue}}}
		if err := k8s.Status().Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "other"}}); err != nil {
		t.Fatal(err)
	}
	web := map[string]string{"app": "web"}
	full := mk("default", "web-1", "n1", web)
	mk("default", "web-2", "n2", web)
	mk("default", "api-1", "n1", map[string]string{"app": "api"})
	mk("other", "web-3", "n1", web)
	eventually(t, "all pods Running in the cache", func() bool {
		var l corev1.PodList
		if err := c.List(ctx, &l); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, p := range l.Items {
			if p.Status.Phase == corev1.PodRunning {
				n++
			}
		}
		return n == 4
	})

	// The store holds records.
	raw, err := c.(*Cache).Cache.GetInformer(ctx, &corev1.Pod{})
	if err != nil {
		t.Fatal(err)
	}
	for _, item := range raw.(toolscache.SharedIndexInformer).GetIndexer().List() {
		if _, ok := item.(*Pod); !ok {
			t.Fatalf("the pod informer stores %T", item)
		}
	}

	// Get: the expanded pod, what readers see.
	var got corev1.Pod
	if err := c.Get(ctx, client.ObjectKeyFromObject(full), &got); err != nil {
		t.Fatal(err)
	}
	if got.UID != full.UID || got.Spec.NodeName != "n1" || got.Spec.ServiceAccountName != "web" || got.Status.PodIP != "10.0.0.7" ||
		got.Status.Phase != corev1.PodRunning || !reflect.DeepEqual(got.Labels, web) || got.ResourceVersion == "" ||
		!reflect.DeepEqual(got.Annotations, map[string]string{selection.RedirectionAnnotation: selection.RedirectionEnabled}) ||
		!reflect.DeepEqual(got.Spec.Containers, []corev1.Container{{Name: PortsContainer, Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}}}}) ||
		!selection.HBONESidecar(withTunnel(got)) || len(got.Status.Conditions) != 1 || got.Status.Conditions[0].Status != corev1.ConditionTrue ||
		got.Kind != "Pod" || got.APIVersion != "v1" {
		t.Fatalf("Get: %+v", got)
	}
	// A copy is the reader's own; without one it is the cache's.
	got.Labels["app"] = "changed"
	var again corev1.Pod
	if err := c.Get(ctx, client.ObjectKeyFromObject(full), &again, client.UnsafeDisableDeepCopy); err != nil {
		t.Fatal(err)
	}
	if again.Labels["app"] != "web" {
		t.Fatal("changing a Get result changed the cache")
	}
	var shared corev1.Pod
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "web-2"}, &shared, client.UnsafeDisableDeepCopy); err != nil {
		t.Fatal(err)
	}
	if reflect.ValueOf(again.Labels).UnsafePointer() != reflect.ValueOf(shared.Labels).UnsafePointer() {
		t.Fatal("replicas' labels are not one shared map")
	}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "default", Name: "missing"}, &got); !apierrors.IsNotFound(err) {
		t.Fatalf("Get of a missing pod: %v", err)
	}

	// List.
	names := func(opts ...client.ListOption) []string {
		t.Helper()
		var l corev1.PodList
		if err := c.List(ctx, &l, opts...); err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, p := range l.Items {
			out = append(out, p.Namespace+"/"+p.Name)
		}
		slices.Sort(out)
		return out
	}
	for _, tc := range []struct {
		opts []client.ListOption
		want []string
	}{
		{nil, []string{"default/api-1", "default/web-1", "default/web-2", "other/web-3"}},
		{[]client.ListOption{client.InNamespace("default")}, []string{"default/api-1", "default/web-1", "default/web-2"}},
		{[]client.ListOption{client.MatchingLabels(web)}, []string{"default/web-1", "default/web-2", "other/web-3"}},
		{[]client.ListOption{client.MatchingFields{"spec.nodeName": "n1"}}, []string{"default/api-1", "default/web-1", "other/web-3"}},
		{[]client.ListOption{client.InNamespace("default"), client.MatchingFields{"spec.nodeName": "n1"}, client.MatchingLabels(web)}, []string{"default/web-1"}},
	} {
		if got := names(tc.opts...); !slices.Equal(got, tc.want) {
			t.Errorf("List %v: %v, want %v", tc.opts, got, tc.want)
		}
	}
	if got := names(client.Limit(2)); len(got) != 2 {
		t.Errorf("List with limit 2: %v", got)
	}
	if err := c.List(ctx, &corev1.PodList{}, client.MatchingFieldsSelector{Selector: fields.ParseSelectorOrDie("spec.nodeName=n1,metadata.name=x")}); err == nil {
		t.Error("two field matches: no error")
	}
	if err := c.List(ctx, &corev1.PodList{}, client.MatchingFields{"spec.unindexed": "x"}); err == nil {
		t.Error("unindexed field: no error")
	}
	// The indexer given by AddIndexers saw expanded pods.
	if keys, err := raw.(toolscache.SharedIndexInformer).GetIndexer().IndexKeys("sa", "web"); err != nil || len(keys) != 4 {
		t.Errorf("indexer added through the informer: %v, %v", keys, err)
	}

	// The manager's client reads pods through the cache.
	mc, err := client.New(cfg, client.Options{Cache: &client.CacheOptions{Reader: c}})
	if err != nil {
		t.Fatal(err)
	}
	var viaClient corev1.Pod
	if err := mc.Get(ctx, client.ObjectKeyFromObject(full), &viaClient); err != nil || viaClient.Spec.Containers[0].Name != PortsContainer {
		t.Fatalf("manager client Get: %v %+v", err, viaClient.Spec)
	}
	// Other kinds pass through.
	var ns corev1.Namespace
	if err := c.Get(ctx, types.NamespacedName{Name: "other"}, &ns); err != nil || ns.Name != "other" {
		t.Fatalf("namespace Get: %v", err)
	}

	// Handlers got expanded pods, also on delete.
	if err := k8s.Delete(ctx, full, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "delete event", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.deleted["web-1"] != nil
	})
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.other) > 0 {
		t.Fatalf("handler given %T", rec.other[0])
	}
	if p := rec.added["web-2"]; p == nil || p.Status.PodIP != "10.0.0.7" || p.Labels["app"] != "web" {
		t.Fatalf("handler's pod: %+v", p)
	}
	if p := rec.deleted["web-1"]; p.UID != full.UID {
		t.Fatalf("deleted pod: %+v", p)
	}
}

// withTunnel is p labelled as an HBONE sidecar (the label the test pods
// lack), to check the sidecar container survived.
func withTunnel(p corev1.Pod) *corev1.Pod {
	q := p.DeepCopy()
	q.Labels[selection.TunnelLabel] = selection.TunnelHTTP
	q.Annotations[selection.SidecarStatusAnnotation] = "{}"
	return q
}
