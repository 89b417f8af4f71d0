package controllers

import (
	"context"
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

func waitWaypointCondition(t *testing.T, ns, name, condType string, status metav1.ConditionStatus, reason string) *meshv1.WaypointPolicy {
	t.Helper()
	wp := &meshv1.WaypointPolicy{}
	eventually(t, fmt.Sprintf("waypoint %s %s=%s/%s", name, condType, status, reason), func() error {
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, wp); err != nil {
			return err
		}
		c := meta.FindStatusCondition(wp.Status.Conditions, condType)
		if c == nil {
			return fmt.Errorf("no condition: %+v", wp.Status)
		}
		if c.Status != status || c.Reason != reason || wp.Status.ObservedGeneration != wp.Generation {
			return fmt.Errorf("have %s/%s (%s)", c.Status, c.Reason, c.Message)
		}
		return nil
	})
	return wp
}

// createNamespace creates a namespace whose WaypointPolicies are deleted
// when the test ends (so their retries do not count in later tests).
func createNamespace(t *testing.T, name string) {
	t.Helper()
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(context.Background(), &meshv1.WaypointPolicy{}, client.InNamespace(name))
	})
}

func waypointReconcileCount(t *testing.T) float64 {
	t.Helper()
	families, err := metricsRegistryGather()
	if err != nil {
		t.Fatal(err)
	}
	return sumCounter(families, "controller_runtime_reconcile_total", "waypointpolicy")
}

func TestWaypointPolicyLifecycle(t *testing.T) {
	ctx := context.Background()
	const ns = "wp-life"
	createNamespace(t, ns)
	wp := &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	if err := k8s.Create(ctx, wp); err != nil {
		t.Fatal(err)
	}

	// No mesh yet: a specific reason and retries that back off, not a hot loop.
	waitWaypointCondition(t, ns, "waypoint", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonMeshNotFound)
	start := waypointReconcileCount(t)
	time.Sleep(3 * time.Second)
	if n := waypointReconcileCount(t) - start; n > 8 {
		t.Fatalf("%v reconciles in 3s without a mesh: hot loop", n)
	}
	if err := gone(&appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}})(); err != nil {
		t.Fatalf("waypoint deployed without a mesh: %v", err)
	}

	// The mesh appears: the waypoint is deployed without any change to the policy.
	newMesh(t, "wp-life", "mesh-wp-life", func(m *meshv1.AmbientMesh) { m.Spec.TrustDomain = "wp.example" })
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "waypoint"}}
	for _, obj := range []client.Object{sa, dep, svc} {
		eventually(t, fmt.Sprintf("%T", obj), exists(obj))
		ref := metav1.GetControllerOf(obj)
		if ref == nil || ref.Kind != "WaypointPolicy" || ref.Name != "waypoint" || !ptr.Deref(ref.BlockOwnerDeletion, false) {
			t.Errorf("%T: owner %+v; garbage collection would not remove it with the policy", obj, ref)
		}
		if l := obj.GetLabels(); l[LabelGatewayManaged] != GatewayManagedValue || l[LabelIstioGatewayName] != "waypoint" || l[LabelWaypointFor] != "service" {
			t.Errorf("%T labels %v", obj, l)
		}
	}
	if p := svc.Spec.Ports[0]; p.Port != 15008 || p.Protocol != corev1.ProtocolTCP {
		t.Errorf("service port %+v", p)
	}
	pod := dep.Spec.Template
	if pod.Labels[LabelDataplaneMode] != "none" || pod.Spec.Containers[0].Image != testDefaults.WaypointImage || pod.Spec.ServiceAccountName != "waypoint" {
		t.Errorf("pod template: labels %v image %s sa %s", pod.Labels, pod.Spec.Containers[0].Image, pod.Spec.ServiceAccountName)
	}
	if env := envMap(pod.Spec.Containers[0].Env); env["TRUST_DOMAIN"] != "wp.example" || env["ROOT_NAMESPACE"] != "mesh-wp-life" {
		t.Errorf("env %v", env)
	}
	if dep.Labels[LabelWaypointFor] != "service" {
		t.Errorf("labels %v", dep.Labels)
	}
	wp = waitWaypointCondition(t, ns, "waypoint", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonDeploymentNotReady)
	if err := exists(svc)(); err != nil || wp.Status.Address != svc.Spec.ClusterIP || wp.Status.Address == "" {
		t.Errorf("status address %q, service cluster IP %q", wp.Status.Address, svc.Spec.ClusterIP)
	}

	// Status transitions follow the Deployment (played here: no controller in envtest).
	setDeploymentStatus(t, ns, "waypoint", 1)
	wp = waitWaypointCondition(t, ns, "waypoint", meshv1.ConditionReady, metav1.ConditionTrue, meshv1.ReasonDeploymentReady)
	if wp.Status.ReadyReplicas != 1 {
		t.Errorf("readyReplicas %d", wp.Status.ReadyReplicas)
	}

	t.Run("update", func(t *testing.T) {
		if err := updateWaypoint(t, ns, "waypoint", func(wp *meshv1.WaypointPolicy) {
			wp.Spec.Replicas = ptr.To[int32](2)
			wp.Spec.Transport = meshv1.TransportHTTP3
		}); err != nil {
			t.Fatal(err)
		}
		eventually(t, "deployment scaled and service has UDP", func() error {
			if err := exists(dep)(); err != nil {
				return err
			}
			if err := exists(svc)(); err != nil {
				return err
			}
			if *dep.Spec.Replicas != 2 || len(svc.Spec.Ports) != 3 || svc.Spec.Ports[2].Protocol != corev1.ProtocolUDP {
				return fmt.Errorf("replicas %d ports %+v", *dep.Spec.Replicas, svc.Spec.Ports)
			}
			return nil
		})
		waitWaypointCondition(t, ns, "waypoint", meshv1.ConditionWaypointReady, metav1.ConditionFalse, meshv1.ReasonDeploymentNotReady)
	})

	t.Run("drift is reverted", func(t *testing.T) {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			t.Fatal(err)
		}
		dep.Spec.Template.Spec.Containers[0].Image = "evil/waypoint"
		if err := k8s.Update(ctx, dep); err != nil {
			t.Fatal(err)
		}
		eventually(t, "image reverted", func() error {
			if err := exists(dep)(); err != nil {
				return err
			}
			if img := dep.Spec.Template.Spec.Containers[0].Image; img != testDefaults.WaypointImage {
				return fmt.Errorf("image %s", img)
			}
			return nil
		})
		uid := svc.UID
		if err := k8s.Delete(ctx, svc); err != nil {
			t.Fatal(err)
		}
		eventually(t, "service recreated", func() error {
			if err := exists(svc)(); err != nil {
				return err
			}
			if svc.UID == uid {
				return fmt.Errorf("old service")
			}
			return nil
		})
	})
}

func updateWaypoint(t *testing.T, ns, name string, mutate func(*meshv1.WaypointPolicy)) error {
	t.Helper()
	wp := &meshv1.WaypointPolicy{}
	for i := 0; i < 5; i++ {
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, wp); err != nil {
			return err
		}
		mutate(wp)
		if err := k8s.Update(context.Background(), wp); err == nil {
			return nil
		}
	}
	return fmt.Errorf("update of %s/%s kept conflicting", ns, name)
}

func setDeploymentStatus(t *testing.T, ns, name string, ready int32) {
	t.Helper()
	eventually(t, "deployment status", func() error {
		dep := &appsv1.Deployment{}
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, dep); err != nil {
			return err
		}
		dep.Status = appsv1.DeploymentStatus{ObservedGeneration: dep.Generation, Replicas: ready, UpdatedReplicas: ready, ReadyReplicas: ready, AvailableReplicas: ready}
		return k8s.Status().Update(context.Background(), dep)
	})
}

func TestWaypointPolicyDoesNotTakeOverForeignObjects(t *testing.T) {
	ctx := context.Background()
	const ns = "wp-taken"
	createNamespace(t, ns)
	newMesh(t, "wp-taken", "mesh-wp-taken", nil)
	user := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "taken"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}},
	}
	if err := k8s.Create(ctx, user); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "taken"}}); err != nil {
		t.Fatal(err)
	}
	waitWaypointCondition(t, ns, "taken", meshv1.ConditionReady, metav1.ConditionFalse, meshv1.ReasonConflict)
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(user), user); err != nil {
		t.Fatal(err)
	}
	if len(user.Spec.Ports) != 1 || user.Spec.Ports[0].Port != 80 || len(user.OwnerReferences) != 0 {
		t.Fatalf("user's Service was modified: %+v", user)
	}
}

func TestServiceAccountWaypointAndGatewayProduceTheSameObjects(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "m"}, Spec: meshv1.AmbientMeshSpec{
		TrustDomain: "td", Namespace: "ambient-system",
		Ztunnel: meshv1.ZtunnelSpec{Transport: meshv1.TransportHTTP2, LogLevel: "info"},
	}}
	wp := &meshv1.WaypointPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "reviews-wp", UID: "u1"},
		Spec:       meshv1.WaypointPolicySpec{Scope: meshv1.ScopeServiceAccount, ServiceAccount: "reviews", TrafficType: meshv1.TrafficWorkload, Replicas: ptr.To[int32](1)},
	}
	gw := &gwv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: "reviews-wp", UID: "u2",
			Labels:      map[string]string{LabelWaypointFor: "workload"},
			Annotations: map[string]string{AnnotationForServiceAcct: "reviews"}},
		Spec: gwv1.GatewaySpec{GatewayClassName: WaypointGatewayClass},
	}
	fromPolicy := WaypointFromPolicy(wp, mesh, testDefaults)
	fromGateway, err := WaypointFromGateway(gw, mesh, testDefaults)
	if err != nil {
		t.Fatal(err)
	}
	if fromGateway.Owner.Kind != "Gateway" || fromPolicy.Owner.Kind != "WaypointPolicy" {
		t.Fatalf("owners %v %v", fromGateway.Owner, fromPolicy.Owner)
	}
	fromGateway.Owner = fromPolicy.Owner
	sa1, dep1, svc1 := DesiredWaypoint(fromPolicy, mesh)
	sa2, dep2, svc2 := DesiredWaypoint(fromGateway, mesh)
	if !equality.Semantic.DeepEqual(sa1, sa2) || !equality.Semantic.DeepEqual(dep1, dep2) || !equality.Semantic.DeepEqual(svc1, svc2) {
		t.Fatalf("policy and gateway produce different waypoints:\n%+v\n%+v", dep1, dep2)
	}
	if sa1.Annotations[AnnotationForServiceAcct] != "reviews" || dep1.Annotations[AnnotationForServiceAcct] != "reviews" {
		t.Errorf("service-account binding missing")
	}

	for _, bad := range []*gwv1.Gateway{
		{ObjectMeta: metav1.ObjectMeta{Name: "x"}, Spec: gwv1.GatewaySpec{GatewayClassName: "istio"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "y", Labels: map[string]string{LabelWaypointFor: "everything"}}, Spec: gwv1.GatewaySpec{GatewayClassName: WaypointGatewayClass}},
	} {
		if _, err := WaypointFromGateway(bad, mesh, testDefaults); err == nil {
			t.Errorf("gateway %s accepted", bad.Name)
		}
	}
}
