package controllers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// can asks the API server's RBAC authorizer whether user may do verb;
// resource is "name" for the core group or "name.group".
func can(t *testing.T, user, verb, resource, ns, name string) bool {
	t.Helper()
	resource, group, _ := strings.Cut(resource, ".")
	sar := &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
		User:   user,
		Groups: []string{"system:serviceaccounts", "system:authenticated"},
		ResourceAttributes: &authzv1.ResourceAttributes{
			Verb: verb, Group: group, Resource: resource, Namespace: ns, Name: name,
		},
	}}
	if err := k8s.Create(context.Background(), sar); err != nil {
		t.Fatal(err)
	}
	return sar.Status.Allowed
}

func sa(ns, name string) string { return fmt.Sprintf("system:serviceaccount:%s:%s", ns, name) }

// TestLeastPrivilege: the CA Secret is readable by the operator only; the
// node agent gets what capture needs; ztunnel and workloads get nothing.
func TestLeastPrivilege(t *testing.T) {
	ctx := context.Background()
	const ns = "mesh-rbac"
	newMesh(t, "rbac", ns, nil)
	eventually(t, "node agent binding", exists(&rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: NodeAgentName}}))
	eventually(t, "ztunnel", exists(&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ZtunnelName}}))
	waitCondition(t, "rbac", meshv1.ConditionCAReady, metav1.ConditionTrue, meshv1.ReasonCAIssued)

	// The operator's ClusterRole exactly as config/rbac ships it.
	raw, err := os.ReadFile(filepath.Join("..", "config", "rbac", "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	role := &rbacv1.ClusterRole{}
	if err := yaml.Unmarshal(raw, role); err != nil {
		t.Fatal(err)
	}
	role.Name = "test-operator-role"
	operator := sa(operatorNamespace, "controller-manager")
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "test-operator-role"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: operatorNamespace, Name: "controller-manager"}},
	}
	if err := k8s.Create(ctx, role); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, binding); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(ctx, binding); _ = k8s.Delete(ctx, role) })
	// The authorizer reads RBAC from its own watch cache, which lags a fresh
	// binding; wait for both bindings to be visible before judging any case.
	eventually(t, "bindings visible to the authorizer", func() error {
		if !can(t, operator, "get", "secrets", ns, CASecretName) || !can(t, sa(ns, NodeAgentName), "list", "pods", "", "") {
			return fmt.Errorf("operator or node-agent grant not yet allowed")
		}
		return nil
	})

	tests := []struct {
		who, verb, resource, ns, name string
		allowed                       bool
	}{
		{operator, "get", "secrets", ns, CASecretName, true},
		// Proxies' tokens, and callers of the metrics and debug endpoints.
		{operator, "create", "tokenreviews.authentication.k8s.io", "", "", true},
		{operator, "create", "subjectaccessreviews.authorization.k8s.io", "", "", true},
		// ReferenceGrants are read, never written.
		{operator, "list", "referencegrants.gateway.networking.k8s.io", "", "", true},
		{operator, "watch", "referencegrants.gateway.networking.k8s.io", "", "", true},
		{operator, "get", "referencegrants.gateway.networking.k8s.io", "apps", "grant", true},
		{operator, "create", "referencegrants.gateway.networking.k8s.io", "apps", "", false},
		{operator, "delete", "referencegrants.gateway.networking.k8s.io", "apps", "grant", false},
		// Disruption budgets of scaled waypoints (the reconciler watches them).
		{operator, "create", "poddisruptionbudgets.policy", "apps", "", true},
		{operator, "watch", "poddisruptionbudgets.policy", "", "", true},
		{operator, "delete", "poddisruptionbudgets.policy", "apps", "waypoint", true},
		{sa(ns, ZtunnelName), "create", "subjectaccessreviews.authorization.k8s.io", "", "", false},
		{sa(ns, ZtunnelName), "get", "secrets", ns, CASecretName, false},
		{sa(ns, ZtunnelName), "list", "secrets", ns, "", false},
		{sa(ns, ZtunnelName), "list", "pods", "", "", false},
		{sa(ns, NodeAgentName), "get", "secrets", ns, CASecretName, false},
		{sa(ns, NodeAgentName), "list", "pods", "", "", true},
		{sa(ns, NodeAgentName), "patch", "pods", "app", "p", true},
		{sa(ns, NodeAgentName), "watch", "namespaces", "", "", true},
		{sa(ns, NodeAgentName), "update", "namespaces", "", "x", false},
		{sa(ns, NodeAgentName), "create", "pods", "app", "", false},
		// Events on the pods it captures and releases, nothing more.
		{sa(ns, NodeAgentName), "create", "events.events.k8s.io", "app", "", true},
		{sa(ns, NodeAgentName), "patch", "events.events.k8s.io", "app", "x", true},
		{sa(ns, NodeAgentName), "delete", "events.events.k8s.io", "app", "x", false},
		{sa(ns, NodeAgentName), "list", "events.events.k8s.io", "app", "", false},
		{sa(ns, ZtunnelName), "create", "events.events.k8s.io", "app", "", false},
		{operator, "create", "events.events.k8s.io", "app", "", true},
		{sa("default", "default"), "get", "secrets", ns, CASecretName, false},
		{sa("app", "waypoint"), "get", "secrets", ns, CASecretName, false},
		{sa("app", "waypoint"), "get", "configmaps", "app", RootCertConfigMap, false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s %s %s/%s/%s", tc.who, tc.verb, tc.resource, tc.ns, tc.name), func(t *testing.T) {
			if got := can(t, tc.who, tc.verb, tc.resource, tc.ns, tc.name); got != tc.allowed {
				t.Fatalf("allowed=%v, want %v", got, tc.allowed)
			}
		})
	}
}
