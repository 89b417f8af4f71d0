//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestBenchMesh is `make bench-mesh` (BENCH_MESH=full) and, with short
// runs, its smoke in the end-to-end stage: a fortio client pod on
// ambient-worker calls fortio servers on the same node and on
// ambient-worker2 with no mesh, through ztunnel only, and through ztunnel
// and a waypoint. It reports latency (1 KiB POST echoed, 1000 rps over 16
// connections), proxy CPU per 1000 rps from the pods' cgroup accounting,
// HTTP throughput with large bodies, and ztunnel memory per idle
// connection, as ratios to the same run's direct path. The smoke asserts
// only that every mode produced error-free results, never timings.
func TestBenchMesh(t *testing.T) {
	requireLoadTools(t)
	full := os.Getenv("BENCH_MESH") == "full"
	cfg := benchConfig{qps: 1000, conns: 16, dur: 3 * time.Second, payload: 1024, bulkDur: 2 * time.Second, bulkPayload: 64 << 10, idleConns: 200}
	if full {
		cfg.dur, cfg.bulkDur, cfg.idleConns = 20*time.Second, 10*time.Second, 1000
	}
	modes := []benchMode{
		{name: "direct", ns: "bench-direct"},
		{name: "ztunnel", ns: "bench-ztunnel", labels: []string{"istio.io/dataplane-mode=ambient"}},
		{name: "ztunnel+waypoint", ns: "bench-waypoint", labels: []string{"istio.io/dataplane-mode=ambient"}, waypoint: true},
	}
	for i := range modes {
		deployBench(t, &modes[i])
	}
	var results []benchResult
	for _, m := range modes {
		for _, path := range []string{"same-node", "cross-node"} {
			r := runLatency(t, m, path, cfg)
			r.BulkMbps = runBulk(t, m, path, cfg)
			results = append(results, r)
			t.Logf("%-17s %-10s p50 %.3f p90 %.3f p99 %.3f ms, %.0f rps, ztunnel %.3f / waypoint %.3f vCPU per 1000 rps, bulk %.0f Mbit/s",
				r.Mode, r.Path, r.P50, r.P90, r.P99, r.QPS, r.ZtunnelCPUPer1k, r.WaypointCPUPer1k, r.BulkMbps)
		}
	}
	idle := runIdle(t, modes[1], cfg)
	out := filepath.Join(repoRoot, "bin/bench-mesh")
	writeBenchReport(t, out, cfg, full, results, idle)
}

type benchConfig struct {
	qps                    float64
	conns, payload         int
	dur, bulkDur           time.Duration
	bulkPayload, idleConns int
}

type benchMode struct {
	name, ns string
	labels   []string
	waypoint bool
}

type benchResult struct {
	Mode, Path                        string
	QPS, P50, P90, P99                float64 // rps; latencies in ms
	ZtunnelCPUPer1k, WaypointCPUPer1k float64 // vCPU per 1000 rps, all pods of the kind summed
	BulkMbps                          float64
	CDF                               [][2]float64 // (latency ms, cumulative %)
}

// deployBench creates the mode's namespace with a fortio client on
// ambient-worker and servers on both workers.
func deployBench(t *testing.T, m *benchMode) {
	t.Helper()
	recreateNamespace(t, m.ns, m.labels...)
	var y strings.Builder
	for _, s := range []struct{ name, node string }{{"client", "ambient-worker"}, {"server-same", "ambient-worker"}, {"server-cross", "ambient-worker2"}} {
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
      terminationGracePeriodSeconds: 1
      containers:
      - {name: fortio, image: docker.io/ambient-lab/fortio:dev, imagePullPolicy: Never, args: [server, -port, "8080"]}
---
apiVersion: v1
kind: Service
metadata: {name: %[1]s}
spec:
  selector: {app: %[1]s}
  ports: [{name: http, port: 8080}]
---
`, s.name, s.node)
	}
	apply(t, m.ns, y.String())
	waitAvailable(t, m.ns)
	if m.waypoint {
		apply(t, m.ns, `apiVersion: mesh.ambient.dev/v1alpha1
kind: WaypointPolicy
metadata: {name: waypoint}
spec: {scope: Namespace, trafficType: service}
`)
		mustKubectl(t, "wait", "-n", m.ns, "--for=condition=Ready", "--timeout=120s", "waypointpolicy/waypoint")
	}
	// The first request through a new path waits for kube-proxy and the
	// proxies to learn it; the measurement must not.
	for _, s := range []string{"server-same", "server-cross"} {
		eventually(t, 60*time.Second, m.name+" "+s+" answers", func() error {
			_, err := kubectl("exec", "-n", m.ns, "deploy/client", "--", "fortio", "load", "-qps", "10", "-c", "1", "-t", "200ms", "http://"+s+":8080/echo")
			return err
		})
	}
}

// fortioResult is the part of fortio's JSON results used here.
type fortioResult struct {
	ActualQPS         float64
	ActualDuration    int64
	RetCodes          map[string]int64
	DurationHistogram struct {
		Count       int64
		Data        []struct{ Start, End, Percent float64 }
		Percentiles []struct{ Percentile, Value float64 }
	}
}

func fortioLoad(t *testing.T, m benchMode, args ...string) fortioResult {
	t.Helper()
	var r fortioResult
	var err error
	// Seen here: an exec stream that ends early with status 0 — run it again.
	for attempt := 1; ; attempt++ {
		if r, err = fortioExec(m.ns, "deploy/client", args...); err == nil {
			break
		}
		if attempt == 3 {
			t.Fatalf("%s: %v", m.name, err)
		}
		t.Logf("%s: %v (attempt %d), again", m.name, err, attempt)
	}
	if ok := r.RetCodes["200"]; ok == 0 || ok != r.DurationHistogram.Count {
		t.Fatalf("%s: fortio %v: return codes %v of %d requests, want all 200", m.name, args, r.RetCodes, r.DurationHistogram.Count)
	}
	return r
}

// serverURL is the echo server a path ("same-node", "cross-node") calls.
func serverURL(path string) string {
	return "http://server-" + strings.TrimSuffix(path, "-node") + ":8080/echo"
}

func runLatency(t *testing.T, m benchMode, path string, cfg benchConfig) benchResult {
	t.Helper()
	url := serverURL(path)
	zt0, wp0 := proxyCPU(t, meshNS, "app=ztunnel"), proxyCPU(t, m.ns, "mesh.ambient.dev/waypoint")
	r := fortioLoad(t, m, "-qps", fmt.Sprint(cfg.qps), "-c", fmt.Sprint(cfg.conns), "-t", cfg.dur.String(), "-payload-size", fmt.Sprint(cfg.payload), url)
	zt1, wp1 := proxyCPU(t, meshNS, "app=ztunnel"), proxyCPU(t, m.ns, "mesh.ambient.dev/waypoint")
	secs := time.Duration(r.ActualDuration).Seconds()
	per1k := func(d time.Duration) float64 { return d.Seconds() / secs / (r.ActualQPS / 1000) }
	res := benchResult{Mode: m.name, Path: path, QPS: r.ActualQPS}
	for _, p := range r.DurationHistogram.Percentiles {
		switch p.Percentile {
		case 50:
			res.P50 = p.Value * 1000
		case 90:
			res.P90 = p.Value * 1000
		case 99:
			res.P99 = p.Value * 1000
		}
	}
	for _, d := range r.DurationHistogram.Data {
		res.CDF = append(res.CDF, [2]float64{d.End * 1000, d.Percent})
	}
	if m.name != "direct" {
		res.ZtunnelCPUPer1k = per1k(zt1 - zt0)
	}
	if m.waypoint {
		res.WaypointCPUPer1k = per1k(wp1 - wp0)
	}
	return res
}

// runBulk: one connection, large POST bodies echoed back as fast as they
// go; Mbit/s counts both directions.
func runBulk(t *testing.T, m benchMode, path string, cfg benchConfig) float64 {
	t.Helper()
	url := serverURL(path)
	r := fortioLoad(t, m, "-qps", "-1", "-c", "1", "-t", cfg.bulkDur.String(), "-payload-size", fmt.Sprint(cfg.bulkPayload), url)
	return r.ActualQPS * float64(2*cfg.bulkPayload) * 8 / 1e6
}

// idleResult is ztunnel's memory with many idle connections open.
type idleResult struct {
	Conns                int
	RSSBeforeMiB         float64 // both ztunnels
	RSSHeldMiB           float64
	KiBPerConnPerZtunnel float64 // the client and the server side each hold one tunnel per connection
}

func runIdle(t *testing.T, m benchMode, cfg benchConfig) idleResult {
	t.Helper()
	before := proxyRSS(t, meshNS, "app=ztunnel")
	hold := 20 * time.Second
	done := make(chan string, 1)
	go func() {
		out, err := kubectl("exec", "-n", m.ns, "deploy/client", "--", "fortio", "hold", "-n", fmt.Sprint(cfg.idleConns), "-t", hold.String(), "server-cross:8080")
		if err != nil {
			out = "error: " + err.Error() + " " + out
		}
		done <- out
	}()
	time.Sleep(hold / 2)
	held := proxyRSS(t, meshNS, "app=ztunnel")
	if out := <-done; !strings.Contains(out, "holding") {
		t.Fatalf("fortio hold: %s", out)
	}
	return idleResult{Conns: cfg.idleConns, RSSBeforeMiB: before / (1 << 20), RSSHeldMiB: held / (1 << 20),
		KiBPerConnPerZtunnel: (held - before) / 1024 / float64(cfg.idleConns) / 2}
}

// podUIDs lists the UIDs of the pods matching selector in ns.
func podUIDs(t *testing.T, ns, selector string) []string {
	t.Helper()
	out := mustKubectl(t, "get", "pods", "-n", ns, "-l", selector, "-o", "jsonpath={.items[*].metadata.uid}")
	return strings.Fields(out)
}

// podCgroup finds the pod's cgroup directory under a v1 controller
// hierarchy (the lab's kubelets use the cgroupfs driver on this host).
func podCgroup(t *testing.T, controller, uid string) string {
	t.Helper()
	var found string
	filepath.WalkDir(filepath.Join("/sys/fs/cgroup", controller), func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil // files, and directories gone meanwhile
		}
		if d.Name() == "pod"+uid {
			found = p
			return filepath.SkipAll
		}
		return nil
	})
	if found == "" {
		t.Fatalf("no %s cgroup for pod %s", controller, uid)
	}
	return found
}

// proxyCPU is the CPU time used so far by all pods matching selector (0
// when there are none).
func proxyCPU(t *testing.T, ns, selector string) time.Duration {
	t.Helper()
	var sum time.Duration
	for _, uid := range podUIDs(t, ns, selector) {
		b, err := os.ReadFile(filepath.Join(podCgroup(t, "cpuacct", uid), "cpuacct.usage"))
		if err != nil {
			t.Fatal(err)
		}
		var ns int64
		fmt.Sscan(string(b), &ns)
		sum += time.Duration(ns)
	}
	return sum
}

// proxyRSS is the resident anonymous memory (bytes) of all pods matching
// selector.
func proxyRSS(t *testing.T, ns, selector string) float64 {
	t.Helper()
	var sum float64
	for _, uid := range podUIDs(t, ns, selector) {
		b, err := os.ReadFile(filepath.Join(podCgroup(t, "memory", uid), "memory.stat"))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "total_rss "); ok {
				var n float64
				fmt.Sscan(v, &n)
				sum += n
			}
		}
	}
	return sum
}

// writeBenchReport writes results.json and results.md (ratios to the same
// run's direct path) and latency.png (latency distributions, drawn by the
// bench tools' plotter).
func writeBenchReport(t *testing.T, out string, cfg benchConfig, full bool, results []benchResult, idle idleResult) {
	t.Helper()
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	load, _ := os.ReadFile("/proc/loadavg")
	doc := map[string]any{"time": time.Now().UTC().Format(time.RFC3339), "loadavg": strings.TrimSpace(string(load)), "full": full,
		"latency": fmt.Sprintf("%d-byte POST echoed, %.0f rps over %d connections for %s", cfg.payload, cfg.qps, cfg.conns, cfg.dur),
		"bulk":    fmt.Sprintf("%d-byte POST echoed on one connection for %s", cfg.bulkPayload, cfg.bulkDur),
		"results": results, "idle": idle}
	js, _ := json.MarshalIndent(doc, "", "  ")
	if err := os.WriteFile(filepath.Join(out, "results.json"), js, 0o644); err != nil {
		t.Fatal(err)
	}
	var md strings.Builder
	fmt.Fprintf(&md, "bench-mesh %s, load average %s; latency: %s; bulk: %s\n\n", doc["time"], doc["loadavg"], doc["latency"], doc["bulk"])
	fmt.Fprintln(&md, "| mode | path | rps | p50 / p90 / p99 ms | added p50 / p90 / p99 ms | ztunnel vCPU per 1000 rps (all) | waypoint vCPU per 1000 rps | bulk Mbit/s | bulk ÷ direct |")
	fmt.Fprintln(&md, "|---|---|---|---|---|---|---|---|---|")
	direct := map[string]benchResult{}
	for _, r := range results {
		if r.Mode == "direct" {
			direct[r.Path] = r
		}
	}
	for _, r := range results {
		d := direct[r.Path]
		ratio := 0.0
		if d.BulkMbps > 0 {
			ratio = r.BulkMbps / d.BulkMbps
		}
		fmt.Fprintf(&md, "| %s | %s | %.0f | %.3f / %.3f / %.3f | %+.3f / %+.3f / %+.3f | %.3f | %.3f | %.0f | %.2f |\n",
			r.Mode, r.Path, r.QPS, r.P50, r.P90, r.P99, r.P50-d.P50, r.P90-d.P90, r.P99-d.P99, r.ZtunnelCPUPer1k, r.WaypointCPUPer1k, r.BulkMbps, ratio)
	}
	fmt.Fprintf(&md, "\nztunnel RSS (both nodes): %.1f MiB idle, %.1f MiB with %d idle connections open → %.1f KiB per connection per ztunnel\n",
		idle.RSSBeforeMiB, idle.RSSHeldMiB, idle.Conns, idle.KiBPerConnPerZtunnel)
	if err := os.WriteFile(filepath.Join(out, "results.md"), []byte(md.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + md.String())
	plotter := filepath.Join(repoRoot, "bin/fortio/fortio")
	if b, err := exec.Command(plotter, "plot", "-in", filepath.Join(out, "results.json"), "-out", filepath.Join(out, "latency.png")).CombinedOutput(); err != nil {
		t.Fatalf("plot: %v\n%s", err, b)
	}
	t.Logf("wrote %s/{results.json,results.md,latency.png}", out)
}
