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
	"sync"
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
	if err := captureOf(t, demoNS).complete(); err != nil {
		t.Errorf("after the node-agent restart: %v", err)
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
	Opened        int      `json:"opened"`
	Failed        int      `json:"failedToOpen"`
	Broken        int      `json:"broken"`
	Survived      int      `json:"survived"`
	Pings         int64    `json:"pings"`
	BytesVerified int64    `json:"bytesVerified"`
	Errors        []string `json:"errors"`
}

// waitZtunnelPods waits until every ztunnel pod is not terminating and
// ok(its grace period, its image).
func waitZtunnelPods(t *testing.T, ok func(grace, image string) bool, what string) {
	t.Helper()
	eventually(t, 180*time.Second, what, func() error {
		out := mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app=ztunnel", "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.spec.terminationGracePeriodSeconds} {.spec.containers[0].image} {.metadata.deletionTimestamp}{"\n"}{end}`)
		for line := range strings.Lines(out) {
			if f := strings.Fields(line); len(f) != 3 || !ok(f[1], f[2]) {
				return fmt.Errorf("ztunnel pod still terminating or old: %q", strings.TrimSpace(line))
			}
		}
		return nil
	})
}

// TestZtunnelUpgradeKeepsMeshWorking rolls the ztunnel DaemonSet to a new
// image tag while long-lived connections are open, same-node and
// cross-node (both nodes' ztunnels are upgraded in turn). The DaemonSet
// surges and the old ztunnel hands over (docs/interfaces.md, ZDS): no NEW
// connection may fail at any point of the rollout, including while the
// old pods drain, and every long-lived connection survives with every
// byte of its pattern echoed back. They live 75 s, far past the default
// grace period (30 s, a 25 s drain; the baseline without hand-over was 20
// of 20 broken): the old ztunnels hand them over to the new ones
// (proxylib/handover: cross-node as resumed HBONE sessions, same-node as
// socket pairs).
func TestZtunnelUpgradeKeepsMeshWorking(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	const ns = "e2e-upgrade"
	deployLoadApps(t, ns, 0)
	// The grace period stays at its default (30 s, Istio's; a 25 s drain):
	// the connections live 75 s, so only the hand-over keeps them.
	if g := strings.TrimSpace(mustKubectl(t, "-n", meshNS, "get", "ds/ztunnel", "-o", "jsonpath={.spec.template.spec.terminationGracePeriodSeconds}")); g != "30" {
		t.Fatalf("ztunnel terminationGracePeriodSeconds is %s, this scenario needs the default 30", g)
	}
	current := strings.TrimSpace(mustKubectl(t, "-n", meshNS, "get", "ds/ztunnel", "-o", "jsonpath={.spec.template.spec.containers[0].image}"))
	upgraded := current[:strings.LastIndex(current, ":")] + ":e2e-upgrade"
	if out, err := exec.Command(filepath.Join(repoRoot, "test/lab/lab.sh"), "tag", current, upgraded).CombinedOutput(); err != nil {
		t.Fatalf("tagging %s as %s on the nodes: %v\n%s", current, upgraded, err, out)
	}

	const conns, hold = 20, 75 * time.Second
	_, holds := streams(ns, "ztunnel")
	held := make(chan struct{})
	go func() {
		defer close(held)
		var wg sync.WaitGroup
		for _, h := range holds {
			wg.Add(1)
			go func() { defer wg.Done(); h.run(loadConfig{conns: conns, hold: hold}) }()
		}
		wg.Wait()
	}()
	time.Sleep(5 * time.Second) // connections established before the upgrade starts
	probes := probeNewConnections(t, "deploy/sleep", "httpbin:9000")
	defer probes.stop() // idempotent; stops the loops on every exit path
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
	// The scenario proves something only if both old ztunnels were told to
	// stop while the connections were still held. (`rollout status` of a
	// surging DaemonSet returns only once the old pods are gone, that is
	// after the connections end.)
	eventually(t, 120*time.Second, "both old ztunnels replaced and told to stop", func() error {
		out := mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app=ztunnel", "-o",
			`jsonpath={range .items[*]}{.spec.containers[0].image} {.status.containerStatuses[0].ready} {.metadata.deletionTimestamp}{"\n"}{end}`)
		newReady := 0
		for line := range strings.Lines(out) {
			f := strings.Fields(line)
			switch {
			case len(f) >= 2 && f[0] == upgraded && f[1] == "true" && len(f) == 2:
				newReady++
			case len(f) >= 1 && f[0] != upgraded && len(f) != 3:
				return fmt.Errorf("an old ztunnel is not terminating yet: %q", strings.TrimSpace(line))
			}
		}
		if newReady != 2 {
			return fmt.Errorf("%d upgraded ztunnels ready", newReady)
		}
		return nil
	})
	select {
	case <-held:
		t.Fatalf("the long-lived connections ended before both old ztunnels were told to stop: raise their hold time (%+v %+v)", holds[0], holds[1])
	default:
	}
	rolloutDaemonSet(t, "ztunnel")
	// The old pods drain after the rollout reports done, until their last
	// connection ends: probe until gone.
	waitZtunnelPods(t, func(_, image string) bool { return image == upgraded }, "old ztunnel pods gone")
	probed := probes.stop()
	t.Logf("ztunnel upgrade: %d new connections opened during the rollout, %d failed, %d probes not run (kubectl exec)", probed.Opened, probed.Failed+probed.Broken, probed.ExecErrors)
	if probed.Failed+probed.Broken > 0 {
		t.Errorf("%d new connections failed during the ztunnel upgrade: %v", probed.Failed+probed.Broken, probed.Errors[:min(len(probed.Errors), 10)])
	}
	if probed.Opened == 0 {
		t.Errorf("no new connection was probed during the rollout (%d kubectl exec errors)", probed.ExecErrors)
	}
	<-held
	report, _ := json.MarshalIndent(holds, "", "  ")
	writeArtifact(t, "ztunnel-upgrade-long-lived.json", report)
	for _, h := range holds {
		r := h.Result
		t.Logf("ztunnel upgrade, long-lived %s: %d opened, %d broken, %d survived, %d pings, %d bytes verified", h.Name, r.Opened, r.Broken, r.Survived, r.Pings, r.BytesVerified)
		switch {
		case h.Err != "":
			t.Errorf("%s: %s", h.Name, h.Err)
		case r.Opened != conns || r.Survived != conns || r.Broken != 0:
			t.Errorf("%s: %d of %d connections survived the upgrade (%d opened, %d broken): %v", h.Name, r.Survived, conns, r.Opened, r.Broken, r.Errors[:min(len(r.Errors), 5)])
		case r.BytesVerified < r.Pings*256 || r.Pings < int64(conns)*int64(hold/time.Second):
			t.Errorf("%s: %d pings, %d bytes verified: too few for %d connections pinging every 200 ms for %s", h.Name, r.Pings, r.BytesVerified, conns, hold)
		}
	}
	assertJourneyTrafficWorks(t, "new connections after the upgrade")
}

// newConnProbes opens new connections from a captured pod in a loop
// (`connhold` with short-lived connections, one kubectl exec per round).
type newConnProbes struct {
	once   sync.Once
	done   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	result probeResult
}

type probeResult struct {
	holdResult
	ExecErrors int // kubectl exec itself failed (no connhold report): not the mesh
}

// probeNewConnections starts two loops, each opening 5 new connections
// (a few echoed pings each) per round, until stop.
func probeNewConnections(t *testing.T, client, addr string) *newConnProbes {
	p := &newConnProbes{done: make(chan struct{})}
	for range 2 {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				select {
				case <-p.done:
					return
				default:
				}
				p.round(t, client, addr)
			}
		}()
	}
	return p
}

func (p *newConnProbes) round(t *testing.T, client, addr string) {
	cmd := exec.Command("kubectl", "--kubeconfig", kubeconfig, "exec", "-n", demoNS, client, "--",
		"connhold", "-addr", addr, "-conns", "5", "-interval", "100ms", "-duration", "350ms")
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	_ = cmd.Run() // connhold exits 1 when a connection failed; its report says which
	var res holdResult
	if err := json.Unmarshal(bytes.TrimSpace(out.Bytes()), &res); err != nil {
		t.Logf("probe round not run: %v: %s", err, strings.TrimSpace(errOut.String()))
		p.mu.Lock()
		p.result.ExecErrors++
		p.mu.Unlock()
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.result.Opened += res.Opened
	p.result.Failed += res.Failed
	p.result.Broken += res.Broken
	p.result.Errors = append(p.result.Errors, res.Errors...)
	if res.Failed+res.Broken > 0 {
		t.Logf("new connections failed at %s: %v", time.Now().UTC().Format(time.RFC3339), res.Errors)
	}
}

func (p *newConnProbes) stop() probeResult {
	p.once.Do(func() { close(p.done) })
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.result
}

func TestDeleteMeshReleasesPodsWithoutRestart(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	eventually(t, 60*time.Second, "pods captured", func() error { return captureOf(t, demoNS).complete() })
	before := podFingerprint(t, demoNS)
	mustKubectl(t, "delete", "ambientmesh", "default", "--wait=true", "--timeout=180s")
	defer func() {
		kubectl("apply", "-f", filepath.Join(repoRoot, "config/samples/mesh_v1alpha1_ambientmesh.yaml"))
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ztunnel", "--timeout=180s")
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ambient-node-agent", "--timeout=180s")
	}()
	eventually(t, 90*time.Second, "pods released", func() error {
		if n := captureOf(t, demoNS).captured; n != 0 {
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
