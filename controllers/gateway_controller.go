package controllers

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
	"github.com/ambientmesh/ambient/proxylib/route"
)

// GatewayWaypointReconciler deploys waypoints declared the Istio way: a
// Gateway API Gateway with gatewayClassName istio-waypoint (and optionally
// istio.io/for-service-account). It produces exactly the objects a
// WaypointPolicy would (DesiredWaypoint) and reports Accepted/Programmed,
// the address and the listeners in the Gateway's status. When another
// controller owns GatewayClass istio-waypoint, its Gateways are left to it.
// Registered only when the Gateway API CRDs are installed.
type GatewayWaypointReconciler struct {
	Client        client.Client
	Defaults      Defaults
	RetryInterval time.Duration
	Now           func() time.Time
	// Events records the waypoint becoming ready or unready on the
	// Gateway (nil: none).
	Events *kubeevents.Recorder
}

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gateways,verbs=get;list;watch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gateways/status,verbs=get;update;patch

// Reconcile brings one waypoint Gateway to its desired state.
func (r *GatewayWaypointReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	gw, err := gatewayToServe(ctx, r.Client, req, false)
	if gw == nil || err != nil {
		if err == nil { // gone, or no longer ours
			r.Events.ForgetKey(kubeevents.Key(&gwv1.Gateway{}, req.Namespace, req.Name))
		}
		return ctrl.Result{}, err
	}
	status := gw.Status.DeepCopy()
	before := gw.Status.DeepCopy().Conditions
	result, unseen, err := r.reconcile(ctx, gw, status)
	if err != nil {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, false, string(gwv1.GatewayReasonPending), err.Error())
	}
	setListenerStatus(status, gw)
	err = patchGatewayStatus(ctx, r.Client, gw, status, err)
	// Readiness events come from observed deployments only: objects just
	// applied but not yet in the cache say nothing about readiness (the
	// watch brings them back at once), and a Gateway read before our own
	// last status write must not flip a Ready into a "not deployed yet".
	if !unseen {
		recordWaypointReady(r.Events, gw, before, status.Conditions, string(gwv1.GatewayConditionProgrammed))
	}
	return result, err
}

// freshenProgrammed: a reconcile that stopped before observing the
// deployment (no mesh, invalid Gateway) still says Programmed=False for
// this generation, never leaves the API server's default or an older one.
func freshenProgrammed(status *gwv1.GatewayStatus, gen int64) {
	c := meta.FindStatusCondition(status.Conditions, string(gwv1.GatewayConditionProgrammed))
	if c != nil && c.ObservedGeneration == gen {
		return
	}
	reason, msg := string(gwv1.GatewayReasonPending), "not deployed yet"
	if a := meta.FindStatusCondition(status.Conditions, string(gwv1.GatewayConditionAccepted)); a != nil && a.Status != metav1.ConditionTrue {
		reason, msg = string(gwv1.GatewayReasonInvalid), "not accepted: "+a.Message
		if a.Reason == string(gwv1.GatewayReasonPending) {
			reason = string(gwv1.GatewayReasonPending)
		}
	}
	setGatewayCondition(status, gen, gwv1.GatewayConditionProgrammed, false, reason, msg)
}

// gatewayToServe reads the Gateway of req when it is ours to reconcile (nil
// otherwise): not being deleted, and for ingress of a class we serve as an
// ingress class (ingressClass), else of class istio-waypoint not owned by
// another controller.
func gatewayToServe(ctx context.Context, c client.Reader, req ctrl.Request, ingress bool) (*gwv1.Gateway, error) {
	gw := &gwv1.Gateway{}
	if err := c.Get(ctx, req.NamespacedName, gw); err != nil {
		return nil, client.IgnoreNotFound(err)
	}
	if !gw.DeletionTimestamp.IsZero() {
		return nil, nil
	}
	class := string(gw.Spec.GatewayClassName)
	if ingress {
		served, err := ingressClass(ctx, c, class)
		if err != nil || !served {
			if err == nil {
				log.FromContext(ctx).V(1).Info("Gateway's class is not an ingress class we serve", "gatewayClass", class)
			}
			return nil, err
		}
		return gw, nil
	}
	if class != WaypointGatewayClass {
		return nil, nil
	}
	if foreign, owner, err := classForeign(ctx, c, class); err != nil || foreign {
		if foreign {
			log.FromContext(ctx).V(1).Info("Gateway left to the GatewayClass's controller", "gatewayClass", class, "controllerName", owner)
		}
		return nil, err
	}
	return gw, nil
}

// patchGatewayStatus writes status when it changed; err is the reconcile's
// error, returned first.
func patchGatewayStatus(ctx context.Context, c client.Client, gw *gwv1.Gateway, status *gwv1.GatewayStatus, err error) error {
	freshenProgrammed(status, gw.Generation)
	if equality.Semantic.DeepEqual(&gw.Status, status) {
		return err
	}
	patch := client.MergeFrom(gw.DeepCopy())
	gw.Status = *status
	if serr := c.Status().Patch(ctx, gw, patch); serr != nil && err == nil {
		return serr
	}
	return err
}

func (r *GatewayWaypointReconciler) reconcile(ctx context.Context, gw *gwv1.Gateway, status *gwv1.GatewayStatus) (result ctrl.Result, unseen bool, err error) {
	mesh, err := activeMesh(ctx, r.Client)
	if err != nil {
		return ctrl.Result{}, false, err
	}
	retry := acceptedRetry(status, r.RetryInterval, r.now)
	if mesh == nil {
		return waitForMesh(gw, status, "waypoint", retry), false, nil
	}
	w, err := WaypointFromGateway(gw, mesh, r.Defaults)
	if err != nil {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonInvalid), err.Error())
		return ctrl.Result{}, false, nil // fixed only by editing the Gateway, which requeues
	}
	if res, done, err := deployProxy(ctx, r.Client, gw, w, mesh, status, retry); done || err != nil {
		return res, false, err
	}
	unseen, err = r.observe(ctx, gw, status)
	return ctrl.Result{}, unseen, err
}

// deployProxy applies the objects of a Gateway's L7 proxy (waypoint or
// ingress gateway) and reports Accepted. done is true when it stopped
// short: a name held by another owner (retried later).
func deployProxy(ctx context.Context, c client.Client, gw *gwv1.Gateway, w Waypoint, mesh *meshv1.AmbientMesh,
	status *gwv1.GatewayStatus, retry func(reason string) ctrl.Result) (ctrl.Result, bool, error) {
	sa, dep, svc := DesiredWaypoint(w, mesh)
	for _, obj := range []client.Object{sa, dep, svc} {
		if taken, err := nameTaken(ctx, c, obj, gw); err != nil {
			return ctrl.Result{}, true, err
		} else if taken != "" {
			setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonInvalid), taken)
			return retry(string(gwv1.GatewayReasonInvalid)), true, nil
		}
		if err := apply(ctx, c, obj); err != nil {
			return ctrl.Result{}, true, err
		}
	}
	what := "waypoint"
	if w.Ingress != nil {
		what = "ingress gateway"
	}
	setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, true, string(gwv1.GatewayReasonAccepted), what+" objects applied")
	return ctrl.Result{}, false, nil
}

// observe sets Programmed from the proxy's Deployment; unseen: it or its
// Service is not in the cache yet (just applied).
func (r *GatewayWaypointReconciler) observe(ctx context.Context, gw *gwv1.Gateway, status *gwv1.GatewayStatus) (unseen bool, err error) {
	dep := &appsv1.Deployment{}
	svc := &corev1.Service{}
	key := client.ObjectKey{Namespace: gw.Namespace, Name: gw.Name}
	for _, obj := range []client.Object{dep, svc} {
		if err := r.Client.Get(ctx, key, obj); err != nil {
			return apierrors.IsNotFound(err), client.IgnoreNotFound(err)
		}
	}
	status.Addresses = serviceAddresses(svc, corev1.ServiceTypeClusterIP)
	want := ptr.Deref(dep.Spec.Replicas, 1)
	s := dep.Status
	if s.ObservedGeneration >= dep.Generation && want > 0 && s.ReadyReplicas >= want && s.UpdatedReplicas >= want {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, true, string(gwv1.GatewayReasonProgrammed), fmt.Sprintf("%d/%d replicas ready", s.ReadyReplicas, want))
	} else {
		setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionProgrammed, false, string(gwv1.GatewayReasonPending), fmt.Sprintf("%d/%d replicas ready", s.ReadyReplicas, want))
	}
	return false, nil
}

// setListenerStatus reports each listener as Istio does for waypoints: the
// one HBONE listener on 15008 is accepted, anything else is not. No route
// attaches to a waypoint's listener (GAMMA routes attach to Services), so
// supportedKinds is empty and attachedRoutes 0.
func setListenerStatus(status *gwv1.GatewayStatus, gw *gwv1.Gateway) {
	programmed := meta.IsStatusConditionTrue(status.Conditions, string(gwv1.GatewayConditionProgrammed))
	var out []gwv1.ListenerStatus
	for _, l := range gw.Spec.Listeners {
		ls := gwv1.ListenerStatus{Name: l.Name, SupportedKinds: []gwv1.RouteGroupKind{}}
		if old := findListenerStatus(status.Listeners, l.Name); old != nil {
			ls.Conditions = old.Conditions
		}
		var rejected route.Rejection
		if !isHBONEListener(l) {
			rejected = route.Rejection{Reason: gwv1.ListenerReasonUnsupportedProtocol,
				Message: fmt.Sprintf("Expected a single listener on port %d with protocol %q", hbonePort, hboneProtocol)}
		}
		setListenerConditions(&ls.Conditions, gw.Generation, "HBONE listener of the waypoint", rejected, "waypoint", programmed)
		out = append(out, ls)
	}
	status.Listeners = out
}

// setListenerConditions sets a listener's conditions: accepted with
// acceptedMsg unless rej says why not, either as the listener itself
// (Accepted false) or its references (ResolvedRefs false); programmed as
// the proxy (named by what) is, when nothing is wrong.
func setListenerConditions(conds *[]metav1.Condition, gen int64, acceptedMsg string, rej route.Rejection, what string, programmed bool) {
	set := func(t gwv1.ListenerConditionType, ok bool, reason gwv1.ListenerConditionReason, msg string) {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		meta.SetStatusCondition(conds, metav1.Condition{Type: string(t), Status: s, Reason: string(reason), Message: msg, ObservedGeneration: gen})
	}
	valid := rej.Message == ""
	if valid || rej.Refs {
		set(gwv1.ListenerConditionAccepted, true, gwv1.ListenerReasonAccepted, acceptedMsg)
	} else {
		set(gwv1.ListenerConditionAccepted, false, rej.Reason, rej.Message)
	}
	if rej.Refs {
		set(gwv1.ListenerConditionResolvedRefs, false, rej.Reason, rej.Message)
	} else {
		set(gwv1.ListenerConditionResolvedRefs, true, gwv1.ListenerReasonResolvedRefs, "No references")
	}
	if rej.Reason == gwv1.ListenerReasonProtocolConflict {
		set(gwv1.ListenerConditionConflicted, true, gwv1.ListenerReasonProtocolConflict, rej.Message)
	} else {
		set(gwv1.ListenerConditionConflicted, false, gwv1.ListenerReasonNoConflicts, "No conflicts")
	}
	switch {
	case !valid:
		set(gwv1.ListenerConditionProgrammed, false, gwv1.ListenerReasonInvalid, "listener not served: "+rej.Message)
	case programmed:
		set(gwv1.ListenerConditionProgrammed, true, gwv1.ListenerReasonProgrammed, what+" ready")
	default:
		set(gwv1.ListenerConditionProgrammed, false, gwv1.ListenerReasonPending, what+" not ready")
	}
}

const hboneProtocol gwv1.ProtocolType = "HBONE"

func isHBONEListener(l gwv1.Listener) bool {
	return l.Port == hbonePort && l.Protocol == hboneProtocol
}

func findListenerStatus(ls []gwv1.ListenerStatus, name gwv1.SectionName) *gwv1.ListenerStatus {
	for i := range ls {
		if ls[i].Name == name {
			return &ls[i]
		}
	}
	return nil
}

func setGatewayCondition(status *gwv1.GatewayStatus, gen int64, t gwv1.GatewayConditionType, ok bool, reason, msg string) {
	s := metav1.ConditionFalse
	if ok {
		s = metav1.ConditionTrue
	}
	meta.SetStatusCondition(&status.Conditions, metav1.Condition{Type: string(t), Status: s, Reason: reason, Message: msg, ObservedGeneration: gen})
}

// acceptedRetry says when to look at a Gateway again after an Accepted
// condition with reason: later the longer that reason has stood.
func acceptedRetry(status *gwv1.GatewayStatus, interval time.Duration, now func() time.Time) func(reason string) ctrl.Result {
	return func(reason string) ctrl.Result {
		return ctrl.Result{RequeueAfter: retryDelay(status.Conditions, string(gwv1.GatewayConditionAccepted), reason, interval, now())}
	}
}

// waitForMesh reports a Gateway whose proxy (what) waits for an AmbientMesh.
func waitForMesh(gw *gwv1.Gateway, status *gwv1.GatewayStatus, what string, retry func(string) ctrl.Result) ctrl.Result {
	setGatewayCondition(status, gw.Generation, gwv1.GatewayConditionAccepted, false, string(gwv1.GatewayReasonPending), "no AmbientMesh exists; create one and the "+what+" will be deployed")
	return retry(string(gwv1.GatewayReasonPending))
}

func (r *GatewayWaypointReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func isWaypointGateway(obj client.Object) bool {
	gw, ok := obj.(*gwv1.Gateway)
	return ok && gw.Spec.GatewayClassName == WaypointGatewayClass
}

// SetupWithManager watches waypoint Gateways, their children and the mesh.
func (r *GatewayWaypointReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.RetryInterval == 0 {
		r.RetryInterval = 30 * time.Second
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("waypointgateway").
		For(&gwv1.Gateway{}, builder.WithPredicates(predicate.NewPredicateFuncs(isWaypointGateway), predicate.GenerationChangedPredicate{})).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		Owns(&corev1.ServiceAccount{}).
		Watches(&meshv1.AmbientMesh{}, handler.EnqueueRequestsFromMapFunc(r.allWaypointGateways)).
		Watches(&gwv1.GatewayClass{}, handler.EnqueueRequestsFromMapFunc(r.allWaypointGateways),
			builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() == WaypointGatewayClass }))).
		Complete(r)
}

func (r *GatewayWaypointReconciler) allWaypointGateways(ctx context.Context, _ client.Object) []reconcile.Request {
	return gatewaysOfClass(ctx, r.Client, WaypointGatewayClass)
}

// gatewaysOfClass lists reconcile requests for every Gateway of class.
func gatewaysOfClass(ctx context.Context, c client.Reader, class string) []reconcile.Request {
	list := &gwv1.GatewayList{}
	if err := c.List(ctx, list); err != nil {
		return nil
	}
	var reqs []reconcile.Request
	for i := range list.Items {
		if string(list.Items[i].Spec.GatewayClassName) == class {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: list.Items[i].Namespace, Name: list.Items[i].Name}})
		}
	}
	return reqs
}
