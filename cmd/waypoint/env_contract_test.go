package main

import (
	"flag"
	"io"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/test/envcontract"
)

// TestOperatorEnvContract: the waypoint the operator deploys reads every
// variable the operator sets on it, nothing else but LB_POLICY, TRACING and PROXY_ROLE
// (optional, with defaults right for the operator's waypoints), and ends up
// with the operator's values, among them the control plane's root
// namespace (the mesh namespace), so a mesh-wide policy means the same to
// both.
func TestOperatorEnvContract(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "example.org", ClusterDomain: "corp.example"}}
	w := controllers.Waypoint{Name: "wp", Namespace: "app", TrafficType: meshv1.TrafficService, Replicas: 1, Image: "waypoint:test",
		Transport: meshv1.TransportHTTP2, LogLevel: "info"}
	_, dep, _ := controllers.DesiredWaypoint(w, mesh)
	var o options
	set := envcontract.Check(t, dep.Spec.Template.Spec.Containers[0], func(args []string, e *envconfig.Env) (err error) {
		fs := flag.NewFlagSet("waypoint", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o, err = parseFlags(fs, args, e)
		return err
	}, "LB_POLICY", "TRACING", "PROXY_ROLE")
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
