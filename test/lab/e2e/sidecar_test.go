//go:build e2e

package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// injectedNamespace recreates ns labelled for sidecar injection, as the
// seeds do for client-b (`kubectl label namespace client-b
// istio-injection=enabled`), deploys the manifests and waits until every
// pod runs with its sidecar.
func injectedNamespace(t *testing.T, ns string, apps ...string) {
	t.Helper()
	recreateNamespace(t, ns)
	mustKubectl(t, "label", "namespace", ns, "istio-injection=enabled")
	for _, a := range apps {
		applyFile(t, ns, "test/lab/manifests/apps/"+a+".yaml")
	}
	if out, err := kubectl("wait", "-n", ns, "--for=condition=available", "deploy", "--all", "--timeout=120s"); err != nil {
		desc, _ := kubectl("get", "pods", "-n", ns, "-o", "wide")
		t.Fatalf("injected pods not available: %v\n%s\n%s", err, out, desc)
	}
	out := mustKubectl(t, "get", "pods", "-n", ns, "-o", `jsonpath={range .items[*]}{.metadata.name} {.metadata.annotations.sidecar\.istio\.io/status} {.spec.initContainers[*].name}{"\n"}{end}`)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if !strings.Contains(line, "istio-proxy") || !strings.Contains(line, "istio-init") {
			t.Fatalf("pod not injected (want istio-init and the istio-proxy native sidecar): %q", line)
		}
	}
}

// TestSidecarCoexistence: the seeds' ambient ↔ sidecar paths in one mesh.
func TestSidecarCoexistence(t *testing.T) {
	requireMesh(t)
	deployJourney(t)
	enrollAmbient(t, demoNS)
	injectedNamespace(t, "e2e-client-b", "sleep")
	injectedNamespace(t, "e2e-sidecar-server", "httpbin")
	t.Cleanup(func() {
		kubectl("delete", "namespace", "e2e-client-b", "e2e-sidecar-server", "--wait=false")
	})
	ambientHTTPBin := "httpbin." + demoNS + ".svc.cluster.local:8000"
	expect := func(what, ns, client, url string, wantOK bool) {
		t.Helper()
		eventually(t, 60*time.Second, what, func() error {
			out, code := curl(t, ns, client, url)
			if ok := code == 0 && strings.Contains(out, title); ok != wantOK {
				return fmt.Errorf("%s: curl exit %d, %.160q", what, code, out)
			}
			return nil
		})
	}

	// sidecar sleep → ambient httpbin: HBONE from the sidecar with its own
	// identity, authorized by the destination ztunnel.
	expect("sidecar sleep -> ambient httpbin", "e2e-client-b", "deploy/sleep", ambientHTTPBin, true)
	if logs := ztunnelLogs(t); !strings.Contains(logs, "ns/e2e-client-b/sa/sleep") {
		t.Errorf("no ztunnel log line names the sidecar client's identity ns/e2e-client-b/sa/sleep")
	}

	// ambient sleep → sidecar httpbin: the source ztunnel tunnels to the
	// sidecar's :15008.
	expect("ambient sleep -> sidecar httpbin", demoNS, "deploy/sleep", "httpbin.e2e-sidecar-server.svc.cluster.local:8000", true)
	proxyLogs, _ := kubectl("logs", "-n", "e2e-sidecar-server", "deploy/httpbin", "-c", "istio-proxy", "--tail=200")
	if !strings.Contains(proxyLogs, "ns/"+demoNS+"/sa/sleep") {
		t.Errorf("the sidecar's log does not name the ambient caller's identity:\n%s", tail(proxyLogs, 10))
	}

	// sidecar sleep → ambient echo behind the namespace waypoint: the
	// sidecar sends to the waypoint's :15008 as ztunnel would, and the
	// seeds' HTTPRoute (echo → echo-v1) applies.
	echoBehindNamespaceWaypoint(t)
	expectEchoV1Only(t, "sidecar sleep -> echo through the waypoint, routed to echo-v1", "e2e-client-b",
		"http://echo."+demoNS+".svc.cluster.local/hostname")
	wpLogs, _ := kubectl("logs", "-n", demoNS, "-l", "mesh.ambient.dev/waypoint", "--tail=200")
	if !strings.Contains(wpLogs, "ns/e2e-client-b/sa/sleep") {
		t.Errorf("the waypoint's access log does not name the sidecar client's identity:\n%s", tail(wpLogs, 5))
	}

	// Under STRICT in the ambient namespace the sidecar client keeps
	// working (mTLS) while the plaintext client outside the mesh is refused.
	recreateNamespace(t, "e2e-client-a")
	applyFile(t, "e2e-client-a", "test/lab/manifests/apps/sleep.yaml")
	waitAvailable(t, "e2e-client-a")
	applyFile(t, demoNS, "test/lab/manifests/policy/peerauth-strict.yaml")
	t.Cleanup(func() { kubectl("delete", "peerauthentication", "peerauth", "-n", demoNS, "--ignore-not-found") })
	expect("STRICT: plaintext client-a refused", "e2e-client-a", "deploy/sleep", ambientHTTPBin, false)
	expect("STRICT: sidecar client still served", "e2e-client-b", "deploy/sleep", ambientHTTPBin, true)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
