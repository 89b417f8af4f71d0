package controllers

import (
	"context"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers/waypointbind"
)

// TestServiceWaypointBinding: route status reads the declared waypoints from
// the API server and binds Services by the control plane's own rules
// (controllers/waypointbind).
func TestServiceWaypointBinding(t *testing.T) {
	ctx := context.Background()
	gateway := func(name string, labels, annotations map[string]string) client.Object {
		gw := waypointGateway("", name, WaypointGatewayClass, annotations)
		gw.Labels = labels
		return gw
	}
	policy := func(name string, mutate func(*meshv1.WaypointPolicy)) client.Object {
		wp := &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if mutate != nil {
			mutate(wp)
		}
		return wp
	}
	forTraffic := func(tt meshv1.TrafficType) map[string]string { return map[string]string{LabelWaypointFor: string(tt)} }
	cases := []struct {
		name      string
		nsLabels  map[string]string
		svcLabels map[string]string
		objects   []client.Object
		want      string // "ns/name", "missing ns/name" or "" for none
	}{
		{"namespace waypoint Gateway", nil, nil, []client.Object{gateway("wp", nil, nil)}, "NS/wp"},
		{"namespace waypoint for workloads only", nil, nil, []client.Object{gateway("wp", forTraffic(meshv1.TrafficWorkload), nil)}, ""},
		{"namespace WaypointPolicy", nil, nil, []client.Object{policy("wp", nil)}, "NS/wp"},
		{"service-account waypoints do not take Services", nil, nil,
			[]client.Object{policy("wp", func(wp *meshv1.WaypointPolicy) {
				wp.Spec.Scope, wp.Spec.ServiceAccount = meshv1.ScopeServiceAccount, "reviews"
			})}, ""},
		{"Service label names a waypoint for services", nil, map[string]string{waypointbind.UseWaypointLabel: "sv"},
			[]client.Object{gateway("sv", forTraffic(meshv1.TrafficService), nil), gateway("a", nil, nil)}, "NS/sv"},
		// As Istio (fetchWaypointForService): a waypoint that takes no
		// service traffic binds no Service, labelled or not.
		{"Service label naming a workload-only waypoint binds nothing", nil, map[string]string{waypointbind.UseWaypointLabel: "wl"},
			[]client.Object{gateway("wl", forTraffic(meshv1.TrafficWorkload), nil), gateway("a", nil, nil)}, ""},
		{"Service label none opts out", nil, map[string]string{waypointbind.UseWaypointLabel: "none"}, []client.Object{gateway("wp", nil, nil)}, ""},
		{"namespace label wins over the namespace waypoint", map[string]string{waypointbind.UseWaypointLabel: "b"}, nil,
			[]client.Object{gateway("a", nil, nil), gateway("b", nil, nil)}, "NS/b"},
		{"namespace label naming nothing fails closed", map[string]string{waypointbind.UseWaypointLabel: "ghost"}, nil, nil, "missing NS/ghost"},
		{"namespace label for a workload waypoint", map[string]string{waypointbind.UseWaypointLabel: "wl"}, nil,
			[]client.Object{gateway("wl", forTraffic(meshv1.TrafficWorkload), nil)}, ""},
		{"WaypointPolicy wins over a Gateway of its name", nil, nil,
			[]client.Object{gateway("wp", nil, nil), policy("wp", func(wp *meshv1.WaypointPolicy) { wp.Spec.TrafficType = meshv1.TrafficNone })}, ""},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ns := fmt.Sprintf("sw-%d", i)
			createLabelledNamespace(t, ns, tc.nsLabels)
			t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
			for _, o := range tc.objects {
				o.SetNamespace(ns)
				if err := k8s.Create(ctx, o); err != nil {
					t.Fatal(err)
				}
			}
			createService(t, ns, "echo", tc.svcLabels)
			svc := &corev1.Service{}
			if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "echo"}, svc); err != nil {
				t.Fatal(err)
			}
			b, err := serviceWaypoint(ctx, k8s, svc)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			if b != nil {
				got = b.Namespace + "/" + b.Name
				if b.Waypoint == nil {
					got = "missing " + got
				}
			}
			if want := strings.Replace(tc.want, "NS", ns, 1); got != want {
				t.Errorf("bound to %q, want %q", got, want)
			}
			// A waypoint's own Service never has a waypoint.
			if len(tc.objects) > 0 {
				own := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: tc.objects[0].GetName()}}
				if b, err := serviceWaypoint(ctx, k8s, own); err != nil || b != nil {
					t.Errorf("waypoint's own Service bound to %+v (%v)", b, err)
				}
			}
		})
	}
}
