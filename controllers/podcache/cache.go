package podcache

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

var podGVK = corev1.SchemeGroupVersion.WithKind("Pod")

// NewCache is the manager's cache (ctrl.Options.NewCache): controller-
// runtime's informer cache of opts, with pods stored as Pod records
// (after any Transform opts set for pods) and read as *corev1.Pod through
// the returned Cache.
func NewCache(cfg *rest.Config, opts cache.Options) (cache.Cache, error) {
	byObject := map[client.Object]cache.ByObject{}
	var pods cache.ByObject
	for obj, o := range opts.ByObject {
		if _, ok := obj.(*corev1.Pod); ok {
			pods = o
			continue
		}
		byObject[obj] = o
	}
	before := pods.Transform
	pods.Transform = func(in any) (any, error) {
		if before != nil {
			var err error
			if in, err = before(in); err != nil {
				return nil, err
			}
		}
		return Compact(in)
	}
	byObject[&corev1.Pod{}] = pods
	opts.ByObject = byObject
	c, err := cache.New(cfg, opts)
	if err != nil {
		return nil, err
	}
	return &Cache{Cache: c}, nil
}

// Cache serves the pods of a cache whose Pod informer stores Pod records
// (Compact) as *corev1.Pod (Expand): Get and List of typed pods, pod field
// indexes, and the Pod informer's event handlers and indexers. Everything
// else goes to the wrapped cache unchanged. Unstructured and metadata-only
// pods have informers of their own, not compacted.
type Cache struct {
	cache.Cache
}

// NeedLeaderElection: every replica's cache runs (as the wrapped one).
func (c *Cache) NeedLeaderElection() bool { return false }

// indexer is the Pod informer's store, once synced.
func (c *Cache) indexer(ctx context.Context) (toolscache.Indexer, error) {
	inf, err := c.Cache.GetInformer(ctx, &corev1.Pod{})
	if err != nil {
		return nil, err
	}
	sii, ok := inf.(toolscache.SharedIndexInformer)
	if !ok {
		return nil, fmt.Errorf("pod cache: informer %T has no store", inf)
	}
	if !sii.HasSynced() { // GetInformer waits for a started informer to sync
		return nil, &cache.ErrCacheNotStarted{}
	}
	return sii.GetIndexer(), nil
}

// Get reads a pod from the records; others from the wrapped cache.
func (c *Cache) Get(ctx context.Context, key client.ObjectKey, out client.Object, opts ...client.GetOption) error {
	pod, ok := out.(*corev1.Pod)
	if !ok {
		return c.Cache.Get(ctx, key, out, opts...)
	}
	idx, err := c.indexer(ctx)
	if err != nil {
		return err
	}
	storeKey := key.Name
	if key.Namespace != "" {
		storeKey = key.Namespace + "/" + key.Name
	}
	item, exists, err := idx.GetByKey(storeKey)
	if err != nil {
		return err
	}
	if !exists {
		return apierrors.NewNotFound(corev1.Resource("pods"), key.Name)
	}
	rec, ok := item.(*Pod)
	if !ok {
		return fmt.Errorf("pod cache holds %T, not a pod record", item)
	}
	var o client.GetOptions
	o.ApplyOptions(opts)
	rec.expandInto(pod)
	if o.UnsafeDisableDeepCopy == nil || !*o.UnsafeDisableDeepCopy {
		*pod = *pod.DeepCopy()
	}
	return nil
}

// List lists pods from the records (by namespace, label selector, one
// exact match of a field index, limit); other kinds from the wrapped cache.
func (c *Cache) List(ctx context.Context, list client.ObjectList, opts ...client.ListOption) error {
	pods, ok := list.(*corev1.PodList)
	if !ok {
		return c.Cache.List(ctx, list, opts...)
	}
	var o client.ListOptions
	o.ApplyOptions(opts)
	if o.Continue != "" {
		return fmt.Errorf("continue list option is not supported by the cache")
	}
	idx, err := c.indexer(ctx)
	if err != nil {
		return err
	}
	var items []any
	switch {
	case o.FieldSelector != nil:
		reqs := o.FieldSelector.Requirements()
		if len(reqs) != 1 || (reqs[0].Operator != selection.Equals && reqs[0].Operator != selection.DoubleEquals) {
			return fmt.Errorf("the pod cache answers one exact field match, not %q", o.FieldSelector)
		}
		items, err = idx.ByIndex(fieldIndex(reqs[0].Field), indexValue(o.Namespace, reqs[0].Value))
	case o.Namespace != "":
		items, err = idx.ByIndex(toolscache.NamespaceIndex, o.Namespace)
	default:
		items = idx.List()
	}
	if err != nil {
		return err
	}
	copied := o.UnsafeDisableDeepCopy == nil || !*o.UnsafeDisableDeepCopy
	out := make([]corev1.Pod, 0, len(items))
	for _, item := range items {
		if o.Limit > 0 && int64(len(out)) >= o.Limit {
			break
		}
		rec, ok := item.(*Pod)
		if !ok {
			return fmt.Errorf("pod cache holds %T, not a pod record", item)
		}
		if o.LabelSelector != nil && !o.LabelSelector.Matches(labels.Set(rec.Labels)) {
			continue
		}
		out = append(out, corev1.Pod{})
		p := &out[len(out)-1]
		rec.expandInto(p)
		if copied {
			*p = *p.DeepCopy()
		}
	}
	pods.Items = out
	return nil
}

// fieldIndex names the Pod informer's index of a field (IndexField).
func fieldIndex(field string) string { return "podcache:" + field }

// indexValue is an index value within namespace ns, or of every namespace.
func indexValue(ns, v string) string {
	if ns == "" {
		return "*/" + v
	}
	return ns + "/" + v
}

// IndexField indexes pods by extract of the expanded pod, for List with
// client.MatchingFields (within a namespace or across all); other kinds by
// the wrapped cache.
func (c *Cache) IndexField(ctx context.Context, obj client.Object, field string, extract client.IndexerFunc) error {
	if _, ok := obj.(*corev1.Pod); !ok {
		return c.Cache.IndexField(ctx, obj, field, extract)
	}
	inf, err := c.Cache.GetInformer(ctx, &corev1.Pod{}, cache.BlockUntilSynced(false))
	if err != nil {
		return err
	}
	return inf.AddIndexers(toolscache.Indexers{fieldIndex(field): func(obj any) ([]string, error) {
		rec, ok := obj.(*Pod)
		if !ok {
			return nil, fmt.Errorf("pod cache holds %T, not a pod record", obj)
		}
		var out []string
		for _, v := range extract(rec.Expand()) {
			out = append(out, indexValue(rec.Namespace, v), indexValue("", v))
		}
		return out, nil
	}})
}

// GetInformer returns the Pod informer with its handlers and indexers
// given expanded pods; other informers unchanged.
func (c *Cache) GetInformer(ctx context.Context, obj client.Object, opts ...cache.InformerGetOption) (cache.Informer, error) {
	inf, err := c.Cache.GetInformer(ctx, obj, opts...)
	if _, ok := obj.(*corev1.Pod); !ok || err != nil {
		return inf, err
	}
	return &informer{Informer: inf}, nil
}

// GetInformerForKind is GetInformer by kind.
func (c *Cache) GetInformerForKind(ctx context.Context, gvk schema.GroupVersionKind, opts ...cache.InformerGetOption) (cache.Informer, error) {
	inf, err := c.Cache.GetInformerForKind(ctx, gvk, opts...)
	if gvk != podGVK || err != nil {
		return inf, err
	}
	return &informer{Informer: inf}, nil
}

// informer is the Pod informer as its users see it.
type informer struct {
	cache.Informer
}

func (i *informer) AddEventHandler(h toolscache.ResourceEventHandler) (toolscache.ResourceEventHandlerRegistration, error) {
	return i.Informer.AddEventHandler(expanding{h})
}

func (i *informer) AddEventHandlerWithResyncPeriod(h toolscache.ResourceEventHandler, resync time.Duration) (toolscache.ResourceEventHandlerRegistration, error) {
	return i.Informer.AddEventHandlerWithResyncPeriod(expanding{h}, resync)
}

func (i *informer) AddEventHandlerWithOptions(h toolscache.ResourceEventHandler, o toolscache.HandlerOptions) (toolscache.ResourceEventHandlerRegistration, error) {
	return i.Informer.AddEventHandlerWithOptions(expanding{h}, o)
}

func (i *informer) AddIndexers(indexers toolscache.Indexers) error {
	out := toolscache.Indexers{}
	for name, f := range indexers {
		out[name] = func(obj any) ([]string, error) { return f(expand(obj)) }
	}
	return i.Informer.AddIndexers(out)
}

// expanding gives a handler the expanded pods of the records.
type expanding struct {
	h toolscache.ResourceEventHandler
}

func (e expanding) OnAdd(obj any, initial bool) { e.h.OnAdd(expand(obj), initial) }
func (e expanding) OnUpdate(old, obj any)       { e.h.OnUpdate(expand(old), expand(obj)) }
func (e expanding) OnDelete(obj any)            { e.h.OnDelete(expand(obj)) }

func expand(obj any) any {
	switch o := obj.(type) {
	case *Pod:
		return o.Expand()
	case toolscache.DeletedFinalStateUnknown:
		o.Obj = expand(o.Obj)
		return o
	}
	return obj
}
