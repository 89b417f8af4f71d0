//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestRedirectionIPTablesJourney runs the mesh with redirection: iptables
// (the node agent's image carries iptables-nft for it): pods created after
// the switch are captured with iptables rules and their traffic crosses
// ztunnel, same-node and cross-node. The mesh goes back to nftables after.
func TestRedirectionIPTablesJourney(t *testing.T) {
	requireMesh(t)
	const ns = "e2e-iptables"
	mustKubectl(t, "patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"capture":{"redirection":"iptables"}}}`)
	t.Cleanup(func() {
		kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", "--timeout=120s")
		kubectl("patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"capture":{"redirection":"nftables"}}}`)
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ambient-node-agent", "--timeout=180s")
	})
	eventually(t, 60*time.Second, "node agents configured for iptables", func() error {
		out, _ := kubectl("-n", meshNS, "get", "daemonset", "ambient-node-agent", "-o",
			`jsonpath={.spec.template.spec.containers[0].env[?(@.name=="REDIRECTION_BACKEND")].value}`)
		if strings.TrimSpace(out) != "iptables" {
			return fmt.Errorf("REDIRECTION_BACKEND %q", out)
		}
		return nil
	})
	rolloutDaemonSet(t, "ambient-node-agent")

	recreateNamespace(t, ns, "istio.io/dataplane-mode=ambient")
	for _, f := range []string{"httpbin", "sleep"} {
		applyFile(t, ns, "test/lab/manifests/apps/"+f+".yaml")
	}
	mustKubectl(t, "scale", "deployment", "sleep", "--replicas=2", "-n", ns)
	waitAvailable(t, ns)
	eventually(t, 60*time.Second, ns+": every pod captured", func() error { return captureOf(t, ns).complete() })
	agentLogs, _ := kubectl("logs", "-n", meshNS, "-l", "app=ambient-node-agent", "--tail=500")
	if strings.Contains(agentLogs, "executable file not found") {
		t.Fatalf("node agent could not run iptables:\n%s", agentLogs)
	}
	eventually(t, 60*time.Second, "sleep -> httpbin through ztunnel with iptables capture", func() error {
		out, code := curl(t, ns, "deploy/sleep", "--repeat", "4", "httpbin:8000")
		if code != 0 || !strings.Contains(out, title) {
			return fmt.Errorf("curl exit %d", code)
		}
		if logs := ztunnelLogs(t); !strings.Contains(logs, "dst.namespace="+ns) {
			return fmt.Errorf("ztunnel logs no connection to %s", ns)
		}
		return nil
	})
}
