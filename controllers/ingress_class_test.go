package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// createClass creates a GatewayClass, deleted when the test ends.
func createClass(t *testing.T, name string, controller gwv1.GatewayController, mutate func(*gwv1.GatewayClass)) *gwv1.GatewayClass {
	t.Helper()
	gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: gwv1.GatewayClassSpec{ControllerName: controller, Description: ptr.To("old")}}
	if mutate != nil {
		mutate(gc)
	}
	if err := k8s.Create(context.Background(), gc); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), gc) })
	return gc
}

// waitClassCondition waits until the class's Accepted condition has status
// and reason for its current generation, and every condition is of that
// generation (what the conformance suite checks).
func waitClassCondition(t *testing.T, name string, status metav1.ConditionStatus, reason gwv1.GatewayClassConditionReason) *gwv1.GatewayClass {
	t.Helper()
	gc := &gwv1.GatewayClass{}
	eventually(t, fmt.Sprintf("GatewayClass %s Accepted=%s %s", name, status, reason), func() error {
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, gc); err != nil {
			return err
		}
		c := meta.FindStatusCondition(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted))
		if c == nil || c.Status != status || c.Reason != string(reason) {
			return fmt.Errorf("conditions %+v", gc.Status.Conditions)
		}
		for _, c := range gc.Status.Conditions {
			if c.ObservedGeneration != gc.Generation {
				return fmt.Errorf("condition %s observedGeneration %d, generation %d", c.Type, c.ObservedGeneration, gc.Generation)
			}
		}
		return nil
	})
	return gc
}

// TestIngressClassObservedGenerationBump is the conformance test
// GatewayClassObservedGenerationBump: a second class with our
// controllerName is accepted, and its conditions follow a spec change.
func TestIngressClassObservedGenerationBump(t *testing.T) {
	ctx := context.Background()
	createClass(t, "gatewayclass-observed-generation-bump", WaypointControllerName, nil)
	before := waitClassCondition(t, "gatewayclass-observed-generation-bump", metav1.ConditionTrue, gwv1.GatewayClassReasonAccepted)
	patch := client.MergeFrom(before.DeepCopy())
	bumped := before.DeepCopy()
	bumped.Spec.Description = ptr.To("new")
	if err := k8s.Patch(ctx, bumped, patch); err != nil {
		t.Fatal(err)
	}
	after := waitClassCondition(t, "gatewayclass-observed-generation-bump", metav1.ConditionTrue, gwv1.GatewayClassReasonAccepted)
	if after.Generation == before.Generation {
		t.Fatalf("generation %d did not change", after.Generation)
	}
}

// TestIngressClassGateway: a Gateway of a second class with our
// controllerName is an ingress gateway like one of class istio: its
// Deployment and Service, the ingress role, Programmed once the load
// balancer has an address, and its routes' parent status.
func TestIngressClassGateway(t *testing.T) {
	ctx := context.Background()
	const ns, appNS, class = "ingress-second", "ingress-second-apps", "second-ingress"
	createNamespace(t, ns)
	createNamespace(t, appNS)
	newMesh(t, "ingress-second", "mesh-ingress-second", nil)
	createClass(t, class, WaypointControllerName, nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(appNS))
	})
	gw := seedsIngressGateway(ns)
	gw.Spec.GatewayClassName = class
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	eventually(t, "gateway deployment", exists(dep))
	eventually(t, "gateway service", exists(svc))
	if env := envMap(dep.Spec.Template.Spec.Containers[0].Env); env["PROXY_ROLE"] != "ingress" || env["WAYPOINT_NAME"] != "gateway" {
		t.Errorf("env %v: want the ingress role of gateway", env)
	}
	if dep.Labels[LabelGatewayClassName] != class {
		t.Errorf("class label %q, want %q", dep.Labels[LabelGatewayClassName], class)
	}
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || len(svc.Spec.Ports) != 2 || svc.Spec.Ports[0].Port != 80 {
		t.Errorf("service %s %+v, want LoadBalancer on 80 and the status port", svc.Spec.Type, svc.Spec.Ports)
	}
	setDeploymentStatus(t, ns, "gateway-istio", 1)
	eventually(t, "load balancer status", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(svc), svc); err != nil {
			return err
		}
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "10.201.0.241"}}
		return k8s.Status().Update(ctx, svc)
	})
	gw = waitGatewayCondition(t, ns, "gateway", string(gwv1.GatewayConditionProgrammed), metav1.ConditionTrue)
	if len(gw.Status.Addresses) != 1 || gw.Status.Addresses[0].Value != "10.201.0.241" {
		t.Errorf("addresses %+v, want the load balancer's", gw.Status.Addresses)
	}
	if c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionAccepted)); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("Accepted %+v", c)
	}
	if err := k8s.Create(ctx, httpbinRoute(appNS, ns, nil)); err != nil {
		t.Fatal(err)
	}
	waitRouteParent(t, appNS, "httpbin", metav1.ConditionTrue, string(gwv1.RouteReasonAccepted))
}

// TestIngressClassOtherController: a class of another controller and its
// Gateways are left alone, while a Gateway of our second class beside it
// is deployed.
func TestIngressClassOtherController(t *testing.T) {
	ctx := context.Background()
	const ns = "ingress-foreign-class"
	createNamespace(t, ns)
	newMesh(t, "ingress-foreign-class", "mesh-ingress-foreign-class", nil)
	foreign := createClass(t, "someone-elses", "example.com/gateway-controller", nil)
	createClass(t, "ours-beside-foreign", WaypointControllerName, nil)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	theirs := seedsIngressGateway(ns)
	theirs.Name, theirs.Spec.GatewayClassName = "theirs", "someone-elses"
	ours := seedsIngressGateway(ns)
	ours.Name, ours.Spec.GatewayClassName = "ours", "ours-beside-foreign"
	for _, gw := range []*gwv1.Gateway{theirs, ours} {
		if err := k8s.Create(ctx, gw); err != nil {
			t.Fatal(err)
		}
	}
	waitClassCondition(t, "ours-beside-foreign", metav1.ConditionTrue, gwv1.GatewayClassReasonAccepted)
	eventually(t, "our gateway deployed", exists(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "ours-istio"}}))
	waitGatewayCondition(t, ns, "ours", string(gwv1.GatewayConditionAccepted), metav1.ConditionTrue)
	time.Sleep(time.Second) // both Gateways were created together; give theirs time to be (wrongly) handled

	gc := &gwv1.GatewayClass{}
	if err := k8s.Get(ctx, client.ObjectKey{Name: "someone-elses"}, gc); err != nil {
		t.Fatal(err)
	}
	if gc.ResourceVersion != foreign.ResourceVersion {
		t.Errorf("another controller's class was written: %+v", gc.Status)
	}
	gw := &gwv1.Gateway{}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(theirs), gw); err != nil {
		t.Fatal(err)
	}
	if gw.ResourceVersion != theirs.ResourceVersion {
		t.Errorf("another controller's Gateway was written: %+v", gw.Status)
	}
	dep := &appsv1.Deployment{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "theirs-istio"}, dep); err == nil {
		t.Errorf("another controller's Gateway was deployed")
	}
}

// TestIngressClassInvalidParameters: a class with our controllerName and a
// parametersRef we cannot serve is Accepted=False InvalidParameters, and
// its Gateways are not deployed; once the reference is removed it is
// accepted and they are.
func TestIngressClassInvalidParameters(t *testing.T) {
	ctx := context.Background()
	const ns, class = "ingress-bad-params", "ingress-bad-params"
	createNamespace(t, ns)
	newMesh(t, "ingress-bad-params", "mesh-ingress-bad-params", nil)
	createClass(t, class, WaypointControllerName, func(gc *gwv1.GatewayClass) {
		gc.Spec.ParametersRef = &gwv1.ParametersReference{Group: "", Kind: "ConfigMap", Name: "gateway-options", Namespace: ptr.To(gwv1.Namespace("default"))}
	})
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	gw := seedsIngressGateway(ns)
	gw.Spec.GatewayClassName = class
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	gc := waitClassCondition(t, class, metav1.ConditionFalse, gwv1.GatewayClassReasonInvalidParameters)
	if c := meta.FindStatusCondition(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted)); c.Message == "" {
		t.Errorf("no message saying why: %+v", c)
	}
	time.Sleep(time.Second)
	dep := &appsv1.Deployment{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "gateway-istio"}, dep); err == nil {
		t.Errorf("a Gateway of a class not accepted was deployed")
	}

	// Without the reference the class is served, and its Gateway deployed.
	patch := client.MergeFrom(gc.DeepCopy())
	gc.Spec.ParametersRef = nil
	if err := k8s.Patch(ctx, gc, patch); err != nil {
		t.Fatal(err)
	}
	waitClassCondition(t, class, metav1.ConditionTrue, gwv1.GatewayClassReasonAccepted)
	eventually(t, "gateway deployed once the class is accepted", exists(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}))
}
