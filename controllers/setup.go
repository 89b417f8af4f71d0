package controllers

import (
	"context"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/ambientmesh/ambient/controllers/podcache"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// CacheOptions narrows the manager's informers to what the operator owns
// where a cluster-wide cache would be large or sensitive: only the mesh's
// ConfigMaps and cluster RBAC objects are cached. Cached objects lose their
// managedFields. Use with NewCache.
func CacheOptions() cache.Options {
	owned := labels.SelectorFromSet(labels.Set{LabelManagedBy: ManagedByValue})
	return cache.Options{DefaultTransform: cache.TransformStripManagedFields(), ByObject: map[client.Object]cache.ByObject{
		&corev1.ConfigMap{}:          {Label: owned},
		&rbacv1.ClusterRole{}:        {Label: owned},
		&rbacv1.ClusterRoleBinding{}: {Label: owned},
	}}
}

// NewCache is the manager's cache (ctrl.Options.NewCache, with
// CacheOptions): pods are kept as compact records of what the manager reads
// and read as *corev1.Pod (podcache).
func NewCache(cfg *rest.Config, opts cache.Options) (cache.Cache, error) {
	return podcache.NewCache(cfg, opts)
}

// ClientOptions keeps Secrets out of the cache: CA keys are read from the API
// server when needed and never held in an informer.
func ClientOptions() client.Options {
	return client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}}
}

// Options configure the operator's controllers.
type Options struct {
	Defaults       Defaults
	RetryInterval  time.Duration
	ReleaseTimeout time.Duration
	EnableWebhooks bool
	// Events records what operators act on (default: the manager's
	// events.k8s.io recorder, as EventSource).
	Events *kubeevents.Recorder
}

// Setup registers every reconciler (and the webhooks) with mgr.
func Setup(mgr ctrl.Manager, o Options) error {
	if o.Events == nil {
		o.Events = kubeevents.New(mgr.GetEventRecorder(EventSource))
	}
	mesh := &AmbientMeshReconciler{
		Events:         o.Events,
		Client:         mgr.GetClient(),
		APIReader:      mgr.GetAPIReader(),
		Defaults:       o.Defaults,
		RetryInterval:  o.RetryInterval,
		ReleaseTimeout: o.ReleaseTimeout,
	}
	if err := mesh.SetupWithManager(mgr); err != nil {
		return err
	}
	waypoints := &WaypointPolicyReconciler{Client: mgr.GetClient(), Defaults: o.Defaults, RetryInterval: o.RetryInterval, Events: o.Events}
	if err := waypoints.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := setupGatewayWaypoints(mgr, o); err != nil {
		return err
	}
	if o.EnableWebhooks {
		if err := SetupWebhooks(mgr); err != nil {
			return err
		}
		mgr.GetWebhookServer().Register(SidecarInjectorPath, &webhook.Admission{Handler: &SidecarInjector{
			Reader: mgr.GetAPIReader(), Defaults: o.Defaults, Decoder: admission.NewDecoder(mgr.GetScheme())}})
	}
	return nil
}

// setupGatewayWaypoints registers the Gateway waypoint, GatewayClass (both
// built-in classes and every class naming our controllerName), ingress
// Gateway and route status controllers when the cluster serves Gateway API v1 Gateways
// (restart the operator after installing the Gateway API CRDs).
func setupGatewayWaypoints(mgr ctrl.Manager, o Options) error {
	gk := schema.GroupKind{Group: gwv1.GroupName, Kind: "Gateway"}
	if _, err := mgr.GetRESTMapper().RESTMapping(gk, gwv1.GroupVersion.Version); err != nil {
		if meta.IsNoMatchError(err) {
			mgr.GetLogger().Info("Gateway API not installed: waypoint Gateways (class istio-waypoint) are not served")
			return nil
		}
		return err
	}
	if err := gwv1.Install(mgr.GetScheme()); err != nil {
		return err
	}
	if err := gwv1beta1.Install(mgr.GetScheme()); err != nil {
		return err
	}
	grants, err := referenceGrantsServed(mgr)
	if err != nil {
		return err
	}
	r := &GatewayWaypointReconciler{Client: mgr.GetClient(), Defaults: o.Defaults, RetryInterval: o.RetryInterval, Events: o.Events}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := (&GatewayClassReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader()}).SetupWithManager(mgr); err != nil {
		return err
	}
	if err := setupIngressGateways(mgr, o, grants); err != nil {
		return err
	}
	return setupRouteStatus(mgr, grants)
}

// referenceGrantsServed reports whether the cluster serves v1beta1
// ReferenceGrants (every Gateway API release since v0.6 does; without the
// CRD no cross-namespace reference is permitted).
func referenceGrantsServed(mgr ctrl.Manager) (bool, error) {
	gk := schema.GroupKind{Group: gwv1beta1.GroupName, Kind: "ReferenceGrant"}
	if _, err := mgr.GetRESTMapper().RESTMapping(gk, gwv1beta1.GroupVersion.Version); err != nil {
		if meta.IsNoMatchError(err) {
			mgr.GetLogger().Info("Gateway API ReferenceGrant not installed: cross-namespace references are refused")
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// setupIngressGateways registers the ingress Gateway controller (class
// istio and every other class naming our controllerName; the
// GatewayClassReconciler reports the classes); route kinds served by the cluster are watched
// for the listeners' attached-route counts.
func setupIngressGateways(mgr ctrl.Manager, o Options, grants bool) error {
	var kinds []client.Object
	for _, k := range RouteKinds {
		gk := schema.GroupKind{Group: gwv1.GroupName, Kind: k.Name}
		if _, err := mgr.GetRESTMapper().RESTMapping(gk, gwv1.GroupVersion.Version); err == nil {
			kinds = append(kinds, k.newRoute())
		} else if !meta.IsNoMatchError(err) {
			return err
		}
	}
	r := &IngressGatewayReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Defaults: o.Defaults, RetryInterval: o.RetryInterval}
	return r.SetupWithManager(mgr, grants, kinds...)
}

// setupRouteStatus registers a route status reconciler for each route kind
// the cluster serves.
func setupRouteStatus(mgr ctrl.Manager, grants bool) error {
	for _, kind := range RouteKinds {
		gk := schema.GroupKind{Group: gwv1.GroupName, Kind: kind.Name}
		if _, err := mgr.GetRESTMapper().RESTMapping(gk, gwv1.GroupVersion.Version); meta.IsNoMatchError(err) {
			mgr.GetLogger().Info("Gateway API route kind not installed: no status written for it", "kind", kind.Name)
			continue
		} else if err != nil {
			return err
		}
		r := &RouteStatusReconciler{Client: mgr.GetClient(), APIReader: mgr.GetAPIReader(), Kind: kind, Grants: grants}
		if err := r.SetupWithManager(context.Background(), mgr); err != nil {
			return err
		}
	}
	return nil
}
