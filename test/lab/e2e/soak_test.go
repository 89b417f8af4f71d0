//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestSoak is `make soak DURATION=30m` (SOAK_DURATION) and, for 40 s, its
// smoke in the end-to-end stage: the steady load of the chaos scenarios
// (HTTP through ztunnel and through a waypoint, same and cross node, plus
// long-lived connections) while an AuthorizationPolicy is created and
// deleted and a bystander pod is created and deleted, alternately, every
// few seconds. Both policy states allow the load and the churned pod is
// not on its path, so no request may fail and no connection may break.
// ztunnel and waypoint RSS, goroutines and open fds (their /metrics) and
// the load's p99 are sampled; growth beyond a bound set from the first
// samples fails the run. Results and a plot go to bin/soak/.
func TestSoak(t *testing.T) {
	requireLoadTools(t)
	dur, every, churn := 40*time.Second, 8*time.Second, 4*time.Second
	if s := os.Getenv("SOAK_DURATION"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < time.Minute {
			t.Fatalf("SOAK_DURATION %q: want a Go duration of at least 1m", s)
		}
		dur, every = d, 30*time.Second
	}
	const zt, wp = "soak-ztunnel", "soak-waypoint"
	deployLoadApps(t, zt, 0)
	deployLoadApps(t, wp, 1)
	h1, l1 := streams(zt, "ztunnel")
	h2, l2 := streams(wp, "waypoint")
	start := time.Now()
	l := startLoad(t, loadConfig{qps: 20, chunk: 10 * time.Second, conns: 5, hold: dur}, append(h1, h2...), append(l1, l2...))
	defer l.finish()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var churns int
	wg.Add(1)
	go func() {
		defer wg.Done()
		churns = churnLoop(t, zt, churn, stop)
	}()
	var samples []soakSample
	for time.Since(start) < dur {
		samples = append(samples, takeSample(t, start, []string{zt, wp}))
		time.Sleep(min(every, dur-time.Since(start)+time.Second))
	}
	close(stop)
	wg.Wait()
	l.finish()
	samples = append(samples, takeSample(t, start, []string{zt, wp}))
	kubectl("delete", "authorizationpolicy", "-n", zt, "soak-allow", "--ignore-not-found")

	res := soakResult{Duration: dur.String(), Churns: churns, Load: l, Samples: samples}
	res.Bounds = soakBounds(samples)
	writeSoakReport(t, res)
	assertNothingLost(t, l, all)
	for _, s := range l.HTTP {
		t.Logf("soak http %-20s sent %6d failed %d", s.Name, s.Sent, s.Failed)
	}
	for _, h := range l.Hold {
		t.Logf("soak conn %-20s held %d broken %d bytes verified %d", h.Name, h.Result.Opened, h.Result.Broken, h.Result.BytesVerified)
	}
	if churns < 2 {
		t.Errorf("only %d churn steps ran", churns)
	}
	for _, b := range res.Bounds {
		t.Logf("soak %s: first %.1f, bound %.1f, last %.1f", b.What, b.Baseline, b.Bound, b.Last)
		if b.Last > b.Bound {
			t.Errorf("%s grew beyond its bound: %.1f at the end, bound %.1f (baseline %.1f from the first samples)", b.What, b.Last, b.Bound, b.Baseline)
		}
	}
}

// churnLoop alternates a policy change and a pod churn every period until
// stop; it returns how many steps ran.
func churnLoop(t *testing.T, ns string, period time.Duration, stop <-chan struct{}) int {
	policy := `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: soak-allow}
spec:
  action: ALLOW
  rules: [{from: [{source: {namespaces: [` + ns + `]}}]}]
`
	steps := 0
	for i := 0; ; i++ {
		select {
		case <-stop:
			kubectl("delete", "pod", "-n", ns, "-l", "app=churn", "--wait=false")
			return steps
		case <-time.After(period):
		}
		var out string
		var err error
		switch i % 4 {
		case 0:
			out, err = kubectlIn(policy, "apply", "-n", ns, "-f", "-")
		case 1:
			node := []string{nodeA, nodeB}[(i/4)%2]
			out, err = kubectlIn(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: churn, labels: {app: churn}}
spec:
  nodeName: %s
  terminationGracePeriodSeconds: 1
  containers:
  - `+serverContainer+`
`, node), "apply", "-n", ns, "-f", "-")
		case 2:
			out, err = kubectl("delete", "authorizationpolicy", "-n", ns, "soak-allow", "--ignore-not-found")
		case 3:
			out, err = kubectl("delete", "pod", "-n", ns, "churn", "--ignore-not-found", "--wait=true", "--timeout=30s")
		}
		if err != nil {
			t.Logf("churn step %d: %v: %s", i, err, out)
			continue
		}
		steps++
	}
}

// soakSample is one point of the series.
type soakSample struct {
	AtSeconds float64            `json:"atSeconds"`
	Metrics   map[string]float64 `json:"metrics"` // "<component> <metric>", summed over the component's pods
	P99ms     float64            `json:"p99ms"`   // worst p99 of the last chunk of each HTTP stream
}

var soakMetrics = []string{"process_resident_memory_bytes", "go_goroutines", "process_open_fds"}

func takeSample(t *testing.T, start time.Time, nss []string) soakSample {
	s := soakSample{AtSeconds: time.Since(start).Seconds(), Metrics: map[string]float64{}}
	comps := []struct{ name, ns, selector string }{{"ztunnel", meshNS, "app=ztunnel"}}
	for _, ns := range nss {
		comps = append(comps, struct{ name, ns, selector string }{"waypoint", ns, waypointSelector})
	}
	for _, c := range comps {
		out, _ := kubectl("get", "pods", "-n", c.ns, "-l", c.selector, "-o", "jsonpath={.items[*].metadata.name}")
		for _, pod := range strings.Fields(out) {
			m, err := kubectl("get", "--raw", fmt.Sprintf("/api/v1/namespaces/%s/pods/%s:15020/proxy/metrics", c.ns, pod))
			if err != nil {
				t.Logf("metrics of %s/%s: %v", c.ns, pod, err)
				continue
			}
			for _, name := range soakMetrics {
				if v, ok := promValue(m, name); ok {
					s.Metrics[c.name+" "+name] += v
				}
			}
		}
	}
	p99Mu.Lock()
	s.P99ms = lastP99
	lastP99 = 0
	p99Mu.Unlock()
	return s
}

// lastP99 is the worst p99 seen by any HTTP chunk since the last sample.
var (
	p99Mu   sync.Mutex
	lastP99 float64
)

func noteP99(r fortioResult) {
	for _, p := range r.DurationHistogram.Percentiles {
		if p.Percentile == 99 {
			p99Mu.Lock()
			lastP99 = math.Max(lastP99, p.Value*1000)
			p99Mu.Unlock()
		}
	}
}

// promValue reads an unlabelled sample from Prometheus text.
func promValue(text, name string) (float64, bool) {
	for line := range strings.Lines(text) {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}

type soakBound struct {
	What                  string
	Baseline, Bound, Last float64
}

// soakBounds: the baseline is the largest value in the first fifth of the
// run (at least two samples: start-up settles there); the bound allows 50%
// more plus a fixed slack (RSS 16 MiB, 50 goroutines, 32 fds); the last
// value is the mean of the last two samples.
func soakBounds(samples []soakSample) []soakBound {
	if len(samples) < 4 {
		return nil
	}
	n := max(2, len(samples)/5)
	var bounds []soakBound
	for _, comp := range []string{"ztunnel", "waypoint"} {
		for _, m := range soakMetrics {
			key := comp + " " + m
			var base float64
			for _, s := range samples[:n] {
				base = math.Max(base, s.Metrics[key])
			}
			if base == 0 {
				continue
			}
			last := (samples[len(samples)-1].Metrics[key] + samples[len(samples)-2].Metrics[key]) / 2
			bound := base*1.5 + 50
			switch m {
			case "process_resident_memory_bytes":
				base, last, bound = base/(1<<20), last/(1<<20), base/(1<<20)*1.5+16
				key = comp + " RSS MiB"
			case "process_open_fds":
				bound = base + 32
			}
			bounds = append(bounds, soakBound{What: key, Baseline: base, Bound: bound, Last: last})
		}
	}
	return bounds
}

type soakResult struct {
	Duration string       `json:"duration"`
	Churns   int          `json:"churnSteps"`
	Load     *load        `json:"load"`
	Samples  []soakSample `json:"samples"`
	Bounds   []soakBound  `json:"bounds"`
}

// writeSoakReport writes bin/soak/results.json and soak.png (RSS,
// goroutines and p99 over time, drawn by the lab's fortio plotter).
func writeSoakReport(t *testing.T, res soakResult) {
	out := filepath.Join(repoRoot, "bin/soak")
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Error(err)
		return
	}
	js, _ := json.MarshalIndent(res, "", "  ")
	in := filepath.Join(out, "results.json")
	if err := os.WriteFile(in, js, 0o644); err != nil {
		t.Error(err)
		return
	}
	writeArtifact(t, "soak-results.json", js)
	if o, err := exec.Command(filepath.Join(repoRoot, "bin/fortio/fortio"), "series", "-in", in, "-out", filepath.Join(out, "soak.png")).CombinedOutput(); err != nil {
		t.Errorf("plotting the soak: %v: %s", err, o)
	}
}
