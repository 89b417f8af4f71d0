//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Faults of the cluster around the mesh (TestChaos): the API server and
// etcd restarted, the node agent killed mid-capture, the network between
// the workers cut, a waypoint replica SIGKILLed, and the CA away for longer
// than half a certificate lifetime.

// labSh runs test/lab/lab.sh with args.
func labSh(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(repoRoot, "test/lab/lab.sh"), args...).CombinedOutput()
	return string(out), err
}

func mustLabSh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := labSh(args...); err != nil {
		t.Fatalf("lab.sh %v: %v\n%s", args, err, out)
	}
}

// controlPlaneRestart: proc (kube-apiserver or etcd) is stopped and started
// again. The load runs from the host in the client pods' namespaces (the
// kubectl exec streams would break with the API server); the data plane
// does not depend on either, so nothing may be lost.
func controlPlaneRestart(t *testing.T, b chaosBudget, proc string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	r := chaosResult{Fault: proc + " stopped (SIGTERM) and started again (lab.sh restart)", Recovery: map[string]float64{}}
	b.load.direct = true
	r.Load = withLoad(t, b, 90*time.Second, streamsOf, func() {
		start := time.Now()
		mustLabSh(t, "restart", proc)
		r.Recovery["apiServerReadyAgain"] = time.Since(start).Seconds()
		// The manager may lose its leader lease meanwhile and restart.
		eventually(t, 120*time.Second, "manager available again", func() error {
			_, err := kubectl("-n", meshNS, "rollout", "status", "deploy/ambient-controller-manager", "--timeout=5s")
			return err
		})
		r.Recovery["managerAvailable"] = time.Since(start).Seconds()
	})
	if t.Failed() {
		return r
	}
	assertNothingLost(t, r.Load, all)
	r.Notes = append(r.Notes, "load run from the host in the client pods' network namespaces (lab.sh podexec), not through kubectl exec")
	return r
}

// netnsState is what a pod's network namespace holds: the mesh's
// redirection table, and ztunnel's in-pod listeners.
type netnsState struct {
	running, rules bool
	listening      []string // of 15001, 15006, 15008
}

var inpodPorts = []string{"15001", "15006", "15008"}

// podNetns inspects pod's namespace from the host, when its first
// container runs.
func podNetns(t *testing.T, ns, pod string) netnsState {
	t.Helper()
	out, _ := kubectl("get", "pod", "-n", ns, pod, "-o",
		`jsonpath={.spec.nodeName} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].state.running.startedAt}`)
	f := strings.Fields(out)
	if len(f) != 3 {
		return netnsState{}
	}
	p := &podExec{node: f[0], cid: f[1]}
	rules, err := p.cmd("nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		return netnsState{} // the container is gone again
	}
	ss, err := p.cmd("ss", "-ltnH").CombinedOutput()
	if err != nil {
		return netnsState{}
	}
	st := netnsState{running: true, rules: strings.Contains(string(rules), "table inet ambient")}
	for _, port := range inpodPorts {
		if strings.Contains(string(ss), ":"+port+" ") {
			st.listening = append(st.listening, port)
		}
	}
	return st
}

// nodeAgentMidCapture: a pod is created on nodeA and the node agent there
// is SIGKILLed right away, while the CNI plugin asks it to capture the
// pod. Sampled until the pod runs captured: whenever its container runs,
// its namespace must have both the redirection rules and ztunnel's
// listeners (captured) — rules without listeners is half-redirected
// (traffic black-holed), neither is running outside the mesh (fail open).
func nodeAgentMidCapture(t *testing.T, b chaosBudget, ns string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	const victim = "capture-victim"
	r := chaosResult{Fault: "SIGKILL to the node agent on " + nodeA + " just after a pod was created there", Recovery: map[string]float64{}}
	agent := nodeAgentOn(t, nodeA)
	if agent == nil {
		t.Fatalf("no ready node agent on %s", nodeA)
	}
	var samples, running, captured int
	r.Load = withLoad(t, b, 90*time.Second, streamsOf, func() {
		apply(t, ns, `apiVersion: v1
kind: Pod
metadata: {name: `+victim+`, labels: {app: `+victim+`}}
spec:
  nodeName: `+nodeA+`
  terminationGracePeriodSeconds: 2
  containers:
  - `+serverContainer+`
`)
		killed := time.Now()
		mustLabSh(t, "signal", nodeA, agent.cid, "SIGKILL")
		for deadline := killed.Add(120 * time.Second); ; time.Sleep(300 * time.Millisecond) {
			st := podNetns(t, ns, victim)
			samples++
			if st.running {
				running++
				switch {
				case st.rules && len(st.listening) == len(inpodPorts):
					captured++
				case st.rules:
					t.Errorf("%s runs half-redirected: redirection rules but ztunnel listens only on %v", victim, st.listening)
				default:
					t.Errorf("%s runs without redirection rules (listening on %v): not captured, not failed closed", victim, st.listening)
				}
			}
			if captured >= 3 || t.Failed() {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s not running captured %s after the kill (%d samples, %d running)", victim, time.Since(killed).Round(time.Second), samples, running)
				return
			}
		}
		r.Recovery["podRunningCaptured"] = time.Since(killed).Seconds()
		ip := strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, victim, "-o", "jsonpath={.status.podIP}"))
		eventually(t, 60*time.Second, victim+" served through the mesh", func() error {
			return fortioProbe(ns, "-qps", "10", "-c", "1", "-t", "200ms", "-payload-size", "0", "-timeout", "2s", "http://"+ip+":80/get")
		})
		r.Recovery["podServed"] = time.Since(killed).Seconds()
		eventually(t, 60*time.Second, "node agent ready again", func() error {
			if a := nodeAgentOn(t, nodeA); a == nil || a.cid == agent.cid {
				return fmt.Errorf("no new ready node agent on %s yet", nodeA)
			}
			return nil
		})
		r.Recovery["nodeAgentReadyAgain"] = time.Since(killed).Seconds()
	})
	if t.Failed() {
		return r
	}
	assertNothingLost(t, r.Load, all)
	events, _ := kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name="+victim+",reason=FailedCreatePodSandBox", "-o", "name")
	r.Notes = append(r.Notes, fmt.Sprintf("%s's namespace sampled %d times from the kill, %d with its container running, all %d of those captured (rules and ztunnel on %v); %d FailedCreatePodSandBox events (the CNI plugin refused the pod while the agent was away)",
		victim, samples, running, captured, inpodPorts, len(strings.Fields(events))))
	kubectl("delete", "pod", "-n", ns, victim, "--wait=false")
	return r
}

// nodeAgentOn is the ready node agent on node (nil if none).
func nodeAgentOn(t *testing.T, node string) *podExec {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app=ambient-node-agent", "--field-selector", "spec.nodeName="+node, "-o",
		`jsonpath={range .items[*]}{.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}{"\n"}{end}`)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) == 2 && f[1] == "true" {
			return &podExec{node: node, cid: f[0]}
		}
	}
	return nil
}

// partitionWorkers: every frame between the two workers is dropped on the
// lab bridge for 10 s. Paths that stay on nodeA lose nothing; cross-node
// requests and connections may fail, but cleanly: no request outlives the
// client's 5 s timeout, every connhold run ends on time with a report.
// The load addresses Services by IP (direct mode): by name, every new
// connection first asked the cluster DNS, which may sit on the other node
// (first lab run: same-node requests failed and one took 15.2 s, in DNS).
func partitionWorkers(t *testing.T, b chaosBudget, wpNS string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	const cut = 10 * time.Second
	r := chaosResult{Fault: fmt.Sprintf("every frame between %s and %s dropped on the lab bridge for %s", nodeA, nodeB, cut), Recovery: map[string]float64{}}
	wpOnB := false
	for _, p := range readyPods(t, wpNS, waypointSelector) {
		wpOnB = wpOnB || strings.Fields(p)[1] == nodeB
	}
	t.Cleanup(func() { labSh("partition", "off") })
	b.load.direct = true
	r.Load = withLoad(t, b, 60*time.Second, streamsOf, func() {
		mustLabSh(t, "partition", "on", nodeA, nodeB)
		time.Sleep(cut)
		mustLabSh(t, "partition", "off")
		healed := time.Now()
		for _, ns := range []string{"chaos-ztunnel", wpNS} {
			eventually(t, 60*time.Second, ns+": cross-node requests after the cut", func() error {
				return fortioProbe(ns, "-qps", "20", "-c", "1", "-t", "100ms", "-payload-size", "0", "-timeout", "1s", "-keepalive=false", "http://server-cross:8000/get")
			})
			r.Recovery[ns+"/crossNodeServedAfterHeal"] = time.Since(healed).Seconds()
		}
	})
	if t.Failed() {
		return r
	}
	untouched := func(name string) bool {
		return name == "ztunnel/same-node" || (name == "waypoint/same-node" && !wpOnB)
	}
	assertNothingLost(t, r.Load, untouched)
	const clientTimeout = 5.0
	for _, s := range r.Load.HTTP {
		if s.MaxSeconds > clientTimeout+1 {
			t.Errorf("%s: a request took %.1f s, past the client's %.0f s timeout", s.Name, s.MaxSeconds, clientTimeout)
		}
	}
	// connhold: hold time, plus its 5 s ping timeout, plus kubectl exec.
	limit := (withLoadHold(b, 60*time.Second) + 5*time.Second + 20*time.Second).Seconds()
	for _, h := range r.Load.Hold {
		res := h.Result
		switch {
		case h.Err != "":
			t.Errorf("%s: %s", h.Name, h.Err)
		case h.Seconds > limit:
			t.Errorf("%s: connhold ran %.0f s, past its %.0f s", h.Name, h.Seconds, limit)
		case res.Survived+res.Broken != res.Opened:
			t.Errorf("%s: %d opened but %d survived and %d broke", h.Name, res.Opened, res.Survived, res.Broken)
		}
	}
	r.Notes = append(r.Notes, fmt.Sprintf("waypoint replica on %s: %v; requests' client timeout 5 s (slowest per stream in results.json), connhold ping timeout 5 s; hold %s", nodeB, wpOnB, withLoadHold(b, 60*time.Second)))
	return r
}

// withLoadHold is how long withLoad holds the connections for window.
func withLoadHold(b chaosBudget, window time.Duration) time.Duration { return window + 3*b.settle }

// waypointSigkill: one of 2 waypoint replicas gets SIGKILL (no drain; the
// kubelet restarts its container).
func waypointSigkill(t *testing.T, b chaosBudget, ns string, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	r := chaosResult{Fault: "SIGKILL to one of 2 waypoint replicas' container (no drain)", Recovery: map[string]float64{}}
	// A rollout in progress (the manager re-renders the waypoint when it
	// returns, as after ca-unreachable) would delete the chosen pod.
	mustKubectl(t, "-n", ns, "rollout", "status", "deploy/waypoint", "--timeout=180s")
	// The old replicas of that rollout stay listed while they drain.
	var v []string
	eventually(t, 3*time.Minute, "2 live, ready waypoint replicas and no other", func() error {
		live, err := liveReadyWaypoints(ns)
		if err != nil {
			return err
		}
		if len(live) != 2 {
			return fmt.Errorf("live ready replicas: %v", live)
		}
		v = live[0]
		return nil
	})
	r.Load = withLoad(t, b, 40*time.Second, streamsOf, func() {
		killed := time.Now()
		mustLabSh(t, "signal", v[1], v[2], "SIGKILL")
		eventually(t, 90*time.Second, "killed waypoint replica restarted and ready", func() error {
			c, _ := kubectl("get", "pod", "-n", ns, v[0], "-o", `jsonpath={.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}`)
			if f := strings.Fields(c); len(f) != 2 || f[0] == v[2] || f[1] != "true" {
				return fmt.Errorf("container %q", c)
			}
			return nil
		})
		r.Recovery["replicaReadyAgain"] = time.Since(killed).Seconds()
	})
	if t.Failed() {
		return r
	}
	// Connections through the killed replica die with it (nothing can
	// carry them on); the others must survive.
	assertNoRequestLostOrConnOffWaypoint(t, r.Load)
	r.Notes = append(r.Notes, fmt.Sprintf("killed %s on %s; long-lived connections through it break with it (reported)", v[0], v[1]))
	return r
}

// liveReadyWaypoints lists the waypoint pods of ns that are ready and not
// being deleted, each as name, node, container ID; an error while any pod
// is still terminating (its connections would blur the figures).
func liveReadyWaypoints(ns string) ([][]string, error) {
	out, err := kubectl("get", "pods", "-n", ns, "-l", waypointSelector, "-o",
		`jsonpath={range .items[*]}{.metadata.name}{"\t"}{.spec.nodeName}{"\t"}{.status.containerStatuses[0].containerID}{"\t"}{.status.containerStatuses[0].ready}{"\t"}{.metadata.deletionTimestamp}{"\n"}{end}`)
	if err != nil {
		return nil, err
	}
	var live [][]string
	// Not TrimSpace: the last field (deletionTimestamp) is empty for a
	// live pod, and trimming would drop its tab.
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		f := strings.Split(line, "\t")
		switch {
		case len(f) != 5:
			return nil, fmt.Errorf("unexpected line %q", line)
		case f[4] != "":
			return nil, fmt.Errorf("%s still terminating", f[0])
		case f[3] == "true" && f[2] != "":
			live = append(live, f[:3])
		}
	}
	return live, nil
}

// caUnreachable (CHAOS=full): workload certificates made short-lived
// (10 min, the smallest allowed; the CA backdates them 2 min) and the
// ztunnels restarted to hold such certificates; then the manager, which is
// the CA, is kept away for 5.5 min, longer than half the 10 min lifetime
// and across every certificate's renewal time (half its validity). They
// must keep being served until expiry (no request fails, no connection
// breaks), and every one must be renewed once the CA is back, before it
// expires.
func caUnreachable(t *testing.T, b chaosBudget, streamsOf func() ([]*httpStream, []*holdStream)) chaosResult {
	const ttl, away, skew = 10 * time.Minute, 5*time.Minute + 30*time.Second, 2 * time.Minute
	const deploy = "deploy/ambient-controller-manager"
	r := chaosResult{Fault: fmt.Sprintf("CA (the manager) unreachable for %s with %s workload certificates", away, ttl), Recovery: map[string]float64{}}
	mesh := strings.TrimSpace(mustKubectl(t, "get", "ambientmeshes", "-o", "jsonpath={.items[0].metadata.name}"))
	old := strings.TrimSpace(mustKubectl(t, "get", "ambientmesh", mesh, "-o", "jsonpath={.spec.ca.workloadCertTTL}"))
	mustKubectl(t, "patch", "ambientmesh", mesh, "--type=merge", "-p", fmt.Sprintf(`{"spec":{"ca":{"workloadCertTTL":"%s"}}}`, ttl))
	t.Cleanup(func() {
		if old == "" {
			kubectl("patch", "ambientmesh", mesh, "--type=json", "-p", `[{"op":"remove","path":"/spec/ca/workloadCertTTL"}]`)
		} else {
			kubectl("patch", "ambientmesh", mesh, "--type=merge", "-p", fmt.Sprintf(`{"spec":{"ca":{"workloadCertTTL":"%s"}}}`, old))
		}
	})
	// Fresh ztunnels request fresh (short) certificates.
	mustKubectl(t, "-n", meshNS, "rollout", "restart", "daemonset/ztunnel")
	mustKubectl(t, "-n", meshNS, "rollout", "status", "daemonset/ztunnel", "--timeout=180s")
	var before []heldCert
	eventually(t, 120*time.Second, "ztunnels hold short-lived certificates", func() error {
		certs, err := ztunnelCerts(t)
		if err != nil {
			return err
		}
		for _, c := range certs {
			if life := c.notAfter.Sub(c.notBefore); life > ttl+skew+time.Minute {
				return fmt.Errorf("%s on %s: %s certificate", c.identity, c.node, life)
			}
		}
		before = certs
		return nil
	})
	replicas := strings.TrimSpace(mustKubectl(t, "-n", meshNS, "get", deploy, "-o", "jsonpath={.spec.replicas}"))
	r.Load = withLoad(t, b, away+90*time.Second, streamsOf, func() {
		mustKubectl(t, "-n", meshNS, "scale", deploy, "--replicas=0")
		mustKubectl(t, "-n", meshNS, "delete", "pod", "-l", "app.kubernetes.io/name=ambient-manager", "--grace-period=0", "--force", "--wait=false")
		down := time.Now()
		time.Sleep(away)
		for _, c := range before { // the fault must cover every renewal
			if half := c.notBefore.Add(c.notAfter.Sub(c.notBefore) / 2); half.Before(down) || half.After(time.Now()) {
				t.Errorf("%s on %s: renewal due at %s, outside the CA's absence (%s-%s)", c.identity, c.node,
					half.Format(time.TimeOnly), down.Format(time.TimeOnly), time.Now().Format(time.TimeOnly))
			}
		}
		mustKubectl(t, "-n", meshNS, "scale", deploy, "--replicas="+replicas)
		mustKubectl(t, "-n", meshNS, "rollout", "status", deploy, "--timeout=120s")
		back := time.Now()
		eventually(t, 3*time.Minute, "every certificate renewed after the CA's return", func() error {
			certs, err := ztunnelCerts(t)
			if err != nil {
				return err
			}
			for _, c := range certs {
				if c.notBefore.Before(back.Add(-skew - 30*time.Second)) { // NotBefore is backdated by skew
					return fmt.Errorf("%s on %s still the certificate valid from %s", c.identity, c.node, c.notBefore.Format(time.TimeOnly))
				}
				if time.Now().After(c.notAfter) {
					return fmt.Errorf("%s on %s: certificate expired at %s", c.identity, c.node, c.notAfter.Format(time.TimeOnly))
				}
			}
			return nil
		})
		r.Recovery["certificatesRenewedAfterCAReady"] = time.Since(back).Seconds()
	})
	if t.Failed() {
		return r
	}
	assertNothingLost(t, r.Load, all)
	r.Notes = append(r.Notes, fmt.Sprintf("%d ztunnel certificates of %s (plus the CA's %s backdating), every renewal due while the CA was away %s; the waypoints keep their own (longer) certificates", len(before), ttl, skew, away))
	return r
}

type heldCert struct {
	node, identity      string
	notBefore, notAfter time.Time
}

// ztunnelCerts lists every workload certificate the ztunnels hold (their
// admin /certificates, read in their own namespace).
func ztunnelCerts(t *testing.T) ([]heldCert, error) {
	t.Helper()
	var all []heldCert
	for _, node := range []string{nodeA, nodeB} {
		pod, cid, _ := readyZtunnelOn(t, node)
		if pod == "" {
			return nil, fmt.Errorf("no ready ztunnel on %s", node)
		}
		out, err := (&podExec{node: node, cid: cid}).cmd("curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/certificates").Output()
		if err != nil {
			return nil, fmt.Errorf("%s certificates: %v", pod, err)
		}
		var certs []struct{ Identity, Type, NotBefore, NotAfter string }
		if err := json.Unmarshal(out, &certs); err != nil {
			return nil, fmt.Errorf("%s certificates: %v: %.200s", pod, err, out)
		}
		for _, c := range certs {
			if c.Type != "Cert Chain" {
				continue
			}
			nb, err1 := time.Parse(time.RFC3339, c.NotBefore)
			na, err2 := time.Parse(time.RFC3339, c.NotAfter)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("%s: %s: times %q %q", pod, c.Identity, c.NotBefore, c.NotAfter)
			}
			all = append(all, heldCert{node: node, identity: c.Identity, notBefore: nb, notAfter: na})
		}
	}
	if len(all) == 0 {
		return nil, fmt.Errorf("no certificate held yet")
	}
	return all, nil
}
