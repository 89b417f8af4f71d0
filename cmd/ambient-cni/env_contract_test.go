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

// optionalAgentEnv are read by the node agent, left unset by the operator:
// their defaults are right for the DaemonSet (the CNI socket and state
// directory under /var/run/ambient, the host's /proc at /host/proc, probe
// SNAT and source preservation on); POD_NAMESPACE backs MESH_NAMESPACE;
// CNI_HOST_ROOT is set only for the CNI platforms auto and openshift.
var optionalAgentEnv = []string{"CNI_SOCKET", "STATE_DIR", "PROC_ROOT", "PROBE_SNAT", "PRESERVE_SOURCE", "POD_NAMESPACE", "CNI_HOST_ROOT"}

// TestOperatorEnvContract: the node agent the operator deploys reads every
// variable the operator sets on it, nothing else but settings with
// defaults right for a standard node (optional), and ends up with the
// operator's values; for every CNI platform (auto and openshift set the
// host root).
func TestOperatorEnvContract(t *testing.T) {
	for _, p := range []meshv1.CNIPlatform{"", meshv1.CNIPlatformK3s, meshv1.CNIPlatformAuto, meshv1.CNIPlatformOpenShift} {
		t.Run("platform "+string(p), func(t *testing.T) { checkAgentEnvContract(t, p) })
	}
}

func checkAgentEnvContract(t *testing.T, platform meshv1.CNIPlatform) {
	mesh := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec: meshv1.AmbientMeshSpec{Namespace: "mesh-root", Capture: meshv1.CaptureSpec{ExcludedNamespaces: []string{"legacy"}, DNSCapture: true}}}
	mesh.Spec.NodeAgent.CNI.Platform = platform
	ds := controllers.DesiredNodeAgent(mesh, controllers.Defaults{NodeAgentImage: "ambient-cni:test"})
	var o struct {
		meshNamespace, meshName string
		hostRoot                string
		excluded                []string
		dnsCapture, dnsRules    bool
	}
	c := ds.Spec.Template.Spec.Containers[0]
	envcontract.Check(t, c, func(args []string, e *envconfig.Env) error {
		fs := flag.NewFlagSet("node-agent", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		if len(args) > 0 && args[0] == "node-agent" {
			args = args[1:] // the subcommand main dispatches on
		}
		opts, _, err := parseAgentFlags(fs, args, e)
		o.meshNamespace, o.meshName, o.excluded = opts.Selection.MeshNamespace, opts.MeshName, opts.Selection.ExcludedNamespaces
		o.hostRoot = opts.CNIHostRoot
		o.dnsCapture, o.dnsRules = opts.DNSCapture, opts.DNSRedirector != nil
		return err
	}, optionalAgentEnv...)
	if !o.dnsCapture || !o.dnsRules {
		t.Errorf("node agent has DNS capture %t (rules %t), the mesh asks for it", o.dnsCapture, o.dnsRules)
	}
	if wantRoot := platform == meshv1.CNIPlatformAuto || platform == meshv1.CNIPlatformOpenShift; (o.hostRoot != "") != wantRoot {
		t.Errorf("node agent has CNI host root %q for platform %q", o.hostRoot, platform)
	}
	if o.meshName != mesh.Name || o.meshNamespace != mesh.Spec.Namespace {
		t.Errorf("node agent has mesh %q in %q, operator meant %q in %q", o.meshName, o.meshNamespace, mesh.Name, mesh.Spec.Namespace)
	}
}
