//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// Steady load for the fault scenarios (chaos_test.go) and the upgrade
// (lifecycle_test.go): HTTP requests from a fortio client and long-lived
// TCP connections echoing a byte pattern (connhold), from pods pinned to
// ambient-worker to servers on the same node and on ambient-worker2.

const (
	nodeA = "ambient-worker"  // clients and the same-node servers
	nodeB = "ambient-worker2" // the cross-node servers
)

// deployLoadApps recreates ns in the mesh with a fortio client (`load`) and
// a connhold client (`hold`) on nodeA, and httpbin servers `server-same`
// (nodeA) and `server-cross` (nodeB), each a Service with http (8000) and
// tcp-echo (9000). waypointReplicas > 0 adds a namespace waypoint (Service
// traffic) with that many replicas.
func deployLoadApps(t *testing.T, ns string, waypointReplicas int) {
	t.Helper()
	recreateNamespace(t, ns, "istio.io/dataplane-mode=ambient")
	t.Cleanup(func() { // kept after a failure, for the artifacts
		if !t.Failed() {
			kubectl("delete", "namespace", ns, "--wait=false")
		}
	})
	var y strings.Builder
	for _, a := range []struct{ name, node, container string }{
		{"load", nodeA, `{name: fortio, image: docker.io/ambient-lab/fortio:dev, imagePullPolicy: Never, args: [server, -port, "8080"]}`},
		{"hold", nodeA, `{name: sleep, image: docker.io/ambient-lab/sleep:dev, imagePullPolicy: Never, command: [/usr/bin/sleep, infinity]}`},
		{"server-same", nodeA, serverContainer},
		{"server-cross", nodeB, serverContainer},
	} {
		fmt.Fprintf(&y, `apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s}
spec:
  replicas: 1
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata: {labels: {app: %[1]s}}
    spec:
      nodeName: %[2]s
      terminationGracePeriodSeconds: 2
      containers:
      - %[3]s
---
`, a.name, a.node, a.container)
		if strings.HasPrefix(a.name, "server-") {
			fmt.Fprintf(&y, `apiVersion: v1
kind: Service
metadata: {name: %s}
spec:
  selector: {app: %[1]s}
  ports: [{name: http, port: 8000, targetPort: 80}, {name: tcp-echo, port: 9000, targetPort: 9000}]
---
`, a.name)
		}
	}
	apply(t, ns, y.String())
	waitAvailable(t, ns)
	eventually(t, 60*time.Second, ns+": every pod captured", func() error { return captureOf(t, ns).complete() })
	if waypointReplicas > 0 {
		apply(t, ns, fmt.Sprintf(`apiVersion: mesh.ambient.dev/v1alpha1
kind: WaypointPolicy
metadata: {name: waypoint}
spec: {scope: Namespace, trafficType: service, replicas: %d}
`, waypointReplicas))
		mustKubectl(t, "wait", "-n", ns, "--for=condition=Ready", "--timeout=120s", "waypointpolicy/waypoint")
		eventually(t, 120*time.Second, ns+": waypoint replicas ready", func() error {
			if n := len(readyPods(t, ns, waypointSelector)); n != waypointReplicas {
				return fmt.Errorf("%d of %d waypoint pods ready", n, waypointReplicas)
			}
			return nil
		})
	}
	// The first request on a path waits for kube-proxy and the proxies to
	// learn it; the scenarios must not.
	for _, s := range []string{"server-same", "server-cross"} {
		eventually(t, 90*time.Second, ns+" "+s+" answers", func() error {
			return fortioProbe(ns, "-qps", "10", "-c", "1", "-t", "300ms", "-payload-size", "0", "http://"+s+":8000/get")
		})
	}
}

const (
	serverContainer  = `{name: httpbin, image: docker.io/ambient-lab/httpbin:dev, imagePullPolicy: Never, readinessProbe: {tcpSocket: {port: 80}, periodSeconds: 2}}`
	waypointSelector = "mesh.ambient.dev/waypoint"
)

// readyPods lists "name node" of the Ready pods matching selector.
func readyPods(t *testing.T, ns, selector string) []string {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", ns, "-l", selector, "-o",
		`jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.metadata.deletionTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
	var pods []string
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) == 3 && f[2] == "True" { // no deletionTimestamp
			pods = append(pods, f[0]+" "+f[1])
		}
	}
	return pods
}

// fortioRun runs one `fortio load` in the namespace's load pod.
func fortioRun(ns string, args ...string) (fortioResult, error) {
	return fortioExec(ns, "deploy/load", args...)
}

// fortioExec runs `fortio load` in target (a pod or deploy/name). Its
// results are read from stdout alone: fortio's log on stderr, interleaved
// with them, made the combined output unparseable under load.
func fortioExec(ns, target string, args ...string) (fortioResult, error) {
	var r fortioResult
	cmd := exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig, "exec", "-n", ns, target, "--", "fortio", "load"}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if derr := json.NewDecoder(&out).Decode(&r); derr != nil {
		return r, fmt.Errorf("fortio load %v: no result (%v, %v): %.300s", args, err, derr, errOut.String())
	}
	return r, nil
}

// fortioProbe runs one short fortio load and fails unless every request
// succeeded.
func fortioProbe(ns string, args ...string) error {
	r, err := fortioRun(ns, args...)
	if err != nil {
		return err
	}
	if r.failed() > 0 || r.DurationHistogram.Count == 0 {
		return fmt.Errorf("return codes %v", r.RetCodes)
	}
	return nil
}

// failed counts requests without a 200 (fortio's -1 is a socket error).
func (r fortioResult) failed() int64 {
	var n int64
	for code, c := range r.RetCodes {
		if code != "200" {
			n += c
		}
	}
	return n + r.DurationHistogram.Count - sumCodes(r.RetCodes)
}

func sumCodes(m map[string]int64) int64 {
	var n int64
	for _, c := range m {
		n += c
	}
	return n
}

// httpStream is a steady stream of HTTP requests, each on a new connection
// (so proxies set up tunnels and check policy all along), run as
// back-to-back fortio chunks until stopped.
type httpStream struct {
	Name      string `json:"name"`
	Path      string `json:"path"` // what the requests cross, for per-node checks
	ns, url   string
	Sent      int64            `json:"sent"`
	Failed    int64            `json:"failed"`
	Codes     map[string]int64 `json:"codes"`
	NotRun    int              `json:"chunksNotRun"` // kubectl exec failed: not the mesh's fault, but no load either
	FirstFail string           `json:"firstFailure,omitempty"`
	// MaxSeconds is the slowest request's duration (the histogram's last
	// bucket end): nothing may hang past the client's timeout.
	MaxSeconds float64  `json:"maxSeconds"`
	server     string   // Service name
	via        *podExec // cfg.direct: the client pod, and the URL by the Service's address
	directURL  string
}

// holdStream is a set of long-lived connections echoing a byte pattern.
type holdStream struct {
	Name   string     `json:"name"`
	Path   string     `json:"path"`
	ns     string     // namespace of the hold pod
	addr   string     // echo server host:port
	Result holdResult `json:"result"`
	Err    string     `json:"error,omitempty"`
	// Seconds is how long connhold ran: it must end with its duration
	// (plus its per-ping timeout), however its connections ended.
	Seconds    float64 `json:"seconds"`
	server     string
	via        *podExec
	directAddr string
}

// load is everything running during one scenario.
type load struct {
	HTTP []*httpStream `json:"http"`
	Hold []*holdStream `json:"hold"`
	stop chan struct{}
	wg   sync.WaitGroup
}

type loadConfig struct {
	qps   int           // per HTTP stream
	chunk time.Duration // one fortio run
	conns int           // per hold stream
	hold  time.Duration // how long the connections are held
	// direct runs the load tools from the host in the client pods' network
	// namespaces (lab.sh podexec) instead of through kubectl exec, whose
	// streams an API server or etcd restart would cut (podexec.go).
	direct bool
}

// startLoad starts every stream; HTTP runs until stop, connections are held
// for cfg.hold.
func startLoad(t *testing.T, cfg loadConfig, http []*httpStream, hold []*holdStream) *load {
	l := &load{HTTP: http, Hold: hold, stop: make(chan struct{})}
	if cfg.direct {
		resolveDirect(t, http, hold)
	}
	for _, s := range http {
		s.Codes = map[string]int64{}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				s.chunk(t, cfg)
			}
		}()
	}
	for _, h := range hold {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			h.run(cfg)
		}()
	}
	return l
}

func (s *httpStream) chunk(t *testing.T, cfg loadConfig) {
	args := []string{"-qps", fmt.Sprint(cfg.qps), "-c", "2", "-t", cfg.chunk.String(), "-payload-size", "0",
		"-keepalive=false", "-timeout", "5s"}
	var r fortioResult
	var err error
	if s.via != nil {
		r, err = s.via.fortio(append(args, s.directURL)...)
	} else {
		r, err = fortioRun(s.ns, append(args, s.url)...)
	}
	if err != nil {
		s.NotRun++
		t.Logf("%s: load chunk not run: %v", s.Name, err)
		return
	}
	s.Sent += r.DurationHistogram.Count
	if d := r.DurationHistogram.Data; len(d) > 0 {
		s.MaxSeconds = max(s.MaxSeconds, d[len(d)-1].End)
	}
	noteP99(r)
	for code, n := range r.RetCodes {
		s.Codes[code] += n
	}
	if f := r.failed(); f > 0 {
		s.Failed += f
		if s.FirstFail == "" {
			s.FirstFail = time.Now().UTC().Format(time.RFC3339)
		}
		t.Logf("%s: %d of %d requests failed at %s: codes %v", s.Name, f, r.DurationHistogram.Count, time.Now().UTC().Format(time.RFC3339), r.RetCodes)
	}
}

func (h *holdStream) run(cfg loadConfig) {
	args := []string{"-conns", fmt.Sprint(cfg.conns), "-interval", "200ms", "-payload", "256", "-duration", cfg.hold.String()}
	var cmd *exec.Cmd
	if h.via != nil {
		cmd = h.via.connhold(append(args, "-addr", h.directAddr)...)
	} else {
		cmd = exec.Command("kubectl", append([]string{"--kubeconfig", kubeconfig, "exec", "-n", h.ns, "deploy/hold", "--",
			"connhold", "-addr", h.addr}, args...)...)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	start := time.Now()
	_ = cmd.Run() // connhold exits 1 when a connection broke; its report says which
	h.Seconds = time.Since(start).Seconds()
	if err := json.Unmarshal(bytes.TrimSpace(out.Bytes()), &h.Result); err != nil {
		h.Err = fmt.Sprintf("no connhold report: %v: %s %s", err, out.String(), errOut.String())
	}
}

// finish stops the HTTP streams and waits for every stream.
func (l *load) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// streams names the standard streams of deployLoadApps in ns: mode is
// "ztunnel" or "waypoint", cross says which paths reach nodeB.
func streams(ns, mode string) ([]*httpStream, []*holdStream) {
	var hs []*httpStream
	var ls []*holdStream
	for _, p := range []struct{ name, server string }{{"same-node", "server-same"}, {"cross-node", "server-cross"}} {
		hs = append(hs, &httpStream{Name: mode + "/" + p.name, Path: p.name, ns: ns, server: p.server, url: "http://" + p.server + ":8000/get"})
		ls = append(ls, &holdStream{Name: mode + "/" + p.name, Path: p.name, ns: ns, server: p.server, addr: p.server + ":9000"})
	}
	return hs, ls
}
