package controllers

import (
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// CacheOptions narrows the manager's informers to what the operator owns
// where a cluster-wide cache would be large or sensitive: only the mesh's
// ConfigMaps and cluster RBAC objects are cached.
func CacheOptions() cache.Options {
	owned := labels.SelectorFromSet(labels.Set{LabelManagedBy: ManagedByValue})
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&corev1.ConfigMap{}:          {Label: owned},
		&rbacv1.ClusterRole{}:        {Label: owned},
		&rbacv1.ClusterRoleBinding{}: {Label: owned},
	}}
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
}

// Setup registers every reconciler (and the webhooks) with mgr.
func Setup(mgr ctrl.Manager, o Options) error {
	mesh := &AmbientMeshReconciler{
		Client:         mgr.GetClient(),
		APIReader:      mgr.GetAPIReader(),
		Defaults:       o.Defaults,
		RetryInterval:  o.RetryInterval,
		ReleaseTimeout: o.ReleaseTimeout,
	}
	if err := mesh.SetupWithManager(mgr); err != nil {
		return err
	}
	waypoints := &WaypointPolicyReconciler{Client: mgr.GetClient(), Defaults: o.Defaults, RetryInterval: o.RetryInterval}
	if err := waypoints.SetupWithManager(mgr); err != nil {
		return err
	}
	if err := setupGatewayWaypoints(mgr, o); err != nil {
		return err
	}
	if o.EnableWebhooks {
		return SetupWebhooks(mgr)
	}
	return nil
}

// setupGatewayWaypoints registers the Gateway waypoint controller when the
// cluster serves Gateway API v1 Gateways (restart the operator after
// installing the Gateway API CRDs).
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
	r := &GatewayWaypointReconciler{Client: mgr.GetClient(), Defaults: o.Defaults, RetryInterval: o.RetryInterval}
	return r.SetupWithManager(mgr)
}
