//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestChaos is `make chaos` (CHAOS=full) and, with short budgets, its smoke
// in the end-to-end stage: steady load (HTTP on a new connection per
// request, same-node and cross-node, through ztunnel only and through a
// waypoint with 2 replicas, plus long-lived connections echoing a byte
// pattern) while faults happen one after another, each followed by its
// check. Every scenario reports requests sent / failed, connections held /
// broken, bytes verified and recovery times (bin/chaos/results.json and
// results.md; docs/reliability.md keeps a recorded run).
func TestChaos(t *testing.T) {
	requireLoadTools(t)
	full := os.Getenv("CHAOS") == "full"
	b := chaosBudget{managerDown: 20 * time.Second, settle: 5 * time.Second, load: loadConfig{qps: 10, chunk: 5 * time.Second, conns: 5}}
	if full {
		b = chaosBudget{managerDown: 2 * time.Minute, settle: 10 * time.Second, load: loadConfig{qps: 20, chunk: 10 * time.Second, conns: 10}}
	}
	const zt, wp = "chaos-ztunnel", "chaos-waypoint"
	deployLoadApps(t, zt, 0)
	deployLoadApps(t, wp, 2)
	streamsOf := func() ([]*httpStream, []*holdStream) {
		h1, l1 := streams(zt, "ztunnel")
		h2, l2 := streams(wp, "waypoint")
		return append(h1, h2...), append(l1, l2...)
	}
	// CHAOS_SCENARIOS (a regexp) runs only the scenarios it matches.
	only, err := regexp.Compile(os.Getenv("CHAOS_SCENARIOS"))
	if err != nil {
		t.Fatalf("CHAOS_SCENARIOS: %v", err)
	}
	var report []chaosResult
	defer func() { writeChaosReport(t, full, b, report) }()
	for _, sc := range []struct {
		name     string
		fullOnly bool // make chaos only: beyond the end-to-end stage's CI budget
		run      func(t *testing.T, b chaosBudget) chaosResult
	}{
		{"manager-down", false, func(t *testing.T, b chaosBudget) chaosResult { return managerDown(t, b, zt, streamsOf) }},
		{"ztunnel-sigkill", false, func(t *testing.T, b chaosBudget) chaosResult { return ztunnelKill(t, b, streamsOf) }},
		{"waypoint-replica-killed", false, func(t *testing.T, b chaosBudget) chaosResult { return waypointKill(t, b, wp, streamsOf) }},
		{"kube-apiserver-restart", false, func(t *testing.T, b chaosBudget) chaosResult {
			return controlPlaneRestart(t, b, "kube-apiserver", streamsOf)
		}},
		{"etcd-restart", true, func(t *testing.T, b chaosBudget) chaosResult { return controlPlaneRestart(t, b, "etcd", streamsOf) }},
		{"node-agent-killed-mid-capture", false, func(t *testing.T, b chaosBudget) chaosResult { return nodeAgentMidCapture(t, b, zt, streamsOf) }},
		{"workers-partitioned", true, func(t *testing.T, b chaosBudget) chaosResult { return partitionWorkers(t, b, wp, streamsOf) }},
		{"ca-unreachable", true, func(t *testing.T, b chaosBudget) chaosResult { return caUnreachable(t, b, streamsOf) }},
		{"waypoint-replica-sigkill", true, func(t *testing.T, b chaosBudget) chaosResult { return waypointSigkill(t, b, wp, streamsOf) }},
	} {
		if (sc.fullOnly && !full) || !only.MatchString(sc.name) {
			continue
		}
		if !t.Run(sc.name, func(t *testing.T) {
			r := sc.run(t, b)
			r.Scenario = sc.name
			report = append(report, r)
			logChaos(t, r)
		}) {
			break // later scenarios would start from a broken state
		}
	}
}

type chaosBudget struct {
	managerDown time.Duration // how long the manager stays down
	settle      time.Duration // load before a fault and after recovery
	load        loadConfig
}

// chaosResult is one scenario's numbers.
type chaosResult struct {
	Scenario string             `json:"scenario"`
	Fault    string             `json:"fault"`
	Load     *load              `json:"load"`
	Recovery map[string]float64 `json:"recoverySeconds,omitempty"`
	Notes    []string           `json:"notes,omitempty"`
}

// withLoad runs fault under the full load: the connections are held for
// settle + window + settle, and the fault must be over before they end.
func withLoad(t *testing.T, b chaosBudget, window time.Duration, streamsOf func() ([]*httpStream, []*holdStream), fault func()) *load {
	t.Helper()
	cfg := b.load
	cfg.hold = window + 3*b.settle
	http, hold := streamsOf()
	start := time.Now()
	l := startLoad(t, cfg, http, hold)
	defer l.finish()
	time.Sleep(b.settle)
	fault()
	if left := cfg.hold - time.Since(start); left < b.settle/2 {
		t.Errorf("the fault took too long: the long-lived connections ended %s after it (budget too small)", left)
	}
	time.Sleep(b.settle)
	l.finish()
	return l
}

// assertNothingLost: every request succeeded and every held connection
// survived with its bytes verified, on the streams ok selects.
func assertNothingLost(t *testing.T, l *load, ok func(path string) bool) {
	t.Helper()
	for _, s := range l.HTTP {
		if !ok(s.Name) {
			continue
		}
		if s.Sent == 0 {
			t.Errorf("%s: no request was sent (%d chunks not run)", s.Name, s.NotRun)
		}
		if s.Failed > 0 {
			t.Errorf("%s: %d of %d requests failed: %v", s.Name, s.Failed, s.Sent, s.Codes)
		}
	}
	for _, h := range l.Hold {
		if !ok(h.Name) {
			continue
		}
		r := h.Result
		switch {
		case h.Err != "":
			t.Errorf("%s: %s", h.Name, h.Err)
		case r.Opened != r.Survived || r.Broken > 0 || r.Failed > 0:
			t.Errorf("%s: %d connections opened, %d failed to open, %d broken: %v", h.Name, r.Opened, r.Failed, r.Broken, r.Errors[:min(len(r.Errors), 5)])
		case r.BytesVerified == 0:
			t.Errorf("%s: no byte verified", h.Name)
		}
	}
}

func all(string) bool { return true }

// managerDown: the manager (control plane and CA) is killed and kept down;
// the proxies work from their last state. A pod created meanwhile must be
// served soon after the manager returns (reported).
func managerDown(t *testing.T, b chaosBudget, ns string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	const deploy = "deploy/ambient-controller-manager"
	r := chaosResult{Fault: fmt.Sprintf("manager scaled to 0 and its pod force-deleted, kept down %s", b.managerDown), Recovery: map[string]float64{}}
	// The replicas to restore (the manager runs more than one: HA).
	replicas := strings.TrimSpace(mustKubectl(t, "-n", meshNS, "get", deploy, "-o", "jsonpath={.spec.replicas}"))
	r.Load = withLoad(t, b, b.managerDown+60*time.Second, streamsOf, func() {
		mustKubectl(t, "-n", meshNS, "scale", deploy, "--replicas=0")
		mustKubectl(t, "-n", meshNS, "delete", "pod", "-l", "app.kubernetes.io/name=ambient-manager", "--grace-period=0", "--force", "--wait=false")
		eventually(t, 60*time.Second, "manager pod gone", func() error {
			if out := mustKubectl(t, "-n", meshNS, "get", "pods", "-l", "app.kubernetes.io/name=ambient-manager", "-o", "name"); strings.TrimSpace(out) != "" {
				return fmt.Errorf("still there: %s", out)
			}
			return nil
		})
		// A new workload while the control plane is away: captured by the
		// node agent, unknown to the proxies until the manager returns.
		apply(t, ns, `apiVersion: v1
kind: Pod
metadata: {name: late, labels: {app: late}}
spec:
  nodeName: `+nodeB+`
  terminationGracePeriodSeconds: 2
  containers:
  - `+serverContainer+`
`)
		time.Sleep(b.managerDown)
		mustKubectl(t, "-n", meshNS, "scale", deploy, "--replicas="+replicas)
		mustKubectl(t, "-n", meshNS, "rollout", "status", deploy, "--timeout=120s")
		back := time.Now()
		// The late pod, by its address (no Service: nothing else to wait for).
		ip := strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, "late", "-o", "jsonpath={.status.podIP}"))
		eventually(t, 120*time.Second, "pod created while the manager was down is served", func() error {
			return fortioProbe(ns, "-qps", "10", "-c", "1", "-t", "200ms", "-payload-size", "0", "-timeout", "2s", "http://"+ip+":80/get")
		})
		r.Recovery["latePodServedAfterManagerReady"] = time.Since(back).Seconds()
	})
	if t.Failed() {
		return r
	}
	assertNothingLost(t, r.Load, all)
	r.Notes = append(r.Notes, "latePodServedAfterManagerReady: from the manager's rollout reporting ready (leader election included) until a request to the pod created while it was down succeeded; probes about 1 s apart (kubectl exec); the pod uses a service account whose certificate the node already had")
	kubectl("delete", "pod", "-n", ns, "late", "--wait=false")
	return r
}

// ztunnelKill: the ztunnel on nodeB gets SIGKILL (containerd kills its
// task; the kubelet restarts it). Streams that never touch nodeB must lose
// nothing; the time until cross-node requests work again is reported.
func ztunnelKill(t *testing.T, b chaosBudget, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	r := chaosResult{Fault: "SIGKILL to the ztunnel container on " + nodeB, Recovery: map[string]float64{}}
	pod, cid := ztunnelOn(t, nodeB)
	wpNodes := map[string]bool{}
	for _, p := range readyPods(t, "chaos-waypoint", waypointSelector) {
		wpNodes[strings.Fields(p)[1]] = true
	}
	r.Load = withLoad(t, b, 30*time.Second, streamsOf, func() {
		killed := time.Now()
		if out, err := exec.Command(filepath.Join(repoRoot, "test/lab/lab.sh"), "signal", nodeB, cid, "SIGKILL").CombinedOutput(); err != nil {
			t.Fatalf("SIGKILL ztunnel %s: %v\n%s", pod, err, out)
		}
		// Requests to the node again: a fresh connection each probe.
		eventually(t, 60*time.Second, "cross-node requests after the kill", func() error {
			return fortioProbe("chaos-ztunnel", "-qps", "20", "-c", "1", "-t", "100ms", "-payload-size", "0", "-timeout", "1s", "-keepalive=false", "http://server-cross:8000/get")
		})
		r.Recovery["crossNodeRequestsServedAgain"] = time.Since(killed).Seconds()
		eventually(t, 60*time.Second, "ztunnel on "+nodeB+" ready again", func() error {
			pod, c, out := readyZtunnelOn(t, nodeB)
			switch {
			case pod == "":
				return fmt.Errorf("no ready ztunnel yet: %s", out)
			case c == cid:
				return fmt.Errorf("container %s still the current one", cid)
			}
			return nil
		})
		r.Recovery["ztunnelReadyAgain"] = time.Since(killed).Seconds()
	})
	if t.Failed() {
		return r
	}
	// Only streams that never cross nodeB must be untouched: the same-node
	// ztunnel path, and the same-node waypoint path when no waypoint
	// replica runs on nodeB.
	untouched := func(name string) bool {
		if strings.HasPrefix(name, "ztunnel/") {
			return strings.HasSuffix(name, "same-node")
		}
		return strings.HasSuffix(name, "same-node") && !wpNodes[nodeB]
	}
	assertNothingLost(t, r.Load, untouched)
	r.Notes = append(r.Notes, fmt.Sprintf("waypoint replicas on %v; recovery measured by probes of ~0.5 s (kubectl exec)", keys(wpNodes)))
	return r
}

// ztunnelOn returns the Ready ztunnel pod on node and its container id.
func ztunnelOn(t *testing.T, node string) (pod, cid string) {
	t.Helper()
	pod, cid, out := readyZtunnelOn(t, node)
	if pod == "" {
		t.Fatalf("no ready ztunnel on %s: %s", node, out)
	}
	return pod, cid
}

// readyZtunnelOn is the ready ztunnel pod on node and its container, or
// empty names (and what kubectl said) while there is none.
func readyZtunnelOn(t *testing.T, node string) (pod, cid, out string) {
	t.Helper()
	out = mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app=ztunnel", "--field-selector", "spec.nodeName="+node, "-o",
		`jsonpath={range .items[*]}{.metadata.name} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}{"\n"}{end}`)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) == 3 && f[2] == "true" {
			return f[0], f[1], out
		}
	}
	return "", "", out
}

// waypointKill: one of the two waypoint replicas is deleted (SIGTERM, the
// waypoint drains); nothing may fail on any stream.
func waypointKill(t *testing.T, b chaosBudget, ns string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	r := chaosResult{Fault: "one of 2 waypoint replicas deleted (graceful: SIGTERM and drain)", Recovery: map[string]float64{}}
	pods := readyPods(t, ns, waypointSelector)
	if len(pods) != 2 {
		t.Fatalf("want 2 ready waypoint replicas, have %v", pods)
	}
	victim := strings.Fields(pods[0])[0]
	r.Load = withLoad(t, b, 50*time.Second, streamsOf, func() {
		killed := time.Now()
		mustKubectl(t, "delete", "pod", "-n", ns, victim, "--wait=false")
		eventually(t, 90*time.Second, "2 waypoint replicas ready again", func() error {
			if n := len(readyPods(t, ns, waypointSelector)); n != 2 {
				return fmt.Errorf("%d ready", n)
			}
			return nil
		})
		r.Recovery["replacementReady"] = time.Since(killed).Seconds()
		eventually(t, 60*time.Second, "old replica gone", func() error {
			if _, err := kubectl("get", "pod", "-n", ns, victim); err == nil {
				return fmt.Errorf("%s still terminating", victim)
			}
			return nil
		})
		r.Recovery["oldReplicaGone"] = time.Since(killed).Seconds()
	})
	if t.Failed() {
		return r
	}
	// No request may fail. Long-lived connections through the deleted
	// replica end with its drain grace (30 s; they are held longer here):
	// they are reported, those that never cross a waypoint must all survive.
	assertNoRequestLostOrConnOffWaypoint(t, r.Load)
	r.Notes = append(r.Notes, "long-lived connections through the deleted replica are closed when its 30 s drain grace ends (they are held for the whole scenario)")
	return r
}

// assertNoRequestLostOrConnOffWaypoint: no request failed on any stream,
// and every long-lived connection that does not cross a waypoint survived
// (those through a waypoint replica that went away may end with it).
func assertNoRequestLostOrConnOffWaypoint(t *testing.T, l *load) {
	t.Helper()
	for _, s := range l.HTTP {
		if s.Failed > 0 || s.Sent == 0 {
			t.Errorf("%s: %d of %d requests failed: %v", s.Name, s.Failed, s.Sent, s.Codes)
		}
	}
	assertNothingLost(t, &load{Hold: l.Hold}, func(name string) bool { return strings.HasPrefix(name, "ztunnel/") })
}

func keys(m map[string]bool) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	return k
}

func logChaos(t *testing.T, r chaosResult) {
	t.Helper()
	t.Logf("%s: %s", r.Scenario, r.Fault)
	if r.Load == nil {
		return
	}
	for _, s := range r.Load.HTTP {
		t.Logf("  http %-22s sent %6d failed %4d codes %v", s.Name, s.Sent, s.Failed, s.Codes)
	}
	for _, h := range r.Load.Hold {
		t.Logf("  conn %-22s held %3d broken %3d bytes verified %8d %s", h.Name, h.Result.Opened, h.Result.Broken, h.Result.BytesVerified, h.Err)
	}
	for k, v := range r.Recovery {
		t.Logf("  recovery %s: %.1f s", k, v)
	}
}

// writeChaosReport writes bin/chaos/results.json and results.md.
func writeChaosReport(t *testing.T, full bool, b chaosBudget, rs []chaosResult) {
	out := filepath.Join(repoRoot, "bin/chaos")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Error(err)
		return
	}
	loadavg, _ := os.ReadFile("/proc/loadavg")
	doc := map[string]any{"time": time.Now().UTC().Format(time.RFC3339), "full": full, "loadavg": strings.TrimSpace(string(loadavg)),
		"load":      fmt.Sprintf("per HTTP stream %d rps over 2 connections, a new connection per request; %d long-lived connections per hold stream, a 256-byte pattern echoed every 200 ms", b.load.qps, b.load.conns),
		"scenarios": rs}
	js, _ := json.MarshalIndent(doc, "", "  ")
	_ = os.WriteFile(filepath.Join(out, "results.json"), js, 0o644)
	writeArtifact(t, "chaos-results.json", js)
	var md strings.Builder
	fmt.Fprintf(&md, "chaos %s (full=%v), load average %s; %s\n\n", doc["time"], full, doc["loadavg"], doc["load"])
	fmt.Fprintln(&md, "| scenario | stream | requests sent / failed | connections held / broken | bytes verified |")
	fmt.Fprintln(&md, "|---|---|---|---|---|")
	for _, r := range rs {
		if r.Load == nil {
			continue
		}
		for i, s := range r.Load.HTTP {
			h := r.Load.Hold[i]
			fmt.Fprintf(&md, "| %s | %s | %d / %d | %d / %d | %d |\n", r.Scenario, s.Name, s.Sent, s.Failed, h.Result.Opened, h.Result.Broken, h.Result.BytesVerified)
		}
	}
	fmt.Fprintln(&md)
	for _, r := range rs {
		fmt.Fprintf(&md, "- %s: %s.", r.Scenario, r.Fault)
		for k, v := range r.Recovery {
			fmt.Fprintf(&md, " %s %.1f s.", k, v)
		}
		fmt.Fprintln(&md)
	}
	_ = os.WriteFile(filepath.Join(out, "results.md"), []byte(md.String()), 0o644)
}
