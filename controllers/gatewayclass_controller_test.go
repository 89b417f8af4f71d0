package controllers

import (
	"context"
	"fmt"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

const istioMeshController gwv1.GatewayController = "istio.io/mesh-controller"

func waitClassAccepted(t *testing.T, name string) *gwv1.GatewayClass {
	t.Helper()
	gc := &gwv1.GatewayClass{}
	eventually(t, "GatewayClass "+name+" accepted", func() error {
		if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, gc); err != nil {
			return err
		}
		c := meta.FindStatusCondition(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted))
		if gc.Spec.ControllerName != WaypointControllerName || c == nil || c.Status != metav1.ConditionTrue || c.ObservedGeneration != gc.Generation {
			return fmt.Errorf("class %s, conditions %+v", gc.Spec.ControllerName, gc.Status.Conditions)
		}
		return nil
	})
	return gc
}

// TestWaypointGatewayClass: the running operator creates istio-waypoint and
// accepts it, and re-creates it when deleted.
func TestWaypointGatewayClass(t *testing.T) {
	ctx := context.Background()
	gc := waitClassAccepted(t, WaypointGatewayClass)
	if err := k8s.Delete(ctx, gc); err != nil {
		t.Fatal(err)
	}
	waitClassAccepted(t, WaypointGatewayClass)
}

// TestGatewayClassReconcile drives the reconciler directly (under a class
// name of its own, so the running operator does not race it): a missing
// class is created and accepted; another controller's is left untouched.
func TestGatewayClassReconcile(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		name     string
		existing gwv1.GatewayController // "" = no class yet
		want     gwv1.GatewayController
		accepted bool
	}{
		{"missing-class", "", WaypointControllerName, true},
		{"ours-already", WaypointControllerName, WaypointControllerName, true},
		{"istio-installed", istioMeshController, istioMeshController, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			className := "test-" + tc.name
			t.Cleanup(func() { _ = k8s.Delete(ctx, &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: className}}) })
			var before string
			if tc.existing != "" {
				gc := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: className}, Spec: gwv1.GatewayClassSpec{ControllerName: tc.existing}}
				if err := k8s.Create(ctx, gc); err != nil {
					t.Fatal(err)
				}
				before = gc.ResourceVersion
			}
			r := &GatewayClassReconciler{Client: k8s, Builtin: []string{className}}
			req := ctrl.Request{NamespacedName: types.NamespacedName{Name: className}}
			for range 2 { // create, then accept (the manager's create event)
				if _, err := r.Reconcile(ctx, req); err != nil {
					t.Fatal(err)
				}
			}
			gc := &gwv1.GatewayClass{}
			if err := k8s.Get(ctx, client.ObjectKey{Name: className}, gc); err != nil {
				t.Fatal(err)
			}
			if gc.Spec.ControllerName != tc.want {
				t.Errorf("controllerName %s, want %s", gc.Spec.ControllerName, tc.want)
			}
			if got := meta.IsStatusConditionTrue(gc.Status.Conditions, string(gwv1.GatewayClassConditionStatusAccepted)); got != tc.accepted {
				t.Errorf("accepted %v, want %v: %+v", got, tc.accepted, gc.Status.Conditions)
			}
			if tc.existing == istioMeshController && gc.ResourceVersion != before {
				t.Errorf("foreign class written: resourceVersion %s → %s", before, gc.ResourceVersion)
			}
			// Idempotent: one more reconcile writes nothing.
			rv := gc.ResourceVersion
			if _, err := r.Reconcile(ctx, req); err != nil {
				t.Fatal(err)
			}
			if err := k8s.Get(ctx, client.ObjectKey{Name: className}, gc); err != nil {
				t.Fatal(err)
			}
			if gc.ResourceVersion != rv {
				t.Errorf("steady-state reconcile wrote the class")
			}
		})
	}
}

// replaceWaypointClass swaps istio-waypoint for another controller's (as
// installing Istio would) and returns a function that deletes it, after
// which the operator re-creates its own; that also runs when the test ends.
// The running operator re-creates its class on deletion, so the swap is
// retried.
func replaceWaypointClass(t *testing.T, owner gwv1.GatewayController) (restore func()) {
	t.Helper()
	ctx := context.Background()
	eventually(t, "foreign GatewayClass in place", func() error {
		gc := &gwv1.GatewayClass{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: WaypointGatewayClass}, gc); err == nil {
			if gc.Spec.ControllerName == owner {
				return nil
			}
			if err := k8s.Delete(ctx, gc); client.IgnoreNotFound(err) != nil {
				return err
			}
		}
		foreign := &gwv1.GatewayClass{ObjectMeta: metav1.ObjectMeta{Name: WaypointGatewayClass}, Spec: gwv1.GatewayClassSpec{ControllerName: owner}}
		if err := k8s.Create(ctx, foreign); err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
		return fmt.Errorf("retrying")
	})
	restore = func() {
		gc := &gwv1.GatewayClass{}
		if err := k8s.Get(ctx, client.ObjectKey{Name: WaypointGatewayClass}, gc); err == nil && gc.Spec.ControllerName == owner {
			_ = k8s.Delete(ctx, gc)
		}
		waitClassAccepted(t, WaypointGatewayClass)
	}
	t.Cleanup(restore)
	return restore
}
