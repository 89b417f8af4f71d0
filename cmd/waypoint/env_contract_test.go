package main

import (
	"flag"
	"io"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/test/envcontract"
)

// TestOperatorEnvContract: the waypoint the operator deploys reads every
// variable the operator sets on it, nothing else but LB_POLICY, TRACING, PROXY_ROLE and GATEWAY_CERT_DIR
// (ingress gateways only), WORKLOAD_CERT_TTL (the CA's lifetime when unset)
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
	}, "LB_POLICY", "TRACING", "PROXY_ROLE", "GATEWAY_CERT_DIR", "WORKER_THREADS", "DRAIN_DELAY", "CLUSTER_ID", "WORKLOAD_CERT_TTL")
	for what, got := range map[string][2]string{
		"root namespace": {o.rootNamespace, mesh.Spec.Namespace},
		"trust domain":   {o.trustDomain, mesh.Spec.TrustDomain},
		"cluster domain": {o.clusterDomain, mesh.Spec.ClusterDomain},
		"root cert":      {o.rootCertPath, set["ROOT_CERT"]},
		"token":          {o.tokenPath, set["TOKEN_PATH"]},
		"waypoint name":  {o.name, w.Name},
		"cert ttl":       {o.certTTL.String(), "0s"}, // the CA's workloadCertTTL
	} {
		if got[0] != got[1] || got[0] == "" {
			t.Errorf("%s: waypoint has %q, operator meant %q", what, got[0], got[1])
		}
	}
}

// TestOperatorEnvContractIngress: the same binary deployed for an ingress
// Gateway (class istio) runs in the ingress role, for that Gateway, with
// its own <gateway>-istio identity and the certificate directory the
// operator mounts Secrets under.
func TestOperatorEnvContractIngress(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "example.org"}}
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "httpbin-gateway", Namespace: "istio-system"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType}}}}
	w, err := controllers.IngressFromGateway(gw, mesh, controllers.Defaults{WaypointImage: "waypoint:test"})
	if err != nil {
		t.Fatal(err)
	}
	_, dep, _ := controllers.DesiredWaypoint(w, mesh)
	var o options
	envcontract.Check(t, dep.Spec.Template.Spec.Containers[0], func(args []string, e *envconfig.Env) (err error) {
		fs := flag.NewFlagSet("waypoint", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o, err = parseFlags(fs, args, e)
		return err
	}, "LB_POLICY", "TRACING", "WORKER_THREADS", "DRAIN_DELAY", "CLUSTER_ID", "WORKLOAD_CERT_TTL")
	if o.role != roleIngress || o.name != "httpbin-gateway" || o.certDir != controllers.GatewayCertDir || o.rootNamespace != "mesh-root" {
		t.Errorf("role %q name %q cert dir %q root %q: want the ingress gateway of httpbin-gateway", o.role, o.name, o.certDir, o.rootNamespace)
	}
	if sa := dep.Spec.Template.Spec.ServiceAccountName; sa != "httpbin-gateway-istio" {
		t.Errorf("service account %q, want httpbin-gateway-istio", sa)
	}
}
