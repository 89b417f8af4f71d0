// Package waypointbind holds the rules that bind Services and pods to
// waypoints. The control plane routes traffic by them and the route status
// controller reports them; sharing one implementation keeps what users are
// told equal to what the data path does.
package waypointbind

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// Labels and annotations with Istio's meaning.
const (
	// UseWaypointLabel on a namespace, Service or pod names the waypoint to
	// use ("none" opts out); Istio's newer binding.
	UseWaypointLabel = "istio.io/use-waypoint"
	// UseWaypointNamespaceLabel names the waypoint's namespace when it is
	// not the object's own.
	UseWaypointNamespaceLabel = "istio.io/use-waypoint-namespace"
	// IngressUseWaypointLabel on a Service or its namespace sends ingress
	// gateways' traffic to the Service through its waypoint.
	IngressUseWaypointLabel = "istio.io/ingress-use-waypoint"
	// ForServiceAccountAnnotation on a waypoint Gateway restricts it to one
	// service account (the seeds' binding).
	ForServiceAccountAnnotation = "istio.io/for-service-account"
	// WaypointForLabel on a Gateway: service, workload, all or none.
	WaypointForLabel = "istio.io/waypoint-for"
	// GatewayClass is the gatewayClassName of waypoint Gateways.
	GatewayClass = "istio-waypoint"
	// IngressGatewayClass is the built-in class of ingress Gateways, as in
	// Istio; they are never waypoints. Any other class naming
	// ControllerName is an ingress class too (IngressClass).
	IngressGatewayClass = "istio"
	// ControllerName is the operator's Gateway API controllerName: in the
	// classes it serves (istio-waypoint for waypoints, every other one
	// naming it for ingress gateways) and in the route parent statuses it
	// writes.
	ControllerName gwv1.GatewayController = "mesh.ambient.dev/waypoint-controller"
	// A waypoint's own pods and Service carry one of these labels naming
	// it; they never get a waypoint themselves.
	GatewayNameLabel  = "gateway.networking.k8s.io/gateway-name"
	WaypointNameLabel = "mesh.ambient.dev/waypoint"
)

// IngressClass reports whether Gateways of GatewayClass name are ingress
// gateways the operator serves, as Istio serves every class naming its
// controller: a class naming ControllerName, other than the waypoint
// class, whose parameters are supported (ParametersProblem). gc is the
// class, nil when it does not exist: only the built-in class istio is
// served then (the operator is creating it).
func IngressClass(name string, gc *gwv1.GatewayClass) bool {
	if name == GatewayClass {
		return false
	}
	if gc == nil {
		return name == IngressGatewayClass
	}
	return gc.Spec.ControllerName == ControllerName && ParametersProblem(gc) == ""
}

// ParametersProblem says why an ingress class's parametersRef cannot be
// served ("" when it has none or it can): the ingress gateway takes its
// parameters from a ConfigMap (Istio's gateway customization format), and
// a class's reference names the ConfigMap's namespace. Whether the
// ConfigMap exists and holds valid parameters is checked by the operator
// when it reads it.
func ParametersProblem(gc *gwv1.GatewayClass) string {
	p := gc.Spec.ParametersRef
	if p == nil {
		return ""
	}
	if p.Group != "" || p.Kind != "ConfigMap" {
		kind := string(p.Kind)
		if p.Group != "" {
			kind += "." + string(p.Group)
		}
		return "parametersRef to " + kind + " " + p.Name + " is not supported: the ambient mesh ingress gateway takes its parameters from a ConfigMap (group \"\", kind ConfigMap)"
	}
	if p.Namespace == nil || *p.Namespace == "" {
		return "parametersRef to ConfigMap " + p.Name + " needs a namespace"
	}
	return ""
}

// Traffic types of a waypoint (istio.io/waypoint-for).
const (
	TrafficService  = string(meshv1.TrafficService)
	TrafficWorkload = string(meshv1.TrafficWorkload)
	TrafficAll      = string(meshv1.TrafficAll)
	TrafficNone     = string(meshv1.TrafficNone)
)

// Waypoint is a declared waypoint: a WaypointPolicy or a waypoint Gateway.
type Waypoint struct {
	Namespace, Name string
	// ServiceAccount is set for a service-account waypoint.
	ServiceAccount string
	TrafficType    string
	// FromGateway: declared by a Gateway, not a WaypointPolicy.
	FromGateway bool
}

// ForWorkloads reports whether traffic addressed to pods goes through w.
func (w *Waypoint) ForWorkloads() bool {
	return w.TrafficType == TrafficWorkload || w.TrafficType == TrafficAll
}

// ForServices reports whether traffic addressed to Services goes through w.
func (w *Waypoint) ForServices() bool {
	return w.TrafficType == TrafficService || w.TrafficType == TrafficAll
}

// FromGatewayObject is the waypoint a Gateway declares; ok is false for
// other Gateways and for one being deleted.
func FromGatewayObject(gw *gwv1.Gateway) (w *Waypoint, ok bool) {
	if gw.Spec.GatewayClassName != GatewayClass || gw.DeletionTimestamp != nil {
		return nil, false
	}
	traffic := gw.Labels[WaypointForLabel]
	if traffic == "" {
		traffic = TrafficService // Istio's default, as the operator deploys it
	}
	return &Waypoint{Namespace: gw.Namespace, Name: gw.Name, ServiceAccount: gw.Annotations[ForServiceAccountAnnotation],
		TrafficType: traffic, FromGateway: true}, true
}

// FromPolicy is the waypoint a WaypointPolicy declares; ok is false while
// it is being deleted.
func FromPolicy(wp *meshv1.WaypointPolicy) (w *Waypoint, ok bool) {
	if wp.DeletionTimestamp != nil {
		return nil, false
	}
	w = &Waypoint{Namespace: wp.Namespace, Name: wp.Name, TrafficType: string(wp.Spec.TrafficType)}
	if w.TrafficType == "" {
		w.TrafficType = TrafficService
	}
	if wp.Spec.Scope == meshv1.ScopeServiceAccount {
		w.ServiceAccount = wp.Spec.ServiceAccount
	}
	return w, true
}

// Index holds declared waypoints by namespace and name.
type Index map[string]map[string]*Waypoint

// Add records w; a WaypointPolicy wins over a Gateway of the same name,
// whatever the order they are added in.
func (ix Index) Add(w *Waypoint) {
	if ix[w.Namespace] == nil {
		ix[w.Namespace] = map[string]*Waypoint{}
	}
	if old := ix[w.Namespace][w.Name]; old != nil && !old.FromGateway && w.FromGateway {
		return
	}
	ix[w.Namespace][w.Name] = w
}

// Lookup finds the waypoint declared as namespace/name; nil when none is.
type Lookup func(namespace, name string) *Waypoint

// Lookup is the Index as a Lookup.
func (ix Index) Lookup(namespace, name string) *Waypoint { return ix[namespace][name] }

// Binding is the waypoint some traffic must cross. Waypoint is nil when a
// label names a waypoint nobody declares: traffic then goes to its future
// address and fails closed rather than bypassing it.
type Binding struct {
	Namespace, Name string
	Waypoint        *Waypoint
}

// Scope is what a binding is computed in: the object's namespace, the
// waypoints declared there, and a lookup for other namespaces.
type Scope struct {
	Namespace *corev1.Namespace // nil when it does not exist
	Name      string            // the namespace's name
	Local     map[string]*Waypoint
	Lookup    Lookup
}

// ForService applies the rules for a Service: its label, then its
// namespace's label, then the namespace waypoint when it handles service
// traffic. A waypoint's own Service never gets one. ok is false when the
// Service has no waypoint.
func ForService(s Scope, svc *corev1.Service) (Binding, bool) {
	if _, own := s.Local[svc.Name]; own || svc.Labels[GatewayNameLabel] != "" || svc.Labels[WaypointNameLabel] != "" {
		return Binding{}, false
	}
	return ForServiceEntry(s, svc.Labels)
}

// ForServiceEntry applies a Service's rules to a ServiceEntry (Istio binds
// both alike): its label, its namespace's label, the namespace waypoint
// when it handles service traffic.
func ForServiceEntry(s Scope, labels map[string]string) (Binding, bool) {
	if b, found := s.labelled(labels); found {
		return accepts(b, (*Waypoint).ForServices)
	}
	return s.namespaceRules((*Waypoint).ForServices)
}

// accepts: a label's binding holds only when the waypoint takes this kind
// of traffic, as Istio binds (a Service labelled with a waypoint for
// workloads only, or a pod with one for services only, gets none). A
// waypoint nobody declares stays bound: traffic fails closed.
func accepts(b Binding, handles func(*Waypoint) bool) (Binding, bool) {
	if b.Waypoint != nil && !handles(b.Waypoint) {
		return Binding{}, false
	}
	return b, b.Name != ""
}

// ForPod applies the rules for a pod, most specific first: its label, the
// waypoint of its service account, its namespace's label, the namespace
// waypoint when it handles workload traffic.
func ForPod(s Scope, pod *corev1.Pod, serviceAccount string) (Binding, bool) {
	return ForWorkload(s, pod.Labels, serviceAccount)
}

// ForWorkload applies the pod rules to any workload (a WorkloadEntry) by
// its labels and service account.
func ForWorkload(s Scope, labels map[string]string, serviceAccount string) (Binding, bool) {
	if b, found := s.labelled(labels); found {
		return accepts(b, (*Waypoint).ForWorkloads)
	}
	if w := s.serviceAccountWaypoint(serviceAccount); w != nil {
		return Binding{Namespace: w.Namespace, Name: w.Name, Waypoint: w}, true
	}
	return s.namespaceRules((*Waypoint).ForWorkloads)
}

// namespaceRules: the namespace's label, then the namespace waypoint, each
// only when the waypoint handles this kind of traffic.
func (s Scope) namespaceRules(handles func(*Waypoint) bool) (Binding, bool) {
	if s.Namespace != nil {
		if b, found := s.labelled(s.Namespace.Labels); found {
			return accepts(b, handles)
		}
	}
	if w := s.namespaceWaypoint(); w != nil && handles(w) {
		return Binding{Namespace: w.Namespace, Name: w.Name, Waypoint: w}, true
	}
	return Binding{}, false
}

// labelled resolves istio.io/use-waypoint in lbls; found is false when the
// label is absent. "none", an empty name and a waypoint for no traffic give
// an empty Binding (found, but nothing bound).
func (s Scope) labelled(lbls map[string]string) (b Binding, found bool) {
	name, ok := lbls[UseWaypointLabel]
	if !ok {
		return Binding{}, false
	}
	if name == "" || name == "none" {
		return Binding{}, true
	}
	ns := s.Name
	if n := lbls[UseWaypointNamespaceLabel]; n != "" {
		ns = n
	}
	w := s.Lookup(ns, name)
	if w != nil && w.TrafficType == TrafficNone {
		return Binding{}, true
	}
	return Binding{Namespace: ns, Name: name, Waypoint: w}, true
}

// serviceAccountWaypoint: the first by name of the waypoints for sa.
func (s Scope) serviceAccountWaypoint(sa string) *Waypoint {
	var best *Waypoint
	for _, w := range s.Local {
		if w.ServiceAccount == sa && w.TrafficType != TrafficNone && (best == nil || w.Name < best.Name) {
			best = w
		}
	}
	return best
}

// namespaceWaypoint: the first by name of the namespace-wide waypoints.
func (s Scope) namespaceWaypoint() *Waypoint {
	var best *Waypoint
	for _, w := range s.Local {
		if w.ServiceAccount == "" && (best == nil || w.Name < best.Name) {
			best = w
		}
	}
	return best
}

// IngressUseWaypoint reports whether ingress gateways send to a Service
// through its waypoint, as Istio decides it: the Service's
// istio.io/ingress-use-waypoint label when present (even "false"), else its
// namespace's; the value is a Go boolean ("true", "1", "True", …), anything
// else is false. Without the label a gateway goes straight to the
// endpoints. nsLabels may be nil.
func IngressUseWaypoint(svcLabels, nsLabels map[string]string) bool {
	v, ok := svcLabels[IngressUseWaypointLabel]
	if !ok {
		if v, ok = nsLabels[IngressUseWaypointLabel]; !ok {
			return false
		}
	}
	b, err := strconv.ParseBool(v)
	return err == nil && b
}
