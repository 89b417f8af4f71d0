package controllers

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// Waypoint binding, as the control plane computes it for Services
// (controllers/discovery serviceWaypoint), so that route status tells what
// the data path does. A copy (that package keeps its model private): change
// both together; TestServiceWaypointBinding pins the rules.
const (
	labelUseWaypoint          = "istio.io/use-waypoint"
	labelUseWaypointNamespace = "istio.io/use-waypoint-namespace"
)

// declaredWaypoint is a WaypointPolicy or a waypoint Gateway.
type declaredWaypoint struct {
	Name, Namespace   string
	ForServiceAccount string
	TrafficType       meshv1.TrafficType
	// Gateway is set when a Gateway (not a WaypointPolicy) declares it.
	Gateway bool
}

func (w *declaredWaypoint) forServices() bool {
	return w.TrafficType == meshv1.TrafficService || w.TrafficType == meshv1.TrafficAll
}

// serviceBinding is the waypoint a Service's traffic goes through.
type serviceBinding struct {
	Name, Namespace string
	// Waypoint is nil when the name is bound (by label) but nothing declares
	// it: traffic then fails closed.
	Waypoint *declaredWaypoint
}

// waypointsIn lists the waypoints declared in ns; a WaypointPolicy wins over
// a Gateway of the same name.
func waypointsIn(ctx context.Context, c client.Reader, ns string) (map[string]*declaredWaypoint, error) {
	out := map[string]*declaredWaypoint{}
	gws := &gwv1.GatewayList{}
	if err := c.List(ctx, gws, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	for i := range gws.Items {
		gw := &gws.Items[i]
		if gw.Spec.GatewayClassName != WaypointGatewayClass || !gw.DeletionTimestamp.IsZero() {
			continue
		}
		traffic := meshv1.TrafficType(gw.Labels[LabelWaypointFor])
		if traffic == "" {
			traffic = meshv1.TrafficService
		}
		out[gw.Name] = &declaredWaypoint{Name: gw.Name, Namespace: ns, ForServiceAccount: gw.Annotations[AnnotationForServiceAcct], TrafficType: traffic, Gateway: true}
	}
	wps := &meshv1.WaypointPolicyList{}
	if err := c.List(ctx, wps, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	for i := range wps.Items {
		wp := &wps.Items[i]
		if !wp.DeletionTimestamp.IsZero() {
			continue
		}
		w := &declaredWaypoint{Name: wp.Name, Namespace: ns, TrafficType: wp.Spec.TrafficType}
		if w.TrafficType == "" {
			w.TrafficType = meshv1.TrafficService
		}
		if wp.Spec.Scope == meshv1.ScopeServiceAccount {
			w.ForServiceAccount = wp.Spec.ServiceAccount
		}
		out[wp.Name] = w
	}
	return out, nil
}

// serviceWaypoint applies the control plane's rules for a Service: service
// label, then namespace label, then the namespace waypoint when it serves
// Services. nil when the Service has no waypoint.
func serviceWaypoint(ctx context.Context, c client.Reader, svc *corev1.Service) (*serviceBinding, error) {
	local, err := waypointsIn(ctx, c, svc.Namespace)
	if err != nil {
		return nil, err
	}
	if _, own := local[svc.Name]; own || svc.Labels[LabelGatewayName] != "" || svc.Labels[LabelWaypointName] != "" {
		return nil, nil // a waypoint's own Service
	}
	if b, found, err := labelledWaypoint(ctx, c, local, svc.Namespace, svc.Labels); found || err != nil {
		return b, err
	}
	ns := &corev1.Namespace{}
	if err := c.Get(ctx, client.ObjectKey{Name: svc.Namespace}, ns); client.IgnoreNotFound(err) != nil {
		return nil, err
	} else if err == nil {
		b, found, err := labelledWaypoint(ctx, c, local, svc.Namespace, ns.Labels)
		if found || err != nil {
			if b != nil && b.Waypoint != nil && !b.Waypoint.forServices() {
				return nil, err
			}
			return b, err
		}
	}
	if w := namespaceWaypointOf(local); w != nil && w.forServices() {
		return &serviceBinding{Name: w.Name, Namespace: w.Namespace, Waypoint: w}, nil
	}
	return nil, nil
}

// labelledWaypoint resolves istio.io/use-waypoint; found is false when the
// label is absent. "none", and a waypoint for no traffic, bind nothing.
func labelledWaypoint(ctx context.Context, c client.Reader, local map[string]*declaredWaypoint, objNS string, lbls map[string]string) (*serviceBinding, bool, error) {
	name, ok := lbls[labelUseWaypoint]
	if !ok {
		return nil, false, nil
	}
	if name == "" || name == "none" {
		return nil, true, nil
	}
	ns := objNS
	if n := lbls[labelUseWaypointNamespace]; n != "" {
		ns = n
	}
	wps := local
	if ns != objNS {
		var err error
		if wps, err = waypointsIn(ctx, c, ns); err != nil {
			return nil, true, err
		}
	}
	w := wps[name]
	if w != nil && w.TrafficType == meshv1.TrafficNone {
		return nil, true, nil
	}
	return &serviceBinding{Name: name, Namespace: ns, Waypoint: w}, true, nil
}

// namespaceWaypointOf: the namespace-wide waypoint (no service account),
// the first by name when there are several, as the control plane picks.
func namespaceWaypointOf(local map[string]*declaredWaypoint) *declaredWaypoint {
	var best *declaredWaypoint
	for _, w := range local {
		if w.ForServiceAccount == "" && (best == nil || w.Name < best.Name) {
			best = w
		}
	}
	return best
}
