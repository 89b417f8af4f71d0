package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/ambientmesh/ambient/proxylib/discovery/selection"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/nodeagent"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
)

// One real kube-apiserver + etcd for the file; tests use distinct namespaces.
var (
	restCfg *rest.Config
	k8s     client.Client
)

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		if _, err := os.Stat("../../bin/k8s/1.36.3/kube-apiserver"); err == nil {
			abs, _ := filepath.Abs("../../bin/k8s/1.36.3")
			os.Setenv("KUBEBUILDER_ASSETS", abs)
		}
	}
	if os.Geteuid() != 0 && os.Getenv("CI") != "true" {
		fmt.Fprintln(os.Stderr, "skipping: namespaced node-agent tests need root")
		os.Exit(0)
	}
	env := &envtest.Environment{CRDDirectoryPaths: []string{"../../config/crd/bases"}, ErrorIfCRDPathMissing: true}
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "envtest:", err)
		os.Exit(1)
	}
	restCfg = cfg
	k8s, err = client.New(cfg, client.Options{Scheme: clientgoscheme.Scheme})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// A mesh exists: stopping an agent is a restart, not an uninstall.
	if err := k8s.Create(context.Background(), newMesh()); err != nil {
		fmt.Fprintln(os.Stderr, "create AmbientMesh:", err)
		os.Exit(1)
	}
	code := m.Run()
	if builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	_ = env.Stop()
	os.Exit(code)
}

const nodeName = "node1"

var captureLatency time.Duration // reported, never asserted

func newMesh() *unstructured.Unstructured {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "mesh.ambient.dev/v1alpha1", "kind": "AmbientMesh",
		"metadata": map[string]any{"name": "default"},
		"spec":     map[string]any{"trustDomain": "cluster.local", "namespace": "ambient-system"},
	}}
	return u
}

// fakeZtunnel is ztunnel's capture half: it serves each added pod's :15001
// by answering "ztunnel <original dst>".
type fakeZtunnel struct {
	mu        sync.Mutex
	pods      map[string]*inpod.PodListeners
	infos     map[string]inpod.WorkloadInfo
	adds      int
	snapshots int
}

func (z *fakeZtunnel) AddWorkload(uid string, info inpod.WorkloadInfo, ns *os.File) error {
	defer ns.Close()
	z.mu.Lock()
	if z.infos == nil {
		z.infos = map[string]inpod.WorkloadInfo{}
	}
	z.infos[uid] = info
	_, known := z.pods[uid]
	z.mu.Unlock()
	if known { // same namespace, new info: keep serving
		return nil
	}
	ls, err := inpod.OpenListeners(ns)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ls.Outbound.Accept()
			if err != nil {
				return
			}
			od, _ := netnsutil.OriginalDst(c)
			_, _ = io.WriteString(c, "ztunnel "+od.String())
			c.Close()
		}
	}()
	z.mu.Lock()
	defer z.mu.Unlock()
	z.pods[uid] = ls
	z.adds++
	return nil
}

func (z *fakeZtunnel) DelWorkload(uid string) error {
	z.mu.Lock()
	defer z.mu.Unlock()
	if ls := z.pods[uid]; ls != nil {
		ls.Close()
		delete(z.pods, uid)
	}
	return nil
}

// preserveSource is what the node agent last said about uid's return path.
func (z *fakeZtunnel) preserveSource(uid types.UID) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.infos[string(uid)].PreserveSource
}

// hasSourceRouting reports whether p's namespace has the return path for
// ztunnel's transparent dials.
func hasSourceRouting(t *testing.T, p *netns.Pod) bool {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ok, err := redirect.HasSourceRouting(f)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func migrateReq(t *testing.T, p *netns.Pod) string {
	var v []byte
	if err := p.Run(func() (err error) {
		v, err = os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(v))
}

func (z *fakeZtunnel) SnapshotDone() { z.mu.Lock(); z.snapshots++; z.mu.Unlock() }

func (z *fakeZtunnel) has(uid types.UID) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.pods[string(uid)] != nil
}

func (z *fakeZtunnel) counts() (adds, snapshots int) {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.adds, z.snapshots
}

type env struct {
	t       *testing.T
	dir     string
	ztunnel *fakeZtunnel
	zsock   string
	cniSock string
	opts    func(*nodeagent.Options) // applied by startAgent
}

func newEnv(t *testing.T) *env {
	dir, err := os.MkdirTemp("", "amb-cni-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{t: t, dir: dir, ztunnel: &fakeZtunnel{pods: map[string]*inpod.PodListeners{}},
		zsock: filepath.Join(dir, "ztunnel.sock"), cniSock: filepath.Join(dir, "cni.sock")}
	ctx, cancel := context.WithCancel(context.Background())
	srv := inpod.NewServer(e.zsock, e.ztunnel, testr.New(t).WithName("ztunnel"))
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.ListenAndServe(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		for uid := range e.ztunnel.pods {
			_ = e.ztunnel.DelWorkload(uid)
		}
	})
	return e
}

// startAgent runs a node agent; the returned func stops it and waits.
func (e *env) startAgent() (stop func()) {
	if e.opts != nil {
		return e.startAgentWith(e.opts)
	}
	return e.startAgentWith(func(*nodeagent.Options) {})
}

func (e *env) startAgentWith(mut func(*nodeagent.Options)) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		o := nodeagent.Options{
			NodeName:      nodeName,
			Selection:     selection.Config{MeshNamespace: "ambient-system"},
			ZtunnelSocket: e.zsock,
			CNISocket:     e.cniSock,
			StateDir:      filepath.Join(e.dir, "pods"),
			ProcRoot:      "/proc",
			Redirect:      redirect.DefaultConfig(),
			Log:           testr.New(e.t).WithName("agent"),
		}
		mut(&o)
		done <- nodeagent.Run(ctx, restCfg, o)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("agent: %v", err)
			}
		})
	}
	e.t.Cleanup(stop)
	return stop
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func createNamespace(t *testing.T, name string, ambient bool) {
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if ambient {
		ns.Labels = map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeAmbient}
	}
	if err := k8s.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
}

func setNamespaceAmbient(t *testing.T, name string, ambient bool) {
	var ns corev1.Namespace
	if err := k8s.Get(context.Background(), client.ObjectKey{Name: name}, &ns); err != nil {
		t.Fatal(err)
	}
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	if ambient {
		ns.Labels[selection.DataplaneModeLabel] = selection.DataplaneModeAmbient
	} else {
		delete(ns.Labels, selection.DataplaneModeLabel)
	}
	if err := k8s.Update(context.Background(), &ns); err != nil {
		t.Fatal(err)
	}
}

// createPod creates the API object for a pod on node1 with the given IP.
func createPod(t *testing.T, ns, name string, ip netip.Addr) *corev1.Pod {
	ctx := context.Background()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{NodeName: nodeName, ServiceAccountName: "default",
			Containers: []corev1.Container{{Name: "app", Image: "app:test"}}},
	}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	if ip.IsValid() {
		pod.Status.Phase = corev1.PodRunning
		pod.Status.PodIP = ip.String()
		pod.Status.PodIPs = []corev1.PodIP{{IP: ip.String()}}
		if err := k8s.Status().Update(ctx, pod); err != nil {
			t.Fatal(err)
		}
	}
	return pod
}

func annotation(t *testing.T, pod *corev1.Pod) string {
	var p corev1.Pod
	if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(pod), &p); err != nil {
		return "<gone>"
	}
	return p.Annotations[selection.RedirectionAnnotation]
}

func installed(t *testing.T, p *netns.Pod) bool {
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ok, err := redirect.NewNFTables(redirect.DefaultConfig()).Installed(f)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// dialFrom connects from the pod's namespace like its app would and returns
// the first reply.
func dialFrom(t *testing.T, p *netns.Pod, dst netip.AddrPort) string {
	f, _ := p.Open()
	defer f.Close()
	c, err := netnsutil.DialTCP(context.Background(), f, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
	if err != nil {
		return "dial error: " + err.Error()
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	return string(b)
}

func serveName(t *testing.T, p *netns.Pod, port int, name string) {
	f, _ := p.Open()
	defer f.Close()
	ln, err := netnsutil.ListenTCP(f, fmt.Sprintf("[::]:%d", port), netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, name)
			c.Close()
		}
	}()
}

// uniqueIP gives a lab pod an extra address no other lab on the machine
// uses, so the agent's by-IP namespace search cannot find someone else's.
func uniqueIP(t *testing.T, p *netns.Pod) netip.Addr {
	var b [2]byte
	f, _ := os.Open("/dev/urandom")
	_, _ = io.ReadFull(f, b[:])
	f.Close()
	ip := netip.AddrFrom4([4]byte{10, 123, b[0], b[1] | 1})
	p.AddAddr("eth0", ip.String()+"/32")
	return ip
}

func TestCaptureRunningPodWithoutRestartAndReadoption(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	podNS, outside := node.AddPod("web"), node.AddPod("outside")
	serveName(t, outside, 9090, "outside")
	ip := uniqueIP(t, podNS)
	app := podNS.Start("sleep", "600") // the pod's running process
	e := newEnv(t)
	createNamespace(t, "running", false)
	pod := createPod(t, "running", "web", ip)
	target := netip.AddrPortFrom(outside.IP, 9090)
	serveName(t, podNS, 8080, "web")
	nodeRole := &netns.Pod{NS: node.NS} // the kubelet's view: dial from the node
	withProbes := func(o *nodeagent.Options) {
		o.ProbeSNAT, o.HostNetns = true, node.Path()
		o.Redirect.PreserveSource = true // the binary's default
	}
	e.opts = withProbes

	stopAgent := e.startAgent()
	eventually(t, "the agent synced ztunnel", func() bool { _, s := e.ztunnel.counts(); return s >= 1 })
	if installed(t, podNS) || e.ztunnel.has(pod.UID) {
		t.Fatal("pod captured although its namespace is not ambient")
	}
	if got := dialFrom(t, podNS, target); got != "outside" {
		t.Fatalf("uncaptured pod reached %q", got)
	}

	labelled := time.Now()
	setNamespaceAmbient(t, "running", true)
	defer func() { t.Logf("running pod captured %v after its namespace was labelled", captureLatency) }()
	eventually(t, "the running pod is captured", func() bool {
		return installed(t, podNS) && e.ztunnel.has(pod.UID) && annotation(t, pod) == selection.RedirectionEnabled
	})
	captureLatency = time.Since(labelled)
	if !hasSourceRouting(t, podNS) || !e.ztunnel.preserveSource(pod.UID) {
		t.Fatalf("source preservation: return path %v, announced to ztunnel %v; want both",
			hasSourceRouting(t, podNS), e.ztunnel.preserveSource(pod.UID))
	}
	if got, want := dialFrom(t, podNS, target), "ztunnel "+target.String(); got != want {
		t.Fatalf("captured pod's outbound reached %q, want %q", got, want)
	}
	// ztunnel upgrades: a closing ztunnel's queued connections move to the
	// new instance instead of being reset (docs/interfaces.md, ZDS).
	if v := migrateReq(t, podNS); v != "1" {
		t.Fatalf("captured pod's net.ipv4.tcp_migrate_req = %q, want 1", v)
	}
	if got := dialFrom(t, nodeRole, netip.AddrPortFrom(podNS.IP, 8080)); got != "web" {
		t.Fatalf("kubelet-style probe from the node reached %q, want the app", got)
	}

	t.Run("agent restart re-adopts without re-creating", func(t *testing.T) {
		stopAgent()
		adds, snaps := e.ztunnel.counts()
		stopAgent = e.startAgent()
		eventually(t, "the new agent's snapshot", func() bool { _, s := e.ztunnel.counts(); return s > snaps })
		if a, _ := e.ztunnel.counts(); a != adds || !e.ztunnel.has(pod.UID) {
			t.Fatalf("after agent restart: adds %d (want %d), served %v", a, adds, e.ztunnel.has(pod.UID))
		}
		if !installed(t, podNS) {
			t.Fatal("rules gone after agent restart")
		}
		if got := dialFrom(t, podNS, target); !strings.HasPrefix(got, "ztunnel ") {
			t.Fatalf("after agent restart outbound reached %q", got)
		}
	})

	setNamespaceAmbient(t, "running", false)
	eventually(t, "the pod is released", func() bool {
		return !installed(t, podNS) && !e.ztunnel.has(pod.UID) && annotation(t, pod) == ""
	})
	if got := dialFrom(t, podNS, target); got != "outside" {
		t.Fatalf("released pod reached %q", got)
	}
	if hasSourceRouting(t, podNS) {
		t.Fatal("release left the source-preservation policy routing behind")
	}
	if app.ProcessState != nil {
		t.Fatal("the pod's process exited: capture must never restart pods")
	}

	t.Run("pod opt-out label releases, removing it captures again", func(t *testing.T) {
		setNamespaceAmbient(t, "running", true)
		eventually(t, "captured again", func() bool { return e.ztunnel.has(pod.UID) && installed(t, podNS) })
		setPodLabel := func(v string) {
			var p corev1.Pod
			if err := k8s.Get(context.Background(), client.ObjectKeyFromObject(pod), &p); err != nil {
				t.Fatal(err)
			}
			// A merge patch, not Update: the agent annotates the pod concurrently,
			// and an optimistic-lock conflict here would be the test's own race.
			base := client.MergeFrom(p.DeepCopy())
			if p.Labels == nil {
				p.Labels = map[string]string{}
			}
			if v == "" {
				delete(p.Labels, selection.DataplaneModeLabel)
			} else {
				p.Labels[selection.DataplaneModeLabel] = v
			}
			if err := k8s.Patch(context.Background(), &p, base); err != nil {
				t.Fatal(err)
			}
		}
		setPodLabel(selection.DataplaneModeNone)
		eventually(t, "opted-out pod released", func() bool { return !installed(t, podNS) && !e.ztunnel.has(pod.UID) })
		setPodLabel("")
		eventually(t, "captured after opt-out removed", func() bool { return installed(t, podNS) && e.ztunnel.has(pod.UID) })
	})

	t.Run("pod deleted while the agent is down is dropped", func(t *testing.T) {
		setNamespaceAmbient(t, "running", true)
		eventually(t, "captured again", func() bool { return e.ztunnel.has(pod.UID) })
		stopAgent()
		zero := int64(0)
		if err := k8s.Delete(context.Background(), pod, &client.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
		stopAgent = e.startAgent()
		eventually(t, "ztunnel drops the deleted pod", func() bool { return !e.ztunnel.has(pod.UID) })
	})
}

func TestOptOutAndSidecarNotCaptured(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	e := newEnv(t)
	createNamespace(t, "optout", true)
	tests := []struct {
		name string
		mut  func(*corev1.Pod)
	}{
		{"dataplane-mode none", func(p *corev1.Pod) {
			p.Labels = map[string]string{selection.DataplaneModeLabel: selection.DataplaneModeNone}
		}},
		{"redirection disabled", func(p *corev1.Pod) {
			p.Annotations = map[string]string{selection.RedirectionAnnotation: selection.RedirectionDisabled}
		}},
		{"sidecar", func(p *corev1.Pod) { p.Annotations = map[string]string{selection.SidecarStatusAnnotation: "{}"} }},
	}
	var pods []*corev1.Pod
	var nss []*netns.Pod
	for i, tc := range tests {
		p := node.AddPod(fmt.Sprintf("o%d", i))
		p.Start("sleep", "600")
		ip := uniqueIP(t, p)
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "optout", Name: fmt.Sprintf("p%d", i)},
			Spec: corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "a", Image: "a"}}}}
		tc.mut(pod)
		if err := k8s.Create(context.Background(), pod); err != nil {
			t.Fatal(err)
		}
		pod.Status.PodIP, pod.Status.PodIPs = ip.String(), []corev1.PodIP{{IP: ip.String()}}
		if err := k8s.Status().Update(context.Background(), pod); err != nil {
			t.Fatal(err)
		}
		pods, nss = append(pods, pod), append(nss, p)
	}
	// A captured control pod proves the agent has processed the namespace.
	control := node.AddPod("control")
	control.Start("sleep", "600")
	cpod := createPod(t, "optout", "control", uniqueIP(t, control))
	e.startAgent()
	eventually(t, "control pod captured", func() bool { return e.ztunnel.has(cpod.UID) && installed(t, control) })
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if installed(t, nss[i]) || e.ztunnel.has(pods[i].UID) || annotation(t, pods[i]) == selection.RedirectionEnabled {
				t.Fatal("opted-out pod was captured")
			}
		})
	}
}

// writeKubeconfig writes a kubeconfig for the envtest API server.
func writeKubeconfig(t *testing.T, dir string) string {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: restCfg.Host, CertificateAuthorityData: restCfg.CAData}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: restCfg.CertData, ClientKeyData: restCfg.KeyData, Token: restCfg.BearerToken}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "admin"}
	kc.CurrentContext = "envtest"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatal(err)
	}
	return path
}

type cniRun struct {
	stdout, stderr string
	err            error
}

// runPlugin executes the built plugin as a container runtime would.
func runPlugin(t *testing.T, bin, command, netnsPath, ns, name string, uid types.UID, conf string) cniRun {
	cmd := exec.Command(bin)
	cmd.Env = []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=sandbox-" + name, "CNI_NETNS=" + netnsPath,
		"CNI_IFNAME=eth0", "CNI_PATH=/opt/cni/bin",
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=sandbox-%s;K8S_POD_UID=%s", ns, name, name, uid),
	}
	cmd.Stdin = strings.NewReader(conf)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return cniRun{out.String(), errb.String(), err}
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// binary builds this command once per test run.
func binary(t *testing.T) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "amb-cni-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "ambient-cni")
		if out, err := exec.Command("go", "build", "-o", builtBin, ".").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

func TestCNIPluginAddDel(t *testing.T) {
	dir := t.TempDir()
	bin := binary(t)
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	sandbox := node.AddPod("cnipod")
	e := newEnv(t)
	createNamespace(t, "cni", true)
	createNamespace(t, "plain", false)
	pod := createPod(t, "cni", "cnipod", netip.Addr{}) // no IP yet: the sandbox is being created
	e.startAgent()
	eventually(t, "agent serving CNI", func() bool { _, err := os.Stat(e.cniSock); return err == nil })

	prev := fmt.Sprintf(`{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":%q}],"ips":[{"address":"%s/24","interface":0,"gateway":"%s"}]}`,
		sandbox.Path(), sandbox.IP, node.Gateway)
	conf := func(socket string, extra string) string {
		return fmt.Sprintf(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"ambient-cni","agentSocket":%q,"meshNamespace":"ambient-system"%s,"prevResult":%s}`, socket, extra, prev)
	}

	start := time.Now()
	r := runPlugin(t, bin, "ADD", sandbox.Path(), "cni", "cnipod", pod.UID, conf(e.cniSock, ""))
	t.Logf("CNI ADD with capture took %v (plugin exec + agent + nftables + ztunnel ack)", time.Since(start))
	if r.err != nil {
		t.Fatalf("ADD failed: %v\nstdout: %s\nstderr: %s", r.err, r.stdout, r.stderr)
	}
	var res struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &res); err != nil || len(res.IPs) != 1 || res.IPs[0].Address != sandbox.IP.String()+"/24" {
		t.Fatalf("ADD did not pass prevResult through: %q (%v)", r.stdout, err)
	}
	// Capture is complete when ADD returns: before any container starts.
	if !installed(t, sandbox) || !e.ztunnel.has(pod.UID) || annotation(t, pod) != selection.RedirectionEnabled {
		t.Fatalf("after ADD: rules %v, ztunnel %v, annotation %q", installed(t, sandbox), e.ztunnel.has(pod.UID), annotation(t, pod))
	}

	r = runPlugin(t, bin, "DEL", sandbox.Path(), "cni", "cnipod", pod.UID, conf(e.cniSock, ""))
	if r.err != nil {
		t.Fatalf("DEL failed: %v %s", r.err, r.stderr)
	}
	if installed(t, sandbox) || e.ztunnel.has(pod.UID) {
		t.Fatal("DEL left the pod captured")
	}

	t.Run("agent unreachable", func(t *testing.T) {
		dead := filepath.Join(dir, "nobody.sock")
		kubeconfig := writeKubeconfig(t, dir)
		plain := createPod(t, "plain", "plainpod", netip.Addr{})
		tests := []struct {
			name, ns, pod string
			uid           types.UID
			extra         string
			wantOK        bool
		}{
			{"captured pod fails closed", "cni", "cnipod", pod.UID, "", false},
			{"captured pod fails closed with kubeconfig", "cni", "cnipod", pod.UID, fmt.Sprintf(`,"kubeconfig":%q`, kubeconfig), false},
			{"kube-system passes", "kube-system", "coredns", "u1", "", true},
			{"non-ambient pod passes with kubeconfig", "plain", "plainpod", plain.UID, fmt.Sprintf(`,"kubeconfig":%q`, kubeconfig), true},
			{"non-ambient pod without kubeconfig fails closed", "plain", "plainpod", plain.UID, "", false},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				r := runPlugin(t, bin, "ADD", sandbox.Path(), tc.ns, tc.pod, tc.uid, conf(dead, tc.extra))
				if (r.err == nil) != tc.wantOK {
					t.Fatalf("ADD ok=%v, want %v\nstdout: %s\nstderr: %s", r.err == nil, tc.wantOK, r.stdout, r.stderr)
				}
			})
		}
		if installed(t, sandbox) {
			t.Fatal("rules installed without an agent")
		}
	})

	t.Run("garbage config", func(t *testing.T) {
		if r := runPlugin(t, bin, "ADD", sandbox.Path(), "cni", "cnipod", pod.UID, `{"cniVersion":`); r.err == nil {
			t.Fatal("ADD with a truncated config succeeded")
		}
		if r := runPlugin(t, bin, "DEL", sandbox.Path(), "cni", "cnipod", pod.UID, `{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","prevResult":7}`); r.err != nil {
			t.Fatalf("DEL must never fail: %v %s %s", r.err, r.stdout, r.stderr)
		}
	})

	t.Run("not chained", func(t *testing.T) {
		r := runPlugin(t, bin, "ADD", sandbox.Path(), "cni", "cnipod", pod.UID,
			fmt.Sprintf(`{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","agentSocket":%q}`, e.cniSock))
		if r.err == nil {
			t.Fatal("ADD without prevResult succeeded")
		}
	})
}

func TestMeshRemovalReleasesPodsRestartDoesNot(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	podNS := node.AddPod("u")
	app := podNS.Start("sleep", "600")
	e := newEnv(t)
	createNamespace(t, "uninstall", true)
	pod := createPod(t, "uninstall", "u", uniqueIP(t, podNS))
	confDir, binDir := filepath.Join(e.dir, "net.d"), filepath.Join(e.dir, "bin")
	os.MkdirAll(confDir, 0o755)
	os.MkdirAll(binDir, 0o755)
	conflist := filepath.Join(confDir, "10-k8s.conflist")
	os.WriteFile(conflist, []byte(`{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}`), 0o644)
	withCNI := func(o *nodeagent.Options) {
		o.CNIConfDir, o.CNIBinDir, o.MeshName = confDir, binDir, "default"
		o.PluginConf = map[string]any{"agentSocket": e.cniSock}
	}
	chained := func() bool { b, _ := os.ReadFile(conflist); return strings.Contains(string(b), `"ambient-cni"`) }
	binary := func() bool { _, err := os.Stat(filepath.Join(binDir, "ambient-cni")); return err == nil }
	captured := func() bool {
		return installed(t, podNS) && e.ztunnel.has(pod.UID) && annotation(t, pod) == selection.RedirectionEnabled && chained() && binary()
	}

	stop := e.startAgentWith(withCNI)
	eventually(t, "captured and plugin installed", captured)
	stop() // restart: the mesh still exists
	if !installed(t, podNS) || annotation(t, pod) != selection.RedirectionEnabled || !chained() {
		t.Fatal("stopping the agent while the mesh exists released the pod or removed the plugin")
	}

	stop = e.startAgentWith(withCNI)
	defer stop()
	eventually(t, "agent back", func() bool { _, s := e.ztunnel.counts(); return s >= 2 })
	t.Cleanup(func() {
		if err := k8s.Create(context.Background(), newMesh()); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Errorf("recreate mesh: %v", err)
		}
	})
	if err := k8s.Delete(context.Background(), newMesh()); err != nil {
		t.Fatal(err)
	}
	// The running agent releases everything, so the operator can finish.
	eventually(t, "pods released and plugin removed while the agent runs", func() bool {
		return !installed(t, podNS) && !e.ztunnel.has(pod.UID) && annotation(t, pod) == "" && !chained() && !binary()
	})
	if app.ProcessState != nil {
		t.Fatal("mesh removal restarted the pod's process")
	}
	// A mesh that comes back captures again.
	eventually(t, "mesh deleted", func() bool {
		return k8s.Get(context.Background(), client.ObjectKey{Name: "default"}, newMesh()) != nil
	})
	if err := k8s.Create(context.Background(), newMesh()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "captured again after the mesh came back", captured)
}

// TestNodeAgentProcess runs the real binary as the DaemonSet does.
func TestNodeAgentProcess(t *testing.T) {
	bin := binary(t)
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	podNS := node.AddPod("proc")
	podNS.Start("sleep", "600")
	e := newEnv(t)
	createNamespace(t, "process", true)
	pod := createPod(t, "process", "proc", uniqueIP(t, podNS))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	health := ln.Addr().String()
	ln.Close()

	cmd := exec.Command(bin, "node-agent", "--health-addr", health, "--proc", "/proc", "--state-dir", filepath.Join(e.dir, "pods"))
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+writeKubeconfig(t, e.dir), "NODE_NAME="+nodeName, "MESH_NAMESPACE=ambient-system",
		"EXCLUDED_NAMESPACES=legacy", "REDIRECTION_BACKEND=nftables", "ZDS_SOCKET="+e.zsock,
		"CNI_SOCKET="+e.cniSock, "PROBE_SNAT=false", "LOG_LEVEL=debug")
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("node agent output:\n%s", logs.String())
		}
	})
	ready := func() bool {
		resp, err := http.Get("http://" + health + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	eventually(t, "the agent process is ready and captured the pod", func() bool {
		return ready() && installed(t, podNS) && e.ztunnel.has(pod.UID) && annotation(t, pod) == selection.RedirectionEnabled
	})
	// By default the agent preserves client addresses and says so.
	if !hasSourceRouting(t, podNS) || !e.ztunnel.preserveSource(pod.UID) {
		t.Fatalf("default node agent: return path %v, announced %v; want source preservation on",
			hasSourceRouting(t, podNS), e.ztunnel.preserveSource(pod.UID))
	}
	// SIGTERM while the mesh exists: exit cleanly, pods stay captured.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("agent exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("agent did not exit on SIGTERM")
	}
	if !installed(t, podNS) {
		t.Fatal("agent restart (SIGTERM) released the pod")
	}
}

// TestNodeAgentNotReadyWhenCaptureRulesCannotInstall: capture rules this
// node cannot install (here TPROXY capture asked of the iptables backend,
// which refuses it) are found by the start-up preflight: the agent stays
// not ready and says why, instead of failing each pod's capture unexplained.
func TestNodeAgentNotReadyWhenCaptureRulesCannotInstall(t *testing.T) {
	e := newEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	health := ln.Addr().String()
	ln.Close()
	e.startAgentWith(func(o *nodeagent.Options) {
		o.HealthAddr = health
		o.Redirect.InboundTPROXY = true
		o.Redirector, o.DNSRedirector = redirect.NewIPTables(o.Redirect), redirect.NewIPTables(o.Redirect.WithDNS())
	})
	var body string
	eventually(t, "the agent answers its readiness probe", func() bool {
		resp, err := http.Get("http://" + health + "/readyz")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(body, "preflight")
	})
	if !strings.Contains(body, "inbound TPROXY") {
		t.Fatalf("readiness body %q, want the preflight naming inbound TPROXY", body)
	}
}
