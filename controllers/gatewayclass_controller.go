package controllers

import (
	"context"
	"slices"
	"time"

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

	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// WaypointControllerName is our Gateway API controllerName: in GatewayClass
// istio-waypoint and istio when we created them, in every other class we
// serve as an ingress class, and in every RouteParentStatus we write.
// Istio's is istio.io/mesh-controller (class) / istio.io/gateway-controller
// (routes), so both can report on the same route without overwriting.
const WaypointControllerName gwv1.GatewayController = waypointbind.ControllerName

// GatewayClassReconciler makes sure the built-in classes (istio-waypoint
// and istio) exist and reports every class naming our controllerName:
// istio-waypoint is the waypoint class; every other one is an ingress class
// (waypointbind.IngressClass), Accepted, or Accepted=False InvalidParameters
// when its parametersRef is one we cannot serve. The Accepted condition's
// observedGeneration follows every spec change. A class of another
// controller, a built-in name included (Istio installed), is left alone:
// Gateways of the class are then that controller's (see classForeign).
type GatewayClassReconciler struct {
	Client client.Client
	// APIReader reads parameters ConfigMaps (not cached); Client when nil.
	APIReader client.Reader
	// ParamsRecheck is how often a class with parameters re-reads them
	// (default 1 minute): ConfigMap edits are not watched.
	ParamsRecheck time.Duration
	// Builtin are the classes created when missing; default istio-waypoint
	// and istio.
	Builtin []string
}

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gatewayclasses,verbs=get;list;watch;create
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=gatewayclasses/status,verbs=get;update;patch

// Reconcile creates a missing built-in class and reports the class if it
// is ours.
func (r *GatewayClassReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	gc := &gwv1.GatewayClass{}
	err := r.Client.Get(ctx, req.NamespacedName, gc)
	if apierrors.IsNotFound(err) {
		if slices.Contains(r.builtin(), req.Name) {
			return ctrl.Result{}, r.create(ctx, req.Name)
		}
		return ctrl.Result{}, nil
	}
	if err != nil {
		return ctrl.Result{}, err
	}
	if gc.Spec.ControllerName != WaypointControllerName {
		log.FromContext(ctx).Info("GatewayClass belongs to another controller; leaving it, and its Gateways, to it",
			"gatewayClass", gc.Name, "controllerName", gc.Spec.ControllerName)
		return ctrl.Result{}, nil
	}
	cond := metav1.Condition{
		Type: string(gwv1.GatewayClassConditionStatusAccepted), Status: metav1.ConditionTrue,
		Reason: string(gwv1.GatewayClassReasonAccepted), Message: "Handled by the ambient mesh operator",
		ObservedGeneration: gc.Generation,
	}
	var res ctrl.Result
	if gc.Name != WaypointGatewayClass {
		if problem := waypointbind.ParametersProblem(gc); problem != "" {
			cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, string(gwv1.GatewayClassReasonInvalidParameters), problem
		} else if gc.Spec.ParametersRef != nil {
			reader := r.APIReader
			if reader == nil {
				reader = r.Client
			}
			if _, transient, err := ClassParameters(ctx, reader, gc); transient {
				return ctrl.Result{}, err
			} else if err != nil {
				cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, string(gwv1.GatewayClassReasonInvalidParameters), err.Error()
			} else {
				cond.Message = "Handled by the ambient mesh operator, with parameters from ConfigMap " + string(*gc.Spec.ParametersRef.Namespace) + "/" + gc.Spec.ParametersRef.Name
			}
			res.RequeueAfter = r.ParamsRecheck
			if res.RequeueAfter <= 0 {
				res.RequeueAfter = time.Minute
			}
		}
	}
	return res, r.setStatus(ctx, gc, cond)
}

func (r *GatewayClassReconciler) create(ctx context.Context, name string) error {
	desc := "Ambient mesh waypoints, deployed by the ambient operator" // ≤ 64 bytes
	if name != WaypointGatewayClass {
		desc = "Ambient mesh ingress gateways, by the ambient operator"
	}
	gc := &gwv1.GatewayClass{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{LabelManagedBy: ManagedByValue}},
		Spec:       gwv1.GatewayClassSpec{ControllerName: WaypointControllerName, Description: &desc},
	}
	if err := r.Client.Create(ctx, gc); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil // the create event brings us back to accept it
}

func (r *GatewayClassReconciler) setStatus(ctx context.Context, gc *gwv1.GatewayClass, cond metav1.Condition) error {
	status := gc.Status.DeepCopy()
	meta.SetStatusCondition(&status.Conditions, cond)
	if equality.Semantic.DeepEqual(&gc.Status, status) {
		return nil
	}
	patch := client.MergeFrom(gc.DeepCopy())
	gc.Status = *status
	return r.Client.Status().Patch(ctx, gc, patch)
}

func (r *GatewayClassReconciler) builtin() []string {
	if r.Builtin != nil {
		return r.Builtin
	}
	return []string{WaypointGatewayClass, IngressGatewayClass}
}

// SetupWithManager watches the classes naming our controller and the
// built-in names (another controller's class of such a name is logged),
// and checks the built-in classes once at start, when no event would (they
// may not exist yet). Every spec change is a new generation to report.
func (r *GatewayClassReconciler) SetupWithManager(mgr ctrl.Manager) error {
	relevant := predicate.NewPredicateFuncs(func(o client.Object) bool {
		gc, ok := o.(*gwv1.GatewayClass)
		return ok && (gc.Spec.ControllerName == WaypointControllerName || slices.Contains(r.builtin(), gc.Name))
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("gatewayclass").
		For(&gwv1.GatewayClass{}, builder.WithPredicates(relevant)).
		WatchesRawSource(source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
			for _, name := range r.builtin() {
				q.Add(reconcile.Request{NamespacedName: types.NamespacedName{Name: name}})
			}
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

// ingressClass reports whether Gateways of class name are ingress gateways
// we serve (waypointbind.IngressClass on the class as it is now).
func ingressClass(ctx context.Context, c client.Reader, name string) (bool, error) {
	if name == WaypointGatewayClass {
		return false, nil
	}
	gc := &gwv1.GatewayClass{}
	if err := c.Get(ctx, client.ObjectKey{Name: name}, gc); apierrors.IsNotFound(err) {
		return waypointbind.IngressClass(name, nil), nil
	} else if err != nil {
		return false, err
	}
	return waypointbind.IngressClass(name, gc), nil
}

// ingressGateways lists the Gateways of every ingress class we serve.
func ingressGateways(ctx context.Context, c client.Reader) ([]*gwv1.Gateway, error) {
	var classes gwv1.GatewayClassList
	if err := c.List(ctx, &classes); err != nil {
		return nil, err
	}
	byName := make(map[string]*gwv1.GatewayClass, len(classes.Items))
	for i := range classes.Items {
		byName[classes.Items[i].Name] = &classes.Items[i]
	}
	var list gwv1.GatewayList
	if err := c.List(ctx, &list); err != nil {
		return nil, err
	}
	var out []*gwv1.Gateway
	for i := range list.Items {
		name := string(list.Items[i].Spec.GatewayClassName)
		if waypointbind.IngressClass(name, byName[name]) {
			out = append(out, &list.Items[i])
		}
	}
	return out, nil
}
