package controllers

import (
	"context"
	"fmt"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// WaypointPolicyReconciler turns a WaypointPolicy into a waypoint proxy:
// ServiceAccount, Deployment and Service. The objects are owned by the
// policy, so Kubernetes garbage collection removes them with it.
type WaypointPolicyReconciler struct {
	Client   client.Client
	Defaults Defaults
	// RetryInterval is the first retry delay while the mesh is missing or a
	// name is taken; it doubles with the time the problem has lasted.
	RetryInterval time.Duration
	Now           func() time.Time
	// Events records the waypoint becoming ready or unready on the
	// WaypointPolicy (nil: none).
	Events *kubeevents.Recorder
}

// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=waypointpolicies,verbs=get;list;watch
// +kubebuilder:rbac:groups=mesh.ambient.dev,resources=waypointpolicies/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=policy,resources=poddisruptionbudgets,verbs=get;list;watch;create;update;patch;delete

// Reconcile brings one WaypointPolicy to its desired state.
func (r *WaypointPolicyReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	wp := &meshv1.WaypointPolicy{}
	if err := r.Client.Get(ctx, req.NamespacedName, wp); err != nil {
		if apierrors.IsNotFound(err) {
			r.Events.ForgetKey(kubeevents.Key(wp, req.Namespace, req.Name))
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !wp.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil // garbage collection removes the children
	}
	st := &waypointStatus{generation: wp.Generation, status: *wp.Status.DeepCopy()}
	st.status.ObservedGeneration = wp.Generation
	before := st.status.DeepCopy().Conditions
	result, err := r.reconcile(ctx, wp, st)
	if err != nil {
		st.set(meshv1.ConditionReconciled, false, meshv1.ReasonReconcileError, err.Error())
		st.set(meshv1.ConditionReady, false, meshv1.ReasonReconcileError, err.Error())
	}
	if serr := r.writeStatus(ctx, wp, st); serr != nil {
		if err == nil {
			err = serr
		}
	} else {
		recordWaypointReady(r.Events, wp, before, st.status.Conditions, meshv1.ConditionWaypointReady)
	}
	return result, err
}

func (r *WaypointPolicyReconciler) reconcile(ctx context.Context, wp *meshv1.WaypointPolicy, st *waypointStatus) (ctrl.Result, error) {
	mesh, err := activeMesh(ctx, r.Client)
	if err != nil {
		return ctrl.Result{}, err
	}
	if mesh == nil {
		msg := "no AmbientMesh exists; create one (see config/samples) and the waypoint will be deployed"
		st.set(meshv1.ConditionReconciled, false, meshv1.ReasonMeshNotFound, msg)
		st.set(meshv1.ConditionReady, false, meshv1.ReasonMeshNotFound, msg)
		return ctrl.Result{RequeueAfter: r.backoff(wp, meshv1.ReasonMeshNotFound)}, nil
	}
	if older, err := r.olderConflict(ctx, wp); err != nil {
		return ctrl.Result{}, err
	} else if older != nil {
		f := waypointConflict(wp, older)
		st.set(meshv1.ConditionReconciled, false, meshv1.ReasonConflict, f.Error())
		st.set(meshv1.ConditionReady, false, meshv1.ReasonConflict, f.Error())
		return ctrl.Result{RequeueAfter: r.backoff(wp, meshv1.ReasonConflict)}, nil
	}
	w := WaypointFromPolicy(wp, mesh, r.Defaults)
	sa, dep, svc := DesiredWaypoint(w, mesh)
	for _, obj := range []client.Object{sa, dep, svc} {
		if taken, err := nameTaken(ctx, r.Client, obj, wp); err != nil {
			return ctrl.Result{}, err
		} else if taken != "" {
			st.set(meshv1.ConditionReconciled, false, meshv1.ReasonConflict, taken)
			st.set(meshv1.ConditionReady, false, meshv1.ReasonConflict, taken)
			return ctrl.Result{RequeueAfter: r.backoff(wp, meshv1.ReasonConflict)}, nil
		}
		if err := apply(ctx, r.Client, obj); err != nil {
			return ctrl.Result{}, err
		}
	}
	if taken, err := r.syncDisruptionBudget(ctx, wp, &w); err != nil {
		return ctrl.Result{}, err
	} else if taken != "" {
		st.set(meshv1.ConditionReconciled, false, meshv1.ReasonConflict, taken)
		st.set(meshv1.ConditionReady, false, meshv1.ReasonConflict, taken)
		return ctrl.Result{RequeueAfter: r.backoff(wp, meshv1.ReasonConflict)}, nil
	}
	// The scale subresource's selector: what an autoscaler measures.
	st.status.Selector = metav1.FormatLabelSelector(dep.Spec.Selector)
	st.set(meshv1.ConditionReconciled, true, meshv1.ReasonReconciled, "waypoint objects applied")
	return ctrl.Result{}, r.observe(ctx, wp, st)
}

// syncDisruptionBudget applies the waypoint's PodDisruptionBudget while it
// has more than one replica and removes it otherwise. It returns a message
// when a budget of that name is not the operator's.
func (r *WaypointPolicyReconciler) syncDisruptionBudget(ctx context.Context, wp *meshv1.WaypointPolicy, w *Waypoint) (string, error) {
	pdb, wanted := w.DisruptionBudget()
	if !wanted {
		return "", deleteOwned(ctx, r.Client, pdb, wp)
	}
	if taken, err := nameTaken(ctx, r.Client, pdb, wp); err != nil || taken != "" {
		return taken, err
	}
	return "", apply(ctx, r.Client, pdb)
}

// nameTaken refuses to take over an object of the same name that owner
// does not control (a user's own Service "waypoint", or another waypoint).
func nameTaken(ctx context.Context, c client.Reader, want client.Object, owner client.Object) (string, error) {
	have := want.DeepCopyObject().(client.Object)
	err := c.Get(ctx, client.ObjectKeyFromObject(want), have)
	if apierrors.IsNotFound(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if metav1.IsControlledBy(have, owner) {
		return "", nil
	}
	kind := fmt.Sprintf("%T", owner)
	kind = kind[strings.LastIndex(kind, ".")+1:]
	return fmt.Sprintf("%T %s/%s exists and is not managed by this %s; rename the %s or delete that object",
		have, have.GetNamespace(), have.GetName(), kind, kind), nil
}

// olderConflict returns an older waypoint serving the same scope (the
// webhook refuses these, but two creates can race).
func (r *WaypointPolicyReconciler) olderConflict(ctx context.Context, wp *meshv1.WaypointPolicy) (*meshv1.WaypointPolicy, error) {
	list := &meshv1.WaypointPolicyList{}
	if err := r.Client.List(ctx, list, client.InNamespace(wp.Namespace)); err != nil {
		return nil, err
	}
	var rest []meshv1.WaypointPolicy
	for _, o := range list.Items {
		ot, wt := o.CreationTimestamp, wp.CreationTimestamp
		if ot.Before(&wt) || (ot.Equal(&wt) && o.Name < wp.Name) {
			rest = append(rest, o)
		}
	}
	return conflictingWaypoint(wp, rest), nil
}

// observe reads the Deployment and Service into status.
func (r *WaypointPolicyReconciler) observe(ctx context.Context, wp *meshv1.WaypointPolicy, st *waypointStatus) error {
	dep := &appsv1.Deployment{}
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: wp.Namespace, Name: wp.Name}, dep); err != nil {
		return client.IgnoreNotFound(err) // the watch event follows
	}
	svc := &corev1.Service{}
	if err := r.Client.Get(ctx, client.ObjectKey{Namespace: wp.Namespace, Name: wp.Name}, svc); err != nil {
		return client.IgnoreNotFound(err)
	}
	if ip := svc.Spec.ClusterIP; ip != "" && ip != corev1.ClusterIPNone {
		st.status.Address = ip
	}
	st.status.ReadyReplicas = dep.Status.ReadyReplicas
	st.status.Replicas = dep.Status.Replicas
	want := ptr32(dep.Spec.Replicas)
	s := dep.Status
	switch {
	case s.ObservedGeneration < dep.Generation:
		st.set(meshv1.ConditionWaypointReady, false, meshv1.ReasonDeploymentNotReady, fmt.Sprintf("generation %d not yet observed by the Deployment controller", dep.Generation))
	case want == 0:
		st.set(meshv1.ConditionWaypointReady, false, meshv1.ReasonDeploymentNotReady, "scaled to 0 replicas: traffic for this waypoint fails")
	case s.UpdatedReplicas < want || s.ReadyReplicas < want:
		st.set(meshv1.ConditionWaypointReady, false, meshv1.ReasonDeploymentNotReady, fmt.Sprintf("%d/%d replicas ready (%d updated)", s.ReadyReplicas, want, s.UpdatedReplicas))
	default:
		st.set(meshv1.ConditionWaypointReady, true, meshv1.ReasonDeploymentReady, fmt.Sprintf("%d/%d replicas ready", s.ReadyReplicas, want))
	}
	c := meta.FindStatusCondition(st.status.Conditions, meshv1.ConditionWaypointReady)
	if c.Status == metav1.ConditionTrue {
		st.set(meshv1.ConditionReady, true, meshv1.ReasonDeploymentReady, "waypoint serving at "+st.status.Address+":15008")
	} else {
		st.set(meshv1.ConditionReady, false, c.Reason, c.Message)
	}
	return nil
}

func ptr32(p *int32) int32 {
	if p == nil {
		return 1
	}
	return *p
}

// backoff grows the retry delay with how long the condition has had this
// reason: RetryInterval at first, then about the time already spent, up to
// five minutes. Stateless, so it survives restarts.
func (r *WaypointPolicyReconciler) backoff(wp *meshv1.WaypointPolicy, reason string) time.Duration {
	return retryDelay(wp.Status.Conditions, meshv1.ConditionReady, reason, r.RetryInterval, r.now())
}

// retryDelay: base at first, then about as long as condType has had reason.
func retryDelay(conds []metav1.Condition, condType, reason string, base time.Duration, now time.Time) time.Duration {
	c := meta.FindStatusCondition(conds, condType)
	if c == nil || c.Reason != reason {
		return base
	}
	return min(max(now.Sub(c.LastTransitionTime.Time), base), 5*time.Minute)
}

func (r *WaypointPolicyReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// activeMesh returns the cluster's AmbientMesh (the oldest live one), or nil.
func activeMesh(ctx context.Context, c client.Reader) (*meshv1.AmbientMesh, error) {
	list := &meshv1.AmbientMeshList{}
	if err := c.List(ctx, list); err != nil {
		return nil, err
	}
	var best *meshv1.AmbientMesh
	for i := range list.Items {
		m := &list.Items[i]
		if !m.DeletionTimestamp.IsZero() {
			continue
		}
		if best == nil || m.CreationTimestamp.Before(&best.CreationTimestamp) ||
			(m.CreationTimestamp.Equal(&best.CreationTimestamp) && m.Name < best.Name) {
			best = m
		}
	}
	return best, nil
}

func (r *WaypointPolicyReconciler) writeStatus(ctx context.Context, wp *meshv1.WaypointPolicy, st *waypointStatus) error {
	if equality.Semantic.DeepEqual(wp.Status, st.status) {
		return nil
	}
	patch := client.MergeFrom(wp.DeepCopy())
	wp.Status = st.status
	return r.Client.Status().Patch(ctx, wp, patch)
}

// SetupWithManager watches policies, their children (drift is reverted) and
// the mesh (defaults and existence).
func (r *WaypointPolicyReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.RetryInterval == 0 {
		r.RetryInterval = 30 * time.Second
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("waypointpolicy").
		For(&meshv1.WaypointPolicy{}, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		Owns(&corev1.ServiceAccount{}).
		Owns(&policyv1.PodDisruptionBudget{}).
		Watches(&meshv1.AmbientMesh{}, handler.EnqueueRequestsFromMapFunc(r.allPolicies)).
		Complete(r)
}

func (r *WaypointPolicyReconciler) allPolicies(ctx context.Context, _ client.Object) []reconcile.Request {
	list := &meshv1.WaypointPolicyList{}
	if err := r.Client.List(ctx, list); err != nil {
		return nil
	}
	reqs := make([]reconcile.Request, 0, len(list.Items))
	for _, wp := range list.Items {
		reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: wp.Namespace, Name: wp.Name}})
	}
	return reqs
}

// waypointStatus is the status computed during one reconcile.
type waypointStatus struct {
	generation int64
	status     meshv1.WaypointPolicyStatus
}

func (s *waypointStatus) set(condType string, ok bool, reason, msg string) {
	status := metav1.ConditionFalse
	if ok {
		status = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&s.status.Conditions, metav1.Condition{
		Type: condType, Status: status, Reason: reason, Message: msg, ObservedGeneration: s.generation,
	})
}
