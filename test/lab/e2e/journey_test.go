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
	"sync"
	"testing"
	"time"
)

// Tests run in source order; each scenario sets up what it needs so a
// failure or skip in one does not hide the others.

const title = "<title>httpbin.org</title>"

func TestLabNodesReady(t *testing.T) {
	out := mustKubectl(t, "get", "nodes", "-o", `jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	ready := strings.Count(out, "=True")
	if ready < 2 {
		t.Fatalf("want at least 2 Ready worker nodes, got:\n%s", out)
	}
	mustKubectl(t, "-n", "kube-system", "wait", "--for=condition=available", "deploy/coredns", "--timeout=60s")
}

// placement pins a client and a server on each of two nodes, for same-node
// and cross-node paths.
const placement = `
apiVersion: v1
kind: ServiceAccount
metadata: {name: client}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server}
---
apiVersion: v1
kind: Pod
metadata: {name: client-w1, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeSelector: {ambient.lab/node: w1}
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: server-w1, labels: {app: server}}
spec:
  serviceAccountName: server
  nodeSelector: {ambient.lab/node: w1}
  terminationGracePeriodSeconds: 1
  containers: [{name: s, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}}]
---
apiVersion: v1
kind: Pod
metadata: {name: server-w2, labels: {app: server}}
spec:
  serviceAccountName: server
  nodeSelector: {ambient.lab/node: w2}
  terminationGracePeriodSeconds: 1
  containers: [{name: s, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}}]
`

func deployPlacement(t *testing.T, ns string, labels ...string) map[string]string {
	t.Helper()
	recreateNamespace(t, ns, labels...)
	apply(t, ns, placement)
	mustKubectl(t, "wait", "-n", ns, "--for=condition=ready", "pod", "--all", "--timeout=90s")
	ips := map[string]string{}
	for _, p := range []string{"server-w1", "server-w2"} {
		ips[p] = strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, p, "-o", "jsonpath={.status.podIP}"))
	}
	return ips
}

// checkPaths asserts same-node and cross-node requests from client-w1.
func checkPaths(t *testing.T, ns string, ips map[string]string) {
	t.Helper()
	for _, tc := range []struct{ name, server string }{{"same node", "server-w1"}, {"cross node", "server-w2"}} {
		eventually(t, 30*time.Second, tc.name, func() error {
			out, code := curl(t, ns, "client-w1", "http://"+ips[tc.server]+"/hostname")
			if code != 0 || strings.TrimSpace(out) != tc.server {
				return fmt.Errorf("curl exit %d, answer %q", code, out)
			}
			return nil
		})
	}
}

func TestSameAndCrossNodeWithoutMesh(t *testing.T) {
	ns := "e2e-plain"
	ips := deployPlacement(t, ns)
	checkPaths(t, ns, ips)
	kubectl("delete", "ns", ns, "--wait=false")
}

func TestSameAndCrossNodeInMesh(t *testing.T) {
	requireMesh(t)
	ns := "e2e-nodes"
	ips := deployPlacement(t, ns, "istio.io/dataplane-mode=ambient")
	eventually(t, 60*time.Second, "pods captured", func() error {
		c := captureOf(t, ns)
		if c.live != 3 {
			return fmt.Errorf("%d live pods, want 3", c.live)
		}
		return c.complete()
	})
	checkPaths(t, ns, ips)
	// The cross-node request went through HBONE to the other node's pod.
	logs := ztunnelLogs(t)
	if !strings.Contains(logs, ips["server-w2"]+":80") {
		t.Errorf("ztunnel logs do not mention the cross-node destination %s:80", ips["server-w2"])
	}
	// Through ztunnel, the server still sees the client's own address (the
	// node agent installs source preservation by default).
	client := strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, "client-w1", "-o", "jsonpath={.status.podIP}"))
	for _, server := range []string{"server-w1", "server-w2"} {
		out, code := curl(t, ns, "client-w1", "http://"+ips[server]+"/ip")
		var got struct{ Origin string }
		if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || got.Origin != client {
			t.Errorf("%s saw the request from %q (curl exit %d, %q), want the client's address %s", server, got.Origin, code, out, client)
		}
	}
}

var journeyOnce sync.Once

// deployJourney installs the seeds' apps (httpbin, sleep x2, notsleep) once.
func deployJourney(t *testing.T) {
	t.Helper()
	journeyOnce.Do(func() {
		recreateNamespace(t, demoNS)
		for _, f := range []string{"httpbin", "sleep", "notsleep"} {
			applyFile(t, demoNS, "test/lab/manifests/apps/"+f+".yaml")
		}
		mustKubectl(t, "scale", "deployment", "sleep", "--replicas=2", "-n", demoNS)
		waitAvailable(t, demoNS)
	})
}

func TestJourneyCurlBeforeMesh(t *testing.T) {
	deployJourney(t)
	// "Available" pods are not yet endpoints kube-proxy has programmed: until
	// it syncs, the Service's address refuses connections (curl exit 7).
	eventually(t, 30*time.Second, "curl httpbin:8000", func() error {
		out, code := curl(t, demoNS, "deploy/sleep", "httpbin:8000")
		if code != 0 || !strings.Contains(out, title) {
			return fmt.Errorf("curl exit %d, page %q", code, out)
		}
		return nil
	})
}

func TestJourneyLabelNamespaceWithoutRestart(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	before := podFingerprint(t, demoNS)
	mustKubectl(t, "label", "namespace", demoNS, "istio.io/dataplane-mode=ambient", "--overwrite")
	eventually(t, 60*time.Second, "every pod annotated ambient.istio.io/redirection=enabled", func() error { return captureOf(t, demoNS).complete() })
	if after := podFingerprint(t, demoNS); after != before {
		t.Fatalf("pods restarted or replaced when enabling ambient:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	eventually(t, 30*time.Second, "curl in ambient", func() error {
		out, code := curl(t, demoNS, "deploy/sleep", "httpbin:8000")
		if code != 0 || !strings.Contains(out, title) {
			return fmt.Errorf("curl exit %d", code)
		}
		return nil
	})
}

func TestJourneyZtunnelLogs(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	if _, code := curl(t, demoNS, "deploy/sleep", "-I", "--repeat", "10", "http://httpbin:8000/"); code != 0 {
		t.Fatalf("curl exit %d", code)
	}
	logs := ztunnelLogs(t)
	if !regexp.MustCompile(`outbound\{.*\}.*(proxying to|proxy to) [0-9.]+:80`).MatchString(logs) {
		t.Errorf("no outbound 'proxying to <ip>:80' line in ztunnel logs")
	}
	if !regexp.MustCompile(`inbound\{.*peer_id=spiffe://cluster.local/ns/`+demoNS+`/sa/sleep\}.*got CONNECT request to [0-9.]+:80`).MatchString(logs) &&
		!strings.Contains(logs, "node local fast path") {
		t.Errorf("no inbound CONNECT (or node-local fast path) line for the sleep identity in ztunnel logs")
	}
}

func TestJourneyProxyConfig(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	zt := strings.TrimSpace(mustKubectl(t, "get", "pods", "-n", meshNS, "-l", "app=ztunnel", "-o", "jsonpath={.items[0].metadata.name}"))
	bin := filepath.Join(repoRoot, "bin/ambientctl")
	run := func(args ...string) string {
		cmd := exec.Command(bin, append([]string{"--kubeconfig", kubeconfig}, args...)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("ambientctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	eventually(t, 30*time.Second, "workloads listed", func() error {
		wl := run("proxy-config", "workloads", zt+"."+meshNS)
		// IP: the pod's addresses, IPv4 first (both families in a dual-stack lab).
		if !regexp.MustCompile(`(?m)^httpbin-\S+\s+` + demoNS + `\s+[0-9.]+(,[0-9a-f:]+)?\s+\S+\s+None\s+HBONE`).MatchString(wl) {
			return fmt.Errorf("httpbin not listed as HBONE:\n%s", wl)
		}
		return nil
	})
	sec := run("proxy-config", "secrets", zt+"."+meshNS)
	if !strings.Contains(sec, "spiffe://cluster.local/ns/") || !strings.Contains(sec, "Cert Chain") {
		t.Errorf("no workload certificate in secrets:\n%s", sec)
	}
	var all map[string]json.RawMessage
	if err := json.Unmarshal([]byte(run("proxy-config", "all", zt+"."+meshNS, "-o", "json")), &all); err != nil || all["workloads"] == nil {
		t.Errorf("proxy-config all -o json: %v", err)
	}
}

func TestJourneyRoundRobin(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	mustKubectl(t, "-n", demoNS, "scale", "deployment", "httpbin", "--replicas=2")
	mustKubectl(t, "-n", demoNS, "wait", "--for=condition=available", "deployment/httpbin", "--timeout=60s")
	eventually(t, 30*time.Second, "both replicas answer", func() error {
		out, code := curl(t, demoNS, "deploy/sleep", "--repeat", "10", "http://httpbin:8000/hostname")
		seen := map[string]int{}
		for _, h := range strings.Fields(out) {
			seen[h]++
		}
		if code != 0 || len(seen) != 2 {
			return fmt.Errorf("curl exit %d, answers %v", code, seen)
		}
		return nil
	})
}

func TestJourneyL4AuthorizationPolicy(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	policy := strings.ReplaceAll(readFile(t, "test/lab/manifests/policy/allow-sleep-l4.yaml"), "ambient-demo", demoNS)
	apply(t, demoNS, policy)
	defer kubectl("delete", "authorizationpolicy", "allow-sleep-to-httpbin", "-n", demoNS, "--ignore-not-found")
	eventually(t, 30*time.Second, "notsleep refused, sleep allowed", func() error {
		_, denied := curl(t, demoNS, "deploy/notsleep", "httpbin:8000")
		out, allowed := curl(t, demoNS, "deploy/sleep", "httpbin:8000")
		if denied == 0 || allowed != 0 || !strings.Contains(out, title) {
			return fmt.Errorf("notsleep exit %d (want non-zero), sleep exit %d (want 0)", denied, allowed)
		}
		return nil
	})
	if !strings.Contains(ztunnelLogs(t), "RBAC rejected") {
		t.Errorf("no 'RBAC rejected' line in ztunnel logs")
	}
}

func TestJourneyL7PolicyWithoutWaypointFailsClosed(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	policy := strings.ReplaceAll(readFile(t, "test/lab/manifests/policy/allow-sleep-l7.yaml"), "ambient-demo", demoNS)
	apply(t, demoNS, policy)
	defer kubectl("delete", "authorizationpolicy", "allow-sleep-to-httpbin", "-n", demoNS, "--ignore-not-found")
	eventually(t, 30*time.Second, "both refused", func() error {
		_, a := curl(t, demoNS, "deploy/sleep", "httpbin:8000")
		_, b := curl(t, demoNS, "deploy/notsleep", "httpbin:8000")
		if a == 0 || b == 0 {
			return fmt.Errorf("sleep exit %d, notsleep exit %d: want both refused", a, b)
		}
		return nil
	})
}

func TestJourneyPeerAuthenticationOutsideClient(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	recreateNamespace(t, "e2e-client-a")
	applyFile(t, "e2e-client-a", "test/lab/manifests/apps/sleep.yaml")
	waitAvailable(t, "e2e-client-a")
	url := "httpbin." + demoNS + ".svc.cluster.local:8000"
	expect := func(mode string, wantOK bool) {
		eventually(t, 30*time.Second, mode, func() error {
			_, code := curl(t, "e2e-client-a", "deploy/sleep", url)
			if (code == 0) != wantOK {
				return fmt.Errorf("%s: curl exit %d", mode, code)
			}
			return nil
		})
	}
	expect("no PeerAuthentication (permissive)", true)
	applyFile(t, demoNS, "test/lab/manifests/policy/peerauth-strict.yaml")
	defer kubectl("delete", "peerauthentication", "peerauth", "-n", demoNS, "--ignore-not-found")
	expect("STRICT", false)
	applyFile(t, demoNS, "test/lab/manifests/policy/peerauth-permissive.yaml")
	expect("PERMISSIVE", true)
}

func TestJourneyWaypointHTTPRoute(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	deployJourney(t)
	echoBehindNamespaceWaypoint(t)
	expectEchoV1Only(t, "echo routed to echo-v1 only", demoNS, "http://echo/hostname")
}

// echoBehindNamespaceWaypoint deploys echo (v1, v2) in demoNS, a namespace
// waypoint (ambientctl waypoint apply) and the seeds' HTTPRoute (echo →
// echo-v1); the waypoint is removed when the test ends.
func echoBehindNamespaceWaypoint(t *testing.T) {
	t.Helper()
	applyFile(t, demoNS, "test/lab/manifests/apps/echo.yaml")
	waitAvailable(t, demoNS)
	out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "apply", "-n", demoNS, "--wait", "--timeout", "120s").CombinedOutput()
	if err != nil {
		t.Fatalf("ambientctl waypoint apply: %v\n%s", err, out)
	}
	// Later scenarios share the namespace and expect every pod in it to be
	// captured: a waypoint pod never is.
	t.Cleanup(func() { removeNamespaceWaypoint(t) })
	applyFile(t, demoNS, "test/lab/manifests/policy/httproute-echo.yaml")
}

// expectEchoV1Only waits until 10 requests from ns's sleep to url are all
// answered by echo-v1 (the seeds' HTTPRoute applied by the waypoint).
func expectEchoV1Only(t *testing.T, what, ns, url string) {
	t.Helper()
	eventually(t, 60*time.Second, what, func() error {
		out, code := curl(t, ns, "deploy/sleep", "--repeat", "10", url)
		hosts := strings.Fields(out)
		if code != 0 || len(hosts) != 10 {
			return fmt.Errorf("curl exit %d, %d answers", code, len(hosts))
		}
		for _, h := range hosts {
			if !strings.HasPrefix(h, "echo-v1-") {
				return fmt.Errorf("answered by %s", h)
			}
		}
		return nil
	})
}

// removeNamespaceWaypoint deletes the HTTPRoute and the namespace waypoint
// and waits until the waypoint's pods are gone.
func removeNamespaceWaypoint(t *testing.T) {
	t.Helper()
	kubectl("delete", "-n", demoNS, "-f", filepath.Join(repoRoot, "test/lab/manifests/policy/httproute-echo.yaml"), "--ignore-not-found")
	if out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "delete", "-n", demoNS, "--all").CombinedOutput(); err != nil {
		t.Errorf("ambientctl waypoint delete: %v\n%s", err, out)
		return
	}
	eventually(t, 90*time.Second, "waypoint pods gone", func() error {
		out, _ := kubectl("get", "pods", "-n", demoNS, "-l", "mesh.ambient.dev/waypoint", "-o", "name")
		if strings.TrimSpace(out) != "" {
			return fmt.Errorf("still running: %s", strings.Fields(out))
		}
		return nil
	})
}

func readFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHairpinPlaintextUnderStrictRefused: a plaintext client outside the
// mesh calls a pod with a workload waypoint. Without STRICT the destination's
// ztunnel hair-pins it through the waypoint (it answers); under STRICT it is
// refused before any hair-pin, as it would be without a waypoint.
func TestHairpinPlaintextUnderStrictRefused(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	deployJourney(t)
	applyFile(t, demoNS, "test/lab/manifests/apps/echo.yaml")
	recreateNamespace(t, "e2e-client-a")
	applyFile(t, "e2e-client-a", "test/lab/manifests/apps/sleep.yaml")
	waitAvailable(t, demoNS)
	waitAvailable(t, "e2e-client-a")
	enrollAmbient(t, demoNS)
	applyFile(t, demoNS, "test/lab/manifests/policy/waypoint-all.yaml")
	t.Cleanup(func() { removeNamespaceWaypoint(t) })
	if out, err := kubectl("wait", "-n", demoNS, "--for=condition=Ready", "--timeout=120s", "waypointpolicy/waypoint"); err != nil {
		t.Fatalf("waypoint not ready: %v\n%s", err, out)
	}
	url := "http://echo-v1." + demoNS + ".svc.cluster.local/hostname"
	expect := func(mode string, wantOK bool) {
		eventually(t, 60*time.Second, mode, func() error {
			out, code := curl(t, "e2e-client-a", "deploy/sleep", url)
			if (code == 0 && strings.HasPrefix(out, "echo-v1-")) != wantOK {
				return fmt.Errorf("%s: curl exit %d, %q", mode, code, out)
			}
			return nil
		})
	}
	expect("PERMISSIVE: hair-pinned through the waypoint", true)
	applyFile(t, demoNS, "test/lab/manifests/policy/peerauth-strict.yaml")
	defer kubectl("delete", "peerauthentication", "peerauth", "-n", demoNS, "--ignore-not-found")
	expect("STRICT: refused before the hair-pin", false)
}

// TestRootNamespacePolicyAppliesToWaypoints: an AuthorizationPolicy in the
// mesh's root namespace (the mesh namespace) targeting the istio-waypoint
// GatewayClass binds every waypoint: GET-only refuses a POST through the
// namespace waypoint. The waypoint and the control plane must agree on the
// root namespace for this to hold.
func TestRootNamespacePolicyAppliesToWaypoints(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	deployJourney(t)
	applyFile(t, demoNS, "test/lab/manifests/apps/echo.yaml")
	waitAvailable(t, demoNS)
	enrollAmbient(t, demoNS)
	out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "apply", "-n", demoNS, "--wait", "--timeout", "120s").CombinedOutput()
	if err != nil {
		t.Fatalf("ambientctl waypoint apply: %v\n%s", err, out)
	}
	t.Cleanup(func() { removeNamespaceWaypoint(t) })
	apply(t, meshNS, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoints-get-only}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
`)
	t.Cleanup(func() {
		kubectl("delete", "authorizationpolicy", "waypoints-get-only", "-n", meshNS, "--ignore-not-found")
	})
	code := func(method string) string {
		out, _ := curl(t, demoNS, "deploy/sleep", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "http://echo/hostname")
		return strings.TrimSpace(out)
	}
	eventually(t, 60*time.Second, "mesh-wide GET-only policy at the waypoint", func() error {
		if get, post := code("GET"), code("POST"); get != "200" || post != "403" {
			return fmt.Errorf("GET %s, POST %s; want 200 and 403", get, post)
		}
		return nil
	})
}
