package controllers

import (
	"context"
	"fmt"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
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
	// The binding is declared on the objects (as Istio labels them); the
	// waypoint itself learns what it serves from discovery.
	if dep.Annotations[AnnotationForServiceAcct] != "reviews" || dep.Labels[LabelWaypointFor] != "service" {
		t.Errorf("labels %v annotations %v", dep.Labels, dep.Annotations)
	}
	if env := envMap(dep.Spec.Template.Spec.Containers[0].Env); env["ROOT_NAMESPACE"] != "mesh-gw" {
		t.Errorf("env %v: ROOT_NAMESPACE is not the mesh namespace", env)
	}
	gw = waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionAccepted), metav1.ConditionTrue)
	gw = waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionProgrammed), metav1.ConditionFalse)
	checkMeshListener(t, gw, metav1.ConditionFalse)
	setDeploymentStatus(t, ns, "reviews-waypoint", 1)
	gw = waitGatewayCondition(t, ns, "reviews-waypoint", string(gwv1.GatewayConditionProgrammed), metav1.ConditionTrue)
	checkMeshListener(t, gw, metav1.ConditionTrue)
	if c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionProgrammed)); c.ObservedGeneration != gw.Generation {
		t.Errorf("Programmed for generation %d, gateway at %d", c.ObservedGeneration, gw.Generation)
	}
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

// checkMeshListener: the HBONE listener is reported, accepted, with no
// attached routes (GAMMA routes attach to Services), and programmed as the
// waypoint is.
func checkMeshListener(t *testing.T, gw *gwv1.Gateway, programmed metav1.ConditionStatus) {
	t.Helper()
	if len(gw.Status.Listeners) != 1 {
		t.Fatalf("listeners %+v", gw.Status.Listeners)
	}
	l := gw.Status.Listeners[0]
	if l.Name != "mesh" || l.AttachedRoutes != 0 || len(l.SupportedKinds) != 0 {
		t.Errorf("listener %+v", l)
	}
	for typ, want := range map[gwv1.ListenerConditionType]metav1.ConditionStatus{
		gwv1.ListenerConditionAccepted: metav1.ConditionTrue, gwv1.ListenerConditionProgrammed: programmed,
		gwv1.ListenerConditionResolvedRefs: metav1.ConditionTrue, gwv1.ListenerConditionConflicted: metav1.ConditionFalse,
	} {
		if c := meta.FindStatusCondition(l.Conditions, string(typ)); c == nil || c.Status != want || c.ObservedGeneration != gw.Generation {
			t.Errorf("listener %s: want %s, have %+v", typ, want, c)
		}
	}
}

func TestSetListenerStatus(t *testing.T) {
	cases := []struct {
		name       string
		listener   gwv1.Listener
		programmed bool
		want       map[gwv1.ListenerConditionType]string // status/reason
	}{
		{"HBONE ready", gwv1.Listener{Name: "mesh", Port: 15008, Protocol: "HBONE"}, true, map[gwv1.ListenerConditionType]string{
			gwv1.ListenerConditionAccepted: "True/Accepted", gwv1.ListenerConditionProgrammed: "True/Programmed"}},
		{"HBONE not ready", gwv1.Listener{Name: "mesh", Port: 15008, Protocol: "HBONE"}, false, map[gwv1.ListenerConditionType]string{
			gwv1.ListenerConditionAccepted: "True/Accepted", gwv1.ListenerConditionProgrammed: "False/Pending"}},
		{"HTTP listener", gwv1.Listener{Name: "http", Port: 80, Protocol: "HTTP"}, true, map[gwv1.ListenerConditionType]string{
			gwv1.ListenerConditionAccepted: "False/UnsupportedProtocol", gwv1.ListenerConditionProgrammed: "False/Invalid"}},
		{"HBONE on another port", gwv1.Listener{Name: "mesh", Port: 15009, Protocol: "HBONE"}, true, map[gwv1.ListenerConditionType]string{
			gwv1.ListenerConditionAccepted: "False/UnsupportedProtocol"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Generation: 3}, Spec: gwv1.GatewaySpec{Listeners: []gwv1.Listener{tc.listener}}}
			st := &gwv1.GatewayStatus{}
			setGatewayCondition(st, 3, gwv1.GatewayConditionProgrammed, tc.programmed, "r", "m")
			setListenerStatus(st, gw)
			if len(st.Listeners) != 1 || st.Listeners[0].Name != tc.listener.Name {
				t.Fatalf("listeners %+v", st.Listeners)
			}
			for typ, want := range tc.want {
				c := meta.FindStatusCondition(st.Listeners[0].Conditions, string(typ))
				if c == nil || string(c.Status)+"/"+c.Reason != want || c.ObservedGeneration != 3 {
					t.Errorf("%s: want %s, have %+v", typ, want, c)
				}
			}
			// Recomputing keeps transition times: nothing to write.
			again := st.DeepCopy()
			setListenerStatus(again, gw)
			if !equality.Semantic.DeepEqual(st, again) {
				t.Errorf("listener status not stable:\n%+v\n%+v", st, again)
			}
		})
	}
}

// TestWaypointGatewayForeignClass: with istio-waypoint owned by another
// controller (Istio installed), its Gateways and the routes bound through
// them are left to that controller; our class comes back when theirs goes.
func TestWaypointGatewayForeignClass(t *testing.T) {
	ctx := context.Background()
	const ns = "gw-foreign"
	createLabelledNamespace(t, ns, nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
	})
	if err := k8s.Create(ctx, waypointGateway(ns, "waypoint", WaypointGatewayClass, nil)); err != nil {
		t.Fatal(err)
	}
	createService(t, ns, "echo", nil)
	route := httpRoute(ns, "echo", []gwv1.ParentReference{serviceParent("", "echo")}, backend("", "echo"))
	if err := k8s.Create(ctx, route); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, route, map[string][]wantCond{"echo": {acceptedOK, waypointOK}})

	restore := replaceWaypointClass(t, istioMeshController)
	// The Service's waypoint is now Istio's: our entry goes (and the
	// operator's cache has seen the foreign class).
	waitRouteParents(t, route, map[string][]wantCond{})

	fresh := waypointGateway(ns, "fresh", WaypointGatewayClass, nil)
	if err := k8s.Create(ctx, fresh); err != nil {
		t.Fatal(err)
	}
	initial := fresh.Status.DeepCopy() // the CRD's defaults: "Waiting for controller"
	r := &GatewayWaypointReconciler{Client: k8s, Defaults: testDefaults, RetryInterval: testRetryInterval}
	if _, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: types.NamespacedName{Namespace: ns, Name: "fresh"}}); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(fresh), fresh); err != nil {
		t.Fatal(err)
	}
	if !equality.Semantic.DeepEqual(initial, &fresh.Status) {
		t.Errorf("wrote status on another controller's Gateway: %+v", fresh.Status)
	}

	// The class is ours again: its Gateways and routes are picked up.
	restore()
	waitGatewayCondition(t, ns, "fresh", string(gwv1.GatewayConditionAccepted), metav1.ConditionFalse) // no mesh in this test
	waitRouteParents(t, route, map[string][]wantCond{"echo": {acceptedOK, waypointOK}})
}
