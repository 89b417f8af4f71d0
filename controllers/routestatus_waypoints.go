package controllers

import (
	"context"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// waypointsIn lists the waypoints declared in ns; a WaypointPolicy wins over
// a Gateway of the same name.
func waypointsIn(ctx context.Context, c client.Reader, ns string) (map[string]*waypointbind.Waypoint, error) {
	ix := waypointbind.Index{}
	gws := &gwv1.GatewayList{}
	if err := c.List(ctx, gws, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	for i := range gws.Items {
		if w, ok := waypointbind.FromGatewayObject(&gws.Items[i]); ok {
			ix.Add(w)
		}
	}
	wps := &meshv1.WaypointPolicyList{}
	if err := c.List(ctx, wps, client.InNamespace(ns)); err != nil {
		return nil, err
	}
	for i := range wps.Items {
		if w, ok := waypointbind.FromPolicy(&wps.Items[i]); ok {
			ix.Add(w)
		}
	}
	if ix[ns] == nil {
		return map[string]*waypointbind.Waypoint{}, nil
	}
	return ix[ns], nil
}

// serviceWaypoint is the waypoint a Service's traffic goes through, by the
// control plane's own rules (controllers/waypointbind), so that route status
// tells what the data path does; nil when it has none.
func serviceWaypoint(ctx context.Context, c client.Reader, svc *corev1.Service) (*waypointbind.Binding, error) {
	local, err := waypointsIn(ctx, c, svc.Namespace)
	if err != nil {
		return nil, err
	}
	var nsObj *corev1.Namespace
	ns := &corev1.Namespace{}
	if err := c.Get(ctx, client.ObjectKey{Name: svc.Namespace}, ns); client.IgnoreNotFound(err) != nil {
		return nil, err
	} else if err == nil {
		nsObj = ns
	}
	var lookupErr error
	lookup := func(namespace, name string) *waypointbind.Waypoint {
		if namespace == svc.Namespace {
			return local[name]
		}
		other, err := waypointsIn(ctx, c, namespace)
		if err != nil {
			lookupErr = err
			return nil
		}
		return other[name]
	}
	b, ok := waypointbind.ForService(waypointbind.Scope{Namespace: nsObj, Name: svc.Namespace, Local: local, Lookup: lookup}, svc)
	if lookupErr != nil {
		return nil, lookupErr
	}
	if !ok {
		return nil, nil
	}
	return &b, nil
}
