package controllers

import (
	"context"
	"strings"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// WaypointControllerName is our Gateway API controllerName: in GatewayClass
// istio-waypoint when we created it, and in every RouteParentStatus we write.
// Istio's is istio.io/mesh-controller (class) / istio.io/gateway-controller
// (routes), so both can report on the same route without overwriting.
const WaypointControllerName gwv1.GatewayController = "mesh.ambient.dev/waypoint-controller"

// GatewayClassReconciler makes sure GatewayClass istio-waypoint exists and,
// when it is ours, reports it Accepted. A class of that name owned by
// another controller (Istio installed) is left alone: Gateways of the class
// are then that controller's (see waypointClassForeign).
type GatewayClassReconciler struct {
	Client client.Client
	// ClassName defaults to istio-waypoint.
	ClassName string
}

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gatewayclasses,verbs=get;list;watch;create
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gatewayclasses/status,verbs=get;update;patch

// Reconcile creates the class if missing and accepts it if it is ours.
func (r *GatewayClassReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	gc := &gwv1.GatewayClass{}
	err := r.Client.Get(ctx, client.ObjectKey{Name: r.className()}, gc)
	if apierrors.IsNotFound(err) {
		return ctrl.Result{}, r.create(ctx)
	}
	if err != nil {
		return ctrl.Result{}, err
	}
	if gc.Spec.ControllerName != WaypointControllerName {
		log.FromContext(ctx).Info("GatewayClass belongs to another controller; leaving it, and its Gateways, to it",
			"gatewayClass", gc.Name, "controllerName", gc.Spec.ControllerName)
		return ctrl.Result{}, nil
	}
	return ctrl.Result{}, r.accept(ctx, gc)
}

func (r *GatewayClassReconciler) create(ctx context.Context) error {
	desc := "Ambient mesh waypoints, deployed by the ambient operator" // ≤ 64 bytes
	if r.className() == IngressGatewayClass {
		desc = "Ambient mesh ingress gateways, by the ambient operator"
	}
	gc := &gwv1.GatewayClass{
		ObjectMeta: metav1.ObjectMeta{Name: r.className(), Labels: map[string]string{LabelManagedBy: ManagedByValue}},
		Spec:       gwv1.GatewayClassSpec{ControllerName: WaypointControllerName, Description: &desc},
	}
	if err := r.Client.Create(ctx, gc); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil // the create event brings us back to accept it
}

func (r *GatewayClassReconciler) accept(ctx context.Context, gc *gwv1.GatewayClass) error {
	status := gc.Status.DeepCopy()
	meta.SetStatusCondition(&status.Conditions, metav1.Condition{
		Type: string(gwv1.GatewayClassConditionStatusAccepted), Status: metav1.ConditionTrue,
		Reason: string(gwv1.GatewayClassReasonAccepted), Message: "Handled by the ambient mesh operator",
		ObservedGeneration: gc.Generation,
	})
	if equality.Semantic.DeepEqual(&gc.Status, status) {
		return nil
	}
	patch := client.MergeFrom(gc.DeepCopy())
	gc.Status = *status
	return r.Client.Status().Patch(ctx, gc, patch)
}

func (r *GatewayClassReconciler) className() string {
	if r.ClassName != "" {
		return r.ClassName
	}
	return WaypointGatewayClass
}

// SetupWithManager watches the one class and checks it once at start, when
// no event would (the class may not exist yet).
func (r *GatewayClassReconciler) SetupWithManager(mgr ctrl.Manager) error {
	req := reconcile.Request{NamespacedName: types.NamespacedName{Name: r.className()}}
	isOurs := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() == r.className() })
	return ctrl.NewControllerManagedBy(mgr).
		Named(strings.ReplaceAll(r.className(), "-", "")+"gatewayclass").
		For(&gwv1.GatewayClass{}, builder.WithPredicates(isOurs)).
		WatchesRawSource(source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
			q.Add(req)
			return nil
		})).
		Complete(r)
}

// waypointClassForeign reports whether GatewayClass istio-waypoint exists
// and names another controller. A missing class is ours: the
// GatewayClassReconciler is creating it.
func waypointClassForeign(ctx context.Context, c client.Reader) (bool, gwv1.GatewayController, error) {
	return classForeign(ctx, c, WaypointGatewayClass)
}

// classForeign reports whether GatewayClass name exists and names another
// controller.
func classForeign(ctx context.Context, c client.Reader, name string) (bool, gwv1.GatewayController, error) {
	gc := &gwv1.GatewayClass{}
	if err := c.Get(ctx, client.ObjectKey{Name: name}, gc); err != nil {
		return false, "", client.IgnoreNotFound(err)
	}
	return gc.Spec.ControllerName != WaypointControllerName, gc.Spec.ControllerName, nil
}
