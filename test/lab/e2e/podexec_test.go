//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// podExec runs host binaries in a pod's network namespace (lab.sh podexec):
// the pod's redirection rules apply as to its own processes, and nothing
// goes through the API server, so the load keeps running (and reporting)
// while the API server or etcd restarts.
type podExec struct{ node, cid string }

// podOf is the first container of the Ready pod labelled app=app in ns.
func podOf(t *testing.T, ns, app string) *podExec {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", ns, "-l", "app="+app, "-o",
		`jsonpath={range .items[*]}{.spec.nodeName} {.status.containerStatuses[0].containerID} {.status.containerStatuses[0].ready}{"\n"}{end}`)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) == 3 && f[2] == "true" {
			return &podExec{node: f[0], cid: f[1]}
		}
	}
	t.Fatalf("%s: no ready pod app=%s: %s", ns, app, out)
	return nil
}

func (p *podExec) cmd(args ...string) *exec.Cmd {
	return exec.Command(filepath.Join(repoRoot, "test/lab/lab.sh"), append([]string{"podexec", p.node, p.cid}, args...)...)
}

// fortio runs `fortio load` (the lab's own build, as in its image).
func (p *podExec) fortio(args ...string) (fortioResult, error) {
	var r fortioResult
	cmd := p.cmd(append([]string{filepath.Join(repoRoot, "bin/fortio/fortio"), "load"}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if derr := json.NewDecoder(&out).Decode(&r); derr != nil {
		return r, fmt.Errorf("fortio load %v in %s: no result (%v, %v): %.300s", args, p.cid, err, derr, errOut.String())
	}
	return r, nil
}

func (p *podExec) connhold(args ...string) *exec.Cmd {
	return p.cmd(append([]string{connholdPath}, args...)...)
}

var (
	connholdPath string // bin/chaos/connhold, once built
	connholdOnce sync.Once
	connholdErr  error
)

// buildConnhold builds the sleep image's toolbox as bin/chaos/connhold (it
// dispatches on its name).
func buildConnhold(t *testing.T) {
	t.Helper()
	connholdOnce.Do(func() {
		connholdPath = filepath.Join(repoRoot, "bin/chaos/connhold")
		cmd := exec.Command("go", "build", "-o", connholdPath, "./test/workloads/sleep")
		cmd.Dir = repoRoot
		cmd.Env = append(cmd.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			connholdErr = fmt.Errorf("building connhold: %v: %s", err, out)
		}
	})
	if connholdErr != nil {
		t.Fatal(connholdErr)
	}
}

// resolveDirect points the streams at their client pods and at the
// Services' cluster IPs (a host process does not use the cluster's DNS).
func resolveDirect(t *testing.T, http []*httpStream, hold []*holdStream) {
	t.Helper()
	buildConnhold(t)
	ips := map[string]string{}
	ipOf := func(ns, svc string) string {
		k := ns + "/" + svc
		if ips[k] == "" {
			ips[k] = strings.TrimSpace(mustKubectl(t, "get", "svc", "-n", ns, svc, "-o", "jsonpath={.spec.clusterIP}"))
		}
		return ips[k]
	}
	for _, s := range http {
		s.via = podOf(t, s.ns, "load")
		s.directURL = "http://" + ipOf(s.ns, s.server) + ":8000/get"
	}
	for _, h := range hold {
		h.via = podOf(t, h.ns, "hold")
		h.directAddr = ipOf(h.ns, h.server) + ":9000"
	}
}
