package controllers

import (
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
)

// The mesh ServiceAccounts disable automounting (proxies use a projected
// token with the mesh audience); the node agent talks to the API server and
// must get its token back at the pod level.
func TestAPITokenMountedOnlyForNodeAgent(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"}, Spec: meshv1.AmbientMeshSpec{Namespace: "ambient-system"}}
	tests := []struct {
		name string
		ds   *appsv1.DaemonSet
		want bool
	}{
		{"node agent", DesiredNodeAgent(mesh, Defaults{}), true},
		{"ztunnel", DesiredZtunnel(mesh, Defaults{}), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.ds.Spec.Template.Spec.AutomountServiceAccountToken
			if got == nil || *got != tc.want {
				t.Fatalf("automountServiceAccountToken = %v, want %v", got, tc.want)
			}
		})
	}
	if sa := desiredServiceAccount(mesh, NodeAgentName); sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Fatal("mesh ServiceAccounts must keep automounting disabled (the pod spec opts the node agent in)")
	}
}
