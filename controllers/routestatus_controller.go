package controllers

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
	proxyroute "github.com/ambientmesh/ambient/proxylib/route"
)

// RouteConditionResolvedWaypoints is Istio's extra route condition: does
// the parent Service have a waypoint (without one, no waypoint applies the
// route).
const RouteConditionResolvedWaypoints = "ResolvedWaypoints"

// Reasons of ResolvedWaypoints. Istio leaves the condition True and only
// changes its message; we say False, which is what the message means.
const (
	reasonResolvedWaypoints = "ResolvedWaypoints"
	reasonNoWaypoint        = "NoWaypoint"
	reasonWaypointNotFound  = "WaypointNotFound"
)

// routeRefsIndex indexes routes by what they refer to (routeRefKeys), so a
// change of a Service or Namespace re-evaluates only its routes.
const routeRefsIndex = "mesh.ambient.dev/route-refs"

// RouteStatusReconciler writes our RouteParentStatus entries on HTTPRoutes
// or GRPCRoutes (one reconciler per kind): one per parentRef that is a
// Service (GAMMA) or a waypoint Gateway of ours. Entries of other
// controllers are kept as they are.
type RouteStatusReconciler struct {
	Client client.Client
	// APIReader reads the latest route after a write conflict.
	APIReader client.Reader
	Kind      RouteKind
	// Grants: the cluster serves ReferenceGrants (watched: they decide
	// whether Gateway routes' cross-namespace backendRefs resolve).
	Grants bool
}

// RouteKind is one of the route kinds we report on (RouteKinds).
type RouteKind struct {
	Name     string
	newRoute func() client.Object
	newList  func() client.ObjectList
}

var (
	HTTPRouteKind = RouteKind{Name: "HTTPRoute",
		newRoute: func() client.Object { return &gwv1.HTTPRoute{} },
		newList:  func() client.ObjectList { return &gwv1.HTTPRouteList{} }}
	GRPCRouteKind = RouteKind{Name: "GRPCRoute",
		newRoute: func() client.Object { return &gwv1.GRPCRoute{} },
		newList:  func() client.ObjectList { return &gwv1.GRPCRouteList{} }}
	// TLSRoute and TCPRoute (v1): ingress Gateways' TLS passthrough and
	// TCP listeners.
	TLSRouteKind = RouteKind{Name: "TLSRoute",
		newRoute: func() client.Object { return &gwv1.TLSRoute{} },
		newList:  func() client.ObjectList { return &gwv1.TLSRouteList{} }}
	TCPRouteKind = RouteKind{Name: "TCPRoute",
		newRoute: func() client.Object { return &gwv1.TCPRoute{} },
		newList:  func() client.ObjectList { return &gwv1.TCPRouteList{} }}
	// RouteKinds are every route kind we serve, each watched when the
	// cluster has its CRD.
	RouteKinds = []RouteKind{HTTPRouteKind, GRPCRouteKind, TLSRouteKind, TCPRouteKind}
)

// l4 reports a kind that only ingress Gateways take (waypoints apply HTTP
// and gRPC routes to Services; TCP to a Service is passed through).
func (k RouteKind) l4() bool { return k.Name == TLSRouteKind.Name || k.Name == TCPRouteKind.Name }

// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=httproutes;grpcroutes;tlsroutes;tcproutes,verbs=get;list;watch
// +kubebuilder:rbac:groups=gateway.networking.k8s.io,resources=httproutes/status;grpcroutes/status;tlsroutes/status;tcproutes/status,verbs=get;update;patch

// Reconcile recomputes our parent entries and writes them when they
// changed. The update carries the resourceVersion read, so a concurrent
// writer's entries are never lost: on a conflict we read the route again
// (from the API server) and start over.
func (r *RouteStatusReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	route := r.Kind.newRoute()
	var reader client.Reader = r.Client
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		defer func() { reader = r.APIReader }() // retries read past the cache
		if err := reader.Get(ctx, req.NamespacedName, route); err != nil {
			return client.IgnoreNotFound(err)
		}
		if !route.GetDeletionTimestamp().IsZero() {
			return nil
		}
		ours, err := r.evaluate(ctx, route)
		if err != nil {
			return err
		}
		status := routeStatusOf(route)
		merged := mergeParentStatuses(status.Parents, ours, route.GetNamespace())
		if equality.Semantic.DeepEqual(status.Parents, merged) {
			return nil
		}
		status.Parents = merged
		return r.Client.Status().Update(ctx, route)
	})
	return ctrl.Result{}, err
}

// parentOutcome is what we conclude about one parentRef.
type parentOutcome struct {
	ref                       gwv1.ParentReference
	accepted                  bool
	acceptedReason, acceptMsg string
	// waypoint is nil for Gateway parents (the condition is about Services).
	waypoint *metav1.Condition
	// gateway: the parent is a Gateway, whose routes need a ReferenceGrant
	// for backends of other namespaces (Service parents do not: GAMMA).
	gateway bool
}

func (r *RouteStatusReconciler) evaluate(ctx context.Context, route client.Object) ([]gwv1.RouteParentStatus, error) {
	foreign, _, err := waypointClassForeign(ctx, r.Client)
	if err != nil {
		return nil, err
	}
	parents, backends := routeRefsOf(route)
	var outcomes []parentOutcome
	for _, p := range parents {
		o, ours, err := r.evaluateParent(ctx, route, p, foreign)
		if err != nil {
			return nil, err
		}
		if ours {
			outcomes = append(outcomes, o)
		}
	}
	if len(outcomes) == 0 {
		return nil, nil
	}
	var grants *proxyroute.Grants
	if r.Grants {
		if grants, err = referenceGrants(ctx, r.Client); err != nil {
			return nil, err
		}
	}
	resolved := map[bool]metav1.Condition{}
	out := make([]gwv1.RouteParentStatus, 0, len(outcomes))
	for _, o := range outcomes {
		if _, done := resolved[o.gateway]; !done {
			c, err := resolveBackends(ctx, r.Client, grants, r.Kind.Name, route.GetNamespace(), backends, o.gateway)
			if err != nil {
				return nil, err
			}
			resolved[o.gateway] = c
		}
		out = append(out, o.status(route.GetGeneration(), resolved[o.gateway]))
	}
	return out, nil
}

// evaluateParent decides whether p is ours to report on, and how: Service
// parents and waypoint Gateways are; other kinds are not. foreign is true
// when another controller owns GatewayClass istio-waypoint.
func (r *RouteStatusReconciler) evaluateParent(ctx context.Context, route client.Object, p gwv1.ParentReference, foreign bool) (parentOutcome, bool, error) {
	routeNS := route.GetNamespace()
	ns := routeNS
	if p.Namespace != nil && *p.Namespace != "" {
		ns = string(*p.Namespace)
	}
	key := client.ObjectKey{Namespace: ns, Name: string(p.Name)}
	switch {
	case isServiceParent(p) && r.Kind.l4():
		return parentOutcome{ref: p, acceptedReason: string(gwv1.RouteReasonUnsupportedValue),
			acceptMsg: fmt.Sprintf("%ss attached to a Service are not applied by waypoints (TCP to a Service is passed through); attach it to an ingress Gateway's %s listener", r.Kind.Name, map[string]string{"TLSRoute": "TLS", "TCPRoute": "TCP"}[r.Kind.Name]),
			waypoint:  waypointCondition(reasonNoWaypoint, "waypoints do not apply "+r.Kind.Name+"s")}, true, nil
	case isServiceParent(p):
		return r.serviceParent(ctx, p, key, foreign)
	case isGatewayParent(p):
		return r.gatewayParent(ctx, route, p, key, foreign)
	}
	return parentOutcome{}, false, nil
}

// serviceParent: accepted when the Service exists, whether or not a waypoint
// serves it (as Istio; ResolvedWaypoints tells). A Service whose waypoint is
// a Gateway of another controller's class is that controller's to report
// on, as Istio skips Services whose waypoint is not its own.
func (r *RouteStatusReconciler) serviceParent(ctx context.Context, p gwv1.ParentReference, key client.ObjectKey, foreign bool) (parentOutcome, bool, error) {
	o := parentOutcome{ref: p}
	svc := &corev1.Service{}
	if err := r.Client.Get(ctx, key, svc); client.IgnoreNotFound(err) != nil {
		return o, false, err
	} else if err != nil {
		o.acceptedReason, o.acceptMsg = string(gwv1.RouteReasonNoMatchingParent), fmt.Sprintf("parent Service %s not found", key)
		o.waypoint = waypointCondition(reasonNoWaypoint, fmt.Sprintf("parent Service %s not found", key))
		return o, true, nil
	}
	b, err := serviceWaypoint(ctx, r.Client, svc)
	if err != nil {
		return o, false, err
	}
	if foreign && b != nil && b.Waypoint != nil && b.Waypoint.FromGateway {
		return o, false, nil
	}
	o.waypoint = bindingCondition(key, b)
	if p.Port != nil && !hasServicePort(svc, int32(*p.Port)) {
		// The route would apply to no traffic (GEP-1294 parentRef port).
		o.acceptedReason, o.acceptMsg = string(gwv1.RouteReasonNoMatchingParent), fmt.Sprintf("parent Service %s has no port %d", key, *p.Port)
		return o, true, nil
	}
	o.accepted, o.acceptedReason, o.acceptMsg = true, string(gwv1.RouteReasonAccepted), "Route was valid"
	return o, true, nil
}

func hasServicePort(svc *corev1.Service, port int32) bool {
	for _, sp := range svc.Spec.Ports {
		if sp.Port == port {
			return true
		}
	}
	return false
}

// gatewayParent: only existing Gateways of our classes are ours (a missing
// Gateway may be any controller's). An ingress Gateway (class istio, or
// another ingress class we serve: ingressClass) takes
// the routes its listeners admit. The waypoint applies routes attached to
// Services only (GAMMA); its HBONE listener takes none, as in Istio.
// waypointForeign is true when another controller owns istio-waypoint.
func (r *RouteStatusReconciler) gatewayParent(ctx context.Context, route client.Object, p gwv1.ParentReference, key client.ObjectKey, waypointForeign bool) (parentOutcome, bool, error) {
	gw := &gwv1.Gateway{}
	if err := r.Client.Get(ctx, key, gw); err != nil {
		return parentOutcome{}, false, client.IgnoreNotFound(err)
	}
	if gw.Spec.GatewayClassName == WaypointGatewayClass {
		if waypointForeign {
			return parentOutcome{}, false, nil
		}
	} else {
		served, err := ingressClass(ctx, r.Client, string(gw.Spec.GatewayClassName))
		if err != nil || !served {
			return parentOutcome{}, false, err
		}
		resolved, err := resolveGatewaySelectors(ctx, r.Client, gw)
		if err != nil {
			return parentOutcome{}, false, err
		}
		o := ingressParent(resolved, p, route.GetNamespace(), r.Kind.Name, routeHostnames(route))
		o.gateway = true
		return o, true, nil
	}
	return parentOutcome{
		ref:            p,
		gateway:        true,
		acceptedReason: string(gwv1.RouteReasonNotAllowedByListeners),
		acceptMsg:      fmt.Sprintf("waypoint Gateway %s takes no routes: attach the route to a Service (parentRef group \"\", kind Service) that uses the waypoint", key),
	}, true, nil
}

func bindingCondition(svc client.ObjectKey, b *waypointbind.Binding) *metav1.Condition {
	switch {
	case b == nil:
		return waypointCondition(reasonNoWaypoint, fmt.Sprintf("Service %s is not bound to a waypoint; no waypoint applies this route", svc))
	case b.Waypoint == nil:
		return waypointCondition(reasonWaypointNotFound, fmt.Sprintf("Service %s uses waypoint %s/%s, which does not exist; its traffic fails until it does", svc, b.Namespace, b.Name))
	}
	c := waypointCondition(reasonResolvedWaypoints, fmt.Sprintf("bound to waypoint %s/%s", b.Namespace, b.Name))
	c.Status = metav1.ConditionTrue
	return c
}

func waypointCondition(reason, msg string) *metav1.Condition {
	return &metav1.Condition{Type: RouteConditionResolvedWaypoints, Status: metav1.ConditionFalse, Reason: reason, Message: msg}
}

// status renders one outcome as our RouteParentStatus (conditions without
// observed state; mergeParentStatuses keeps transition times).
func (o parentOutcome) status(gen int64, resolved metav1.Condition) gwv1.RouteParentStatus {
	accepted := metav1.Condition{Type: string(gwv1.RouteConditionAccepted), Status: metav1.ConditionFalse, Reason: o.acceptedReason, Message: o.acceptMsg}
	if o.accepted {
		accepted.Status = metav1.ConditionTrue
	}
	conds := []metav1.Condition{accepted, resolved}
	if o.waypoint != nil {
		conds = append(conds, *o.waypoint)
	}
	for i := range conds {
		conds[i].ObservedGeneration = gen
	}
	return gwv1.RouteParentStatus{ParentRef: o.ref, ControllerName: WaypointControllerName, Conditions: conds}
}

// resolveBackends reports ResolvedRefs as the proxies behave
// (proxylib/route.BackendPermitted): only core Services are routed to; for
// a Gateway parent, one of another namespace only when a ReferenceGrant
// there permits it (RefNotPermitted otherwise), while a Service parent
// (GAMMA) needs no grant; a missing or ExternalName Service answers 500.
func resolveBackends(ctx context.Context, c client.Reader, grants *proxyroute.Grants, kind, routeNS string, refs []gwv1.BackendRef, gatewayParent bool) (metav1.Condition, error) {
	var reason gwv1.RouteConditionReason
	var problems []string
	fail := func(r gwv1.RouteConditionReason, msg string) {
		if reason == "" {
			reason = r
		}
		problems = append(problems, msg)
	}
	for _, ref := range refs {
		ns := routeNS
		if ref.Namespace != nil && *ref.Namespace != "" {
			ns = string(*ref.Namespace)
		}
		key := client.ObjectKey{Namespace: ns, Name: string(ref.Name)}
		switch {
		case !isCoreService(ref.Group, ref.Kind):
			fail(gwv1.RouteReasonInvalidKind, fmt.Sprintf("backendRef %s: kind %s/%s is not supported, only core Services", key, deref(ref.Group), deref(ref.Kind)))
		case !proxyroute.BackendPermitted(grants, gatewayParent, kind, routeNS, ns, string(ref.Name)):
			fail(gwv1.RouteReasonRefNotPermitted, fmt.Sprintf("backendRef %s: no ReferenceGrant in namespace %s permits %ss of namespace %s to use this Service", key, ns, kind, routeNS))
		default:
			svc := &corev1.Service{}
			if err := c.Get(ctx, key, svc); client.IgnoreNotFound(err) != nil {
				return metav1.Condition{}, err
			} else if err != nil {
				fail(gwv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef Service %s not found", key))
			} else if svc.Spec.Type == corev1.ServiceTypeExternalName {
				fail(gwv1.RouteReasonBackendNotFound, fmt.Sprintf("backendRef Service %s is ExternalName, which waypoints cannot route to", key))
			}
		}
	}
	if reason != "" {
		return metav1.Condition{Type: string(gwv1.RouteConditionResolvedRefs), Status: metav1.ConditionFalse, Reason: string(reason), Message: strings.Join(problems, "; ")}, nil
	}
	return metav1.Condition{Type: string(gwv1.RouteConditionResolvedRefs), Status: metav1.ConditionTrue, Reason: string(gwv1.RouteReasonResolvedRefs), Message: "All references resolved"}, nil
}

// mergeParentStatuses replaces our entries with ours (keeping each
// condition's lastTransitionTime when its status did not change), drops our
// entries for parentRefs that are gone, and leaves other controllers'
// entries where they are.
func mergeParentStatuses(current, ours []gwv1.RouteParentStatus, routeNS string) []gwv1.RouteParentStatus {
	want := map[string]gwv1.RouteParentStatus{}
	var order []string
	for _, o := range ours {
		k := parentKey(o.ParentRef, routeNS)
		if _, dup := want[k]; !dup {
			order = append(order, k)
		}
		want[k] = o
	}
	out := []gwv1.RouteParentStatus{}
	placed := map[string]bool{}
	for _, cur := range current {
		if cur.ControllerName != WaypointControllerName {
			out = append(out, cur)
			continue
		}
		k := parentKey(cur.ParentRef, routeNS)
		w, keep := want[k]
		if !keep || placed[k] {
			continue
		}
		placed[k] = true
		out = append(out, withConditions(w, cur.Conditions))
	}
	for _, k := range order {
		if !placed[k] {
			out = append(out, withConditions(want[k], nil))
		}
	}
	return out
}

func withConditions(w gwv1.RouteParentStatus, existing []metav1.Condition) gwv1.RouteParentStatus {
	conds := make([]metav1.Condition, 0, len(w.Conditions))
	for _, c := range w.Conditions {
		if old := meta.FindStatusCondition(existing, c.Type); old != nil {
			conds = append(conds, *old)
		}
	}
	for _, c := range w.Conditions {
		meta.SetStatusCondition(&conds, c)
	}
	// Drop conditions we no longer report (e.g. a parent changed kind).
	filtered := conds[:0]
	for _, c := range conds {
		if meta.FindStatusCondition(w.Conditions, c.Type) != nil {
			filtered = append(filtered, c)
		}
	}
	w.Conditions = filtered
	return w
}

// parentKey identifies a parentRef with defaults filled in.
func parentKey(p gwv1.ParentReference, routeNS string) string {
	group, kind, ns := gwv1.GroupName, "Gateway", routeNS
	if p.Group != nil {
		group = string(*p.Group)
	}
	if group == "core" {
		group = ""
	}
	if p.Kind != nil {
		kind = string(*p.Kind)
	}
	if p.Namespace != nil && *p.Namespace != "" {
		ns = string(*p.Namespace)
	}
	return fmt.Sprintf("%s/%s/%s/%s/%s/%d", group, kind, ns, p.Name, deref(p.SectionName), deref(p.Port))
}

// isServiceParent: kind Service in the core group, as the waypoint reads
// parentRefs (an omitted kind means Gateway).
func isServiceParent(p gwv1.ParentReference) bool {
	return p.Kind != nil && isCoreService(p.Group, p.Kind)
}

func isGatewayParent(p gwv1.ParentReference) bool {
	return (p.Group == nil || *p.Group == gwv1.GroupName) && (p.Kind == nil || *p.Kind == "Gateway")
}

// isCoreService: group "" (or "core", which the waypoint also accepts) and
// kind Service (the default for backendRefs).
func isCoreService(group *gwv1.Group, kind *gwv1.Kind) bool {
	return (group == nil || *group == "" || *group == "core") && (kind == nil || *kind == "Service")
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// routeRefsOf returns the route's parentRefs and every rule's backendRefs.
func routeRefsOf(route client.Object) ([]gwv1.ParentReference, []gwv1.BackendRef) {
	var backends []gwv1.BackendRef
	switch r := route.(type) {
	case *gwv1.HTTPRoute:
		for _, rule := range r.Spec.Rules {
			for _, b := range rule.BackendRefs {
				backends = append(backends, b.BackendRef)
			}
		}
		return r.Spec.ParentRefs, backends
	case *gwv1.GRPCRoute:
		for _, rule := range r.Spec.Rules {
			for _, b := range rule.BackendRefs {
				backends = append(backends, b.BackendRef)
			}
		}
		return r.Spec.ParentRefs, backends
	case *gwv1.TLSRoute:
		for _, rule := range r.Spec.Rules {
			backends = append(backends, rule.BackendRefs...)
		}
		return r.Spec.ParentRefs, backends
	case *gwv1.TCPRoute:
		for _, rule := range r.Spec.Rules {
			backends = append(backends, rule.BackendRefs...)
		}
		return r.Spec.ParentRefs, backends
	}
	return nil, nil
}

func routeHostnames(route client.Object) []gwv1.Hostname {
	switch r := route.(type) {
	case *gwv1.HTTPRoute:
		return r.Spec.Hostnames
	case *gwv1.GRPCRoute:
		return r.Spec.Hostnames
	case *gwv1.TLSRoute:
		return r.Spec.Hostnames
	}
	return nil
}

func routeStatusOf(route client.Object) *gwv1.RouteStatus {
	switch r := route.(type) {
	case *gwv1.HTTPRoute:
		return &r.Status.RouteStatus
	case *gwv1.GRPCRoute:
		return &r.Status.RouteStatus
	case *gwv1.TLSRoute:
		return &r.Status.RouteStatus
	case *gwv1.TCPRoute:
		return &r.Status.RouteStatus
	}
	return &gwv1.RouteStatus{}
}

// routeRefKeys: "svc/<ns>/<name>" for every Service a route names (parent
// or backend), "ns/<ns>" for the namespaces of its Service parents
// (whose labels bind waypoints) and "backendns/<ns>" for the other
// namespaces its backends are in (whose ReferenceGrants decide).
func routeRefKeys(obj client.Object) []string {
	parents, backends := routeRefsOf(obj)
	var keys []string
	nsOf := func(n *gwv1.Namespace) string {
		if n != nil && *n != "" {
			return string(*n)
		}
		return obj.GetNamespace()
	}
	for _, p := range parents {
		if isServiceParent(p) {
			keys = append(keys, "svc/"+nsOf(p.Namespace)+"/"+string(p.Name), "ns/"+nsOf(p.Namespace))
		}
	}
	for _, b := range backends {
		keys = append(keys, "svc/"+nsOf(b.Namespace)+"/"+string(b.Name))
		if ns := nsOf(b.Namespace); ns != obj.GetNamespace() {
			keys = append(keys, "backendns/"+ns)
		}
	}
	return keys
}

// SetupWithManager indexes routes by reference and watches what the status
// depends on. Our own status writes come back as route events once and then
// write nothing, so there is no loop.
func (r *RouteStatusReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	if err := mgr.GetFieldIndexer().IndexField(ctx, r.Kind.newRoute(), routeRefsIndex, routeRefKeys); err != nil {
		return err
	}
	changed := predicate.Or(predicate.GenerationChangedPredicate{}, predicate.LabelChangedPredicate{}, predicate.AnnotationChangedPredicate{})
	b := ctrl.NewControllerManagedBy(mgr)
	if r.Grants {
		// A ReferenceGrant decides for the routes with backends in its
		// namespace.
		b = b.Watches(&gwv1beta1.ReferenceGrant{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return r.routesReferring(ctx, "backendns/"+o.GetNamespace())
		}))
	}
	return b.
		Named(strings.ToLower(r.Kind.Name)+"status").
		For(r.Kind.newRoute()).
		// Every Service change: its type (ExternalName) and labels matter.
		Watches(&corev1.Service{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return r.routesReferring(ctx, "svc/"+o.GetNamespace()+"/"+o.GetName())
		})).
		// A namespace's labels decide both the waypoints its Services use
		// and which ingress listeners (selectors) admit its own routes.
		Watches(&corev1.Namespace{}, handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, o client.Object) []reconcile.Request {
			return append(r.routesReferring(ctx, "ns/"+o.GetName()), r.routesIn(ctx, o.GetName())...)
		}), builder.WithPredicates(predicate.LabelChangedPredicate{})).
		Watches(&gwv1.Gateway{}, handler.EnqueueRequestsFromMapFunc(r.allRoutes), builder.WithPredicates(changed)).
		Watches(&meshv1.WaypointPolicy{}, handler.EnqueueRequestsFromMapFunc(r.allRoutes), builder.WithPredicates(changed)).
		Watches(&gwv1.GatewayClass{}, handler.EnqueueRequestsFromMapFunc(r.allRoutes),
			builder.WithPredicates(predicate.NewPredicateFuncs(func(o client.Object) bool {
				gc, ok := o.(*gwv1.GatewayClass)
				return ok && (gc.Name == WaypointGatewayClass || gc.Name == IngressGatewayClass || gc.Spec.ControllerName == WaypointControllerName)
			}))).
		Complete(r)
}

// routesIn lists the routes of one namespace.
func (r *RouteStatusReconciler) routesIn(ctx context.Context, ns string) []reconcile.Request {
	list := r.Kind.newList()
	if err := r.Client.List(ctx, list, client.InNamespace(ns)); err != nil {
		return nil
	}
	return requestsFor(list)
}

func (r *RouteStatusReconciler) routesReferring(ctx context.Context, key string) []reconcile.Request {
	list := r.Kind.newList()
	if err := r.Client.List(ctx, list, client.MatchingFields{routeRefsIndex: key}); err != nil {
		return nil
	}
	return requestsFor(list)
}

// allRoutes: waypoints (and their class) can bind Services anywhere through
// istio.io/use-waypoint-namespace, and change rarely, so every route is
// re-evaluated.
func (r *RouteStatusReconciler) allRoutes(ctx context.Context, _ client.Object) []reconcile.Request {
	list := r.Kind.newList()
	if err := r.Client.List(ctx, list); err != nil {
		return nil
	}
	return requestsFor(list)
}

func requestsFor(list client.ObjectList) []reconcile.Request {
	var reqs []reconcile.Request
	_ = meta.EachListItem(list, func(o runtime.Object) error {
		if m, ok := o.(metav1.Object); ok {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: m.GetNamespace(), Name: m.GetName()}})
		}
		return nil
	})
	return reqs
}
