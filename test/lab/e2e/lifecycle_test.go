//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Lifecycle scenarios: restarts of the node components, a ztunnel upgrade
// under load and mesh removal. They run after the journey (file order).

func rolloutDaemonSet(t *testing.T, name string) {
	t.Helper()
	mustKubectl(t, "-n", meshNS, "rollout", "status", "daemonset/"+name, "--timeout=180s")
}

// nodeOf returns the node of the first pod matching selector in ns.
func nodeOf(t *testing.T, ns, selector string) string {
	t.Helper()
	return strings.TrimSpace(mustKubectl(t, "get", "pods", "-n", ns, "-l", selector, "-o", "jsonpath={.items[0].spec.nodeName}"))
}

// restartComponentOnNode deletes the DaemonSet pod of app on node and waits
// for its replacement.
func restartComponentOnNode(t *testing.T, app, node string) {
	t.Helper()
	pod := strings.TrimSpace(mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app="+app,
		"--field-selector", "spec.nodeName="+node, "-o", "jsonpath={.items[0].metadata.name}"))
	if pod == "" {
		t.Fatalf("no %s pod on node %s", app, node)
	}
	mustKubectl(t, "delete", "pod", "-n", meshNS, pod, "--wait=true", "--timeout=60s")
	rolloutDaemonSet(t, app)
}

func assertJourneyTrafficWorks(t *testing.T, what string) {
	t.Helper()
	eventually(t, 60*time.Second, what, func() error {
		for _, client := range []string{"deploy/sleep", "deploy/notsleep"} {
			out, code := curl(t, demoNS, client, "httpbin:8000")
			if code != 0 || !strings.Contains(out, title) {
				return fmt.Errorf("%s: curl exit %d", client, code)
			}
		}
		return nil
	})
}

func TestNodeAgentRestartReadoptsPods(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	before := podFingerprint(t, demoNS)
	node := nodeOf(t, demoNS, "app=httpbin")
	restartComponentOnNode(t, "ambient-node-agent", node)
	assertJourneyTrafficWorks(t, "traffic after node-agent restart on "+node)
	if n, want := capturedCount(t, demoNS), podCount(t, demoNS); n != want {
		t.Errorf("%d of %d pods still captured after the node-agent restart", n, want)
	}
	if after := podFingerprint(t, demoNS); after != before {
		t.Errorf("workload pods restarted:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestZtunnelRestartReadoptsPods(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	before := podFingerprint(t, demoNS)
	node := nodeOf(t, demoNS, "app=sleep")
	restartComponentOnNode(t, "ztunnel", node)
	assertJourneyTrafficWorks(t, "traffic after ztunnel restart on "+node)
	// Traffic from the re-adopted pods still goes through the new ztunnel.
	if _, code := curl(t, demoNS, "deploy/sleep", "--repeat", "5", "httpbin:8000"); code != 0 {
		t.Fatalf("curl exit %d", code)
	}
	if !strings.Contains(ztunnelLogs(t), "outbound") {
		t.Errorf("the restarted ztunnel logs no outbound traffic")
	}
	if after := podFingerprint(t, demoNS); after != before {
		t.Errorf("workload pods restarted:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// holdResult mirrors connhold's JSON report (test/workloads/sleep).
type holdResult struct {
	Opened   int      `json:"opened"`
	Failed   int      `json:"failedToOpen"`
	Broken   int      `json:"broken"`
	Survived int      `json:"survived"`
	Pings    int64    `json:"pings"`
	Errors   []string `json:"errors"`
}

// TestZtunnelUpgradeKeepsMeshWorking rolls the ztunnel DaemonSet to a new
// image tag while long-lived connections are open, and records how many
// broke: the baseline for a later zero-loss upgrade goal. New connections
// must work after the upgrade.
func TestZtunnelUpgradeKeepsMeshWorking(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	current := strings.TrimSpace(mustKubectl(t, "-n", meshNS, "get", "ds/ztunnel", "-o", "jsonpath={.spec.template.spec.containers[0].image}"))
	upgraded := current[:strings.LastIndex(current, ":")] + ":e2e-upgrade"
	if out, err := exec.Command(filepath.Join(repoRoot, "test/lab/lab.sh"), "tag", current, upgraded).CombinedOutput(); err != nil {
		t.Fatalf("tagging %s as %s on the nodes: %v\n%s", current, upgraded, err, out)
	}

	const conns, hold = 20, 45 * time.Second
	hc := exec.Command("kubectl", "--kubeconfig", kubeconfig, "exec", "-n", demoNS, "deploy/sleep", "--",
		"connhold", "-addr", "httpbin:9000", "-conns", fmt.Sprint(conns), "-interval", "200ms", "-duration", hold.String())
	var holdOut, holdErr bytes.Buffer
	hc.Stdout, hc.Stderr = &holdOut, &holdErr
	if err := hc.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second) // connections established before the upgrade starts
	mustKubectl(t, "patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"ztunnel":{"image":"`+upgraded+`"}}}`)
	defer func() {
		kubectl("patch", "ambientmesh", "default", "--type", "json", "-p", `[{"op":"remove","path":"/spec/ztunnel/image"}]`)
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ztunnel", "--timeout=180s")
	}()
	eventually(t, 60*time.Second, "DaemonSet picks up the new image", func() error {
		img := mustKubectl(t, "-n", meshNS, "get", "ds/ztunnel", "-o", "jsonpath={.spec.template.spec.containers[0].image}")
		if strings.TrimSpace(img) != upgraded {
			return fmt.Errorf("image still %s", img)
		}
		return nil
	})
	rolloutDaemonSet(t, "ztunnel")
	_ = hc.Wait() // non-zero when connections broke; the JSON says how many
	var res holdResult
	if err := json.Unmarshal(bytes.TrimSpace(holdOut.Bytes()), &res); err != nil {
		t.Fatalf("connhold report: %v\nstdout: %s\nstderr: %s", err, holdOut.String(), holdErr.String())
	}
	t.Logf("ztunnel upgrade baseline: %d connections opened, %d broken, %d survived, %d pings", res.Opened, res.Broken, res.Survived, res.Pings)
	writeArtifact(t, "ztunnel-upgrade-baseline.json", holdOut.Bytes())
	if res.Opened != conns {
		t.Errorf("only %d of %d connections opened before the upgrade: %v", res.Opened, conns, res.Errors)
	}
	assertJourneyTrafficWorks(t, "new connections after the upgrade")
}

func TestDeleteMeshReleasesPodsWithoutRestart(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	eventually(t, 60*time.Second, "pods captured", func() error {
		if n, want := capturedCount(t, demoNS), podCount(t, demoNS); n != want {
			return fmt.Errorf("%d of %d captured", n, want)
		}
		return nil
	})
	before := podFingerprint(t, demoNS)
	mustKubectl(t, "delete", "ambientmesh", "default", "--wait=true", "--timeout=180s")
	defer func() {
		kubectl("apply", "-f", filepath.Join(repoRoot, "config/samples/mesh_v1alpha1_ambientmesh.yaml"))
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ztunnel", "--timeout=180s")
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ambient-node-agent", "--timeout=180s")
	}()
	eventually(t, 90*time.Second, "pods released", func() error {
		if n := capturedCount(t, demoNS); n != 0 {
			return fmt.Errorf("%d pods still annotated ambient.istio.io/redirection=enabled", n)
		}
		return nil
	})
	if after := podFingerprint(t, demoNS); after != before {
		t.Errorf("pods restarted when the mesh was deleted:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	assertJourneyTrafficWorks(t, "plain traffic after the mesh is gone")
}

func writeArtifact(t *testing.T, name string, data []byte) {
	t.Helper()
	dir := os.Getenv("E2E_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(repoRoot, "_artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err == nil {
		_ = os.WriteFile(filepath.Join(dir, name), data, 0o644)
	}
}
