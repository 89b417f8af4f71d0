//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

var (
	repoRoot   string
	kubeconfig string
	mesh       = map[string]string{} // OPERATOR, ZTUNNEL, NODE_AGENT, WAYPOINT_IMAGE -> "ready" or why not
)

const (
	meshNS  = "ambient-system"
	demoNS  = "e2e-demo"
	reqTime = "5" // curl --max-time inside pods, seconds
)

func TestMain(m *testing.M) {
	wd, _ := os.Getwd()
	repoRoot = filepath.Clean(filepath.Join(wd, "../../.."))
	kubeconfig = os.Getenv("LAB_KUBECONFIG")
	if kubeconfig == "" {
		kubeconfig = filepath.Join(repoRoot, "bin/lab/kubeconfig")
	}
	if out, err := kubectl("get", "--raw", "/readyz"); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: the lab is not reachable with %s (%v: %s)\nrun test/lab/e2e.sh, or test/lab/lab.sh up && test/lab/install.sh first\n", kubeconfig, err, out)
		os.Exit(1)
	}
	readMeshEnv(filepath.Join(filepath.Dir(kubeconfig), "state/mesh.env"))
	os.Exit(m.Run())
}

// readMeshEnv loads install.sh's report of which components are available.
func readMeshEnv(path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok {
			mesh[k] = strings.Trim(v, `"`)
		}
	}
}

// requireComponents skips (or, with E2E_REQUIRE_MESH=1, fails) a scenario
// whose components are not available yet, always naming the reason.
func requireComponents(t *testing.T, keys ...string) {
	t.Helper()
	for _, k := range keys {
		state, ok := mesh[k]
		if !ok {
			state = "not installed (install.sh did not get that far)"
		}
		if state == "ready" {
			continue
		}
		msg := fmt.Sprintf("%s not available yet: %s", strings.ToLower(strings.ReplaceAll(k, "_", " ")), state)
		if os.Getenv("E2E_REQUIRE_MESH") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

func requireMesh(t *testing.T) { t.Helper(); requireComponents(t, "OPERATOR", "ZTUNNEL", "NODE_AGENT") }

func kubectl(args ...string) (string, error) {
	return kubectlIn("", args...)
}

func kubectlIn(stdin string, args ...string) (string, error) {
	cmd := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String() + withoutKlog(errOut.String()), err
}

// klogLine is kubectl's own client-side log line ("E1204 15:59:18.860427
// 8058 websocket.go:296] Unknown stream id 1, ..."): never part of a
// command's answer, but mixed into it, it spoiled a curl's JSON in CI.
var klogLine = regexp.MustCompile(`^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d+\s+\d+ \S+:\d+\] `)

func withoutKlog(s string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(s, "\n") {
		if !klogLine.MatchString(line) {
			b.WriteString(line)
		}
	}
	return b.String()
}

func mustKubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := kubectl(args...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func apply(t *testing.T, ns, yaml string) {
	t.Helper()
	args := []string{"apply", "-f", "-"}
	if ns != "" {
		args = append(args, "-n", ns)
	}
	if out, err := kubectlIn(yaml, args...); err != nil {
		t.Fatalf("kubectl apply: %v\n%s", err, out)
	}
}

func applyFile(t *testing.T, ns, rel string) {
	t.Helper()
	mustKubectl(t, "apply", "-n", ns, "-f", filepath.Join(repoRoot, rel))
}

// curl runs the lab's curl inside a pod ("deploy/x" or a pod name) and
// returns its output and exit code (curl's codes: 56 = reset, 7 = refused...).
func curl(t *testing.T, ns, target string, args ...string) (string, int) {
	t.Helper()
	full := append([]string{"exec", "-n", ns, target, "--", "curl", "-s", "-m", reqTime}, args...)
	out, err := kubectl(full...)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out, ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("kubectl exec: %v", err)
	}
	return out, 0
}

// eventually retries fn until it succeeds or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = fn(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(time.Second)
	}
}

// podFingerprint is "uid:restarts" of every pod of a namespace, sorted: equal
// fingerprints mean no pod was replaced or restarted.
func podFingerprint(t *testing.T, ns string) string {
	t.Helper()
	return mustKubectl(t, "get", "pods", "-n", ns, "--sort-by=.metadata.name", "-o",
		`jsonpath={range .items[*]}{.metadata.name}:{.metadata.uid}:{.status.containerStatuses[0].restartCount}{"\n"}{end}`)
}

// capture is the redirection state of a namespace's live pods. A pod
// being deleted is left out: it would be counted while it terminates and
// vanish between two polls (the HA scenario's scale-down left one behind).
type capture struct {
	live       int
	captured   int
	uncaptured []string // names, for the failure message
}

func (c capture) complete() error {
	if c.captured != c.live {
		return fmt.Errorf("%d of %d pods captured; not captured: %v", c.captured, c.live, c.uncaptured)
	}
	return nil
}

func captureOf(t *testing.T, ns string) capture {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", ns, "-o",
		`jsonpath={range .items[*]}{.metadata.name}{"\t"}{.metadata.deletionTimestamp}{"\t"}{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}`)
	var c capture
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Split(line, "\t")
		if len(f) != 3 || f[1] != "" {
			continue
		}
		c.live++
		if f[2] == "enabled" {
			c.captured++
		} else {
			c.uncaptured = append(c.uncaptured, f[0])
		}
	}
	return c
}

func waitAvailable(t *testing.T, ns string) {
	t.Helper()
	mustKubectl(t, "wait", "-n", ns, "--for=condition=available", "deploy", "--all", "--timeout=120s")
}

func recreateNamespace(t *testing.T, ns string, labels ...string) {
	t.Helper()
	kubectl("delete", "ns", ns, "--ignore-not-found", "--wait=true", "--timeout=120s")
	mustKubectl(t, "create", "ns", ns)
	if len(labels) > 0 {
		mustKubectl(t, append([]string{"label", "ns", ns, "--overwrite"}, labels...)...)
	}
}

func ztunnelLogs(t *testing.T) string {
	t.Helper()
	out, _ := kubectl("logs", "-n", meshNS, "-l", "app=ztunnel", "--tail=2000", "--prefix")
	return out
}

// enrollAmbient puts ns in the mesh (if it is not yet) and waits until
// every pod there is captured, so a scenario does not depend on an
// earlier one having enrolled the namespace. Call it before a waypoint
// exists: waypoint pods are never captured.
func enrollAmbient(t *testing.T, ns string) {
	t.Helper()
	mustKubectl(t, "label", "namespace", ns, "istio.io/dataplane-mode=ambient", "--overwrite")
	eventually(t, 60*time.Second, ns+": every pod captured", func() error { return captureOf(t, ns).complete() })
}

// requireLoadTools: the scenarios with load need the waypoint image and
// the lab's fortio image (test/lab/build.sh fortio images).
func requireLoadTools(t *testing.T) {
	t.Helper()
	requireMesh(t)
	requireComponents(t, "WAYPOINT_IMAGE")
	if _, err := os.Stat(filepath.Join(repoRoot, "bin/lab/images/fortio.tar")); err != nil {
		t.Fatalf("fortio image not built (test/lab/build.sh fortio images): %v", err)
	}
}
