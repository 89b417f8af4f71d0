//go:build e2e

package e2e

import (
	"encoding/json"
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
		// Until the operator has changed the DaemonSet, rollout status sees the
		// iptables generation complete: wait for the env first, or the next
		// scenario's pods are captured with iptables rules.
		rollNodeAgents(t, "REDIRECTION_BACKEND", "nftables")
	})
	rollNodeAgents(t, "REDIRECTION_BACKEND", "iptables")

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

// rollNodeAgents waits until the operator gave the node agents env=want
// and their rollout finished.
func rollNodeAgents(t *testing.T, env, want string) {
	t.Helper()
	eventually(t, 60*time.Second, "node agents configured with "+env+"="+want, func() error {
		out, _ := kubectl("-n", meshNS, "get", "daemonset", "ambient-node-agent", "-o",
			`jsonpath={.spec.template.spec.containers[0].env[?(@.name=="`+env+`")].value}`)
		if strings.TrimSpace(out) != want {
			return fmt.Errorf("%s %q", env, out)
		}
		return nil
	})
	rolloutDaemonSet(t, "ambient-node-agent")
}

// TestInboundTPROXY switches the mesh to spec.capture.inboundMode TPROXY:
// a plaintext client in a namespace outside the mesh calls httpbin pods in
// an enrolled namespace (same node and across nodes) and httpbin's /ip
// reports the client's own address; under NAT (before the switch) it
// reports httpbin's own. A mesh client is seen as itself in both modes.
// The mesh goes back to NAT after.
func TestInboundTPROXY(t *testing.T) {
	requireMesh(t)
	const meshNSName, outNS = "e2e-tproxy", "e2e-tproxy-out"
	// Pods captured by an iptables node agent keep those NAT rules after a
	// switch to nftables (the backends do not remove each other's rules),
	// and a NAT REDIRECT there would still rewrite TPROXY'd connections.
	rollNodeAgents(t, "REDIRECTION_BACKEND", "nftables")
	servers := deployPlacement(t, meshNSName, "istio.io/dataplane-mode=ambient")
	deployPlacement(t, outNS)
	t.Cleanup(func() {
		kubectl("delete", "ns", meshNSName, outNS, "--ignore-not-found", "--wait=false")
		kubectl("patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"capture":{"inboundMode":"NAT"}}}`)
		rollNodeAgents(t, "INBOUND_CAPTURE", "NAT")
	})
	eventually(t, 60*time.Second, meshNSName+": every pod captured", func() error { return captureOf(t, meshNSName).complete() })
	podIP := func(ns, pod string) string {
		return strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}"))
	}
	outside, inside := podIP(outNS, "client-w1"), podIP(meshNSName, "client-w1")
	// expect: what each httpbin's /ip reports as the client's address.
	expect := func(what, ns string, want func(server string) string) {
		t.Helper()
		for _, server := range []string{"server-w1", "server-w2"} {
			eventually(t, 60*time.Second, what+" -> "+server, func() error {
				out, code := curl(t, ns, "client-w1", "http://"+servers[server]+"/ip")
				var got struct{ Origin string }
				if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil {
					return fmt.Errorf("curl exit %d, %q", code, out)
				}
				if got.Origin != want(server) {
					return fmt.Errorf("%s saw %s, want %s", server, got.Origin, want(server))
				}
				return nil
			})
		}
	}
	itself := func(server string) string { return servers[server] }
	expect("NAT: plaintext client outside the mesh seen as the pod itself", outNS, itself)
	expect("NAT: mesh client seen as itself", meshNSName, func(string) string { return inside })

	mustKubectl(t, "patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"capture":{"inboundMode":"TPROXY"}}}`)
	rollNodeAgents(t, "INBOUND_CAPTURE", "TPROXY")
	eventually(t, 60*time.Second, "condition InboundCapture TPROXY", func() error {
		out, _ := kubectl("get", "ambientmesh", "default", "-o", `jsonpath={.status.conditions[?(@.type=="InboundCapture")].reason}`)
		if strings.TrimSpace(out) != "TPROXY" {
			return fmt.Errorf("reason %q", out)
		}
		return nil
	})
	expect("TPROXY: plaintext client outside the mesh seen as itself", outNS, func(string) string { return outside })
	expect("TPROXY: mesh client seen as itself", meshNSName, func(string) string { return inside })
}
