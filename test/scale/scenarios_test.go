//go:build scale

package scale

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// TestScaleScenarios runs the scenarios of issue 14 on one simulated
// cluster, in order, each reporting a RESULT line (and a JSON line appended
// to SCALE_OUT, for hack/scaleplot):
//
//	steady   N pods over M nodes, one node-scoped ztunnel client per node
//	         (SCALE_NODES, SCALE_PODS_PER_NODE), then SCALE_SAMPLES pods
//	         created one at a time
//	churn    pods created and deleted at SCALE_CHURN_RATE/s for SCALE_CHURN_SECONDS
//	service  a Service scaled to SCALE_SERVICE_ENDPOINTS endpoints, then to half
//	enrol    a namespace of SCALE_ENROL_PODS Running pods enrolled at once
//	policy   a mesh-wide AuthorizationPolicy (every client must hold it)
//	restart  the manager stopped, one pod per node created and one deleted
//	         while it is down, started again: time until every client holds
//	         exactly its node's pods (the reconnect storm)
//
// SCALE_SCENARIOS selects a subset (comma separated; steady always runs).
// SCALE_PROFILE=dir writes CPU and mutex profiles of the test process
// during the restart; SCALE_RESTART_APISERVER_PAUSE=20s stops the API
// server for that long as the restarted manager starts (a stalled sync).
// Convergence is pod created (or namespace labelled, or policy created) →
// every relevant proxy holds it: the ztunnel of the pod's node (node-scoped
// discovery), or every ztunnel for a policy. Bytes are what the xDS server
// wrote (TLS records) during the scenario. CPU is the test process (the
// manager's informers and control plane plus the in-process clients) and,
// separately, the kube-apiserver, etcd and kwok processes.
func TestScaleScenarios(t *testing.T) {
	nodes, per := envInt("SCALE_NODES", 10), envInt("SCALE_PODS_PER_NODE", 20)
	want := map[string]bool{"steady": true}
	for _, s := range strings.Split(envStr("SCALE_SCENARIOS", "churn,service,enrol,policy,restart"), ",") {
		want[strings.TrimSpace(s)] = true
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := startCluster(t, ctx)
	r := &run{t: t, c: c, nodes: nodes, pods: nodes * per, out: os.Getenv("SCALE_OUT")}
	for i := range 5 {
		must(t, c.k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "svc-" + strconv.Itoa(i), Namespace: appNS},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "svc-" + strconv.Itoa(i)}, Ports: []corev1.ServicePort{{Port: 80}}}}))
	}

	// steady: every node's client connected, then every pod created.
	names := make([]string, nodes)
	for i := range nodes {
		names[i] = fmt.Sprintf("kwok-%d", i)
		c.createNode(t, ctx, names[i])
	}
	clientCtx, stopClients := context.WithCancel(ctx)
	defer stopClients()
	tr := newTracker(nodes)
	tr.watchRunning(t, ctx, c.cs)
	r.tr = tr
	clients := make([]*xds.Client, nodes)
	for i := range nodes {
		var st *xds.State
		clients[i], st = c.connect(t, clientCtx, names[i])
		tr.watch(i, st)
	}
	eventually(t, 5*time.Minute, "every client ready", func() bool { return tr.allReady() })
	m := r.begin()
	pods := make([]podRef, 0, nodes*per)
	for i := range nodes {
		for j := range per {
			pods = append(pods, podRef{ns: appNS, name: fmt.Sprintf("%s-app-%d", names[i], j), node: i, labels: map[string]string{"app": "svc-" + strconv.Itoa(j%5)}})
		}
	}
	c.createAll(t, ctx, tr, pods)
	tr.wait(t, 30*time.Minute, "every ztunnel holds its node's pods")
	r.end(m, "steady-create", tr.latencies(), len(pods))
	for i, s := range tr.states {
		if n := countOn(s, names[i]); n != per {
			t.Fatalf("%s's ztunnel holds %d of its %d pods", names[i], n, per)
		}
		for _, w := range s.Workloads() {
			if w.Namespace == appNS && w.Node != names[i] {
				t.Fatalf("%s's ztunnel holds %s of %s", names[i], w.Name, w.Node)
			}
		}
	}
	// Idle: what the server writes with nothing changing (keepalive
	// pings of every connection), subtracted from the next scenarios'
	// bytes per change.
	idle := r.begin()
	time.Sleep(10 * time.Second)
	r.end(idle, "steady-idle-10s", nil, 0)
	r.idleBytesPerSec = float64(r.results[len(r.results)-1].Bytes) / r.results[len(r.results)-1].Seconds
	// One pod at a time: latency without the backlog of a burst.
	samples := envInt("SCALE_SAMPLES", 50)
	m = r.begin()
	var sampled []time.Duration
	for k := range samples {
		p := podRef{ns: appNS, name: fmt.Sprintf("sample-%d", k), node: k % nodes, labels: map[string]string{"app": "svc-0"}}
		c.createAll(t, ctx, tr, []podRef{p})
		tr.wait(t, 5*time.Minute, "sampled pod at its ztunnel")
		sampled = append(sampled, tr.latencies()...)
		pods = append(pods, p)
	}
	r.end(m, "steady-one-at-a-time", sampled, samples)

	if want["churn"] {
		rate, secs := envInt("SCALE_CHURN_RATE", 100), envInt("SCALE_CHURN_SECONDS", 10)
		m = r.begin()
		tick := time.NewTicker(time.Second / time.Duration(rate))
		end := time.Now().Add(time.Duration(secs) * time.Second)
		var wg sync.WaitGroup
		changes, settled := 0, len(pods)
		for k := 0; time.Now().Before(end); k++ {
			<-tick.C
			// A pod created; one of those that existed before deleted.
			add := podRef{ns: appNS, name: fmt.Sprintf("churn-%d", k), node: k % nodes, labels: map[string]string{"app": "svc-1"}}
			var del *podRef
			if k < settled {
				del = &podRef{}
				*del, pods[k] = pods[k], add
				changes++
			} else {
				pods = append(pods, add)
			}
			changes++
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.createAll(t, ctx, tr, []podRef{add})
				if del != nil {
					c.deletePod(t, ctx, tr, *del)
				}
			}()
		}
		tick.Stop()
		issued := m.elapsed()
		wg.Wait()
		tr.wait(t, 10*time.Minute, "churn converged")
		r.end(m, fmt.Sprintf("churn-%d/s-for-%ds", rate, secs), tr.latencies(), changes)
		r.note("churn achieved %.0f changes/s (asked %d)", float64(changes)/issued.Seconds(), 2*rate)
	}

	if want["service"] {
		eps := envInt("SCALE_SERVICE_ENDPOINTS", 5000)
		must(t, c.k8s.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "big", Namespace: appNS},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "big"}, Ports: []corev1.ServicePort{{Port: 80}}}}))
		big := make([]podRef, eps)
		for k := range eps {
			big[k] = podRef{ns: appNS, name: fmt.Sprintf("big-%d", k), node: k % nodes, labels: map[string]string{"app": "big"}}
		}
		m = r.begin()
		c.createAll(t, ctx, tr, big)
		tr.wait(t, 30*time.Minute, "big service scaled up")
		r.end(m, fmt.Sprintf("service-scale-0-to-%d", eps), tr.latencies(), eps)
		svcKey := appNS + "/big." + appNS + ".svc.cluster.local"
		eventually(t, time.Minute, "every ztunnel holds the big service", func() bool {
			for _, s := range tr.states {
				if s.ServiceByKey(svcKey) == nil {
					return false
				}
			}
			return true
		})
		m = r.begin()
		for _, p := range big[eps/2:] {
			c.deletePod(t, ctx, tr, p)
		}
		tr.wait(t, 30*time.Minute, "big service scaled down")
		r.end(m, fmt.Sprintf("service-scale-%d-to-%d", eps, eps/2), tr.latencies(), eps-eps/2)
		pods = append(pods, big[:eps/2]...)
	}

	if want["enrol"] {
		n := envInt("SCALE_ENROL_PODS", 2000)
		ns := "enrol"
		must(t, c.k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}))
		must(t, c.k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: ns}}))
		enrol := make([]podRef, n)
		for k := range n {
			enrol[k] = podRef{ns: ns, name: fmt.Sprintf("e-%d", k), node: k % nodes, labels: map[string]string{"app": "e"}}
		}
		c.createAll(t, ctx, nil, enrol)
		eventually(t, 30*time.Minute, "kwok ran every pod of the namespace", func() bool {
			var l corev1.PodList
			must(t, c.k8s.List(ctx, &l, client.InNamespace(ns)))
			running := 0
			for _, p := range l.Items {
				if p.Status.PodIP != "" {
					running++
				}
			}
			return running == n
		})
		m = r.begin()
		t0 := time.Now()
		for _, p := range enrol {
			tr.expect(p.node, xds.PodUID("Kubernetes", ns, p.name), true, t0)
		}
		var nsObj corev1.Namespace
		must(t, c.k8s.Get(ctx, client.ObjectKey{Name: ns}, &nsObj))
		nsObj.Labels = map[string]string{"istio.io/dataplane-mode": "ambient"}
		must(t, c.k8s.Update(ctx, &nsObj))
		tr.wait(t, 30*time.Minute, "enrolled namespace at every ztunnel")
		r.end(m, fmt.Sprintf("enrol-namespace-%d-pods", n), tr.latencies(), n)
		pods = append(pods, enrol...)
	}

	if want["policy"] {
		m = r.begin()
		pol := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "mesh-deny", Namespace: meshNS}}
		pol.Spec.Action = apisecurity.AuthorizationPolicy_DENY
		pol.Spec.Rules = []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{IpBlocks: []string{"192.0.2.0/24"}}}}}}
		t0 := time.Now()
		for i := range nodes {
			tr.expectPolicy(i, meshNS+"/mesh-deny", t0)
		}
		must(t, c.k8s.Create(ctx, pol))
		tr.wait(t, 10*time.Minute, "every ztunnel holds the policy")
		r.end(m, "policy-mesh-wide", tr.latencies(), 1)
	}

	if want["restart"] {
		m = r.begin()
		addr := c.xdsAddr
		c.stopManager()
		// While it is down: one pod more and one less per node.
		var added, deleted []podRef
		for i := range nodes {
			added = append(added, podRef{ns: appNS, name: fmt.Sprintf("down-%d", i), node: i, labels: map[string]string{"app": "svc-2"}})
		}
		c.createAll(t, ctx, nil, added)
		for i, p := range slices.Clone(pods) {
			if len(deleted) < nodes && p.ns == appNS && slices.IndexFunc(deleted, func(d podRef) bool { return d.node == p.node }) < 0 {
				deleted = append(deleted, p)
				pods[i] = added[p.node]
			}
		}
		for _, p := range deleted {
			must(t, c.k8s.Delete(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns}}, client.GracePeriodSeconds(0)))
		}
		peak := r.watchPeak()
		t0 := time.Now()
		tr.arm(t0)
		for _, p := range added {
			tr.expect(p.node, xds.PodUID("Kubernetes", p.ns, p.name), true, t0)
		}
		for _, p := range deleted {
			tr.expect(p.node, xds.PodUID("Kubernetes", p.ns, p.name), false, t0)
		}
		stopProfile := r.profile("restart")
		accepted := c.accepted.Load()
		// SCALE_RESTART_APISERVER_PAUSE: the API server stopped (SIGSTOP)
		// for that long while the manager syncs, as a saturated one would
		// stall the sync past the proxies' connect timeout.
		if d, err := time.ParseDuration(os.Getenv("SCALE_RESTART_APISERVER_PAUSE")); err == nil && d > 0 {
			c.beforeStart = func() { pauseAPIServer(t, d) }
		}
		c.stopManager = c.startManager(t, ctx, addr)
		c.beforeStart = nil
		started := time.Since(t0)
		tr.wait(t, 10*time.Minute, "every client consistent after the restart")
		stopProfile()
		rss, heap := peak()
		r.end(m, fmt.Sprintf("restart-%d-clients", nodes), tr.latencies(), nodes) // bytes per client resynced
		r.note("restart: manager synced in %v; %d connections accepted for %d clients; peak during the storm: RSS %.0f MiB, heap %.0f MiB",
			started.Round(time.Millisecond), c.accepted.Load()-accepted, nodes, rss, heap)
		if rs := tr.resynced(); len(rs) > 0 {
			q := func(p int) time.Duration { return rs[(len(rs)*p+99)/100-1].Round(time.Millisecond) }
			r.note("restart: first change applied by %d clients p50 %v p99 %v max %v; the last pod created while down had its address %v after the start",
				len(rs), q(50), q(99), q(100), tr.lastRunning(added, t0).Round(time.Millisecond))
		}
		// Consistent: each client holds exactly its node's pods.
		byNode := make([]map[string]bool, nodes)
		for i := range byNode {
			byNode[i] = map[string]bool{}
		}
		for _, p := range pods {
			byNode[p.node][xds.PodUID("Kubernetes", p.ns, p.name)] = true
		}
		for i, s := range tr.states {
			held := 0
			for _, w := range s.Workloads() {
				if w.Namespace == meshNS {
					continue
				}
				uid := xds.PodUID("Kubernetes", w.Namespace, w.Name)
				if !byNode[i][uid] {
					t.Fatalf("%s's ztunnel holds %s, not its node's or deleted", names[i], uid)
				}
				held++
			}
			if held != len(byNode[i]) {
				t.Fatalf("%s's ztunnel holds %d of its %d pods after the restart", names[i], held, len(byNode[i]))
			}
		}
	}

	// Per-client memory: the test process's heap with every client
	// connected, minus without them (client state + server stream).
	with := heapMiB()
	stopClients()
	time.Sleep(5 * time.Second)
	without := heapMiB()
	r.note("per client (client state + its server stream): %.1f KiB (heap %.1f MiB with %d clients, %.1f MiB without)",
		(with-without)*1024/float64(nodes), with, nodes, without)
	r.perClientKiB = (with - without) * 1024 / float64(nodes)
	r.flush()
}

// pauseAPIServer stops this test's kube-apiserver (a child process) and
// continues it after d.
func pauseAPIServer(t *testing.T, d time.Duration) {
	t.Helper()
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, pid := range strings.Fields(string(b)) {
			comm, _ := os.ReadFile("/proc/" + pid + "/comm")
			if strings.TrimSpace(string(comm)) != "kube-apiserver" {
				continue
			}
			n, _ := strconv.Atoi(pid)
			must(t, syscall.Kill(n, syscall.SIGSTOP))
			time.AfterFunc(d, func() { _ = syscall.Kill(n, syscall.SIGCONT) })
			return
		}
	}
	t.Fatal("kube-apiserver not found among this test's child processes")
}

// podRef is a pod of the scenario and the index of its node.
type podRef struct {
	ns, name string
	node     int
	labels   map[string]string
}

// createAll creates pods (kwok runs them), 64 at a time, and tells tr to
// expect each at its node's ztunnel from the moment its create was sent.
func (c *cluster) createAll(t *testing.T, ctx context.Context, tr *tracker, pods []podRef) {
	t.Helper()
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for _, p := range pods {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if tr != nil {
				tr.expect(p.node, xds.PodUID("Kubernetes", p.ns, p.name), true, time.Now())
			}
			err := createRetrying(ctx, c.k8s, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns, Labels: p.labels},
				Spec: corev1.PodSpec{NodeName: fmt.Sprintf("kwok-%d", p.node), Containers: []corev1.Container{{Name: "app", Image: "app"}},
					Tolerations: []corev1.Toleration{{Key: kwokAnnotation, Operator: corev1.TolerationOpExists}}}})
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	must(t, firstErr)
}

// createRetrying creates obj, again after a timeout or throttling of a
// saturated API server (an AlreadyExists then is the earlier try's success).
func createRetrying(ctx context.Context, k8s client.Client, obj client.Object) error {
	for try := 0; ; try++ {
		err := k8s.Create(ctx, obj)
		switch {
		case err == nil:
			return nil
		case try > 0 && apierrors.IsAlreadyExists(err):
			return nil
		case try < 5 && (apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) || apierrors.IsTooManyRequests(err) || apierrors.IsInternalError(err)):
			time.Sleep(time.Second << try)
			obj.SetResourceVersion("")
		default:
			return fmt.Errorf("create %s/%s: %w", obj.GetNamespace(), obj.GetName(), err)
		}
	}
}

// deletePod deletes p at once and expects it gone from its node's ztunnel.
func (c *cluster) deletePod(t *testing.T, ctx context.Context, tr *tracker, p podRef) {
	t.Helper()
	tr.expect(p.node, xds.PodUID("Kubernetes", p.ns, p.name), false, time.Now())
	must(t, c.k8s.Delete(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: p.ns}}, client.GracePeriodSeconds(0)))
}

// tracker records when each client's state first satisfies what it is
// expected to hold (a workload with an address, its absence, a policy),
// checked on every change the client applies.
type tracker struct {
	mu      sync.Mutex
	states  []*xds.State
	pending []map[string]expectation // per client, by workload uid or policy key
	lat     []time.Duration
	open    int
	// running: when this test's own watch saw kwok give each pod its
	// address, by workload uid; latFromRunning is measured from there (the
	// control plane's share, without the API server's and kwok's).
	running        map[string]time.Time
	latFromRunning []time.Duration
	// firstChange: when each client first applied a change after
	// armedAt (its stream resynced after a restart), set by arm.
	armedAt     time.Time
	firstChange []time.Time
}

type expectation struct {
	present, policy bool
	since           time.Time
}

func newTracker(n int) *tracker {
	tr := &tracker{states: make([]*xds.State, n), pending: make([]map[string]expectation, n), running: map[string]time.Time{}}
	for i := range tr.pending {
		tr.pending[i] = map[string]expectation{}
	}
	return tr
}

func (tr *tracker) watch(i int, s *xds.State) {
	tr.states[i] = s
	s.OnChange(func(xds.Change) {
		now := time.Now()
		tr.mu.Lock()
		if !tr.armedAt.IsZero() && tr.firstChange[i].IsZero() {
			tr.firstChange[i] = now
		}
		tr.mu.Unlock()
		tr.check(i, now)
	})
}

// arm starts recording each client's first change from t0.
func (tr *tracker) arm(t0 time.Time) {
	tr.mu.Lock()
	tr.armedAt, tr.firstChange = t0, make([]time.Time, len(tr.states))
	tr.mu.Unlock()
}

// resynced returns, sorted, how long after arm each client first applied a
// change (clients without one are left out).
func (tr *tracker) resynced() []time.Duration {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var d []time.Duration
	for _, f := range tr.firstChange {
		if !f.IsZero() {
			d = append(d, f.Sub(tr.armedAt))
		}
	}
	slices.Sort(d)
	return d
}

// lastRunning is how long after t0 the last of pods got its address (as
// this test's watch saw it), zero if all had it before.
func (tr *tracker) lastRunning(pods []podRef, t0 time.Time) time.Duration {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var last time.Duration
	for _, p := range pods {
		if r, ok := tr.running[xds.PodUID("Kubernetes", p.ns, p.name)]; ok {
			last = max(last, r.Sub(t0))
		}
	}
	return last
}

func (tr *tracker) expect(i int, uid string, present bool, since time.Time) {
	tr.add(i, uid, expectation{present: present, since: since})
}

func (tr *tracker) expectPolicy(i int, key string, since time.Time) {
	tr.add(i, key, expectation{present: true, policy: true, since: since})
}

func (tr *tracker) add(i int, key string, e expectation) {
	tr.mu.Lock()
	if _, ok := tr.pending[i][key]; !ok {
		tr.open++
	}
	tr.pending[i][key] = e
	tr.mu.Unlock()
	tr.check(i, time.Now()) // already there (a change applied before the expectation)
}

func (tr *tracker) check(i int, now time.Time) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	s := tr.states[i]
	for key, e := range tr.pending[i] {
		var met bool
		switch w := s.WorkloadByUID(key); {
		case e.policy:
			met = s.Policy(key) != nil
		case e.present: // in the mesh, with its address
			met = w != nil && len(w.Addresses) > 0 && w.TunnelProtocol == workloadapi.TunnelProtocol_HBONE
		default:
			met = w == nil
		}
		if met {
			tr.lat = append(tr.lat, now.Sub(e.since))
			if r, ok := tr.running[key]; ok && e.present && !e.policy && r.After(e.since) {
				tr.latFromRunning = append(tr.latFromRunning, now.Sub(r))
			}
			delete(tr.pending[i], key)
			tr.open--
		}
	}
}

func (tr *tracker) allReady() bool {
	for _, s := range tr.states {
		if !s.Ready() {
			return false
		}
	}
	return true
}

// wait until nothing is pending; the states are checked again on the way
// (an expectation added after the last change is met without one).
func (tr *tracker) wait(t *testing.T, timeout time.Duration, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		tr.mu.Lock()
		open := tr.open
		tr.mu.Unlock()
		if open == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: %d expectations open", what, open)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// latencies returns and resets the recorded latencies.
func (tr *tracker) latencies() []time.Duration {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	l := tr.lat
	tr.lat = nil
	return l
}

// fromRunning returns and resets the latencies from "pod Running with its
// address" (as this test's watch saw it) to its ztunnel holding it.
func (tr *tracker) fromRunning() []time.Duration {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	l := tr.latFromRunning
	tr.latFromRunning = nil
	return l
}

// watchRunning records when each pod first has an address, from a watch
// of every pod (started before the pods are created).
func (tr *tracker) watchRunning(t *testing.T, ctx context.Context, cs kubernetes.Interface) {
	t.Helper()
	w, err := cs.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{})
	must(t, err)
	go func() {
		for {
			tr.record(w)
			if ctx.Err() != nil {
				return
			}
			// The API server ends watches after a while: watch again
			// (a pod Running in the gap gets no from-Running sample).
			if w, err = cs.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{}); err != nil {
				return
			}
		}
	}()
}

func (tr *tracker) record(w watch.Interface) {
	defer w.Stop()
	for ev := range w.ResultChan() {
		p, ok := ev.Object.(*corev1.Pod)
		if !ok || p.Status.PodIP == "" {
			continue
		}
		now := time.Now()
		uid := xds.PodUID("Kubernetes", p.Namespace, p.Name)
		tr.mu.Lock()
		if _, seen := tr.running[uid]; !seen {
			tr.running[uid] = now
		}
		tr.mu.Unlock()
	}
}

// run collects the scenarios' measurements.
type run struct {
	t            *testing.T
	c            *cluster
	tr           *tracker
	nodes, pods  int
	out          string
	results      []result
	perClientKiB float64
	// idleBytesPerSec is what the xDS server writes with nothing to push.
	idleBytesPerSec float64
}

type mark struct {
	start         time.Time
	pushed        int64
	self, others  float64
	selfRSS, heap float64
}

func (m mark) elapsed() time.Duration { return time.Since(m.start) }

type result struct {
	Scenario     string  `json:"scenario"`
	Nodes        int     `json:"nodes"`
	Pods         int     `json:"pods"`
	Changes      int     `json:"changes"`
	Seconds      float64 `json:"seconds"`
	P50ms        float64 `json:"p50_ms"`
	P99ms        float64 `json:"p99_ms"`
	Maxms        float64 `json:"max_ms"`
	RunP50ms     float64 `json:"running_p50_ms"`
	RunP99ms     float64 `json:"running_p99_ms"`
	Bytes        int64   `json:"bytes_pushed"`
	BytesPer     float64 `json:"bytes_per_change"`
	NetBytesPer  float64 `json:"bytes_per_change_net_of_idle"`
	CPUSelf      float64 `json:"cpu_s_manager_and_clients"`
	CPUOthers    float64 `json:"cpu_s_apiserver_etcd_kwok"`
	RSSMiB       float64 `json:"rss_mib"`
	HeapMiB      float64 `json:"heap_mib"`
	PerClientKiB float64 `json:"per_client_kib,omitempty"`
	Load1        string  `json:"load1"`
}

func (r *run) begin() mark {
	self, others := cpuSeconds()
	return mark{start: time.Now(), pushed: r.c.pushed.Load(), self: self, others: others}
}

func (r *run) end(m mark, scenario string, lat []time.Duration, changes int) {
	runLat := r.tr.fromRunning()
	res := result{Scenario: scenario, Nodes: r.nodes, Pods: r.pods, Changes: changes, Seconds: m.elapsed().Seconds(), Load1: load1()}
	res.Bytes = r.c.pushed.Load() - m.pushed
	if changes > 0 {
		res.BytesPer = float64(res.Bytes) / float64(changes)
		res.NetBytesPer = max(0, float64(res.Bytes)-r.idleBytesPerSec*res.Seconds) / float64(changes)
	}
	self, others := cpuSeconds()
	res.CPUSelf, res.CPUOthers = self-m.self, others-m.others
	res.RSSMiB, res.HeapMiB = rssMiB(), heapMiB()
	if len(lat) > 0 {
		slices.Sort(lat)
		q := func(p int) float64 { return float64(lat[(len(lat)*p+99)/100-1].Microseconds()) / 1000 }
		res.P50ms, res.P99ms, res.Maxms = q(50), q(99), q(100)
	}
	if len(runLat) > 0 {
		slices.Sort(runLat)
		q := func(p int) float64 { return float64(runLat[(len(runLat)*p+99)/100-1].Microseconds()) / 1000 }
		res.RunP50ms, res.RunP99ms = q(50), q(99)
	}
	r.results = append(r.results, res)
	r.write(res) // now: a later failure keeps what was measured
	r.t.Logf("RESULT %s nodes=%d pods=%d changes=%d in %.1fs p50=%.0fms p99=%.0fms max=%.0fms (from Running: p50=%.0fms p99=%.0fms) pushed=%d B (%.0f B/change, %.0f net of idle) cpu: manager+clients %.1fs, apiserver+etcd+kwok %.1fs; rss %.0f MiB heap %.0f MiB load1 %s",
		scenario, r.nodes, r.pods, changes, res.Seconds, res.P50ms, res.P99ms, res.Maxms, res.RunP50ms, res.RunP99ms, res.Bytes, res.BytesPer, res.NetBytesPer, res.CPUSelf, res.CPUOthers, res.RSSMiB, res.HeapMiB, res.Load1)
}

func (r *run) note(format string, args ...any) { r.t.Logf("RESULT "+format, args...) }

// profile writes CPU and mutex profiles of the test process (the manager
// and the clients) to SCALE_PROFILE/<name>.{cpu,mutex}.pprof until the
// returned func is called; without SCALE_PROFILE it does nothing.
func (r *run) profile(name string) func() {
	dir := os.Getenv("SCALE_PROFILE")
	if dir == "" {
		return func() {}
	}
	must(r.t, os.MkdirAll(dir, 0o755))
	f, err := os.Create(filepath.Join(dir, name+".cpu.pprof"))
	must(r.t, err)
	must(r.t, pprof.StartCPUProfile(f))
	runtime.SetMutexProfileFraction(5)
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		m, err := os.Create(filepath.Join(dir, name+".mutex.pprof"))
		must(r.t, err)
		must(r.t, pprof.Lookup("mutex").WriteTo(m, 0))
		m.Close()
		runtime.SetMutexProfileFraction(0)
	}
}

// watchPeak samples RSS and heap every 100ms until the returned func is
// called, which returns the peaks in MiB.
func (r *run) watchPeak() func() (float64, float64) {
	done := make(chan struct{})
	var rss, heap float64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		var ms runtime.MemStats
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				runtime.ReadMemStats(&ms)
				rss, heap = max(rss, rssMiB()), max(heap, float64(ms.HeapAlloc)/(1<<20))
			}
		}
	}()
	return func() (float64, float64) { close(done); wg.Wait(); return rss, heap }
}

// write appends res to SCALE_OUT.
func (r *run) write(res result) {
	if r.out == "" {
		return
	}
	f, err := os.OpenFile(r.out, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	must(r.t, err)
	defer f.Close()
	must(r.t, json.NewEncoder(f).Encode(res))
}

// flush appends the per-client memory, measured last, as its own line.
func (r *run) flush() {
	r.write(result{Scenario: "per-client-memory", Nodes: r.nodes, Pods: r.pods, PerClientKiB: r.perClientKiB, Load1: load1()})
}

func envStr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// heapMiB is the live heap after a GC.
func heapMiB() float64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / (1 << 20)
}

func rssMiB() float64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func load1() string {
	b, _ := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}

// cpuSeconds returns the CPU time of this process and of its child
// processes (kube-apiserver, etcd, kwok), user+system.
func cpuSeconds() (self, children float64) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	self = tv(ru.Utime) + tv(ru.Stime)
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, pid := range strings.Fields(string(b)) {
			children += procCPU(pid)
		}
	}
	return self, children
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

// procCPU is utime+stime of pid from /proc/<pid>/stat, in seconds.
func procCPU(pid string) float64 {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}
