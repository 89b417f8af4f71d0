package controllers

import (
	"context"
	"fmt"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	logf "sigs.k8s.io/controller-runtime/pkg/log"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// finalize removes everything the mesh created. The node agents watch the
// mesh and release their captured pods (rules removed, redirection
// annotation cleared) when its deletion starts; the operator waits for that,
// up to ReleaseTimeout, before deleting the node components, so traffic is
// never left redirected to a ztunnel that is gone. Pods are never restarted
// or modified by the operator.
func (r *AmbientMeshReconciler) finalize(ctx context.Context, mesh *meshv1.AmbientMesh) (ctrl.Result, error) {
	if !controllerutil.ContainsFinalizer(mesh, MeshFinalizer) {
		return ctrl.Result{}, nil
	}
	log := logf.FromContext(ctx)
	captured, err := r.capturedPods(ctx)
	if err != nil {
		return ctrl.Result{}, err
	}
	waited := r.now().Sub(mesh.DeletionTimestamp.Time)
	if captured > 0 && waited < r.ReleaseTimeout {
		st := newMeshStatus(mesh)
		msg := fmt.Sprintf("waiting for node agents to release %d captured pods (gives up after %s)", captured, r.ReleaseTimeout)
		st.set(meshv1.ConditionReady, false, meshv1.ReasonReleasingPods, msg)
		if err := r.writeStatus(ctx, mesh, st); err != nil {
			return ctrl.Result{}, err
		}
		return ctrl.Result{RequeueAfter: min(r.RetryInterval, r.ReleaseTimeout-waited)}, nil
	}
	if captured > 0 {
		log.Info("release timeout reached; removing the mesh with pods still marked captured", "pods", captured)
	}
	if err := r.deleteOwned(ctx, mesh); err != nil {
		return ctrl.Result{}, err
	}
	patch := client.MergeFrom(mesh.DeepCopy())
	controllerutil.RemoveFinalizer(mesh, MeshFinalizer)
	if err := r.Client.Patch(ctx, mesh, patch); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	log.Info("mesh removed")
	return ctrl.Result{}, nil
}

// capturedPods counts pods the node agents still redirect. Listed straight
// from the API server: only needed while the mesh is being deleted.
func (r *AmbientMeshReconciler) capturedPods(ctx context.Context) (int, error) {
	pods := &metav1.PartialObjectMetadataList{}
	pods.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("PodList"))
	if err := r.APIReader.List(ctx, pods); err != nil {
		return 0, err
	}
	n := 0
	for _, p := range pods.Items {
		if p.GetAnnotations()[meshRedirectionLabel] == "enabled" {
			n++
		}
	}
	return n, nil
}

// deleteOwned deletes every object labelled with the mesh: children in the
// mesh namespace, cluster RBAC, the trust bundle in every namespace and the
// operator's CA Secret (a user's bring-your-own Secret has no mesh label and
// is kept). Garbage collection would do most of it through owner
// references; doing it here makes removal immediate and complete.
func (r *AmbientMeshReconciler) deleteOwned(ctx context.Context, mesh *meshv1.AmbientMesh) error {
	sel := client.MatchingLabels{LabelMesh: mesh.Name}
	for _, list := range []client.ObjectList{
		&appsv1.DaemonSetList{}, &corev1.ServiceList{}, &corev1.ServiceAccountList{},
		&corev1.ConfigMapList{}, &rbacv1.ClusterRoleBindingList{}, &rbacv1.ClusterRoleList{},
	} {
		if err := r.Client.List(ctx, list, sel); err != nil {
			return err
		}
		if err := deleteItems(ctx, r.Client, list); err != nil {
			return err
		}
	}
	secrets := &corev1.SecretList{}
	if err := r.APIReader.List(ctx, secrets, sel, client.InNamespace(mesh.Spec.Namespace)); err != nil {
		return err
	}
	if err := deleteItems(ctx, r.Client, secrets); err != nil {
		return err
	}
	return r.deleteNamespaceIfOurs(ctx, mesh)
}

func deleteItems(ctx context.Context, c client.Client, list client.ObjectList) error {
	items, err := meta.ExtractList(list)
	if err != nil {
		return err
	}
	for _, item := range items {
		obj := item.(client.Object)
		if err := c.Delete(ctx, obj); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete %T %s/%s: %w", obj, obj.GetNamespace(), obj.GetName(), err)
		}
	}
	return nil
}

// deleteNamespaceIfOurs deletes the mesh namespace only if this mesh created
// it and the operator does not run there.
func (r *AmbientMeshReconciler) deleteNamespaceIfOurs(ctx context.Context, mesh *meshv1.AmbientMesh) error {
	if mesh.Spec.Namespace == r.Defaults.OperatorNamespace {
		return nil
	}
	ns := &corev1.Namespace{}
	if err := r.Client.Get(ctx, client.ObjectKey{Name: mesh.Spec.Namespace}, ns); err != nil {
		return client.IgnoreNotFound(err)
	}
	if ns.Labels[LabelCreatedNamespace] != mesh.Name || !ns.DeletionTimestamp.IsZero() {
		return nil
	}
	return client.IgnoreNotFound(r.Client.Delete(ctx, ns))
}
