package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/proxylib/redirect"
	"github.com/ambientmesh/ambient/test/netns"
	"github.com/ambientmesh/ambient/test/proctest"
)

// The test binary doubles as the ztunnel binary: re-executed with this
// variable set it runs main, so the processes below are the real program.
const runMainEnv = "ZTUNNEL_TEST_RUN_MAIN"

func TestMain(m *testing.M) { proctest.RunMain(m, runMainEnv, main) }

const testToken = proctest.Token

// ztunnel is one real ztunnel process in its own pod namespace, as in a
// DaemonSet pod (so each has its own admin, metrics and readiness ports).
type ztunnel struct {
	cmd    *exec.Cmd
	ns     *os.File
	out    *proctest.LogBuffer
	exited chan error
}

func startZtunnel(t *testing.T, cp *proctest.ControlPlane, pod *netns.Pod, sock, node, transport string, grace time.Duration, extra ...string) *ztunnel {
	ns, err := pod.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	cp.ServeIn(t, ns)
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte(testToken), 0o600); err != nil {
		t.Fatal(err)
	}
	z := &ztunnel{ns: ns, out: proctest.NewLogBuffer(t, pod.Name), exited: make(chan error, 1)}
	z.cmd = exec.Command("ip", "netns", "exec", pod.Name, os.Args[0],
		"-node-name", node, "-pod-name", pod.Name, "-xds-address", "127.0.0.1:15010", "-ca-address", "127.0.0.1:15012",
		"-token-path", token, "-root-cert", cp.Roots, "-zds-socket", sock, "-transport", transport, "-drain-grace", grace.String(),
		// proctest's control plane is a plain snapshot server: it serves
		// every address, not the node scope of the manager's AddressCache.
		"-full-discovery")
	z.cmd.Args = append(z.cmd.Args, extra...)
	z.cmd.Env = append(os.Environ(), runMainEnv+"=1")
	z.cmd.Stdout, z.cmd.Stderr = z.out, z.out
	if err := z.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { z.exited <- z.cmd.Wait() }()
	t.Cleanup(func() {
		z.cmd.Process.Kill()
		<-z.exited
	})
	return z
}

// ready asks the instance's own readiness endpoint.
func (z *ztunnel) ready() bool {
	c := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, z.ns, netip.AddrPort{}, netip.MustParseAddrPort("127.0.0.1:15021"), netnsutil.SocketOptions{})
	}}}
	resp, err := c.Get("http://127.0.0.1:15021/healthz/ready")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveEcho answers every line with the same line, in the server pod.
func serveEcho(t *testing.T, pod *netns.Pod, port int) {
	serveIn(t, pod, port, func(c net.Conn) {
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := io.WriteString(c, line); err != nil {
				return
			}
		}
	})
}

// serveIn serves each connection to pod:port with handle (then closed).
func serveIn(t *testing.T, pod *netns.Pod, port int, handle func(net.Conn)) {
	ns, err := pod.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ln, err := netnsutil.ListenTCP(ns, fmt.Sprintf("0.0.0.0:%d", port), netnsutil.SocketOptions{ReuseAddr: true})
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
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

// session is an application connection from a captured pod (redirected
// to ztunnel's :15001 by the pod's rules).
type session struct {
	c net.Conn
	r *bufio.Reader
}

func dialFrom(ns *os.File, dst netip.AddrPort) (*session, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := netnsutil.DialTCP(ctx, ns, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
	if err != nil {
		return nil, err
	}
	return &session{c: c, r: bufio.NewReader(c)}, nil
}

// roundTrip proves the connection reaches the server through ztunnel.
func (s *session) roundTrip(msg string) error {
	s.c.SetDeadline(time.Now().Add(5 * time.Second))
	defer s.c.SetDeadline(time.Time{})
	if _, err := io.WriteString(s.c, msg+"\n"); err != nil {
		return err
	}
	got, err := s.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// prober opens new connections continuously and counts the outcomes.
type prober struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	stop       chan struct{}
	done       sync.WaitGroup
}

func startProbing(ns *os.File, dst netip.AddrPort, workers int) *prober {
	p := &prober{stop: make(chan struct{})}
	for w := range workers {
		p.done.Add(1)
		go func() {
			defer p.done.Done()
			for i := 0; ; i++ {
				select {
				case <-p.stop:
					return
				default:
				}
				err := probeOnce(ns, dst, fmt.Sprintf("probe-%d-%d", w, i))
				if err == nil {
					p.ok.Add(1)
					continue
				}
				p.failed.Add(1)
				p.mu.Lock()
				p.errs = append(p.errs, err.Error())
				p.mu.Unlock()
			}
		}()
	}
	return p
}

func probeOnce(ns *os.File, dst netip.AddrPort, msg string) error {
	s, err := dialFrom(ns, dst)
	if err != nil {
		return err
	}
	defer s.c.Close()
	return s.roundTrip(msg)
}

// waitMore waits until n more probes succeeded.
func (p *prober) waitMore(t *testing.T, n int64) {
	t.Helper()
	target := p.ok.Load() + n
	waitFor(t, fmt.Sprintf("%d more successful new connections", n), func() bool { return p.ok.Load() >= target })
}

func (p *prober) finish() (ok, failed int64, errs []string) {
	close(p.stop)
	p.done.Wait()
	return p.ok.Load(), p.failed.Load(), p.errs
}

// TestUpgradeHandsOverWithoutFailingConnections is a ztunnel upgrade on one
// node with real processes: the old and the new ztunnel both serve the
// captured pods (the node agent's Syncer feeds both), then the old one gets
// SIGTERM while clients open connections continuously. No new connection
// may fail, connections open on the old one keep working until they end
// (the old one then exits without using its grace period), and a pod
// deleted meanwhile is released by both. Two paths through the upgraded
// node: outbound from a captured client (to an unmeshed server), and
// inbound HBONE (:15008) to a captured server from another node, whose
// ztunnel pools tunnels to the old instance when the upgrade starts. With
// HBONE over HTTP/3 both instances must at least be able to bind the pods'
// UDP port (inbound tunnels are not handed over yet).
func TestUpgradeHandsOverWithoutFailingConnections(t *testing.T) {
	netns.RequireRoot(t)
	for _, transport := range []string{"HTTP2", "HTTP3"} {
		for _, inbound := range []bool{false, true} {
			name := transport + "/outbound"
			if inbound {
				name = transport + "/inbound-hbone"
			}
			t.Run(name, func(t *testing.T) {
				if transport == "HTTP3" && inbound {
					// Not done (docs/interfaces.md, ZDS): UDP has no handover. Once
					// the new instance's socket joins, datagrams of peers' pooled
					// QUIC connections may reach it; tunnels over them fail until
					// the QUIC connection times out.
					t.Skip("HBONE over HTTP/3 has no gap-free upgrade yet")
				}
				testUpgrade(t, transport, inbound)
			})
		}
	}
}

// nodeAgent is the node agent's part for one node: rules, listener
// migration and a Syncer feeding the node's ztunnels.
type nodeAgent struct {
	syncer *inpod.Syncer
	sock   string
	pods   map[*netns.Pod]inpod.Pod
	nsOf   map[*netns.Pod]*os.File
}

func startNodeAgent(t *testing.T, ctx context.Context, name string) *nodeAgent {
	a := &nodeAgent{sock: filepath.Join(t.TempDir(), "ztunnel.sock"), pods: map[*netns.Pod]inpod.Pod{}, nsOf: map[*netns.Pod]*os.File{}}
	a.syncer = inpod.NewSyncer(a.sock, testr.New(t).WithName(name))
	go a.syncer.Run(ctx)
	return a
}

// capture registers the pod with the control plane and captures it.
func (a *nodeAgent) capture(t *testing.T, ctx context.Context, cp *proctest.ControlPlane, p *netns.Pod, node string) {
	cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", p.Name), Name: p.Name, Namespace: "default",
		Addresses: [][]byte{p.IP.AsSlice()}, ServiceAccount: "sa-" + p.Name, TrustDomain: "cluster.local", Node: node,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE})
	f, err := p.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := redirect.NewNFTables(redirect.DefaultConfig()).Install(f); err != nil {
		t.Fatal(err)
	}
	if err := netnsutil.EnableListenerMigration(f); err != nil {
		t.Fatal(err)
	}
	a.nsOf[p] = f
	a.pods[p] = inpod.Pod{UID: "uid-" + p.Name, Info: inpod.WorkloadInfo{Name: p.Name, Namespace: "default", ServiceAccount: "sa-" + p.Name}, NetnsPath: p.Path()}
	a.syncer.Upsert(ctx, a.pods[p]) // queued until a ztunnel connects
}

func testUpgrade(t *testing.T, transport string, inbound bool) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c := netns.NewCluster(t)
	node := c.AddNode("node1")
	server, leaving := node.AddPod("server"), node.AddPod("leaving")
	oldPod, newPod := node.AddPod("ztunnel-old"), node.AddPod("ztunnel-new")
	serveEcho(t, server, 7777)
	dst := netip.AddrPortFrom(server.IP, 7777)

	cp := proctest.NewControlPlane(t)
	agent := startNodeAgent(t, ctx, "node-agent-1")
	agent.capture(t, ctx, cp, leaving, "node1")
	var client *netns.Pod
	var clientNS *os.File
	if inbound {
		// The client lives on another node with a ztunnel that stays.
		node2 := c.AddNode("node2")
		client = node2.AddPod("client")
		agent.capture(t, ctx, cp, server, "node1")
		agent2 := startNodeAgent(t, ctx, "node-agent-2")
		agent2.capture(t, ctx, cp, client, "node2")
		clientNS = agent2.nsOf[client]
		z2 := startZtunnel(t, cp, node2.AddPod("ztunnel-2"), agent2.sock, "node2", transport, time.Minute)
		waitFor(t, "node2 ztunnel ready", z2.ready)
	} else {
		client = node.AddPod("client")
		agent.capture(t, ctx, cp, client, "node1")
		clientNS = agent.nsOf[client]
	}
	syncer, sock, captured, nsOf := agent.syncer, agent.sock, agent.pods, agent.nsOf

	const grace = 60 * time.Second // never reached: the old instance must finish on its own
	// The drain itself is tested here: with hand-over the long-lived
	// connections would leave the old instance at once
	// (TestUpgradeHandsOverLongLivedConnections).
	noHandover := []string{"-handover-socket", "off"}
	old := startZtunnel(t, cp, oldPod, sock, "node1", transport, grace, noHandover...)
	waitFor(t, "old ztunnel ready", old.ready)
	// Long-lived connections, all on the old instance.
	var longLived []*session
	for i := range 8 {
		s, err := dialFrom(clientNS, dst)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.roundTrip(fmt.Sprintf("long-%d", i)); err != nil {
			t.Fatal(err)
		}
		longLived = append(longLived, s)
	}
	leavingConn, err := dialFrom(nsOf[leaving], dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := leavingConn.roundTrip("leaving"); err != nil {
		t.Fatal(err)
	}

	// The surged instance starts next to the old one and gets every pod.
	nu := startZtunnel(t, cp, newPod, sock, "node1", transport, grace, noHandover...)
	waitFor(t, "new ztunnel ready", nu.ready)
	waitFor(t, "node agent connected to both ztunnels", func() bool { return syncer.Connected() == 2 })
	if !old.ready() {
		t.Fatal("old ztunnel not ready next to the new one")
	}

	probes := startProbing(clientNS, dst, 4)
	defer func() {
		if probes != nil {
			probes.finish()
		}
	}()
	probes.waitMore(t, 50)

	// Upgrade: the old instance is told to stop.
	if err := old.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "old ztunnel draining", func() bool { return old.out.Contains("draining") })
	waitFor(t, "old ztunnel reports not ready", func() bool { return !old.ready() })
	probes.waitMore(t, 200)

	// Connections open on the old instance keep working.
	for i, s := range longLived {
		if err := s.roundTrip(fmt.Sprintf("long-%d-after-sigterm", i)); err != nil {
			t.Fatalf("long-lived connection %d broke after SIGTERM: %v", i, err)
		}
	}
	// A pod deleted during the drain is released by both instances; its
	// connection on the old one is closed.
	if n := syncer.Connected(); n != 2 {
		t.Fatalf("node agent connected to %d ztunnels during the drain, want 2", n)
	}
	if err := syncer.Remove(ctx, captured[leaving].UID); err != nil {
		t.Fatalf("release during the drain: %v", err)
	}
	for _, z := range []*ztunnel{old, nu} {
		waitFor(t, z.out.Prefix()+" released the deleted pod", func() bool {
			return z.out.HasLine("workload removed", captured[leaving].UID)
		})
	}
	if err := leavingConn.roundTrip("after-delete"); err == nil {
		t.Fatal("connection of the deleted pod still served by the old ztunnel")
	}

	// The old one exits as soon as its last connection ends.
	for _, s := range longLived {
		s.c.Close()
	}
	select {
	case err := <-old.exited:
		old.exited <- err
		if err != nil {
			t.Fatalf("old ztunnel exit: %v", err)
		}
	case <-time.After(grace / 2):
		t.Fatal("old ztunnel still running after its last connection ended")
	}
	if !old.out.Contains("drained: every connection ended") {
		t.Fatal("old ztunnel did not report a complete drain")
	}
	probes.waitMore(t, 50)
	ok, failed, errs := probes.finish()
	probes = nil
	if failed != 0 {
		t.Fatalf("%d of %d new connections failed during the upgrade; first errors: %q", failed, ok+failed, errs[:min(len(errs), 5)])
	}
	t.Logf("%d new connections during the upgrade, none failed", ok)
	waitFor(t, "node agent down to the new ztunnel", func() bool { return syncer.Connected() == 1 })
	if !nu.ready() {
		t.Fatal("new ztunnel not ready after the upgrade")
	}
}
