package controllers

import (
	"context"
	"fmt"
	"maps"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/validation/field"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// The webhooks enforce what a schema cannot: rules that span objects. Lists
// go to the API server (not the cache) so a just-created object counts.

// +kubebuilder:webhook:path=/validate-mesh-ambient-dev-v1alpha1-ambientmesh,mutating=false,failurePolicy=fail,sideEffects=None,groups=mesh.ambient.dev,resources=ambientmeshes,verbs=create;update,versions=v1alpha1,name=vambientmesh.mesh.ambient.dev,admissionReviewVersions=v1
// +kubebuilder:webhook:path=/validate-mesh-ambient-dev-v1alpha1-waypointpolicy,mutating=false,failurePolicy=fail,sideEffects=None,groups=mesh.ambient.dev,resources=waypointpolicies,verbs=create;update,versions=v1alpha1,name=vwaypointpolicy.mesh.ambient.dev,admissionReviewVersions=v1

// AmbientMeshValidator allows one mesh per cluster and keeps the trust
// domain and mesh namespace fixed.
type AmbientMeshValidator struct{ Reader client.Reader }

var meshGK = meshv1.GroupVersion.WithKind("AmbientMesh").GroupKind()

// ValidateCreate refuses a second AmbientMesh.
func (v *AmbientMeshValidator) ValidateCreate(ctx context.Context, mesh *meshv1.AmbientMesh) (admission.Warnings, error) {
	if errs := meshResourceErrors(mesh); len(errs) > 0 {
		return nil, apierrors.NewInvalid(meshGK, mesh.Name, errs)
	}
	list := &meshv1.AmbientMeshList{}
	if err := v.Reader.List(ctx, list); err != nil {
		return nil, err
	}
	for _, other := range list.Items {
		if other.Name != mesh.Name && other.DeletionTimestamp.IsZero() {
			return nil, apierrors.NewInvalid(meshGK, mesh.Name, field.ErrorList{field.Forbidden(field.NewPath("metadata", "name"),
				fmt.Sprintf("AmbientMesh %q already exists and there is one mesh per cluster; edit %q instead of creating %q", other.Name, other.Name, mesh.Name))})
		}
	}
	return nil, nil
}

// ValidateUpdate refuses changes that would break every identity or move
// the installation (the CRD's CEL rules say the same; this covers API
// servers with CEL disabled and gives the fix).
func (v *AmbientMeshValidator) ValidateUpdate(_ context.Context, old, mesh *meshv1.AmbientMesh) (admission.Warnings, error) {
	var errs field.ErrorList
	if mesh.DeletionTimestamp.IsZero() { // never block the finalizer's removal
		errs = meshResourceErrors(mesh)
	}
	if old.Spec.TrustDomain != mesh.Spec.TrustDomain {
		errs = append(errs, field.Forbidden(field.NewPath("spec", "trustDomain"),
			fmt.Sprintf("changing the trust domain from %q to %q would invalidate every workload certificate; delete and re-create the AmbientMesh to change it", old.Spec.TrustDomain, mesh.Spec.TrustDomain)))
	}
	if old.Spec.Namespace != mesh.Spec.Namespace {
		errs = append(errs, field.Forbidden(field.NewPath("spec", "namespace"),
			fmt.Sprintf("the mesh namespace cannot move from %q to %q; delete and re-create the AmbientMesh", old.Spec.Namespace, mesh.Spec.Namespace)))
	}
	if len(errs) > 0 {
		return nil, apierrors.NewInvalid(meshGK, mesh.Name, errs)
	}
	return nil, nil
}

func meshResourceErrors(mesh *meshv1.AmbientMesh) field.ErrorList {
	spec := field.NewPath("spec")
	errs := resourceErrors(spec.Child("ztunnel", "resources"), mesh.Spec.Ztunnel.Resources)
	errs = append(errs, resourceErrors(spec.Child("nodeAgent", "resources"), mesh.Spec.NodeAgent.Resources)...)
	return append(errs, resourceErrors(spec.Child("waypoint", "resources"), mesh.Spec.Waypoint.Resources)...)
}

// resourceErrors refuses a request above its limit here, naming the field:
// otherwise only the DaemonSet or Deployment built from it is refused, later
// and far from the cause.
func resourceErrors(path *field.Path, r *corev1.ResourceRequirements) field.ErrorList {
	if r == nil {
		return nil
	}
	var errs field.ErrorList
	for _, name := range slices.Sorted(maps.Keys(r.Requests)) {
		req, lim := r.Requests[name], r.Limits[name]
		if _, limited := r.Limits[name]; limited && req.Cmp(lim) > 0 {
			errs = append(errs, field.Invalid(path.Child("requests").Key(string(name)), req.String(),
				fmt.Sprintf("must not exceed the %s limit %s", name, lim.String())))
		}
	}
	return errs
}

// ValidateDelete allows deletion; the finalizer cleans up.
func (v *AmbientMeshValidator) ValidateDelete(context.Context, *meshv1.AmbientMesh) (admission.Warnings, error) {
	return nil, nil
}

// WaypointPolicyValidator allows at most one namespace waypoint per
// namespace and one waypoint per service account.
type WaypointPolicyValidator struct{ Reader client.Reader }

var waypointGK = meshv1.GroupVersion.WithKind("WaypointPolicy").GroupKind()

// ValidateCreate checks the new waypoint against its namespace's others.
func (v *WaypointPolicyValidator) ValidateCreate(ctx context.Context, wp *meshv1.WaypointPolicy) (admission.Warnings, error) {
	return nil, v.validate(ctx, wp)
}

// ValidateUpdate checks the changed waypoint against its namespace's others.
func (v *WaypointPolicyValidator) ValidateUpdate(ctx context.Context, _, wp *meshv1.WaypointPolicy) (admission.Warnings, error) {
	return nil, v.validate(ctx, wp)
}

// ValidateDelete allows deletion.
func (v *WaypointPolicyValidator) ValidateDelete(context.Context, *meshv1.WaypointPolicy) (admission.Warnings, error) {
	return nil, nil
}

func (v *WaypointPolicyValidator) validate(ctx context.Context, wp *meshv1.WaypointPolicy) error {
	if errs := resourceErrors(field.NewPath("spec", "resources"), wp.Spec.Resources); len(errs) > 0 {
		return apierrors.NewInvalid(waypointGK, wp.Name, errs)
	}
	list := &meshv1.WaypointPolicyList{}
	if err := v.Reader.List(ctx, list, client.InNamespace(wp.Namespace)); err != nil {
		return err
	}
	if other := conflictingWaypoint(wp, list.Items); other != nil {
		return apierrors.NewInvalid(waypointGK, wp.Name, field.ErrorList{waypointConflict(wp, other)})
	}
	return nil
}

// conflictingWaypoint returns a live waypoint of the same namespace that
// serves the same scope (namespace, or the same service account) as wp.
func conflictingWaypoint(wp *meshv1.WaypointPolicy, others []meshv1.WaypointPolicy) *meshv1.WaypointPolicy {
	for i := range others {
		o := &others[i]
		if o.Name == wp.Name || !o.DeletionTimestamp.IsZero() || o.Spec.Scope != wp.Spec.Scope {
			continue
		}
		if wp.Spec.Scope == meshv1.ScopeNamespace || o.Spec.ServiceAccount == wp.Spec.ServiceAccount {
			return o
		}
	}
	return nil
}

func waypointConflict(wp, other *meshv1.WaypointPolicy) *field.Error {
	if wp.Spec.Scope == meshv1.ScopeNamespace {
		return field.Forbidden(field.NewPath("spec", "scope"),
			fmt.Sprintf("namespace %s already has the namespace waypoint %q; use scope: ServiceAccount with serviceAccount set, or delete %q", wp.Namespace, other.Name, other.Name))
	}
	return field.Forbidden(field.NewPath("spec", "serviceAccount"),
		fmt.Sprintf("service account %q already has the waypoint %q; a service account has one waypoint: edit or delete %q", wp.Spec.ServiceAccount, other.Name, other.Name))
}

// SetupWebhooks registers both validating webhooks with mgr.
func SetupWebhooks(mgr ctrl.Manager) error {
	if err := ctrl.NewWebhookManagedBy(mgr, &meshv1.AmbientMesh{}).
		WithValidator(&AmbientMeshValidator{Reader: mgr.GetAPIReader()}).Complete(); err != nil {
		return err
	}
	return ctrl.NewWebhookManagedBy(mgr, &meshv1.WaypointPolicy{}).
		WithValidator(&WaypointPolicyValidator{Reader: mgr.GetAPIReader()}).Complete()
}
