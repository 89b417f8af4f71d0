package controllers

import (
	"context"
	"fmt"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

func waypointGateway(ns, name, class string, annotations map[string]string) *gwv1.Gateway {
	return &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: annotations},
		Spec: gwv1.GatewaySpec{
			GatewayClassName: gwv1.ObjectName(class),
			Listeners:        []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}},
		},
	}
}

func waitGatewayCondition(t *testing.T, ns, name, condType string, status metav1.ConditionStatus) *gwv1.Gateway {
	t.Helper()
	gw := &gwv1.Gateway{}
	eventually(t, fmt.Sprintf("gateway %s %s=%s", name, condType, status), func() error {
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, gw); err != nil {
			return err
		}
		c := meta.FindStatusCondition(gw.Status.Conditions, condType)
		if c == nil || c.Status != status {
			return fmt.Errorf("conditions %+v", gw.Status.Conditions)
		}
		return nil
	})
	return gw
}

// TestGatewayWaypoint: `istioctl waypoint apply`-style Gateways deploy the
// same waypoint a WaypointPolicy would; other Gateway classes are ignored.
func TestGatewayWaypoint(t *testing.T) {
	ctx := context.Background()
	const ns = "gw-waypoint"
	createNamespace(t, ns)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })

	gw := waypointGateway(ns, "reviews-waypoint", WaypointGatewayClass, map[string]string{AnnotationForServiceAcct: "reviews"})
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionAccepted), metav1.ConditionFalse) // no mesh yet

	newMesh(t, "gw", "mesh-gw", nil)
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews-waypoint"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews-waypoint"}}
	eventually(t, "waypoint deployment", exists(dep))
	eventually(t, "waypoint service", exists(svc))
	if ref := metav1.GetControllerOf(dep); ref == nil || ref.Kind != "Gateway" || ref.Name != "reviews-waypoint" {
		t.Errorf("deployment owner %+v", ref)
	}
	if env := envMap(dep.Spec.Template.Spec.Containers[0].Env); env["WAYPOINT_SERVICE_ACCOUNT"] != "reviews" || env["WAYPOINT_FOR"] != "service" {
		t.Errorf("env %v", env)
	}
	gw = waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionAccepted), metav1.ConditionTrue)
	waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionProgrammed), metav1.ConditionFalse)
	setDeploymentStatus(t, ns, "reviews-waypoint", 1)
	gw = waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionProgrammed), metav1.ConditionTrue)
	if len(gw.Status.Addresses) != 1 || gw.Status.Addresses[0].Value != svc.Spec.ClusterIP {
		t.Errorf("gateway addresses %+v, service IP %s", gw.Status.Addresses, svc.Spec.ClusterIP)
	}

	// A WaypointPolicy of the same name does not take the Gateway's objects.
	if err := k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "reviews-waypoint"}}); err != nil {
		t.Fatal(err)
	}
	waitWaypointCondition(t, ns, "reviews-waypoint", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonConflict)

	// Gateways of other classes are not waypoints.
	if err := k8s.Create(ctx, waypointGateway(ns, "ingress", "istio", nil)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "other waypoint reconciled meanwhile", exists(dep))
	if err := gone(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "ingress"}})(); err != nil {
		t.Errorf("deployed a waypoint for an ingress Gateway: %v", err)
	}
}
