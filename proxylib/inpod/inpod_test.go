package inpod_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ambientmesh/ambient/proxylib/inpod"
	"github.com/ambientmesh/ambient/proxylib/inpod/zds"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/netns"
)

// proxy is a minimal ztunnel: it opens the pod listeners and answers HBONE
// port connections with the workload name.
type proxy struct {
	mu        sync.Mutex
	pods      map[string]*inpod.PodListeners
	inodes    map[string]uint64
	infos     map[string]inpod.WorkloadInfo
	adds      int
	snapshots int
}

func newProxy() *proxy {
	return &proxy{pods: map[string]*inpod.PodListeners{}, inodes: map[string]uint64{}, infos: map[string]inpod.WorkloadInfo{}}
}

func (p *proxy) AddWorkload(uid string, info inpod.WorkloadInfo, ns *os.File) error {
	p.mu.Lock()
	if _, ok := p.pods[uid]; ok { // same namespace, new info: keep the listeners
		p.infos[uid] = info
		p.mu.Unlock()
		ns.Close()
		return nil
	}
	p.mu.Unlock()
	ls, err := inpod.OpenListeners(ns)
	if err != nil {
		return err
	}
	ino, _ := netnsutil.Inode(ns)
	ns.Close()
	go func() {
		for {
			c, err := ls.HBONE.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, info.String())
			c.Close()
		}
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[uid], p.inodes[uid], p.infos[uid] = ls, ino, info
	p.adds++
	return nil
}

func (p *proxy) DelWorkload(uid string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ls := p.pods[uid]; ls != nil {
		ls.Close()
	}
	delete(p.pods, uid)
	delete(p.inodes, uid)
	delete(p.infos, uid)
	return nil
}

func (p *proxy) closeAll() {
	for uid := range p.pods {
		_ = p.DelWorkload(uid)
	}
}

func (p *proxy) SnapshotDone() { p.mu.Lock(); p.snapshots++; p.mu.Unlock() }

func (p *proxy) state() (uids map[string]uint64, adds, snapshots int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	uids = map[string]uint64{}
	for k, v := range p.inodes {
		uids[k] = v
	}
	return uids, p.adds, p.snapshots
}

func startServer(t *testing.T, path string, h inpod.WorkloadHandler) (*inpod.Server, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	srv := inpod.NewServer(path, h, testr.New(t))
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.ListenAndServe(ctx) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	waitFor(t, "socket", func() bool { _, err := os.Stat(path); return err == nil })
	return srv, stop
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func inode(t *testing.T, path string) uint64 {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	i, _ := netnsutil.Inode(f)
	return i
}

// hbone asks the pod's :15008 who answers, from another pod.
func hbone(t *testing.T, from *netns.Pod, to *netns.Pod) (string, error) {
	f, _ := from.Open()
	defer f.Close()
	c, err := netnsutil.DialTCP(context.Background(), f, netip.AddrPort{}, netip.AddrPortFrom(to.IP, inpod.PortHBONE), netnsutil.SocketOptions{})
	if err != nil {
		return "", err
	}
	defer c.Close()
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestSyncerServerRoundTripAndReadoption(t *testing.T) {
	c := netns.NewCluster(t)
	node := c.AddNode("n1")
	a, b, client := node.AddPod("a"), node.AddPod("b"), node.AddPod("client")
	sock := filepath.Join(t.TempDir(), "ztunnel.sock")
	px := newProxy()
	_, stopServer := startServer(t, sock, px)

	ctx, cancelAgent := context.WithCancel(context.Background())
	agent := inpod.NewSyncer(sock, testr.New(t))
	go agent.Run(ctx)
	<-agent.Synced()

	podA := inpod.Pod{UID: "uid-a", Info: inpod.WorkloadInfo{Name: "a", Namespace: "default", ServiceAccount: "sa"}, NetnsPath: a.Path()}
	podB := inpod.Pod{UID: "uid-b", Info: inpod.WorkloadInfo{Name: "b", Namespace: "default"}, NetnsPath: b.Path()}
	for _, p := range []inpod.Pod{podA, podB} {
		if err := agent.Upsert(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	uids, _, _ := px.state()
	if uids["uid-a"] != inode(t, a.Path()) || uids["uid-b"] != inode(t, b.Path()) {
		t.Fatalf("ztunnel got namespaces %v, want the pods' inodes", uids)
	}
	if got, err := hbone(t, client, a); err != nil || got != "default/a" {
		t.Fatalf("pod a :15008 answered %q, %v", got, err)
	}

	t.Run("del", func(t *testing.T) {
		if err := agent.Remove(ctx, "uid-b"); err != nil {
			t.Fatal(err)
		}
		if _, err := hbone(t, client, b); err == nil {
			t.Fatal("pod b :15008 still served after DelWorkload")
		}
		if err := agent.Upsert(ctx, podB); err != nil {
			t.Fatal(err)
		}
	})

	outer := t
	t.Run("ztunnel restart re-adopts every pod", func(t *testing.T) {
		stopServer()
		px.closeAll() // a real ztunnel's sockets die with its process
		px2 := newProxy()
		startServer(outer, sock, px2)
		waitFor(t, "re-adoption", func() bool { u, _, s := px2.state(); return len(u) == 2 && s == 1 })
		if got, err := hbone(t, client, b); err != nil || got != "default/b" {
			t.Fatalf("after ztunnel restart pod b answered %q, %v", got, err)
		}
		px = px2
	})

	t.Run("node agent restart keeps live pods and drops stale ones", func(t *testing.T) {
		cancelAgent()
		_, addsBefore, snapsBefore := px.state()
		ctx2, cancel2 := context.WithCancel(context.Background())
		defer cancel2()
		agent2 := inpod.NewSyncer(sock, testr.New(t))
		// The restarted agent rebuilt its view: only pod a is still captured.
		_ = agent2.Upsert(ctx2, podA)
		go agent2.Run(ctx2)
		<-agent2.Synced()
		waitFor(t, "snapshot", func() bool { _, _, s := px.state(); return s > snapsBefore })
		uids, adds, _ := px.state()
		if _, ok := uids["uid-b"]; ok || len(uids) != 1 {
			t.Fatalf("after agent restart ztunnel serves %v, want only uid-a", uids)
		}
		if adds != addsBefore {
			t.Fatalf("re-adoption re-created pod a's listeners (%d adds, want %d)", adds, addsBefore)
		}
		if got, err := hbone(t, client, a); err != nil || got != "default/a" {
			t.Fatalf("pod a after agent restart: %q, %v", got, err)
		}
	})
}

func (p *proxy) info(uid string) inpod.WorkloadInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.infos[uid]
}

// TestPreserveSourceTravels: the node agent's preserve_source (and DNS
// capture with the pod's resolvers) reaches
// ztunnel, and a change for a pod already served (node agent restarted with
// another setting) re-adopts it with the new value, keeping its listeners.
func TestPreserveSourceTravels(t *testing.T) {
	c := netns.NewCluster(t)
	a := c.AddNode("n1").AddPod("a")
	sock := filepath.Join(t.TempDir(), "ztunnel.sock")
	px := newProxy()
	startServer(t, sock, px)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agent := inpod.NewSyncer(sock, testr.New(t))
	go agent.Run(ctx)
	<-agent.Synced()
	pod := inpod.Pod{UID: "uid-a", Info: inpod.WorkloadInfo{Name: "a", Namespace: "default", PreserveSource: true}, NetnsPath: a.Path()}
	for _, want := range []bool{true, false, true} {
		pod.Info.PreserveSource = want
		if err := agent.Upsert(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if got := px.info("uid-a"); !got.Equal(pod.Info) {
			t.Fatalf("ztunnel has %+v, want %+v", got, pod.Info)
		}
	}
	// DNS capture and the pod's resolvers travel the same way (capture_dns,
	// dns_nameservers), and so does turning it off.
	for _, ns := range [][]string{{"10.96.0.10:53"}, {"10.96.0.10:53", "[fd00::a]:53"}, nil} {
		pod.Info.CaptureDNS, pod.Info.DNSNameservers = ns != nil, ns
		if err := agent.Upsert(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if got := px.info("uid-a"); !got.Equal(pod.Info) {
			t.Fatalf("ztunnel has %+v, want %+v", got, pod.Info)
		}
	}
	// The inbound capture mode (inbound_tproxy) too: a mesh switched between
	// NAT and TPROXY re-adopts its pods with the new mode.
	for _, tproxy := range []bool{true, false} {
		pod.Info.InboundTPROXY = tproxy
		if err := agent.Upsert(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if got := px.info("uid-a"); !got.Equal(pod.Info) {
			t.Fatalf("ztunnel has %+v, want %+v", got, pod.Info)
		}
	}
	if _, adds, _ := px.state(); adds != 1 {
		t.Fatalf("%d fresh adds, want 1 (changes are re-adoptions)", adds)
	}
}

// raw speaks the wire protocol directly, to send what a correct client never would.
func raw(t *testing.T, path string) *net.UnixConn {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func exchange(t *testing.T, c *net.UnixConn, payload []byte, fds ...int) (string, error) {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(payload, oob, nil); err != nil {
		return "", err
	}
	buf := make([]byte, 4096)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, _, _, err := c.ReadMsgUnix(buf, nil)
	if err != nil {
		return "", err
	}
	var resp zds.WorkloadResponse
	if err := proto.Unmarshal(buf[:n], &resp); err != nil {
		return "", err
	}
	return resp.GetAck().GetError(), nil
}

func marshal(t *testing.T, m *zds.WorkloadRequest) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestServerRejectsHostileInput(t *testing.T) {
	lab := netns.New(t)
	pod := lab.NewNS("pod")
	sock := filepath.Join(t.TempDir(), "z.sock")
	px := newProxy()
	startServer(t, sock, px)
	hello := marshal(t, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Hello{Hello: &zds.Hello{Version: zds.Version_V1}}})
	add := marshal(t, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{Uid: "u1"}}})
	keep := marshal(t, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: "nope"}}})
	regular, _ := os.Open("/proc/self/stat")
	defer regular.Close()
	nsf, _ := pod.Open()
	defer nsf.Close()

	t.Run("first message not hello", func(t *testing.T) {
		c := raw(t, sock)
		if e, err := exchange(t, c, add); err != nil || e == "" {
			t.Fatalf("ack error %q, %v; want a refusal", e, err)
		}
		if _, err := exchange(t, c, hello); err == nil {
			t.Fatal("connection still open after a protocol violation")
		}
	})
	tests := []struct {
		name    string
		payload []byte
		fds     []int
	}{
		{"garbage", []byte{0xff, 0xff, 0xff}, nil},
		{"add without netns", add, nil},
		{"add with a regular file", add, []int{int(regular.Fd())}},
		{"add with two fds", add, []int{int(nsf.Fd()), int(nsf.Fd())}},
		{"fd on keep", keep, []int{int(nsf.Fd())}},
		{"keep unknown", keep, nil},
		{"empty request", nil, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := raw(t, sock)
			if e, err := exchange(t, c, hello); err != nil || e != "" {
				t.Fatalf("hello: %q, %v", e, err)
			}
			e, err := exchange(t, c, tc.payload, tc.fds...)
			if err == nil && e == "" {
				t.Fatal("hostile request accepted")
			}
		})
	}
	if u, _, _ := px.state(); len(u) != 0 {
		t.Fatalf("hostile input created workloads: %v", u)
	}
	t.Run("valid add still works", func(t *testing.T) {
		c := raw(t, sock)
		exchange(t, c, hello)
		if e, err := exchange(t, c, add, int(nsf.Fd())); err != nil || e != "" {
			t.Fatalf("valid add: %q, %v", e, err)
		}
	})
}

func TestUpsertWhileDisconnectedIsQueued(t *testing.T) {
	lab := netns.New(t)
	pod := lab.NewNS("pod")
	sock := filepath.Join(t.TempDir(), "z.sock")
	agent := inpod.NewSyncer(sock, testr.New(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	err := agent.Upsert(ctx, inpod.Pod{UID: "u", Info: inpod.WorkloadInfo{Name: "p", Namespace: "ns"}, NetnsPath: pod.Path()})
	if !errors.Is(err, inpod.ErrNotConnected) {
		t.Fatalf("Upsert without ztunnel: %v, want ErrNotConnected", err)
	}
	go agent.Run(ctx)
	px := newProxy()
	startServer(t, sock, px)
	<-agent.Synced()
	if u, _, _ := px.state(); len(u) != 1 {
		t.Fatalf("queued pod not delivered on connect: %v", u)
	}
}

// flaky refuses a workload until allowed (like a ztunnel without its
// certificate yet).
type flaky struct {
	*proxy
	mu    sync.Mutex
	allow bool
}

func (f *flaky) AddWorkload(uid string, info inpod.WorkloadInfo, ns *os.File) error {
	f.mu.Lock()
	ok := f.allow
	f.mu.Unlock()
	if !ok {
		return errors.New("no certificate yet")
	}
	return f.proxy.AddWorkload(uid, info, ns)
}

func TestRefusedPodIsRetried(t *testing.T) {
	lab := netns.New(t)
	pod := lab.NewNS("pod")
	sock := filepath.Join(t.TempDir(), "z.sock")
	z := &flaky{proxy: newProxy()}
	startServer(t, sock, z)
	agent := inpod.NewSyncer(sock, testr.New(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go agent.Run(ctx)
	<-agent.Synced()
	err := agent.Upsert(ctx, inpod.Pod{UID: "u", Info: inpod.WorkloadInfo{Name: "p", Namespace: "ns"}, NetnsPath: pod.Path()})
	var ack *inpod.AckError
	if !errors.As(err, &ack) {
		t.Fatalf("Upsert to a refusing ztunnel: %v, want AckError", err)
	}
	z.mu.Lock()
	z.allow = true
	z.mu.Unlock()
	waitFor(t, "the refused pod to be retried", func() bool { u, _, _ := z.state(); return len(u) == 1 })
}

// A ztunnel that refuses a pod of the snapshot is not ready (SnapshotDone)
// until the retried pod is served: an upgrade's new instance must not look
// ready, and get the old one stopped, while it serves less than the old one.
func TestSnapshotDoneWaitsForRefusedPods(t *testing.T) {
	lab := netns.New(t)
	pod := lab.NewNS("pod")
	sock := filepath.Join(t.TempDir(), "z.sock")
	z := &flaky{proxy: newProxy()}
	startServer(t, sock, z)
	agent := inpod.NewSyncer(sock, testr.New(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	agent.Upsert(ctx, inpod.Pod{UID: "u", Info: inpod.WorkloadInfo{Name: "p", Namespace: "ns"}, NetnsPath: pod.Path()})
	go agent.Run(ctx)
	<-agent.Synced()
	if _, _, snapshots := z.state(); snapshots != 0 {
		t.Fatal("snapshot reported done while its pod was refused")
	}
	z.mu.Lock()
	z.allow = true
	z.mu.Unlock()
	waitFor(t, "snapshot done once the refused pod is served", func() bool {
		u, _, snapshots := z.state()
		return len(u) == 1 && snapshots == 1
	})
}

func socketInode(t *testing.T, path string) uint64 {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0
	}
	return st.Ino
}

// Upgrade: a second ztunnel takes over the socket path while the first
// still runs. The node agent keeps both connections, sends both every pod
// (snapshot and later changes), releases deleted pods in both, and forgets
// the old one when it exits; the old one leaves the new one's socket alone.
func TestSyncerFeedsEveryZtunnelBehindThePath(t *testing.T) {
	lab := netns.New(t)
	podA, podB := lab.NewNS("pod-a"), lab.NewNS("pod-b")
	sock := filepath.Join(t.TempDir(), "z.sock")
	oldZ, newZ := newProxy(), newProxy()
	defer oldZ.closeAll()
	defer newZ.closeAll()
	_, stopOld := startServer(t, sock, oldZ)
	agent := inpod.NewSyncer(sock, testr.New(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go agent.Run(ctx)
	<-agent.Synced()
	if err := agent.Upsert(ctx, inpod.Pod{UID: "a", Info: inpod.WorkloadInfo{Name: "a", Namespace: "ns"}, NetnsPath: podA.Path()}); err != nil {
		t.Fatal(err)
	}

	oldSock := socketInode(t, sock)
	srv := inpod.NewServer(sock, newZ, testr.New(t))
	newCtx, stopNew := context.WithCancel(context.Background())
	defer stopNew()
	go srv.ListenAndServe(newCtx)
	waitFor(t, "new socket", func() bool { i := socketInode(t, sock); return i != 0 && i != oldSock })
	waitFor(t, "node agent connected to both", func() bool { return agent.Connected() == 2 })
	if u, _, snaps := newZ.state(); len(u) != 1 || snaps != 1 {
		t.Fatalf("new ztunnel after its snapshot: pods %v, snapshots %d", u, snaps)
	}
	// Both ztunnels listen in the pod (SO_REUSEPORT).
	if err := agent.Upsert(ctx, inpod.Pod{UID: "b", Info: inpod.WorkloadInfo{Name: "b", Namespace: "ns"}, NetnsPath: podB.Path()}); err != nil {
		t.Fatalf("pod added next to two ztunnels: %v", err)
	}
	for name, z := range map[string]*proxy{"old": oldZ, "new": newZ} {
		if u, _, _ := z.state(); len(u) != 2 {
			t.Fatalf("%s ztunnel serves %v, want both pods", name, u)
		}
	}
	if err := agent.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	for name, z := range map[string]*proxy{"old": oldZ, "new": newZ} {
		if u, _, _ := z.state(); len(u) != 1 {
			t.Fatalf("%s ztunnel still serves %v after the delete", name, u)
		}
	}
	// The old ztunnel exits: only the new one is left, its socket intact.
	stopOld()
	waitFor(t, "node agent down to one ztunnel", func() bool { return agent.Connected() == 1 })
	if socketInode(t, sock) == oldSock || socketInode(t, sock) == 0 {
		t.Fatal("the old ztunnel removed the new one's socket")
	}
	if err := agent.Upsert(ctx, inpod.Pod{UID: "a", Info: inpod.WorkloadInfo{Name: "a", Namespace: "ns"}, NetnsPath: podA.Path()}); err != nil {
		t.Fatalf("after the old ztunnel left: %v", err)
	}
	if u, _, _ := newZ.state(); len(u) != 2 {
		t.Fatalf("new ztunnel serves %v", u)
	}
}
