//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	egressNS   = "e2e-egress"
	externalIP = "10.201.0.251" // lib.sh EXTERNAL_IP; CoreDNS: external.lab.example
)

// egressApps: two clients whose DNS is captured (ztunnel answers the
// ServiceEntry hosts with their VIPs). egressEntries: a STATIC and a DNS
// ServiceEntry for the external host, both bound to the waypoint
// "egress"; an L7 policy (GET /get and /ip only) on both and an L4 one
// (deny the principal of "other") on the STATIC entry only; a
// WorkloadEntry for the host selected by a ServiceEntry without waypoint.
const egressApps = `
apiVersion: v1
kind: ServiceAccount
metadata: {name: client}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata:
  name: egress-client
  labels: {app: egress-client}
  annotations: {ambient.istio.io/dns-capture: "true"}
spec:
  serviceAccountName: client
  nodeSelector: {ambient.lab/node: w1}
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: egress-other
  labels: {app: egress-other}
  annotations: {ambient.istio.io/dns-capture: "true"}
spec:
  serviceAccountName: other
  nodeSelector: {ambient.lab/node: w2}
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}]
`

const egressEntries = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-static, labels: {istio.io/use-waypoint: egress}}
spec:
  hosts: [static.lab.example]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  endpoints: [{address: 10.201.0.251}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-dns, labels: {istio.io/use-waypoint: egress}}
spec:
  hosts: [external.lab.example]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, labels: {app: vm}}
spec: {address: 10.201.0.251, serviceAccount: vm, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vm, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [vm.lab.example]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-l7}
spec:
  targetRefs:
  - {group: networking.istio.io, kind: ServiceEntry, name: ext-static}
  - {group: networking.istio.io, kind: ServiceEntry, name: ext-dns}
  rules:
  - from: [{source: {principals: [cluster.local/ns/e2e-egress/sa/client, cluster.local/ns/e2e-egress/sa/other]}}]
    to: [{operation: {methods: [GET], paths: [/get, /ip]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-l4-deny-other}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: ext-static}]
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/e2e-egress/sa/other]}}]
`

// startExternalHost runs the lab's httpbin as a host process on the
// external service host (lab.sh's alab-ext namespace, outside the
// cluster) on EXTERNAL_IP:8080, stopped when the test ends.
func startExternalHost(t *testing.T) {
	t.Helper()
	if err := exec.Command("ip", "netns", "exec", "alab-ext", "true").Run(); err != nil {
		t.Fatalf("no external host namespace alab-ext (test/lab/lab.sh up creates it): %v", err)
	}
	bin := filepath.Join(repoRoot, "bin/e2e/httpbin")
	build := exec.Command("go", "build", "-o", bin, "./test/workloads/httpbin")
	build.Dir, build.Env = repoRoot, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building httpbin: %v\n%s", err, out)
	}
	srv := exec.Command("ip", "netns", "exec", "alab-ext", bin, "-http", externalIP+":8080", "-echo", "")
	logf, err := os.Create(filepath.Join(t.TempDir(), "external-httpbin.log"))
	if err != nil {
		t.Fatal(err)
	}
	srv.Stdout, srv.Stderr = logf, logf
	if err := srv.Start(); err != nil {
		t.Fatalf("starting the external host's httpbin: %v", err)
	}
	t.Cleanup(func() {
		_ = srv.Process.Kill()
		_ = srv.Wait()
		logf.Close()
	})
}

// TestServiceEntryEgressThroughWaypoint: an enrolled pod reaches a host
// outside the cluster (a process in the lab's alab-ext namespace) by name
// through its ServiceEntry: ztunnel's DNS proxy answers the host with the
// entry's auto-allocated VIP, ztunnel sends the VIP's traffic to the
// entry's waypoint (istio.io/use-waypoint), which dials the external
// host (STATIC: the endpoint's address; DNS: the host resolved by the
// cluster's DNS). The external host sees the waypoint's address. At the
// waypoint an L7 policy allows GET /get and refuses /headers (403), and
// an L4 policy denies one client's identity on one entry only. A
// WorkloadEntry for the same host, selected by a third ServiceEntry that
// opts out of the waypoint, is reached straight from ztunnel.
func TestServiceEntryEgressThroughWaypoint(t *testing.T) {
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	startExternalHost(t)
	recreateNamespace(t, egressNS, "istio.io/dataplane-mode=ambient")
	apply(t, egressNS, egressApps)
	mustKubectl(t, "wait", "-n", egressNS, "--for=condition=ready", "pod", "--all", "--timeout=90s")
	enrollAmbient(t, egressNS)
	if out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "apply",
		"-n", egressNS, "--name", "egress", "--wait", "--timeout", "120s").CombinedOutput(); err != nil {
		t.Fatalf("ambientctl waypoint apply: %v\n%s", err, out)
	}
	apply(t, egressNS, egressEntries)
	// The waypoint's pods (one or more replicas): the origin the external
	// host must see.
	wpIPs := strings.Fields(mustKubectl(t, "get", "pods", "-n", egressNS, "-l", "mesh.ambient.dev/waypoint", "-o", `jsonpath={range .items[*]}{.status.podIP}{" "}{end}`))
	if len(wpIPs) == 0 {
		t.Fatal("no waypoint pod")
	}
	const wp = "the waypoint"
	clientIP := strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", egressNS, "egress-client", "-o", "jsonpath={.status.podIP}"))
	var vip string
	eventually(t, 30*time.Second, "ext-static VIP allocated", func() error {
		out := mustKubectl(t, "get", "serviceentry", "-n", egressNS, "ext-static", "-o", `jsonpath={range .status.addresses[*]}{.value}{"\n"}{end}`)
		for _, a := range strings.Fields(out) {
			if !strings.Contains(a, ":") {
				vip = a
			}
		}
		if vip == "" {
			return fmt.Errorf("status addresses %q", out)
		}
		return nil
	})

	// request returns the HTTP status and the origin the external host
	// saw (httpbin's JSON; the status is the last three characters).
	request := func(pod, method, url string) (string, string) {
		out, code := curl(t, egressNS, pod, "-X", method, "-w", "%{http_code}", url)
		if code != 0 || len(out) < 3 {
			return fmt.Sprintf("curl exit %d (%q)", code, out), ""
		}
		var got struct{ Origin string }
		_ = json.Unmarshal([]byte(out[:len(out)-3]), &got)
		return out[len(out)-3:], got.Origin
	}
	cases := []struct{ what, pod, method, url, status, origin string }{
		{"STATIC entry by name, allowed path", "egress-client", "GET", "http://static.lab.example/get", "200", wp},
		{"DNS entry by name, allowed path", "egress-client", "GET", "http://external.lab.example/get", "200", wp},
		{"L7 policy: path not allowed", "egress-client", "GET", "http://static.lab.example/headers", "403", ""},
		{"L7 policy: method not allowed", "egress-client", "POST", "http://external.lab.example/get", "403", ""},
		{"L4 policy: the other identity denied on the STATIC entry", "egress-other", "GET", "http://static.lab.example/get", "403", ""},
		{"L4 policy: the other identity allowed on the DNS entry", "egress-other", "GET", "http://external.lab.example/get", "200", wp},
		// A WorkloadEntry (the same host as a VM without a ztunnel) selected
		// by a ServiceEntry without a waypoint: straight from the client's
		// ztunnel, port by the entry's port name, the client's own address.
		{"WorkloadEntry behind a ServiceEntry, no waypoint", "egress-client", "GET", "http://vm.lab.example/get", "200", clientIP},
	}
	for _, c := range cases {
		eventually(t, 60*time.Second, c.what, func() error {
			status, origin := request(c.pod, c.method, c.url)
			if c.origin == wp && slices.Contains(wpIPs, origin) {
				origin = wp
			}
			if status != c.status || origin != c.origin {
				return fmt.Errorf("%s %s from %s: %s (origin %q), want %s (origin %q; waypoint pods %v)", c.method, c.url, c.pod, status, origin, c.status, c.origin, wpIPs)
			}
			return nil
		})
	}
	// The client's ztunnel listed the entry's host with its VIP and the
	// waypoint; the waypoint logged the refusals.
	zt, _ := ztunnelOn(t, "ambient-worker")
	out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "ztunnel-config", "services", zt+"."+meshNS).CombinedOutput()
	if err != nil || !regexp.MustCompile(`(?m)^`+egressNS+`\s+static\.lab\.example\s+\S*`+regexp.QuoteMeta(vip)+`\S*\s+`+egressNS+`/\S+`).Match(out) {
		t.Errorf("ambientctl ztunnel-config services: no static.lab.example with VIP %s and a waypoint (%v):\n%s", vip, err, out)
	}
	wpLogs, _ := kubectl("logs", "-n", egressNS, "-l", "mesh.ambient.dev/waypoint", "--tail=300")
	if !strings.Contains(wpLogs, "RBAC rejected request") {
		t.Errorf("the waypoint logged no \"RBAC rejected request\":\n%s", tail(wpLogs, 10))
	}
	if out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "delete", "-n", egressNS, "--all").CombinedOutput(); err != nil {
		t.Errorf("ambientctl waypoint delete: %v\n%s", err, out)
	}
	kubectl("delete", "ns", egressNS, "--wait=false")
}
