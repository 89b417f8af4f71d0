package main

import (
	"flag"
	"io"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/test/envcontract"
)

// TestOperatorEnvContract: the ztunnel the operator deploys reads every
// variable the operator sets on it, nothing else but CLUSTER_ID (optional,
// default "Kubernetes", as Istio's) and WORKER_THREADS (set only with
// spec.ztunnel.workerThreads, default 2), HANDOVER_SOCKET and
// WORKLOAD_CERT_TTL (unset: the CA's spec.ca.workloadCertTTL, so changing
// that setting rolls no proxy), and ends up with the operator's values.
func TestOperatorEnvContract(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "example.org", ClusterDomain: "corp.example",
			CA: meshv1.CASpec{WorkloadCertTTL: metav1.Duration{Duration: 6 * time.Hour}}}}
	ds := controllers.DesiredZtunnel(mesh, controllers.Defaults{ZtunnelImage: "ztunnel:test"})
	var o options
	set := envcontract.Check(t, ds.Spec.Template.Spec.Containers[0], func(args []string, e *envconfig.Env) (err error) {
		fs := flag.NewFlagSet("ztunnel", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o, err = parseFlags(fs, args, e)
		return err
	}, "CLUSTER_ID", "WORKER_THREADS", "HANDOVER_SOCKET", "WORKLOAD_CERT_TTL")
	for what, got := range map[string][2]string{
		"trust domain": {o.TrustDomain, mesh.Spec.TrustDomain},
		"root cert":    {o.RootCertPath, set["ROOT_CERT"]},
		"token":        {o.TokenPath, set["TOKEN_PATH"]},
		"xds":          {o.XDSAddr, set["XDS_ADDRESS"]},
		"ca":           {o.CAAddr, set["CA_ADDRESS"]},
		"dns domain":   {o.DNS.ClusterDomain, mesh.Spec.ClusterDomain},
		"cert ttl":     {o.CertTTL.String(), "0s"}, // the CA's workloadCertTTL: changing it restarts no proxy
	} {
		if got[0] != got[1] || got[0] == "" {
			t.Errorf("%s: ztunnel has %q, operator meant %q", what, got[0], got[1])
		}
	}
}
