package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/test/svcproxy"
)

// replicaEnv makes the test binary run the manager (main) instead of the
// tests: TestHAReplicas starts real manager processes from it.
const replicaEnv = "AMBIENT_TEST_MANAGER_ARGS"

func TestMain(m *testing.M) {
	if args, ok := os.LookupEnv(replicaEnv); ok {
		os.Args = append([]string{"manager"}, strings.Fields(args)...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// replica is one manager process.
type replica struct {
	name                        string
	cmd                         *exec.Cmd
	out                         *syncBuffer
	xds, ca, probe, webhookPort string
	webhookDir                  string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startReplica(t *testing.T, name, kubeconfig string) *replica {
	t.Helper()
	r := &replica{name: name, out: &syncBuffer{}, webhookDir: t.TempDir(),
		xds: fmt.Sprintf("127.0.0.1:%d", freePort(t)), ca: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		probe: fmt.Sprintf("127.0.0.1:%d", freePort(t)), webhookPort: fmt.Sprint(freePort(t))}
	args := []string{
		"--leader-elect", "--leader-elect-lease-duration=4s", "--leader-elect-renew-deadline=3s", "--leader-elect-retry-period=500ms",
		"--operator-namespace=ambient-system", "--metrics-bind-address=0", "--health-probe-bind-address=" + r.probe,
		"--webhook-port=" + r.webhookPort, "--webhook-cert-dir=" + r.webhookDir,
		"--xds-address=" + r.xds, "--ca-address=" + r.ca, "--debug-address=",
		"--ztunnel-image=ambient/ztunnel:dev", "--log-level=info",
	}
	r.cmd = exec.Command(os.Args[0], "-test.run=^$")
	r.cmd.Env = append(os.Environ(), replicaEnv+"="+strings.Join(args, " "), "KUBECONFIG="+kubeconfig)
	r.cmd.Stdout, r.cmd.Stderr = r.out, r.out
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
		if t.Failed() {
			t.Logf("replica %s output:\n%s", r.name, r.out.String())
		}
	})
	return r
}

func (r *replica) leads() bool { return strings.Contains(r.out.String(), "elected leader") }

func (r *replica) ready() error {
	resp, err := http.Get("http://" + r.probe + "/readyz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s /readyz: %d", r.name, resp.StatusCode)
	}
	return nil
}

// TestHAReplicas runs two manager processes against one API server, as a
// two-replica Deployment does: they start at once on an empty cluster and
// make exactly one CA; both are ready and serve discovery and the CA while
// one leads; killing the leader (SIGKILL: no Lease release) hands writes to
// the other, the discovery client connected to the killed one reconnects
// to the survivor and converges to its view (including changes made
// meanwhile), and certificate requests succeed throughout.
func TestHAReplicas(t *testing.T) {
	cfg, kcPath, k8s := startCluster(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, ns := range []string{"ambient-system", "app"} {
		if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}); err != nil {
			t.Fatal(err)
		}
	}
	installWebhookConfigs(t, k8s)

	// Two replicas start at once on an empty cluster; the mesh is created
	// while they race.
	replicas := []*replica{startReplica(t, "a", kcPath), startReplica(t, "b", kcPath)}
	if err := k8s.Create(ctx, &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "default"}}); err != nil {
		t.Fatal(err)
	}
	var leader, follower *replica
	waitFor(t, "one leader", func() error {
		switch {
		case replicas[0].leads() && replicas[1].leads():
			t.Fatal("both replicas lead")
		case replicas[0].leads():
			leader, follower = replicas[0], replicas[1]
		case replicas[1].leads():
			leader, follower = replicas[1], replicas[0]
		default:
			return fmt.Errorf("no leader yet")
		}
		return nil
	})
	caSecret := &corev1.Secret{}
	waitFor(t, "the mesh CA", func() error {
		return k8s.Get(ctx, client.ObjectKey{Namespace: "ambient-system", Name: "ambient-ca"}, caSecret)
	})
	roots, err := ca.ParseCerts(caSecret.Data["root.crt"])
	if err != nil || len(roots) != 1 {
		t.Fatalf("CA Secret roots: %d, %v", len(roots), err)
	}
	root := roots[0]
	pool := x509.NewCertPool()
	pool.AddCert(root)
	// Readiness does not depend on leadership: both replicas are ready.
	for _, r := range replicas {
		waitFor(t, "replica "+r.name+" ready", r.ready)
	}
	if follower.leads() {
		t.Fatal("the follower claims to lead too")
	}

	// A ztunnel on node-a and the pods it serves.
	ztunnel := createRunningPod(t, k8s, "ambient-system", "ztunnel-a", "ztunnel", "10.0.0.2")
	stay := createRunningPod(t, k8s, "app", "stay", "default", "10.1.0.1")
	gone := createRunningPod(t, k8s, "app", "gone", "default", "10.1.0.2")
	tok := podToken(t, cs, ztunnel, "ambient-mesh")
	clientTLS := &tls.Config{RootCAs: pool, ServerName: "ambient-controlplane.ambient-system.svc", MinVersion: tls.VersionTLS13}

	// Each replica signs with the one CA.
	stayID := identity.MustParse("spiffe://cluster.local/ns/app/sa/default")
	for _, r := range replicas {
		c, err := caclient.New(caclient.Config{Address: r.ca, TLS: clientTLS, Token: func() (string, error) { return tok, nil }})
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "replica "+r.name+" signs", func() error {
			chain, err := c.Sign(ctx, newCSR(t), stayID, time.Hour)
			if err != nil {
				return err
			}
			return verifyChain(chain, pool)
		})
		_ = c.Close()
	}

	// Proxies reach the replicas through the Service; it prefers the
	// leader, which the test kills.
	xdsSvc := svcproxy.New(t, leader.xds, follower.xds)
	caSvc := svcproxy.New(t, leader.ca, follower.ca)
	state := xds.NewState(xds.AddressType, xds.AuthorizationType)
	xc := xds.NewClient(xds.ClientConfig{
		Address: xdsSvc.Addr(), TLS: clientTLS, Token: func() (string, error) { return tok, nil },
		Node:       xds.NodeInfo{NodeName: "node-a", PodName: ztunnel.Name, PodNamespace: "ambient-system", Role: "ztunnel"},
		MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond,
	}, state)
	xctx, xcancel := context.WithCancel(ctx)
	xdone := make(chan struct{})
	go func() { _ = xc.Run(xctx); close(xdone) }()
	defer func() { xcancel(); <-xdone }()
	waitFor(t, "the pods over discovery from the leader", func() error {
		return hasAddresses(state, []string{"10.1.0.1", "10.1.0.2"}, nil)
	})

	// Certificate requests through the Service, throughout the failover.
	cac, err := caclient.New(caclient.Config{Address: caSvc.Addr(), TLS: clientTLS, Token: func() (string, error) { return tok, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer cac.Close()
	var signed, failed atomic.Int64
	var firstFailure atomic.Value
	stopSigning := make(chan struct{})
	signDone := make(chan struct{})
	go func() {
		defer close(signDone)
		for {
			select {
			case <-stopSigning:
				return
			default:
			}
			chain, err := cac.Sign(ctx, newCSR(t), stayID, time.Hour)
			if err == nil {
				err = verifyChain(chain, pool)
			}
			if err != nil {
				failed.Add(1)
				firstFailure.CompareAndSwap(nil, err.Error())
			} else {
				signed.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	waitFor(t, "signing through the Service", func() error {
		if signed.Load() < 3 {
			return fmt.Errorf("%d signed", signed.Load())
		}
		return nil
	})

	// Kill the leader as the kernel would an OOM-killed pod: no Lease
	// release, its connections reset; the endpoints drop it.
	if err := leader.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = leader.cmd.Wait()
	xdsSvc.Remove(leader.xds)
	caSvc.Remove(leader.ca)
	before := signed.Load()

	// Changes while the leader is gone reach the proxy from the survivor.
	if err := k8s.Delete(ctx, gone, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	createRunningPod(t, k8s, "app", "new", "default", "10.1.0.3")
	waitFor(t, "the proxy's view from the survivor", func() error {
		return hasAddresses(state, []string{"10.1.0.1", "10.1.0.3"}, []string{"10.1.0.2"})
	})
	if xdsSvc.Connections(follower.xds) == 0 {
		t.Fatal("the discovery client did not reconnect to the survivor")
	}
	_ = stay

	// The survivor takes over the writes: it leads and repairs what the
	// operator owns.
	waitFor(t, "the survivor leads", func() error {
		if !follower.leads() {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if err := k8s.Delete(ctx, &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ambient-system", Name: "ztunnel"}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "ztunnel DaemonSet recreated by the new leader", func() error {
		return k8s.Get(ctx, client.ObjectKey{Namespace: "ambient-system", Name: "ztunnel"}, &appsv1.DaemonSet{})
	})
	waitFor(t, "signing after the failover", func() error {
		if signed.Load() < before+5 {
			return fmt.Errorf("%d signed since the kill", signed.Load()-before)
		}
		return nil
	})
	close(stopSigning)
	<-signDone
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d certificate requests failed across the failover; first: %v", n, n+signed.Load(), firstFailure.Load())
	}
	// Still the one CA.
	after := &corev1.Secret{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: "ambient-system", Name: "ambient-ca"}, after); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(after.Data["root.crt"], caSecret.Data["root.crt"]) {
		t.Fatal("the new leader replaced the mesh root")
	}
	if err := follower.ready(); err != nil {
		t.Fatalf("the survivor is not ready: %v", err)
	}
	t.Logf("%d certificates signed, 0 failed; discovery connections: leader %d, survivor %d",
		signed.Load(), xdsSvc.Connections(leader.xds), xdsSvc.Connections(follower.xds))
}

// hasAddresses: the state holds a workload for each of want and none for
// each of absent.
func hasAddresses(s *xds.State, want, absent []string) error {
	for _, ip := range want {
		if s.WorkloadByAddr(netip.MustParseAddr(ip)) == nil {
			return fmt.Errorf("no workload %s", ip)
		}
	}
	for _, ip := range absent {
		if s.WorkloadByAddr(netip.MustParseAddr(ip)) != nil {
			return fmt.Errorf("workload %s still present", ip)
		}
	}
	return nil
}

func createRunningPod(t *testing.T, k8s client.Client, ns, name, sa, ip string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	if err := k8s.Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: sa}}); err != nil && client.IgnoreAlreadyExists(err) != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: sa, Containers: []corev1.Container{{Name: "c", Image: "c"}}}}
	if err := k8s.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
	pod.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}}
	if err := k8s.Status().Update(ctx, pod); err != nil {
		t.Fatal(err)
	}
	return pod
}

func podToken(t *testing.T, cs kubernetes.Interface, pod *corev1.Pod, audience string) string {
	t.Helper()
	exp := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(context.Background(), pod.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: &exp,
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

func newCSR(t *testing.T) []byte {
	key, err := ca.NewKey()
	if err != nil {
		t.Error(err)
		return nil
	}
	csr, err := identity.NewCSR(key, identity.MustParse("spiffe://cluster.local/ns/app/sa/default"))
	if err != nil {
		t.Error(err)
	}
	return csr
}

func verifyChain(chain []*x509.Certificate, roots *x509.CertPool) error {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}
