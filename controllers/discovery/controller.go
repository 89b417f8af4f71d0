// Package discovery is the control plane's workload discovery: it watches
// Pods, Services, Namespaces, Istio security policies and waypoints through
// the manager's informers, keeps the Istio-compatible model (Address,
// Authorization, L7Resource) incrementally, and serves it over delta xDS.
package discovery

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	cachetypes "github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/go-logr/logr"
	"google.golang.org/protobuf/proto"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/policy"
	"github.com/ambientmesh/ambient/controllers/proxyauth"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
	"github.com/ambientmesh/ambient/proxylib/route"
)

// Options configure the model.
type Options struct {
	// MeshNamespace is used until an AmbientMesh says otherwise; it is also
	// Istio's root namespace.
	MeshNamespace string
	// TrustDomain default (AmbientMesh spec.trustDomain wins).
	TrustDomain string
	// ClusterID prefixes workload uids (Istio's default "Kubernetes").
	ClusterID string
	// DomainSuffix of service hostnames, default cluster.local.
	DomainSuffix string
	// Debounce waits for this much quiet before pushing (default 100ms), but
	// never longer than MaxDebounce after the first change (default 1s).
	Debounce, MaxDebounce time.Duration
	Log                   logr.Logger
	// Events records policy translations that drop rules and proxies'
	// refusals of a push (nil: none).
	Events *kubeevents.Recorder
	// Elected closes when this replica leads (manager.Elected()); every
	// replica builds the model, only the leader records policy Events.
	// Nil: always record.
	Elected <-chan struct{}
}

func (o *Options) defaults() {
	if o.MeshNamespace == "" {
		o.MeshNamespace = "ambient-system"
	}
	if o.TrustDomain == "" {
		o.TrustDomain = "cluster.local"
	}
	if o.ClusterID == "" {
		o.ClusterID = "Kubernetes"
	}
	if o.DomainSuffix == "" {
		o.DomainSuffix = "cluster.local"
	}
	if o.Debounce <= 0 {
		o.Debounce = 100 * time.Millisecond
	}
	if o.MaxDebounce <= 0 {
		o.MaxDebounce = time.Second
	}
}

// Controller keeps the model in the xDS caches.
type Controller struct {
	opts   Options
	reader client.Reader
	log    logr.Logger

	// Addresses scopes what each ztunnel and sidecar receives
	// (AddressCache); authorizations and L7 resources go whole to every
	// subscriber but sidecars, which get what can apply to their pod.
	Addresses          *AddressCache
	Authorizations, L7 *SidecarScopedCache

	// optional kinds, watched once their CRDs are installed
	hasIstio, hasGateway, hasClasses, hasRoutes, hasGrants, hasL4Routes atomic.Bool
	hasNetworking                                                       atomic.Bool
	informers                                                           cache.Informers
	mapper                                                              meta.RESTMapper
	pending                                                             []*optionalSource

	mu    sync.Mutex
	dirty dirtySet
	kick  chan struct{}

	// current is what the caches hold, per type URL, for diffs and debug.
	curMu   sync.RWMutex
	current map[string]map[string]proto.Message

	synced    atomic.Bool
	waypoints atomic.Pointer[map[string]map[string]*waypoint]
	// ingress holds the ingress Gateways (class istio): ns -> name.
	ingress atomic.Pointer[map[string]map[string]bool]
	// selectorsInUse: an ingress Gateway selects route namespaces by label,
	// so a namespace change rebuilds the Gateways sent to the gateways.
	selectorsInUse atomic.Bool
	// OnPush, when set, is called after each push with the number of
	// resources changed (tests and the convergence benchmark).
	OnPush func(changed int)
	// OnPodEvent, when set, is called as a pod event arrives from the
	// informer (the convergence benchmark's start mark).
	OnPodEvent func(namespace, name string)
}

type dirtySet struct {
	full       bool
	pods       map[types.NamespacedName]struct{}
	namespaces map[string]struct{}
	authz      map[types.NamespacedName]struct{}
	peerAuthn  map[types.NamespacedName]struct{}
	routes     map[string]struct{} // L7 keys of routes
}

func (d *dirtySet) empty() bool {
	return !d.full && len(d.pods)+len(d.namespaces)+len(d.authz)+len(d.peerAuthn)+len(d.routes) == 0
}

func newDirty() dirtySet {
	return dirtySet{
		pods: map[types.NamespacedName]struct{}{}, namespaces: map[string]struct{}{},
		authz: map[types.NamespacedName]struct{}{}, peerAuthn: map[types.NamespacedName]struct{}{},
		routes: map[string]struct{}{},
	}
}

// NewController creates the model; Register wires its informers.
func NewController(reader client.Reader, opts Options) *Controller {
	opts.defaults()
	c := &Controller{
		opts:           opts,
		reader:         reader,
		log:            opts.Log,
		Addresses:      NewAddressCache(),
		Authorizations: NewSidecarScopedCache(xds.AuthorizationType),
		L7:             NewSidecarScopedCache(xds.L7ResourceType),
		dirty:          newDirty(),
		kick:           make(chan struct{}, 1),
		current: map[string]map[string]proto.Message{
			xds.AddressType: {}, xds.AuthorizationType: {}, xds.L7ResourceType: {},
		},
	}
	c.dirty.full = true
	return c
}

var (
	gatewayGVK   = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "Gateway"}
	classGVK     = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "GatewayClass"}
	httpRouteGVK = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "HTTPRoute"}
	grpcRouteGVK = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "GRPCRoute"}
	// TLSRoute and TCPRoute are v1 since Gateway API v1.5 (standard
	// channel); ingress gateways route TLS passthrough and TCP listeners
	// by them.
	tlsRouteGVK = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "TLSRoute"}
	tcpRouteGVK = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1", Kind: "TCPRoute"}
	// ReferenceGrant as v1beta1, which every Gateway API release since
	// v0.6 serves (v1 only since v1.5).
	referenceGrantGVK = schema.GroupVersionKind{Group: gwv1.GroupName, Version: "v1beta1", Kind: "ReferenceGrant"}
	authzPolicyGV     = schema.GroupVersionKind{Group: "security.istio.io", Version: "v1", Kind: "AuthorizationPolicy"}
	peerAuthnGVK      = schema.GroupVersionKind{Group: "security.istio.io", Version: "v1", Kind: "PeerAuthentication"}
	serviceEntryGVK   = schema.GroupVersionKind{Group: "networking.istio.io", Version: "v1", Kind: "ServiceEntry"}
	workloadEntryGVK  = schema.GroupVersionKind{Group: "networking.istio.io", Version: "v1", Kind: "WorkloadEntry"}
)

func installed(mapper meta.RESTMapper, gvk schema.GroupVersionKind) bool {
	_, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	return err == nil
}

// optionalSource is a kind that exists only when its CRDs are installed.
type optionalSource struct {
	name    string
	gvks    []schema.GroupVersionKind
	objs    []client.Object
	handler toolscache.ResourceEventHandler
	enabled *atomic.Bool
}

// Register adds event handlers to the manager's informers. Kinds whose CRDs
// are not installed yet (Istio security, Gateway API) are watched once they
// appear (WatchLateCRDs); the operator may install them after start.
func (c *Controller) Register(ctx context.Context, informers cache.Informers, mapper meta.RESTMapper) error {
	c.informers, c.mapper = informers, mapper
	core := []struct {
		obj client.Object
		h   toolscache.ResourceEventHandler
	}{
		{&corev1.Pod{}, c.handler(func(o, _ client.Object) { c.markPod(o) })},
		{&corev1.Service{}, c.handler(func(o, _ client.Object) { c.markNamespace(o.GetNamespace(), c.isWaypointService(o)) })},
		{&corev1.Namespace{}, c.handler(func(o, _ client.Object) { c.markNamespace(o.GetName(), c.selectorsInUse.Load()) })},
		{&discoveryv1.EndpointSlice{}, c.handler(c.markEndpointSlice)},
		// Nodes by metadata only: their locality labels, which every pod
		// on them carries (rare changes: rebuild everything).
		{nodeMeta(), c.handler(func(o, old client.Object) {
			if old == nil && nodeLocality(o.GetLabels()) != nil || old != nil && localityChanged(o.GetLabels(), old.GetLabels()) {
				c.markFull()
			}
		})},
		{&meshv1.WaypointPolicy{}, c.handler(func(client.Object, client.Object) { c.markFull() })},
		{&meshv1.AmbientMesh{}, c.handler(func(client.Object, client.Object) { c.markFull() })},
	}
	for _, h := range core {
		if err := c.addHandler(ctx, h.obj, h.h); err != nil {
			return err
		}
	}
	c.pending = []*optionalSource{
		{name: "istio-security", gvks: []schema.GroupVersionKind{authzPolicyGV, peerAuthnGVK},
			objs: []client.Object{&securityv1.AuthorizationPolicy{}, &securityv1.PeerAuthentication{}}, enabled: &c.hasIstio},
		// ServiceEntries select pods and WorkloadEntries of their own
		// namespace only: a change recomputes that namespace.
		{name: "istio-networking", gvks: []schema.GroupVersionKind{serviceEntryGVK, workloadEntryGVK},
			objs:    []client.Object{&networkingv1.ServiceEntry{}, &networkingv1.WorkloadEntry{}},
			handler: c.handler(func(o, _ client.Object) { c.markNamespace(o.GetNamespace(), false) }), enabled: &c.hasNetworking},
		{name: "gateways", gvks: []schema.GroupVersionKind{gatewayGVK}, objs: []client.Object{&gwv1.Gateway{}},
			handler: c.handler(func(client.Object, client.Object) { c.markFull() }), enabled: &c.hasGateway},
		// GatewayClasses decide which Gateways are ingress gateways
		// (waypointbind.IngressClass); without them, class istio only.
		{name: "gatewayclasses", gvks: []schema.GroupVersionKind{classGVK}, objs: []client.Object{&gwv1.GatewayClass{}},
			handler: c.handler(func(client.Object, client.Object) { c.markFull() }), enabled: &c.hasClasses},
		{name: "routes", gvks: []schema.GroupVersionKind{httpRouteGVK, grpcRouteGVK}, objs: []client.Object{&gwv1.HTTPRoute{}, &gwv1.GRPCRoute{}},
			handler: c.handler(func(o, _ client.Object) { c.markRoute(o) }), enabled: &c.hasRoutes},
		{name: "l4routes", gvks: []schema.GroupVersionKind{tlsRouteGVK, tcpRouteGVK}, objs: []client.Object{&gwv1.TLSRoute{}, &gwv1.TCPRoute{}},
			handler: c.handler(func(o, _ client.Object) { c.markRoute(o) }), enabled: &c.hasL4Routes},
		// ReferenceGrants open cross-namespace backends and certificates
		// to ingress gateways; they change rarely, so any change rebuilds.
		{name: "referencegrants", gvks: []schema.GroupVersionKind{referenceGrantGVK}, objs: []client.Object{&gwv1beta1.ReferenceGrant{}},
			handler: c.handler(func(client.Object, client.Object) { c.markFull() }), enabled: &c.hasGrants},
	}
	return c.registerOptional(ctx)
}

func (c *Controller) addHandler(ctx context.Context, obj client.Object, h toolscache.ResourceEventHandler) error {
	inf, err := c.informers.GetInformer(ctx, obj)
	if err != nil {
		return fmt.Errorf("informer for %T: %w", obj, err)
	}
	_, err = inf.AddEventHandler(h)
	return err
}

// registerOptional watches the optional kinds that are installed now.
func (c *Controller) registerOptional(ctx context.Context) error {
	var still []*optionalSource
	for _, src := range c.pending {
		ok := true
		for _, gvk := range src.gvks {
			ok = ok && installed(c.mapper, gvk)
		}
		if !ok {
			still = append(still, src)
			continue
		}
		for i, obj := range src.objs {
			h := src.handler
			if src.name == "istio-security" {
				h = c.handler([]func(o, old client.Object){c.markAuthz, c.markPeerAuthn}[i])
			}
			if err := c.addHandler(ctx, obj, h); err != nil {
				return err
			}
		}
		src.enabled.Store(true)
		c.log.Info("watching", "source", src.name)
		c.markFull()
	}
	c.pending = still
	return nil
}

// WatchLateCRDs polls for optional CRDs installed after start.
func (c *Controller) WatchLateCRDs(ctx context.Context, every time.Duration) {
	for len(c.pending) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		if err := c.registerOptional(ctx); err != nil {
			c.log.Error(err, "watching late CRDs")
		}
	}
}

// handler calls fn(new, old) for adds, updates and deletes (old is nil
// except for updates; for deletes new is the last known object).
func (c *Controller) handler(fn func(obj, old client.Object)) toolscache.ResourceEventHandler {
	asObj := func(o any) client.Object {
		if t, ok := o.(toolscache.DeletedFinalStateUnknown); ok {
			o = t.Obj
		}
		co, _ := o.(client.Object)
		return co
	}
	return toolscache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) {
			if co := asObj(o); co != nil {
				fn(co, nil)
			}
		},
		UpdateFunc: func(old, o any) {
			if co := asObj(o); co != nil {
				fn(co, asObj(old))
			}
		},
		DeleteFunc: func(o any) {
			if co := asObj(o); co != nil {
				fn(co, nil)
			}
		},
	}
}

func (c *Controller) signal() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *Controller) markPod(o client.Object) {
	if c.OnPodEvent != nil {
		c.OnPodEvent(o.GetNamespace(), o.GetName())
	}
	c.mu.Lock()
	c.dirty.pods[client.ObjectKeyFromObject(o)] = struct{}{}
	c.mu.Unlock()
	c.signal()
}

func (c *Controller) markNamespace(ns string, full bool) {
	c.mu.Lock()
	c.dirty.namespaces[ns] = struct{}{}
	c.dirty.full = c.dirty.full || full
	c.mu.Unlock()
	c.signal()
}

func (c *Controller) markFull() {
	c.mu.Lock()
	c.dirty.full = true
	c.mu.Unlock()
	c.signal()
}

func (c *Controller) rootNamespace() string {
	return c.meshConfig(context.Background()).RootNamespace
}

// markAuthz: selector policies change which workloads list them.
func (c *Controller) markAuthz(o, old client.Object) {
	c.mu.Lock()
	c.dirty.authz[client.ObjectKeyFromObject(o)] = struct{}{}
	c.dirty.routes[l7KeyOf(o, "AuthorizationPolicy", "security.istio.io")] = struct{}{}
	c.mu.Unlock()
	c.markAuthzTargets(o, old)
}

func (c *Controller) markPeerAuthn(o, old client.Object) {
	c.mu.Lock()
	c.dirty.peerAuthn[client.ObjectKeyFromObject(o)] = struct{}{}
	c.mu.Unlock()
	c.markPolicyTargets(o, old)
}

func (c *Controller) markPolicyTargets(o, _ client.Object) {
	if o.GetNamespace() == c.rootNamespace() {
		c.markFull()
		return
	}
	c.markNamespace(o.GetNamespace(), false)
}

// markAuthz: only selector policies change what workloads carry; namespace
// and global policies are looked up by scope on the client.
func (c *Controller) markAuthzTargets(o, old client.Object) {
	hasSelector := func(obj client.Object) bool {
		ap, ok := obj.(*securityv1.AuthorizationPolicy)
		return ok && len(ap.Spec.GetSelector().GetMatchLabels()) > 0
	}
	if hasSelector(o) || (old != nil && hasSelector(old)) {
		c.markPolicyTargets(o, old)
		return
	}
	c.signal()
}

// markEndpointSlice: selector-less services take their endpoints from
// EndpointSlices; the pods they name are recomputed.
func (c *Controller) markEndpointSlice(o, old client.Object) {
	es, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	svcName := es.Labels[discoveryv1.LabelServiceName]
	if svcName == "" {
		return
	}
	var svc corev1.Service
	if err := c.reader.Get(context.Background(), client.ObjectKey{Namespace: es.Namespace, Name: svcName}, &svc); err == nil && len(svc.Spec.Selector) > 0 {
		return
	}
	c.mu.Lock()
	for _, slice := range []client.Object{o, old} {
		s, ok := slice.(*discoveryv1.EndpointSlice)
		if !ok || s == nil {
			continue
		}
		for _, ep := range s.Endpoints {
			if ref := ep.TargetRef; ref != nil && ref.Kind == "Pod" {
				c.dirty.pods[types.NamespacedName{Namespace: s.Namespace, Name: ref.Name}] = struct{}{}
			}
		}
	}
	c.mu.Unlock()
	c.signal()
}

func (c *Controller) markRoute(o client.Object) {
	gvk := routeGVK(o)
	c.mu.Lock()
	c.dirty.routes[l7KeyOf(o, gvk.Kind, gvk.Group)] = struct{}{}
	c.mu.Unlock()
	c.signal()
}

// routeGVK is the kind of a route object we watch.
func routeGVK(o client.Object) schema.GroupVersionKind {
	switch o.(type) {
	case *gwv1.GRPCRoute:
		return grpcRouteGVK
	case *gwv1.TLSRoute:
		return tlsRouteGVK
	case *gwv1.TCPRoute:
		return tcpRouteGVK
	}
	return httpRouteGVK
}

func l7KeyOf(o client.Object, kind, group string) string {
	return xds.L7Key(group, kind, o.GetNamespace(), o.GetName())
}

// isWaypointService: a waypoint's Service may be referenced from other
// namespaces, so its changes recompute everything.
func (c *Controller) isWaypointService(o client.Object) bool {
	return o.GetLabels()[GatewayNameLabel] != "" || o.GetLabels()[WaypointNameLabel] != "" ||
		c.IsWaypoint(o.GetNamespace(), o.GetName())
}

// Synced reports whether the first full model has been pushed; the xDS
// server serves nobody before that, so a reconnecting proxy never sees a
// partial view (which would read as mass deletion).
func (c *Controller) Synced() bool { return c.synced.Load() }

// Run debounces changes and pushes them until ctx ends. The informers must
// have synced before Run is called.
func (c *Controller) Run(ctx context.Context) {
	c.flush(ctx)
	c.synced.Store(true)
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		}
		first := time.Now()
		quiet := time.NewTimer(c.opts.Debounce)
	debounce:
		for {
			select {
			case <-ctx.Done():
				quiet.Stop()
				return
			case <-c.kick:
				if time.Since(first) >= c.opts.MaxDebounce {
					break debounce
				}
				quiet.Reset(min(c.opts.Debounce, c.opts.MaxDebounce-time.Since(first)))
			case <-quiet.C:
				break debounce
			}
		}
		quiet.Stop()
		if c.flush(ctx) > 0 {
			pushLatency.Observe(time.Since(first).Seconds())
		}
	}
}

func (c *Controller) meshConfig(ctx context.Context) meshConfig {
	mc := meshConfig{
		TrustDomain: c.opts.TrustDomain, RootNamespace: c.opts.MeshNamespace,
		ClusterID: c.opts.ClusterID, DomainSuffix: c.opts.DomainSuffix,
	}
	var meshes meshv1.AmbientMeshList
	if err := c.reader.List(ctx, &meshes); err == nil && len(meshes.Items) > 0 {
		sort.Slice(meshes.Items, func(i, j int) bool {
			return meshes.Items[i].CreationTimestamp.Before(&meshes.Items[j].CreationTimestamp)
		})
		m := meshes.Items[0].Spec
		if m.TrustDomain != "" {
			mc.TrustDomain = m.TrustDomain
		}
		if m.Namespace != "" {
			mc.RootNamespace = m.Namespace
		}
		if m.ClusterDomain != "" {
			mc.DomainSuffix = m.ClusterDomain
		}
		mc.ExcludedNamespaces = m.Capture.ExcludedNamespaces
	}
	return mc
}

// flush recomputes everything marked dirty and pushes the differences; it
// returns the number of resources changed.
func (c *Controller) flush(ctx context.Context) int {
	c.mu.Lock()
	d := c.dirty
	c.dirty = newDirty()
	c.mu.Unlock()
	if d.empty() {
		return 0
	}
	b := newBuild(ctx, c, c.meshConfig(ctx))
	if err := b.run(d); err != nil {
		// The informer cache does not fail reads; if it ever does, retry
		// everything rather than push a partial model.
		c.log.Error(err, "building discovery model; retrying")
		c.markFull()
		return 0
	}
	c.waypoints.Store(&b.wps)
	c.ingress.Store(&b.ingress)
	inUse := false
	for _, gw := range b.gateways {
		inUse = inUse || route.UsesSelectors(gw)
	}
	c.selectorsInUse.Store(inUse)
	c.Authorizations.SetRootNamespace(b.mc.RootNamespace)
	c.L7.SetRootNamespace(b.mc.RootNamespace)
	changed := c.apply(xds.AddressType, c.Addresses, b.addresses, b.addrScope) +
		c.apply(xds.AuthorizationType, c.Authorizations, b.authz, b.authzScope) +
		c.apply(xds.L7ResourceType, c.L7, b.l7, b.l7Scope)
	if c.OnPush != nil {
		c.OnPush(changed)
	}
	return changed
}

// apply pushes want for the names in scope (nil scope: every name): names
// in scope but not in want are deleted; unchanged resources are skipped.
func (c *Controller) apply(typeURL string, lc resourceCache, want map[string]proto.Message, scope map[string]struct{}) int {
	c.curMu.Lock()
	cur := c.current[typeURL]
	update := map[string]cachetypes.Resource{}
	var remove []string
	for name, msg := range want {
		if old, ok := cur[name]; ok && c.same(typeURL, name, old, msg) {
			continue
		}
		update[name] = msg
		cur[name] = c.keep(typeURL, msg)
	}
	consider := func(name string) {
		if _, keep := want[name]; !keep {
			if _, ok := cur[name]; ok {
				remove = append(remove, name)
				delete(cur, name)
			}
		}
	}
	if scope == nil {
		for name := range cur {
			consider(name)
		}
	} else {
		for name := range scope {
			consider(name)
		}
	}
	c.curMu.Unlock()
	if len(update)+len(remove) == 0 {
		return 0
	}
	if err := lc.UpdateResources(update, remove); err != nil {
		c.log.Error(err, "updating xDS cache", "type", typeURL)
	}
	return len(update) + len(remove)
}

// resourceCache is where apply pushes: a LinearCache or the AddressCache.
type resourceCache interface {
	UpdateResources(update map[string]cachetypes.Resource, remove []string) error
}

// Addresses are the bulk of the model (one per pod): current holds only
// their names, and the AddressCache their encoding, compared as such.
func (c *Controller) same(typeURL, name string, old, msg proto.Message) bool {
	if typeURL == xds.AddressType {
		return c.Addresses.Holds(name, msg)
	}
	return proto.Equal(old, msg)
}

func (c *Controller) keep(typeURL string, msg proto.Message) proto.Message {
	if typeURL == xds.AddressType {
		return nil
	}
	return msg
}

// Snapshot returns the current resources of a type, sorted by name.
func (c *Controller) Snapshot(typeURL string) []NamedResource {
	c.curMu.RLock()
	defer c.curMu.RUnlock()
	out := make([]NamedResource, 0, len(c.current[typeURL]))
	for name, msg := range c.current[typeURL] {
		if typeURL == xds.AddressType {
			msg = c.Addresses.Message(name)
		}
		out = append(out, NamedResource{Name: name, Resource: msg})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// NamedResource is one resource of a Snapshot.
type NamedResource struct {
	Name     string
	Resource proto.Message
}

// build is one flush's computation, with per-namespace reads memoized.
type build struct {
	ctx   context.Context
	c     *Controller
	mc    meshConfig
	views map[string]*namespaceView
	wps   map[string]map[string]*waypoint // ns -> name
	// ingress: the ingress Gateways (ns -> name); gateways holds them for
	// a full build, which sends each to the L7 proxies.
	ingress  map[string]map[string]bool
	gateways []*gwv1.Gateway
	// localities of nodes by name, read once per build.
	localities map[string]*workloadapi.Locality

	addresses, authz, l7           map[string]proto.Message
	addrScope, authzScope, l7Scope map[string]struct{} // nil = full
}

func newBuild(ctx context.Context, c *Controller, mc meshConfig) *build {
	return &build{
		ctx: ctx, c: c, mc: mc, views: map[string]*namespaceView{},
		addresses: map[string]proto.Message{}, authz: map[string]proto.Message{}, l7: map[string]proto.Message{},
	}
}

var noCopy = client.UnsafeDisableDeepCopy

func (b *build) run(d dirtySet) error {
	if err := b.loadWaypoints(); err != nil {
		return err
	}
	if d.full {
		return b.runFull()
	}
	b.addrScope, b.authzScope, b.l7Scope = map[string]struct{}{}, map[string]struct{}{}, map[string]struct{}{}
	for ns := range d.namespaces {
		if err := b.namespace(ns); err != nil {
			return err
		}
	}
	for key := range d.pods {
		if _, done := d.namespaces[key.Namespace]; done {
			continue
		}
		if err := b.pod(key); err != nil {
			return err
		}
	}
	for key := range d.authz {
		if err := b.authorizationPolicy(key); err != nil {
			return err
		}
	}
	for key := range d.peerAuthn {
		if err := b.peerAuthentication(key); err != nil {
			return err
		}
	}
	for key := range d.routes {
		if err := b.route(key); err != nil {
			return err
		}
	}
	return nil
}

func (b *build) runFull() error {
	var pods corev1.PodList
	if err := b.c.reader.List(b.ctx, &pods, noCopy); err != nil {
		return err
	}
	for i := range pods.Items {
		if err := b.addPod(&pods.Items[i]); err != nil {
			return err
		}
	}
	var svcs corev1.ServiceList
	if err := b.c.reader.List(b.ctx, &svcs, noCopy); err != nil {
		return err
	}
	for i := range svcs.Items {
		if err := b.addService(&svcs.Items[i]); err != nil {
			return err
		}
	}
	if err := b.allNetworking(); err != nil {
		return err
	}
	b.authz[xds.PolicyKey(b.mc.RootNamespace, policy.StaticStrictPolicyName)] = policy.StaticStrictPolicy(b.mc.RootNamespace)
	// The L7 engines' mesh settings: the root namespace these policies
	// were translated with (a root change is a full build).
	settings := xds.MeshSettings{RootNamespace: b.mc.RootNamespace}
	if mesh, err := xds.MeshResource(settings); err == nil {
		b.l7[xds.MeshKey(settings)] = mesh
	}
	if b.c.hasIstio.Load() {
		var aps securityv1.AuthorizationPolicyList
		if err := b.c.reader.List(b.ctx, &aps, noCopy); err != nil {
			return err
		}
		for _, ap := range aps.Items {
			b.addAuthorizationPolicy(ap)
		}
		var pas securityv1.PeerAuthenticationList
		if err := b.c.reader.List(b.ctx, &pas, noCopy); err != nil {
			return err
		}
		for _, pa := range pas.Items {
			b.addPeerAuthentication(pa)
		}
	}
	// An ingress gateway learns its listeners from its Gateway (any change
	// of a Gateway rebuilds everything), with the namespaces its listeners'
	// selectors match resolved here, where namespace labels are known.
	nsLabels, err := b.namespaceLabels()
	if err != nil {
		return err
	}
	for _, gw := range b.gateways {
		b.addL7(l7KeyOf(gw, gatewayGVK.Kind, gatewayGVK.Group), route.ResolveSelectors(gw, nsLabels), gatewayGVK)
	}
	if b.c.hasGrants.Load() {
		var rgs gwv1beta1.ReferenceGrantList
		if err := b.c.reader.List(b.ctx, &rgs, noCopy); err != nil {
			return err
		}
		for i := range rgs.Items {
			if rg := &rgs.Items[i]; rg.DeletionTimestamp == nil {
				b.addL7(l7KeyOf(rg, referenceGrantGVK.Kind, referenceGrantGVK.Group), rg, referenceGrantGVK)
			}
		}
	}
	for _, kind := range []struct {
		on    bool
		lists []client.ObjectList
	}{
		{b.c.hasRoutes.Load(), []client.ObjectList{&gwv1.HTTPRouteList{}, &gwv1.GRPCRouteList{}}},
		{b.c.hasL4Routes.Load(), []client.ObjectList{&gwv1.TLSRouteList{}, &gwv1.TCPRouteList{}}},
	} {
		if !kind.on {
			continue
		}
		for _, list := range kind.lists {
			if err := b.c.reader.List(b.ctx, list, noCopy); err != nil {
				return err
			}
			_ = meta.EachListItem(list, func(o runtime.Object) error {
				r := o.(client.Object)
				b.addRoute(r, routeGVK(r))
				return nil
			})
		}
	}
	return nil
}

// loadWaypoints indexes WaypointPolicies and waypoint Gateways; a
// WaypointPolicy wins over a Gateway of the same name.
func (b *build) loadWaypoints() error {
	b.wps = map[string]map[string]*waypoint{}
	b.ingress, b.gateways = map[string]map[string]bool{}, nil
	ix := waypointbind.Index(b.wps)
	if b.c.hasGateway.Load() {
		byName := map[string]*gwv1.GatewayClass{}
		if b.c.hasClasses.Load() {
			var classes gwv1.GatewayClassList
			if err := b.c.reader.List(b.ctx, &classes, noCopy); err != nil {
				return err
			}
			for i := range classes.Items {
				byName[classes.Items[i].Name] = &classes.Items[i]
			}
		}
		var gws gwv1.GatewayList
		if err := b.c.reader.List(b.ctx, &gws, noCopy); err != nil {
			return err
		}
		for i := range gws.Items {
			gw := &gws.Items[i]
			class := string(gw.Spec.GatewayClassName)
			if w, ok := waypointbind.FromGatewayObject(gw); ok {
				ix.Add(w)
			} else if waypointbind.IngressClass(class, byName[class]) && gw.DeletionTimestamp == nil {
				if b.ingress[gw.Namespace] == nil {
					b.ingress[gw.Namespace] = map[string]bool{}
				}
				b.ingress[gw.Namespace][gw.Name] = true
				b.gateways = append(b.gateways, gw)
			}
		}
	}
	var wpl meshv1.WaypointPolicyList
	if err := b.c.reader.List(b.ctx, &wpl, noCopy); err != nil {
		return err
	}
	for i := range wpl.Items {
		if w, ok := waypointbind.FromPolicy(&wpl.Items[i]); ok {
			ix.Add(w)
		}
	}
	return nil
}

func (b *build) view(ns string) (*namespaceView, error) {
	if v, ok := b.views[ns]; ok {
		return v, nil
	}
	v := &namespaceView{
		locality:  b.nodeLocality,
		waypoints: b.wps[ns],
		lookupWaypoint: func(namespace, name string) *waypoint {
			return b.wps[namespace][name]
		},
		waypointService: b.waypointService,
	}
	if v.waypoints == nil {
		v.waypoints = map[string]*waypoint{}
	}
	var nsObj corev1.Namespace
	if err := b.c.reader.Get(b.ctx, client.ObjectKey{Name: ns}, &nsObj); err == nil {
		v.ns = &nsObj
	} else if client.IgnoreNotFound(err) != nil {
		return nil, err
	}
	var svcs corev1.ServiceList
	if err := b.c.reader.List(b.ctx, &svcs, client.InNamespace(ns), noCopy); err != nil {
		return nil, err
	}
	for i := range svcs.Items {
		v.services = append(v.services, &svcs.Items[i])
		if len(svcs.Items[i].Spec.Selector) == 0 && svcs.Items[i].Spec.Type != corev1.ServiceTypeExternalName {
			v.needSlices = true
		}
	}
	if v.needSlices {
		var slices discoveryv1.EndpointSliceList
		if err := b.c.reader.List(b.ctx, &slices, client.InNamespace(ns), noCopy); err != nil {
			return nil, err
		}
		v.slices = map[string][]*discoveryv1.EndpointSlice{}
		for i := range slices.Items {
			es := &slices.Items[i]
			if name := es.Labels[discoveryv1.LabelServiceName]; name != "" {
				v.slices[name] = append(v.slices[name], es)
			}
		}
	}
	if b.c.hasNetworking.Load() {
		var ses networkingv1.ServiceEntryList
		if err := b.c.reader.List(b.ctx, &ses, client.InNamespace(ns), noCopy); err != nil {
			return nil, err
		}
		for _, se := range ses.Items {
			if se.DeletionTimestamp == nil {
				v.serviceEntries = append(v.serviceEntries, se)
			}
		}
		var wes networkingv1.WorkloadEntryList
		if err := b.c.reader.List(b.ctx, &wes, client.InNamespace(ns), noCopy); err != nil {
			return nil, err
		}
		v.workloadEntries = wes.Items
	}
	if b.c.hasIstio.Load() {
		for _, n := range uniq(ns, b.mc.RootNamespace) {
			var aps securityv1.AuthorizationPolicyList
			if err := b.c.reader.List(b.ctx, &aps, client.InNamespace(n), noCopy); err != nil {
				return nil, err
			}
			v.authz = append(v.authz, aps.Items...)
			var pas securityv1.PeerAuthenticationList
			if err := b.c.reader.List(b.ctx, &pas, client.InNamespace(n), noCopy); err != nil {
				return nil, err
			}
			v.peerAuthn = append(v.peerAuthn, pas.Items...)
		}
	}
	b.views[ns] = v
	return v, nil
}

// nodeMeta is a Node read by metadata only.
func nodeMeta() *metav1.PartialObjectMetadata {
	m := &metav1.PartialObjectMetadata{}
	m.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Node"))
	return m
}

// nodeLocality is node's locality (memoized per build); nil when the node
// is unknown or has no locality labels.
func (b *build) nodeLocality(node string) *workloadapi.Locality {
	if node == "" {
		return nil
	}
	if l, ok := b.localities[node]; ok {
		return l
	}
	var l *workloadapi.Locality
	m := nodeMeta()
	if err := b.c.reader.Get(b.ctx, client.ObjectKey{Name: node}, m); err == nil {
		l = nodeLocality(m.Labels)
	}
	if b.localities == nil {
		b.localities = map[string]*workloadapi.Locality{}
	}
	b.localities[node] = l
	return l
}

func uniq(a, b string) []string {
	if a == b {
		return []string{a}
	}
	return []string{a, b}
}

func (b *build) waypointService(namespace, name string) *corev1.Service {
	if v, ok := b.views[namespace]; ok {
		for _, s := range v.services {
			if s.Name == name {
				return s
			}
		}
		return nil
	}
	var svc corev1.Service
	if err := b.c.reader.Get(b.ctx, client.ObjectKey{Namespace: namespace, Name: name}, &svc); err != nil {
		return nil
	}
	return &svc
}

// namespace recomputes every pod and service of ns.
func (b *build) namespace(ns string) error {
	var pods corev1.PodList
	if err := b.c.reader.List(b.ctx, &pods, client.InNamespace(ns), noCopy); err != nil {
		return err
	}
	// Everything previously known in ns is in scope, so vanished objects go.
	prefixes := []string{
		xds.PodUID(b.mc.ClusterID, ns, ""), ns + "/",
		xds.WorkloadEntryUID(b.mc.ClusterID, ns, ""),
		strings.TrimSuffix(xds.ServiceEntryUID(b.mc.ClusterID, ns, "", ""), "/"),
	}
	b.c.curMu.RLock()
	for name := range b.c.current[xds.L7ResourceType] {
		if strings.HasPrefix(name, xds.IngressUseWaypointKey(ns, "")) {
			b.l7Scope[name] = struct{}{} // a deleted Service's goes
		}
	}
	for name := range b.c.current[xds.AddressType] {
		for _, p := range prefixes {
			if strings.HasPrefix(name, p) {
				b.addrScope[name] = struct{}{}
				break
			}
		}
	}
	b.c.curMu.RUnlock()
	for i := range pods.Items {
		if err := b.addPod(&pods.Items[i]); err != nil {
			return err
		}
	}
	v, err := b.view(ns)
	if err != nil {
		return err
	}
	for _, svc := range v.services {
		if err := b.addService(svc); err != nil {
			return err
		}
	}
	b.addNetworking(v)
	return nil
}

// allNetworking adds the ServiceEntries and WorkloadEntries of every
// namespace that has any (full build).
func (b *build) allNetworking() error {
	if !b.c.hasNetworking.Load() {
		return nil
	}
	namespaces := map[string]bool{}
	var ses networkingv1.ServiceEntryList
	if err := b.c.reader.List(b.ctx, &ses, noCopy); err != nil {
		return err
	}
	for _, se := range ses.Items {
		namespaces[se.Namespace] = true
	}
	var wes networkingv1.WorkloadEntryList
	if err := b.c.reader.List(b.ctx, &wes, noCopy); err != nil {
		return err
	}
	for _, we := range wes.Items {
		namespaces[we.Namespace] = true
	}
	for ns := range namespaces {
		v, err := b.view(ns)
		if err != nil {
			return err
		}
		b.addNetworking(v)
	}
	return nil
}

// addNetworking adds the Services and Workloads of a namespace's
// ServiceEntries and WorkloadEntries.
func (b *build) addNetworking(v *namespaceView) {
	add := func(name string, a *workloadapi.Address) {
		b.addresses[name] = a
		if b.addrScope != nil {
			b.addrScope[name] = struct{}{}
		}
	}
	for _, se := range v.serviceEntries {
		for _, s := range buildServiceEntryServices(b.mc, v, se) {
			add(xds.ServiceKey(s.Namespace, s.Hostname), &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}})
		}
		for _, w := range buildServiceEntryWorkloads(b.mc, v, se) {
			add(w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
		}
	}
	for _, we := range v.workloadEntries {
		if w := buildWorkloadEntry(b.mc, v, we); w != nil {
			add(w.Uid, &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}})
		}
	}
}

func (b *build) pod(key types.NamespacedName) error {
	uid := xds.PodUID(b.mc.ClusterID, key.Namespace, key.Name)
	b.addrScope[uid] = struct{}{}
	var pod corev1.Pod
	if err := b.c.reader.Get(b.ctx, key, &pod); err != nil {
		return client.IgnoreNotFound(err)
	}
	return b.addPod(&pod)
}

func (b *build) addPod(pod *corev1.Pod) error {
	if b.addrScope != nil {
		b.addrScope[xds.PodUID(b.mc.ClusterID, pod.Namespace, pod.Name)] = struct{}{}
	}
	v, err := b.view(pod.Namespace)
	if err != nil {
		return err
	}
	if w := buildWorkload(b.mc, v, pod); w != nil {
		b.addresses[w.Uid] = &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
	}
	return nil
}

func (b *build) addService(svc *corev1.Service) error {
	v, err := b.view(svc.Namespace)
	if err != nil {
		return err
	}
	s := buildService(b.mc, v, svc)
	if s != nil {
		name := xds.ServiceKey(s.Namespace, s.Hostname)
		b.addresses[name] = &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}}
		if b.addrScope != nil {
			b.addrScope[name] = struct{}{}
		}
	}
	// Ingress gateways learn which Services they reach through the
	// waypoint (istio.io/ingress-use-waypoint); the others they reach
	// directly.
	key := xds.IngressUseWaypointKey(svc.Namespace, svc.Name)
	if b.l7Scope != nil {
		b.l7Scope[key] = struct{}{}
	}
	var nsLabels map[string]string
	if v.ns != nil {
		nsLabels = v.ns.Labels
	}
	if s != nil && s.Waypoint != nil && waypointbind.IngressUseWaypoint(svc.Labels, nsLabels) {
		b.l7[key] = xds.IngressUseWaypointResource(svc.Namespace, svc.Name)
	}
	return nil
}

func (b *build) authorizationPolicy(key types.NamespacedName) error {
	name := xds.PolicyKey(key.Namespace, key.Name)
	b.authzScope[name] = struct{}{}
	var ap securityv1.AuthorizationPolicy
	if err := b.c.reader.Get(b.ctx, key, &ap); err != nil {
		if apierrors.IsNotFound(err) {
			b.c.opts.Events.ForgetKey(kubeevents.Key(&ap, key.Namespace, key.Name))
		}
		return client.IgnoreNotFound(err)
	}
	b.addAuthorizationPolicy(&ap)
	return nil
}

func (b *build) addAuthorizationPolicy(ap *securityv1.AuthorizationPolicy) {
	if ap.DeletionTimestamp != nil {
		return
	}
	if out := policy.TranslateAuthorizationPolicy(b.mc.RootNamespace, ap); out != nil {
		b.authz[xds.PolicyKey(out.Namespace, out.Name)] = out
	}
	b.reportDroppedRules(ap)
	key := l7KeyOf(ap, "AuthorizationPolicy", "security.istio.io")
	if b.l7Scope != nil {
		b.l7Scope[key] = struct{}{}
	}
	if policy.NeedsWaypoint(ap) {
		b.addL7(key, ap, authzPolicyGV)
	}
}

func (b *build) peerAuthentication(key types.NamespacedName) error {
	for _, n := range []string{policy.ConvertedPeerAuthPrefix + key.Name, policy.ConvertedPeerAuthPrefix + key.Name + "_strict_ports"} {
		b.authzScope[xds.PolicyKey(key.Namespace, n)] = struct{}{}
	}
	var pa securityv1.PeerAuthentication
	if err := b.c.reader.Get(b.ctx, key, &pa); err != nil {
		return client.IgnoreNotFound(err)
	}
	b.addPeerAuthentication(&pa)
	return nil
}

func (b *build) addPeerAuthentication(pa *securityv1.PeerAuthentication) {
	if pa.DeletionTimestamp != nil {
		return
	}
	for _, out := range policy.TranslatePeerAuthentication(b.mc.RootNamespace, pa) {
		b.authz[xds.PolicyKey(out.Namespace, out.Name)] = out
	}
}

func (b *build) route(key string) error {
	b.l7Scope[key] = struct{}{}
	parts := strings.SplitN(key, "/", 4)
	if len(parts) != 4 {
		return nil
	}
	nn := types.NamespacedName{Namespace: parts[2], Name: parts[3]}
	switch parts[1] {
	case httpRouteGVK.Kind:
		var r gwv1.HTTPRoute
		if err := b.c.reader.Get(b.ctx, nn, &r); err != nil {
			return client.IgnoreNotFound(err)
		}
		b.addRoute(&r, httpRouteGVK)
	case grpcRouteGVK.Kind:
		var r gwv1.GRPCRoute
		if err := b.c.reader.Get(b.ctx, nn, &r); err != nil {
			return client.IgnoreNotFound(err)
		}
		b.addRoute(&r, grpcRouteGVK)
	case tlsRouteGVK.Kind:
		var r gwv1.TLSRoute
		if err := b.c.reader.Get(b.ctx, nn, &r); err != nil {
			return client.IgnoreNotFound(err)
		}
		b.addRoute(&r, tlsRouteGVK)
	case tcpRouteGVK.Kind:
		var r gwv1.TCPRoute
		if err := b.c.reader.Get(b.ctx, nn, &r); err != nil {
			return client.IgnoreNotFound(err)
		}
		b.addRoute(&r, tcpRouteGVK)
	}
	return nil
}

func (b *build) addRoute(obj client.Object, gvk schema.GroupVersionKind) {
	if obj.GetDeletionTimestamp() != nil {
		return
	}
	b.addL7(l7KeyOf(obj, gvk.Kind, gvk.Group), obj, gvk)
}

// addL7 carries a Kubernetes object whole (spec and identifying metadata).
func (b *build) addL7(key string, obj client.Object, gvk schema.GroupVersionKind) {
	body := map[string]any{
		"apiVersion": gvk.GroupVersion().String(),
		"kind":       gvk.Kind,
		"metadata": map[string]any{
			"name": obj.GetName(), "namespace": obj.GetNamespace(),
			"labels": obj.GetLabels(), "annotations": obj.GetAnnotations(),
			"generation": obj.GetGeneration(),
			// Route conflicts resolve oldest first (Gateway API).
			"creationTimestamp": obj.GetCreationTimestamp(),
		},
	}
	raw, err := json.Marshal(obj)
	if err != nil {
		b.c.log.Error(err, "encoding L7 resource", "key", key)
		return
	}
	var full map[string]any
	if err := json.Unmarshal(raw, &full); err == nil {
		body["spec"] = full["spec"]
	}
	js, err := json.Marshal(body)
	if err != nil {
		return
	}
	b.l7[key] = &meshapi.L7Resource{Group: gvk.Group, Kind: gvk.Kind, Namespace: obj.GetNamespace(), Name: obj.GetName(), Json: js}
}

// IsWaypoint reports whether a waypoint (WaypointPolicy or waypoint Gateway)
// named name exists in namespace, as of the last push.
func (c *Controller) IsWaypoint(namespace, name string) bool {
	idx := c.waypoints.Load()
	if idx == nil {
		return false
	}
	_, ok := (*idx)[namespace][name]
	return ok
}

// namespaceLabels maps every namespace to its labels, when an ingress
// Gateway selects route namespaces by label (else nil: not needed).
func (b *build) namespaceLabels() (map[string]map[string]string, error) {
	need := false
	for _, gw := range b.gateways {
		need = need || route.UsesSelectors(gw)
	}
	if !need {
		return nil, nil
	}
	var list corev1.NamespaceList
	if err := b.c.reader.List(b.ctx, &list, noCopy); err != nil {
		return nil, err
	}
	out := make(map[string]map[string]string, len(list.Items))
	for _, ns := range list.Items {
		out[ns.Name] = ns.Labels
	}
	return out, nil
}

// IsIngressGateway reports whether an ingress Gateway (class istio, or
// another class naming our controllerName: waypointbind.IngressClass) named
// name exists in namespace, as of the last push.
func (c *Controller) IsIngressGateway(namespace, name string) bool {
	idx := c.ingress.Load()
	return idx != nil && (*idx)[namespace][name]
}

// IsL7Proxy reports whether account in namespace is the service account
// (and Deployment) of one of the mesh's L7 proxies: a waypoint (named after
// it) or an ingress gateway (<gateway>-istio). Only that proxy's own pods
// obtain its identity and the L7 configuration.
func (c *Controller) IsL7Proxy(namespace, account string) bool {
	if c.IsWaypoint(namespace, account) {
		return true
	}
	gw, ok := strings.CutSuffix(account, proxyauth.IngressObjectName(""))
	return ok && c.IsIngressGateway(namespace, gw)
}

type podRef struct{ waypoint, sidecar bool }

func (c *Controller) getPod(ctx context.Context, ns, name string, out *podRef) error {
	var pod corev1.Pod
	if err := c.reader.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, &pod); err != nil {
		return err
	}
	out.waypoint = isWaypointPod(&pod)
	out.sidecar = selection.HBONESidecar(&pod)
	return nil
}
