package main

import (
	"flag"
	"io"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
)

// optionalEnv are variables the waypoint reads that the operator leaves
// unset on purpose: each has a default that is right for the operator's
// waypoints.
var optionalEnv = []string{"LB_POLICY", "TRACING"}

// TestOperatorEnvContract: the waypoint the operator deploys reads every
// variable the operator sets on it, reads nothing else but optionalEnv, and
// ends up with the operator's values, among them the control plane's root
// namespace (the mesh namespace), so a mesh-wide policy means the same to
// both.
func TestOperatorEnvContract(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "example.org", ClusterDomain: "corp.example"}}
	w := controllers.Waypoint{Name: "wp", Namespace: "app", TrafficType: meshv1.TrafficService, Replicas: 1, Image: "waypoint:test",
		Transport: meshv1.TransportHTTP2, LogLevel: "info"}
	_, dep, _ := controllers.DesiredWaypoint(w, mesh)
	c := dep.Spec.Template.Spec.Containers[0]
	set := map[string]string{}
	for _, v := range c.Env {
		set[v.Name] = envValue(v)
	}
	e := envconfig.FromMap(set)
	fs := flag.NewFlagSet("waypoint", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o, err := parseFlags(fs, c.Args, e)
	if err != nil {
		t.Fatalf("the operator's args %v: %v", c.Args, err)
	}
	read := e.Read()
	for name := range set {
		if !slices.Contains(read, name) {
			t.Errorf("the operator sets %s on the waypoint, which never reads it", name)
		}
	}
	for _, name := range read {
		if _, ok := set[name]; !ok && !slices.Contains(optionalEnv, name) {
			t.Errorf("the waypoint reads %s, which the operator does not set and which is not declared optional", name)
		}
	}
	for what, got := range map[string][2]string{
		"root namespace": {o.rootNamespace, mesh.Spec.Namespace},
		"trust domain":   {o.trustDomain, mesh.Spec.TrustDomain},
		"cluster domain": {o.clusterDomain, mesh.Spec.ClusterDomain},
		"root cert":      {o.rootCertPath, set["ROOT_CERT"]},
		"token":          {o.tokenPath, set["TOKEN_PATH"]},
		"waypoint name":  {o.name, w.Name},
	} {
		if got[0] != got[1] || got[0] == "" {
			t.Errorf("%s: waypoint has %q, operator meant %q", what, got[0], got[1])
		}
	}
}

// envValue is a variable's literal value, or a marker for a field reference
// (the kubelet fills it in).
func envValue(v corev1.EnvVar) string {
	if v.ValueFrom != nil && v.ValueFrom.FieldRef != nil {
		return "fieldRef:" + v.ValueFrom.FieldRef.FieldPath
	}
	return v.Value
}
