package controllers

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// Invalid specs are refused by the API server (CRD schema and CEL rules)
// or the validating webhook, with a message naming the field and the fix.
func TestInvalidAmbientMeshRejected(t *testing.T) {
	ctx := context.Background()
	dur := func(d time.Duration) metav1.Duration { return metav1.Duration{Duration: d} }
	tests := []struct {
		name   string
		mutate func(*meshv1.AmbientMesh)
		want   string
	}{
		{"bad trust domain", func(m *meshv1.AmbientMesh) { m.Spec.TrustDomain = "Not_A_Domain" }, "spec.trustDomain"},
		{"workload TTL too short", func(m *meshv1.AmbientMesh) { m.Spec.CA.WorkloadCertTTL = dur(5 * time.Minute) }, "spec.ca.workloadCertTTL must be between 10m and 2160h"},
		{"root TTL too short", func(m *meshv1.AmbientMesh) { m.Spec.CA.RootCertTTL = dur(time.Hour) }, "spec.ca.rootCertTTL must be at least 24h"},
		{"workload outlives root", func(m *meshv1.AmbientMesh) {
			m.Spec.CA.RootCertTTL = dur(48 * time.Hour)
			m.Spec.CA.WorkloadCertTTL = dur(72 * time.Hour)
		}, "spec.ca.workloadCertTTL must be shorter than spec.ca.rootCertTTL"},
		{"secret CA without secretRef", func(m *meshv1.AmbientMesh) { m.Spec.CA.Type = meshv1.CAFromSecret }, "spec.ca.secretRef is required"},
		{"unknown transport", func(m *meshv1.AmbientMesh) { m.Spec.Ztunnel.Transport = "HTTP1" }, "spec.ztunnel.transport"},
		{"unknown redirection", func(m *meshv1.AmbientMesh) { m.Spec.Capture.Redirection = "ebpf" }, "spec.capture.redirection"},
		// A request above its limit would only fail later, when the
		// DaemonSet or Deployment is applied, far from the field at fault.
		{"ztunnel request above limit", func(m *meshv1.AmbientMesh) {
			m.Spec.Ztunnel.Resources = &corev1.ResourceRequirements{Requests: quantities("memory", "2Gi"), Limits: quantities("memory", "1Gi")}
		}, "spec.ztunnel.resources.requests[memory]: Invalid value: \"2Gi\": must not exceed the memory limit 1Gi"},
		{"node agent request above limit", func(m *meshv1.AmbientMesh) {
			m.Spec.NodeAgent.Resources = &corev1.ResourceRequirements{Requests: quantities("cpu", "2"), Limits: quantities("cpu", "500m")}
		}, "spec.nodeAgent.resources.requests[cpu]"},
		{"waypoint request above limit", func(m *meshv1.AmbientMesh) {
			m.Spec.Waypoint.Resources = &corev1.ResourceRequirements{Requests: quantities("cpu", "3"), Limits: quantities("cpu", "2")}
		}, "spec.waypoint.resources.requests[cpu]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "invalid"}}
			tc.mutate(m)
			err := k8s.Create(ctx, m)
			if err == nil {
				deleteMesh(t, "invalid")
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestMeshWebhookRules(t *testing.T) {
	ctx := context.Background()
	newMesh(t, "first", "mesh-first", func(m *meshv1.AmbientMesh) { m.Spec.TrustDomain = "first.example" })

	err := k8s.Create(ctx, &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "second"}})
	if err == nil {
		deleteMesh(t, "second")
		t.Fatal("second AmbientMesh accepted")
	}
	if !strings.Contains(err.Error(), "one mesh per cluster") || !strings.Contains(err.Error(), `"first"`) {
		t.Fatalf("second mesh error: %v", err)
	}

	for field, mutate := range map[string]func(*meshv1.AmbientMesh){
		"spec.trustDomain": func(m *meshv1.AmbientMesh) { m.Spec.TrustDomain = "changed.example" },
		"spec.namespace":   func(m *meshv1.AmbientMesh) { m.Spec.Namespace = "elsewhere" },
	} {
		err := updateMesh(t, "first", mutate)
		if err == nil || !strings.Contains(err.Error(), field) || !strings.Contains(err.Error(), "create") {
			t.Errorf("changing %s: %v", field, err)
		}
	}
	// Other fields stay editable.
	if err := updateMesh(t, "first", func(m *meshv1.AmbientMesh) { m.Spec.Ztunnel.LogLevel = "debug" }); err != nil {
		t.Fatalf("log level change refused: %v", err)
	}
}

func TestInvalidWaypointPolicyRejected(t *testing.T) {
	ctx := context.Background()
	createNamespace(t, "wp-invalid")
	create := func(name string, spec meshv1.WaypointPolicySpec) error {
		return k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "wp-invalid", Name: name}, Spec: spec})
	}
	tests := []struct {
		name string
		spec meshv1.WaypointPolicySpec
		want string
	}{
		{"sa scope without sa", meshv1.WaypointPolicySpec{Scope: meshv1.ScopeServiceAccount}, "spec.serviceAccount is required when spec.scope is ServiceAccount"},
		{"namespace scope with sa", meshv1.WaypointPolicySpec{Scope: meshv1.ScopeNamespace, ServiceAccount: "x"}, "spec.serviceAccount must be empty"},
		{"too many replicas", meshv1.WaypointPolicySpec{Replicas: ptr.To[int32](101)}, "spec.replicas"},
		{"unknown traffic type", meshv1.WaypointPolicySpec{TrafficType: "udp"}, "spec.trafficType"},
		{"request above limit", meshv1.WaypointPolicySpec{Resources: &corev1.ResourceRequirements{
			Requests: quantities("memory", "2Gi"), Limits: quantities("memory", "1Gi")}}, "spec.resources.requests[memory]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := create("bad", tc.spec)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}

	// Cross-object rules (webhook).
	if err := create("ns-wp", meshv1.WaypointPolicySpec{}); err != nil {
		t.Fatal(err)
	}
	if err := create("ns-wp-2", meshv1.WaypointPolicySpec{}); err == nil || !strings.Contains(err.Error(), "spec.scope") || !strings.Contains(err.Error(), `"ns-wp"`) {
		t.Fatalf("second namespace waypoint: %v", err)
	}
	if err := create("reviews", meshv1.WaypointPolicySpec{Scope: meshv1.ScopeServiceAccount, ServiceAccount: "reviews"}); err != nil {
		t.Fatalf("a service-account waypoint next to the namespace one must be allowed: %v", err)
	}
	if err := create("reviews-2", meshv1.WaypointPolicySpec{Scope: meshv1.ScopeServiceAccount, ServiceAccount: "reviews"}); err == nil || !strings.Contains(err.Error(), "spec.serviceAccount") {
		t.Fatalf("second waypoint for one service account: %v", err)
	}
	if err := create("ratings", meshv1.WaypointPolicySpec{Scope: meshv1.ScopeServiceAccount, ServiceAccount: "ratings"}); err != nil {
		t.Fatalf("waypoint for another service account refused: %v", err)
	}
	// Updating into a conflict is refused too.
	err := updateWaypoint(t, "wp-invalid", "ratings", func(wp *meshv1.WaypointPolicy) { wp.Spec.ServiceAccount = "reviews" })
	if err == nil {
		t.Fatal("update into a conflict accepted")
	}
	// The same waypoint in another namespace is fine.
	createNamespace(t, "wp-invalid-2")
	if err := k8s.Create(ctx, &meshv1.WaypointPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "wp-invalid-2", Name: "ns-wp"}}); err != nil {
		t.Fatal(err)
	}
}
