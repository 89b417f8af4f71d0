package controllers

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// AmbientMeshReconciler turns the cluster's AmbientMesh into the mesh
// namespace, node components, RBAC, control-plane Service, CA and trust bundle.
type AmbientMeshReconciler struct {
	Client client.Client
	// APIReader reads Secrets and Pods straight from the API server.
	APIReader client.Reader
	Defaults  Defaults
	// RetryInterval is the first re-check delay of a problem only the user
	// can fix (missing CA Secret, second mesh); it grows with the time the
	// problem has lasted, and watches usually react sooner.
	RetryInterval time.Duration
	// ReleaseTimeout bounds how long deletion waits for the node agents to
	// release captured pods before removing them anyway.
	ReleaseTimeout time.Duration
	Now            func() time.Time
	// Events records CA issuance, rotation and validity, and ztunnel
	// rollouts on the AmbientMesh (nil: none).
	Events *kubeevents.Recorder
}

// RBAC: the operator must hold every permission it grants the node agent
// (Kubernetes refuses privilege escalation), hence pods patch, which the
// operator itself never uses.
// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=ambientmeshes,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=ambientmeshes/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=ambientmeshes/finalizers,verbs=update
// +kubebuilder:rbac:groups="",resources=namespaces,verbs=get;list;watch;create;delete
// +kubebuilder:rbac:groups="",resources=serviceaccounts;services;configmaps,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch;patch
// +kubebuilder:rbac:groups=apps,resources=daemonsets;deployments,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=rbac.authorization.k8s.io,resources=clusterroles;clusterrolebindings,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile brings one AmbientMesh to its desired state.
func (r *AmbientMeshReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	mesh := &meshv1.AmbientMesh{}
	if err := r.Client.Get(ctx, req.NamespacedName, mesh); err != nil {
		if apierrors.IsNotFound(err) {
			r.Events.ForgetKey(kubeevents.Key(mesh, "", req.Name))
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !mesh.DeletionTimestamp.IsZero() {
		return r.finalize(ctx, mesh)
	}
	if !controllerutil.ContainsFinalizer(mesh, MeshFinalizer) {
		patch := client.MergeFrom(mesh.DeepCopy())
		controllerutil.AddFinalizer(mesh, MeshFinalizer)
		if err := r.Client.Patch(ctx, mesh, patch); err != nil {
			return ctrl.Result{}, err
		}
	}
	st := newMeshStatus(mesh)
	before := st.status.DeepCopy().Conditions
	if older, err := r.olderMesh(ctx, mesh); err != nil {
		return ctrl.Result{}, err
	} else if older != "" {
		msg := fmt.Sprintf("AmbientMesh %q already defines the mesh; there is one mesh per cluster: delete %q or edit %q", older, mesh.Name, older)
		st.set(meshv1.ConditionReady, false, meshv1.ReasonConflict, msg)
		st.set(meshv1.ConditionReconciled, false, meshv1.ReasonConflict, msg)
		return ctrl.Result{RequeueAfter: retryDelay(mesh.Status.Conditions, meshv1.ConditionReady, meshv1.ReasonConflict, r.RetryInterval, r.now())}, r.writeStatus(ctx, mesh, st)
	}
	result, err := r.reconcileMesh(ctx, mesh, st)
	if err != nil {
		if reason, userFixable, rotation := caReason(err); userFixable {
			st.set(meshv1.ConditionCAReady, false, reason, err.Error())
			if rotation {
				st.set(meshv1.ConditionRootRotation, false, meshv1.ReasonRootRotationFailed, err.Error())
			}
			st.set(meshv1.ConditionReconciled, false, reason, err.Error())
			result, err = ctrl.Result{RequeueAfter: retryDelay(mesh.Status.Conditions, meshv1.ConditionReady, reason, r.RetryInterval, r.now())}, nil
		} else {
			st.set(meshv1.ConditionReconciled, false, meshv1.ReasonReconcileError, err.Error())
		}
	} else {
		st.set(meshv1.ConditionReconciled, true, meshv1.ReasonReconciled, "all objects applied")
	}
	st.summarize()
	if serr := r.writeStatus(ctx, mesh, st); serr != nil {
		if err == nil {
			err = serr
		}
	} else {
		recordMeshTransitions(r.Events, mesh, before, st.status.Conditions)
	}
	return result, err
}

// olderMesh returns the name of another live AmbientMesh created before this
// one (the webhook refuses a second mesh, but two creates can race).
func (r *AmbientMeshReconciler) olderMesh(ctx context.Context, mesh *meshv1.AmbientMesh) (string, error) {
	list := &meshv1.AmbientMeshList{}
	if err := r.Client.List(ctx, list); err != nil {
		return "", err
	}
	for _, m := range list.Items {
		if m.Name == mesh.Name || !m.DeletionTimestamp.IsZero() {
			continue
		}
		ct, mt := m.CreationTimestamp, mesh.CreationTimestamp
		if ct.Before(&mt) || (ct.Equal(&mt) && m.Name < mesh.Name) {
			return m.Name, nil
		}
	}
	return "", nil
}

func (r *AmbientMeshReconciler) reconcileMesh(ctx context.Context, mesh *meshv1.AmbientMesh, st *meshStatus) (ctrl.Result, error) {
	if err := r.ensureNamespace(ctx, mesh); err != nil {
		return ctrl.Result{}, err
	}
	cam := &caManager{client: r.Client, reader: r.APIReader, now: r.now, bundleBehind: r.bundleBehind}
	meshCA, err := cam.ensure(ctx, mesh)
	if err != nil {
		return ctrl.Result{}, err
	}
	recordCA(r.Events, mesh, meshCA)
	st.rootRotation(meshCA.Root)
	expiry := metav1.NewTime(meshCA.rootExpiry())
	st.status.RootCertExpiry = &expiry
	st.set(meshv1.ConditionCAReady, true, meshv1.ReasonCAIssued, fmt.Sprintf("mesh CA for %s valid until %s", mesh.Spec.TrustDomain, meshCA.Authority.Cert.NotAfter.UTC().Format(time.RFC3339)))

	objs := []client.Object{
		desiredServiceAccount(mesh, ZtunnelName),
		desiredServiceAccount(mesh, NodeAgentName),
		desiredNodeAgentClusterRole(mesh),
		desiredNodeAgentClusterRoleBinding(mesh),
		desiredRootCertConfigMap(mesh, mesh.Spec.Namespace, meshCA.RootsPEM),
	}
	for _, svc := range desiredControlPlaneServices(mesh, r.Defaults) {
		objs = append(objs, svc)
	}
	for _, obj := range objs {
		if err := apply(ctx, r.Client, obj); err != nil {
			return ctrl.Result{}, err
		}
	}
	if err := r.publishTrustBundle(ctx, mesh, meshCA.RootsPEM); err != nil {
		return ctrl.Result{}, err
	}
	ztunnel, err := r.applyDaemonSet(ctx, DesiredZtunnel(mesh, r.Defaults))
	if err != nil {
		return ctrl.Result{}, err
	}
	nodeAgent, err := r.applyDaemonSet(ctx, DesiredNodeAgent(mesh, r.Defaults))
	if err != nil {
		return ctrl.Result{}, err
	}
	st.status.Ztunnel = daemonSetRollout(ztunnel)
	st.status.NodeAgent = daemonSetRollout(nodeAgent)
	st.daemonSet(meshv1.ConditionZtunnelReady, "ztunnel", ztunnel)
	st.daemonSet(meshv1.ConditionNodeAgentReady, "node agent", nodeAgent)
	st.inboundCapture(mesh)

	// Come back before the intermediate needs rotating.
	rotateAt := meshCA.Authority.Cert.NotAfter.Add(-meshCA.Authority.Cert.NotAfter.Sub(meshCA.Authority.Cert.NotBefore) / 3)
	after := min(max(rotateAt.Sub(r.now()), time.Minute), 12*time.Hour)
	// A root rotation's next step is due at a recorded time.
	if next := meshCA.Root.Next; !next.IsZero() {
		after = min(after, max(next.Sub(r.now())+time.Second, time.Second))
	}
	return ctrl.Result{RequeueAfter: after}, nil
}

// ensureNamespace creates the mesh namespace when missing and marks it as
// ours; an existing namespace is used as is and never deleted.
func (r *AmbientMeshReconciler) ensureNamespace(ctx context.Context, mesh *meshv1.AmbientMesh) error {
	ns := &corev1.Namespace{}
	err := r.Client.Get(ctx, client.ObjectKey{Name: mesh.Spec.Namespace}, ns)
	if err == nil {
		if !ns.DeletionTimestamp.IsZero() {
			return fmt.Errorf("mesh namespace %s is being deleted", mesh.Spec.Namespace)
		}
		return nil
	}
	if !apierrors.IsNotFound(err) {
		return err
	}
	ns = &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name:   mesh.Spec.Namespace,
		Labels: mergeLabels(meshLabels(mesh.Name, ""), map[string]string{LabelCreatedNamespace: mesh.Name}),
	}}
	if err := r.Client.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// publishTrustBundle writes ambient-root-cert into every live namespace whose
// copy is missing or differs, so a steady-state reconcile makes no writes.
func (r *AmbientMeshReconciler) publishTrustBundle(ctx context.Context, mesh *meshv1.AmbientMesh, roots []byte) error {
	namespaces := &corev1.NamespaceList{}
	if err := r.Client.List(ctx, namespaces); err != nil {
		return err
	}
	existing := &corev1.ConfigMapList{}
	if err := r.Client.List(ctx, existing, client.MatchingLabels{LabelMesh: mesh.Name}); err != nil {
		return err
	}
	current := map[string]*corev1.ConfigMap{}
	for i := range existing.Items {
		if existing.Items[i].Name == RootCertConfigMap {
			current[existing.Items[i].Namespace] = &existing.Items[i]
		}
	}
	for _, ns := range namespaces.Items {
		if !ns.DeletionTimestamp.IsZero() || ns.Name == mesh.Spec.Namespace {
			continue
		}
		want := desiredRootCertConfigMap(mesh, ns.Name, roots)
		if have := current[ns.Name]; have != nil && upToDate(have, want) {
			continue
		}
		if err := apply(ctx, r.Client, want); err != nil {
			if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
				continue // namespace vanished or began terminating meanwhile
			}
			return err
		}
	}
	return nil
}

// bundleBehind names the namespaces whose trust bundle ConfigMap does not
// hold roots yet (from the cache: a lagging cache only makes a root
// rotation wait longer).
func (r *AmbientMeshReconciler) bundleBehind(ctx context.Context, mesh *meshv1.AmbientMesh, roots []byte) ([]string, error) {
	namespaces := &corev1.NamespaceList{}
	if err := r.Client.List(ctx, namespaces); err != nil {
		return nil, err
	}
	existing := &corev1.ConfigMapList{}
	if err := r.Client.List(ctx, existing, client.MatchingLabels{LabelMesh: mesh.Name}); err != nil {
		return nil, err
	}
	have := map[string]string{}
	for _, cm := range existing.Items {
		if cm.Name == RootCertConfigMap {
			have[cm.Namespace] = cm.Data[RootCertKey]
		}
	}
	var behind []string
	for _, ns := range namespaces.Items {
		if ns.DeletionTimestamp.IsZero() && have[ns.Name] != string(roots) {
			behind = append(behind, ns.Name)
		}
	}
	return behind, nil
}

func upToDate(have, want *corev1.ConfigMap) bool {
	if !equality.Semantic.DeepEqual(have.Data, want.Data) {
		return false
	}
	for k, v := range want.Labels {
		if have.Labels[k] != v {
			return false
		}
	}
	return metav1.IsControlledBy(have, &metav1.ObjectMeta{UID: want.OwnerReferences[0].UID})
}

func (r *AmbientMeshReconciler) applyDaemonSet(ctx context.Context, ds *appsv1.DaemonSet) (*appsv1.DaemonSet, error) {
	if err := apply(ctx, r.Client, ds); err != nil {
		return nil, err
	}
	got := &appsv1.DaemonSet{}
	if err := r.Client.Get(ctx, client.ObjectKeyFromObject(ds), got); err != nil {
		if apierrors.IsNotFound(err) {
			return ds, nil // cache not caught up yet; the watch event follows
		}
		return nil, err
	}
	return got, nil
}

func (r *AmbientMeshReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// SetupWithManager wires the watches: the mesh itself, every owned kind (so
// deleted or edited children are restored), new namespaces (trust bundle)
// and the CA Secrets (metadata only: keys never enter the cache).
func (r *AmbientMeshReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.RetryInterval == 0 {
		r.RetryInterval = 30 * time.Second
	}
	if r.ReleaseTimeout == 0 {
		r.ReleaseTimeout = 2 * time.Minute
	}
	secretMeta := &metav1.PartialObjectMetadata{}
	secretMeta.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Secret"))
	return ctrl.NewControllerManagedBy(mgr).
		Named("ambientmesh").
		For(&meshv1.AmbientMesh{}, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Owns(&appsv1.DaemonSet{}).
		Owns(&corev1.ServiceAccount{}).
		Owns(&corev1.Service{}).
		Owns(&corev1.ConfigMap{}).
		Owns(&rbacv1.ClusterRole{}).
		Owns(&rbacv1.ClusterRoleBinding{}).
		Watches(&corev1.Namespace{}, handler.EnqueueRequestsFromMapFunc(r.allMeshes),
			builder.WithPredicates(predicate.Funcs{
				CreateFunc: func(event.CreateEvent) bool { return true },
				UpdateFunc: func(event.UpdateEvent) bool { return false },
				DeleteFunc: func(event.DeleteEvent) bool { return false },
			})).
		Watches(secretMeta, handler.EnqueueRequestsFromMapFunc(r.meshesUsingSecret), builder.OnlyMetadata).
		Complete(r)
}

func (r *AmbientMeshReconciler) allMeshes(ctx context.Context, _ client.Object) []reconcile.Request {
	list := &meshv1.AmbientMeshList{}
	if err := r.Client.List(ctx, list); err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(list.Items))
	for _, m := range list.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Name: m.Name}})
	}
	return reqs
}

func (r *AmbientMeshReconciler) meshesUsingSecret(ctx context.Context, obj client.Object) []reconcile.Request {
	list := &meshv1.AmbientMeshList{}
	if err := r.Client.List(ctx, list); err != nil {
		return nil
	}
	var reqs []reconcile.Request
	for _, m := range list.Items {
		if m.Spec.Namespace != obj.GetNamespace() {
			continue
		}
		ref := m.Spec.CA.SecretRef
		if obj.GetName() == CASecretName || (ref != nil && ref.Name == obj.GetName()) {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Name: m.Name}})
		}
	}
	return reqs
}

// writeStatus patches status only when it changed, so a steady mesh causes
// no writes (and no watch events).
func (r *AmbientMeshReconciler) writeStatus(ctx context.Context, mesh *meshv1.AmbientMesh, st *meshStatus) error {
	if equality.Semantic.DeepEqual(mesh.Status, st.status) {
		return nil
	}
	patch := client.MergeFrom(mesh.DeepCopy())
	mesh.Status = st.status
	if err := r.Client.Status().Patch(ctx, mesh, patch); err != nil {
		return err
	}
	logf.FromContext(ctx).V(1).Info("status updated", "ready", meta.IsStatusConditionTrue(mesh.Status.Conditions, meshv1.ConditionReady))
	return nil
}
