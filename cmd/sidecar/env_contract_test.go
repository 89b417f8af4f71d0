package main

import (
	"flag"
	"fmt"
	"io"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/controllers"
	"github.com/ambientmesh/ambient/proxylib/envconfig"
	"github.com/ambientmesh/ambient/test/envcontract"
)

// TestInjectorEnvContract: the sidecar and its init container, as the
// injector writes them into a pod, read every variable the injector sets,
// nothing else but CLUSTER_ID and DRAIN_GRACE (optional), and end up with
// the injector's values.
func TestInjectorEnvContract(t *testing.T) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", TrustDomain: "example.org",
			CA: meshv1.CASpec{WorkloadCertTTL: metav1.Duration{Duration: 6 * time.Hour}}}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app", Annotations: map[string]string{
		"traffic.sidecar.istio.io/excludeOutboundPorts":    "3306",
		"traffic.sidecar.istio.io/excludeInboundPorts":     "9090",
		"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", ReadinessProbe: &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}}}}}}
	if err := controllers.InjectSidecar(pod, mesh, "sidecar:test"); err != nil {
		t.Fatal(err)
	}
	var o options
	set := envcontract.Check(t, pod.Spec.InitContainers[1], func(args []string, e *envconfig.Env) (err error) {
		fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		o, err = parseFlags(fs, args, e)
		return err
	}, "CLUSTER_ID", "DRAIN_GRACE", "WORKER_THREADS", "WORKLOAD_CERT_TTL")
	for what, got := range map[string][2]string{
		"trust domain":    {o.TrustDomain, mesh.Spec.TrustDomain},
		"root cert":       {o.RootCertPath, set["ROOT_CERT"]},
		"token":           {o.TokenPath, set["TOKEN_PATH"]},
		"xds":             {o.XDSAddr, "ambient-controlplane.mesh-root.svc:15010"},
		"ca":              {o.CAAddr, "ambient-controlplane.mesh-root.svc:15012"},
		"pod uid":         {o.podUID, "fieldRef:metadata.uid"},
		"cert ttl":        {o.CertTTL.String(), "0s"}, // the CA's workloadCertTTL
		"service account": {o.serviceAccount, "fieldRef:spec.serviceAccountName"},
		"pod ip":          {o.podIP, "fieldRef:status.podIP"},
		"app probes":      {fmt.Sprint(o.appProbes["/app-health/app/readyz"].TCPSocket.Port), "8080"},
	} {
		if got[0] != got[1] || got[0] == "" {
			t.Errorf("%s: sidecar has %q, injector meant %q", what, got[0], got[1])
		}
	}
	var io2 initOptions
	envcontract.Check(t, pod.Spec.InitContainers[0], func(args []string, e *envconfig.Env) (err error) {
		fs := flag.NewFlagSet("sidecar init", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		if len(args) == 0 || args[0] != "init" {
			t.Fatalf("init container args %v, want [init]", args)
		}
		io2, err = parseInitFlags(fs, args[1:], e)
		return err
	}, "REDIRECT_BACKEND")
	if io2.uid != 1337 || io2.outPorts != "3306" || io2.inPorts != "9090" || io2.ranges != "10.96.0.0/12" || io2.backend != "nftables" {
		t.Errorf("init options %+v", io2)
	}
}
