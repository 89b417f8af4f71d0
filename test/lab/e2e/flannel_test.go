//go:build e2e && flannel

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// flannelPlacement: clients and servers on a bridge worker (w1) and on the
// flannel worker; "other" runs as an identity the L4 policy refuses.
func flannelPlacement(flannel string) string {
	var b strings.Builder
	b.WriteString(`apiVersion: v1
kind: Service
metadata: {name: server-fl}
spec:
  selector: {app: server, place: fl}
  ports: [{name: http, port: 80}]
`)
	for _, sa := range []string{"client", "other", "server"} {
		fmt.Fprintf(&b, "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: %s}\n", sa)
	}
	for _, p := range []struct{ name, app, node string }{
		{"client-w1", "client", "w1"}, {"client-fl", "client", flannel}, {"other-fl", "other", flannel},
		{"server-w1", "server", "w1"}, {"server-fl", "server", flannel},
	} {
		container := `{name: c, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}`
		if p.app == "server" {
			container = `{name: s, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 1}}`
		}
		place := strings.TrimPrefix(p.name, p.app+"-")
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata: {name: %s, labels: {app: %s, place: %s}}
spec:
  serviceAccountName: %s
  nodeSelector: {ambient.lab/node: %s}
  terminationGracePeriodSeconds: 1
  containers: [%s]
`, p.name, p.app, place, p.app, p.node, container)
	}
	return b.String()
}

// flannelNode returns the short name (w3) of the lab's flannel worker, or
// skips: the flannel shape is opt-in (make e2e-flannel).
func flannelNode(t *testing.T) string {
	t.Helper()
	out := mustKubectl(t, "get", "nodes", "-l", "ambient.lab/cni=flannel", "-o", `jsonpath={range .items[*]}{.metadata.labels.ambient\.lab/node}{"\n"}{end}`)
	shorts := strings.Fields(out)
	if len(shorts) == 0 {
		msg := "the lab has no flannel worker (LAB_WORKERS=3 LAB_FLANNEL_NODES=w3; make e2e-flannel)"
		if os.Getenv("E2E_REQUIRE_FLANNEL") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return shorts[0]
}

// cniChain lists the plugin types of the node's flannel CNI configuration
// (the lab keeps each node's /etc/cni/net.d under bin/lab/state).
func cniChain(short string) ([]string, error) {
	raw, err := os.ReadFile(filepath.Join(flannelConfDir(short), "10-flannel.conflist"))
	if err != nil {
		return nil, err
	}
	var conf struct{ Plugins []struct{ Type string } }
	if err := json.Unmarshal(raw, &conf); err != nil {
		return nil, err
	}
	var types []string
	for _, p := range conf.Plugins {
		types = append(types, p.Type)
	}
	return types, nil
}

func flannelConfDir(short string) string {
	return filepath.Join(filepath.Dir(kubeconfig), "state/nodes", short, "fs/etc/cni/net.d")
}

// TestFlannelWorkerJourney: the journey's core on a worker whose pod network
// is flannel (flanneld with the kube subnet manager and vxlan, flannel's CNI
// plugin): the node agent chains into flannel's conflist (and again after
// flannel rewrites it), pods there are captured, HBONE works same-node and
// to and from a bridge worker, L4 policy is enforced and a waypoint serves
// traffic to a pod on it. The node agents run with CNI platform auto.
func TestFlannelWorkerJourney(t *testing.T) {
	requireMesh(t)
	short := flannelNode(t)
	node := strings.TrimSpace(mustKubectl(t, "get", "nodes", "-l", "ambient.lab/node="+short, "-o", "jsonpath={.items[0].metadata.name}"))
	ann := mustKubectl(t, "get", "node", node, "-o", `jsonpath={.metadata.annotations.flannel\.alpha\.coreos\.com/backend-type}`)
	if strings.TrimSpace(ann) == "" {
		t.Fatalf("node %s has no flannel backend annotation: flanneld did not register it", node)
	}
	// The node agents find the CNI directories themselves (platform auto):
	// after flannel rewrites its file, the agent on its node chains in again
	// into what it detected.
	useAutoCNI(t)
	rewriteFlannelConfig(t, short)
	agentLogs, _ := kubectl("logs", "-n", meshNS, "-l", "app=ambient-node-agent", "--tail=-1", "--prefix")
	if !strings.Contains(agentLogs, "/host/root/etc/cni/net.d") {
		t.Errorf("no node agent logged configuring the detected /host/root/etc/cni/net.d")
	}
	eventually(t, 60*time.Second, "node agent chained after flannel", func() error {
		types, err := cniChain(short)
		if err != nil || len(types) == 0 || types[0] != "flannel" || types[len(types)-1] != "ambient-cni" {
			return fmt.Errorf("chain %v (%v)", types, err)
		}
		return nil
	})

	const ns = "e2e-flannel"
	recreateNamespace(t, ns, "istio.io/dataplane-mode=ambient")
	t.Cleanup(func() { kubectl("delete", "ns", ns, "--wait=false") })
	apply(t, ns, flannelPlacement(short))
	mustKubectl(t, "wait", "-n", ns, "--for=condition=ready", "pod", "--all", "--timeout=120s")
	eventually(t, 60*time.Second, "pods captured", func() error {
		c := captureOf(t, ns)
		if c.live != 5 {
			return fmt.Errorf("%d live pods, want 5", c.live)
		}
		return c.complete()
	})
	ip := func(pod string) string {
		return strings.TrimSpace(mustKubectl(t, "get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}"))
	}
	cidr := strings.TrimSpace(mustKubectl(t, "get", "node", node, "-o", "jsonpath={.spec.podCIDR}"))
	prefix := strings.TrimSuffix(cidr, "0/24")
	serverFl, serverW1 := ip("server-fl"), ip("server-w1")
	if !strings.HasPrefix(serverFl, prefix) {
		t.Fatalf("server-fl has %s, not an address of the flannel node's %s", serverFl, cidr)
	}

	for _, tc := range []struct{ name, client, server, addr string }{
		{"same node on flannel", "client-fl", "server-fl", serverFl},
		{"bridge node to flannel node", "client-w1", "server-fl", serverFl},
		{"flannel node to bridge node", "client-fl", "server-w1", serverW1},
	} {
		eventually(t, 30*time.Second, tc.name, func() error {
			out, code := curl(t, ns, tc.client, "http://"+tc.addr+"/hostname")
			if code != 0 || strings.TrimSpace(out) != tc.server {
				return fmt.Errorf("curl exit %d, answer %q", code, out)
			}
			return nil
		})
	}
	// Both HBONE destinations show in ztunnel's logs (the flannel node's
	// ztunnel served server-fl, w1's served server-w1).
	logs := ztunnelLogs(t)
	for _, dst := range []string{serverFl + ":80", serverW1 + ":80"} {
		if !strings.Contains(logs, dst) {
			t.Errorf("ztunnel logs do not mention %s", dst)
		}
	}

	// L4: only the client identity reaches the servers.
	apply(t, ns, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/%s/sa/client]}}]}]
`, ns))
	eventually(t, 30*time.Second, "other refused, client allowed (L4 on the flannel node)", func() error {
		_, denied := curl(t, ns, "other-fl", "http://"+serverFl+"/hostname")
		_, sameNode := curl(t, ns, "client-fl", "http://"+serverFl+"/hostname")
		_, crossNode := curl(t, ns, "client-w1", "http://"+serverFl+"/hostname")
		if denied == 0 || sameNode != 0 || crossNode != 0 {
			return fmt.Errorf("other exit %d (want non-zero), client same node %d, cross node %d (want 0)", denied, sameNode, crossNode)
		}
		return nil
	})
	mustKubectl(t, "delete", "authorizationpolicy", "allow-client", "-n", ns)

	// A namespace waypoint; a GET-only policy on the flannel pod's Service
	// is enforced there (POST 403 can only come from the waypoint).
	requireComponents(t, "WAYPOINT_IMAGE")
	if out, err := exec.Command(filepath.Join(repoRoot, "bin/ambientctl"), "--kubeconfig", kubeconfig, "waypoint", "apply", "-n", ns, "--wait", "--timeout", "120s").CombinedOutput(); err != nil {
		t.Fatalf("ambientctl waypoint apply: %v\n%s", err, out)
	}
	apply(t, ns, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server-fl-get-only}
spec:
  targetRefs: [{kind: Service, group: "", name: server-fl}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
`)
	code := func(client, method string) string {
		out, _ := curl(t, ns, client, "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "http://server-fl/hostname")
		return strings.TrimSpace(out)
	}
	for _, client := range []string{"client-fl", "client-w1"} {
		eventually(t, 60*time.Second, client+" through the waypoint to the flannel pod", func() error {
			if get, post := code(client, "GET"), code(client, "POST"); get != "200" || post != "403" {
				return fmt.Errorf("GET %s, POST %s; want 200 and 403", get, post)
			}
			return nil
		})
	}

	// flannel rewrites its conflist when it restarts (kube-flannel's
	// install-cni): the node agent chains in again, and new pods are captured.
	rewriteFlannelConfig(t, short)
	mustKubectl(t, "delete", "pod", "server-fl", "-n", ns, "--wait=true")
	apply(t, ns, flannelPlacement(short))
	mustKubectl(t, "wait", "-n", ns, "--for=condition=ready", "pod/server-fl", "--timeout=120s")
	eventually(t, 60*time.Second, "new pod on the flannel node captured and served", func() error {
		// Only this pod: a waypoint pod in the namespace is never captured.
		got, _ := kubectl("get", "pod", "server-fl", "-n", ns, "-o", `jsonpath={.metadata.annotations.ambient\.istio\.io/redirection}`)
		if got != "enabled" {
			return fmt.Errorf("server-fl redirection %q", got)
		}
		out, code := curl(t, ns, "client-w1", "http://"+ip("server-fl")+"/hostname")
		if code != 0 || strings.TrimSpace(out) != "server-fl" {
			return fmt.Errorf("curl exit %d, answer %q", code, out)
		}
		return nil
	})
}

// rewriteFlannelConfig puts back flannel's own conflist, as kube-flannel's
// install-cni does on every restart, and waits for the node agent to chain
// in again.
func rewriteFlannelConfig(t *testing.T, short string) {
	t.Helper()
	pristine := filepath.Join(filepath.Dir(kubeconfig), "state/nodes", short, "flannel-cni.conflist")
	b, err := os.ReadFile(pristine)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(flannelConfDir(short), "10-flannel.conflist")
	if err := os.WriteFile(dst+".e2e", b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dst+".e2e", dst); err != nil {
		t.Fatal(err)
	}
	if types, _ := cniChain(short); slices.Contains(types, "ambient-cni") {
		t.Fatalf("rewritten conflist still has ambient-cni: %v", types)
	}
	eventually(t, 30*time.Second, "node agent chained in again after flannel rewrote its config", func() error {
		if types, err := cniChain(short); err != nil || !slices.Contains(types, "ambient-cni") {
			return fmt.Errorf("chain %v (%v)", types, err)
		}
		return nil
	})
}

// useAutoCNI switches the mesh's node agents to platform auto (the host's /
// mounted, directories detected on each node) until the test ends.
func useAutoCNI(t *testing.T) {
	t.Helper()
	mustKubectl(t, "patch", "ambientmesh", "default", "--type", "merge", "-p", `{"spec":{"nodeAgent":{"cni":{"platform":"auto"}}}}`)
	t.Cleanup(func() {
		kubectl("patch", "ambientmesh", "default", "--type", "json", "-p", `[{"op":"remove","path":"/spec/nodeAgent/cni/platform"}]`)
		kubectl("-n", meshNS, "rollout", "status", "daemonset/ambient-node-agent", "--timeout=180s")
	})
	eventually(t, 60*time.Second, "node agents rendered for platform auto", func() error {
		out, _ := kubectl("-n", meshNS, "get", "daemonset", "ambient-node-agent", "-o",
			`jsonpath={.spec.template.spec.containers[0].env[?(@.name=="CNI_HOST_ROOT")].value}`)
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("no CNI_HOST_ROOT yet")
		}
		return nil
	})
	rolloutDaemonSet(t, "ambient-node-agent")
}
