package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/test/netns"
	"github.com/ambientmesh/ambient/test/proctest"
)

// serveRawEcho echoes every byte back, in the server pod.
func serveRawEcho(t *testing.T, pod *netns.Pod, port int) {
	serveIn(t, pod, port, func(c net.Conn) { io.Copy(c, c) })
}

// patternByte is byte off of connection i's stream: position-dependent,
// so a lost, repeated or reordered byte shows up at once.
func patternByte(i int, off int64) byte {
	return byte(off*31 + off/253 + int64(i)*7)
}

// patternConn is a long-lived connection that keeps sending its pattern
// and verifies every echoed byte.
type patternConn struct {
	i                 int
	c                 net.Conn
	written, verified atomic.Int64
	mu                sync.Mutex
	err               error
	stop              chan struct{}
	done              sync.WaitGroup
}

func startPattern(t *testing.T, ns *os.File, dst netip.AddrPort, i int) *patternConn {
	s, err := dialFrom(ns, dst)
	if err != nil {
		t.Fatal(err)
	}
	p := &patternConn{i: i, c: s.c, stop: make(chan struct{})}
	t.Cleanup(func() { p.c.Close() })
	p.done.Add(2)
	go p.write()
	go p.read()
	return p
}

func (p *patternConn) fail(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.mu.Unlock()
}

func (p *patternConn) failure() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *patternConn) write() {
	defer p.done.Done()
	buf := make([]byte, 700)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-tick.C:
		}
		off := p.written.Load()
		for k := range buf {
			buf[k] = patternByte(p.i, off+int64(k))
		}
		n, err := p.c.Write(buf)
		p.written.Add(int64(n))
		if err != nil {
			p.fail(fmt.Errorf("write at byte %d: %w", off+int64(n), err))
			return
		}
	}
}

func (p *patternConn) read() {
	defer p.done.Done()
	buf := make([]byte, 4096)
	for {
		n, err := p.c.Read(buf)
		off := p.verified.Load()
		for k := range n {
			if want := patternByte(p.i, off+int64(k)); buf[k] != want {
				p.fail(fmt.Errorf("byte %d: got %#x, want %#x (lost, repeated or reordered)", off+int64(k), buf[k], want))
				return
			}
		}
		p.verified.Add(int64(n))
		if err != nil {
			if p.verified.Load() < p.written.Load() || !isStopped(p.stop) {
				p.fail(fmt.Errorf("read after %d bytes: %w", p.verified.Load(), err))
			}
			return
		}
	}
}

func isStopped(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// progress waits until every connection verified more bytes than now.
func progress(t *testing.T, what string, conns []*patternConn) {
	t.Helper()
	before := make([]int64, len(conns))
	for i, p := range conns {
		before[i] = p.verified.Load()
	}
	waitFor(t, what, func() bool {
		for i, p := range conns {
			if err := p.failure(); err != nil {
				t.Fatalf("%s: connection %d broke: %v", what, i, err)
			}
			if p.verified.Load() <= before[i]+4096 {
				return false
			}
		}
		return true
	})
}

// finishPatterns stops the writers and checks every byte came back once.
func finishPatterns(t *testing.T, conns []*patternConn) (total int64) {
	t.Helper()
	for _, p := range conns {
		close(p.stop)
	}
	for i, p := range conns {
		waitFor(t, fmt.Sprintf("connection %d echoes its last byte", i), func() bool {
			return p.failure() != nil || p.verified.Load() == p.written.Load()
		})
		if err := p.failure(); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		if got, want := p.verified.Load(), p.written.Load(); got != want {
			t.Fatalf("connection %d: %d bytes echoed, %d written", i, got, want)
		}
		total += p.verified.Load()
		p.c.Close()
		p.done.Wait()
	}
	return total
}

// upgrade starts a new ztunnel next to old on the node, then SIGTERMs old.
func upgrade(t *testing.T, cp *proctest.ControlPlane, agent *nodeAgent, old *ztunnel, newPod *netns.Pod, node string, grace time.Duration, extra ...string) *ztunnel {
	t.Helper()
	nu := startZtunnel(t, cp, newPod, agent.sock, node, "HTTP2", grace, extra...)
	waitFor(t, node+" new ztunnel ready", nu.ready)
	waitFor(t, node+" node agent connected to both ztunnels", func() bool { return agent.syncer.Connected() == 2 })
	if err := old.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, node+" old ztunnel draining", func() bool { return old.out.Contains("draining") })
	return nu
}

// exitedWithin reports whether z exited within d.
func exitedWithin(z *ztunnel, d time.Duration) bool {
	select {
	case err := <-z.exited:
		z.exited <- err
		return true
	case <-time.After(d):
		return false
	}
}

// TestUpgradeHandsOverLongLivedConnections: connections between a client
// on node2 and a server on node1 (HBONE, real TLS, real processes in kernel
// network namespaces) keep a byte pattern flowing while first the client's
// ztunnel and then the server's is replaced. The old instances have a short
// grace period; the connections live far past it, so only a hand-over keeps
// them: every byte must come back once, in order. The old instances exit
// at once (nothing left to drain). Against a peer that does not answer the
// session offer (as Istio's ztunnel), the connection falls back to the
// drain: it lives through the grace period and ends with it.
func TestUpgradeHandsOverLongLivedConnections(t *testing.T) {
	netns.RequireRoot(t)
	const grace = 2 * time.Second
	const conns, localConns = 6, 4
	setup := func(t *testing.T, serverExtra ...string) (cp *proctest.ControlPlane, c *netns.Cluster, a1, a2 *nodeAgent, z1, z2 *ztunnel, n1, n2 *netns.Node, clientNS, localNS *os.File, dst netip.AddrPort) {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		c = netns.NewCluster(t)
		n1, n2 = c.AddNode("node1"), c.AddNode("node2")
		server, client, local := n1.AddPod("server"), n2.AddPod("client"), n1.AddPod("local")
		serveRawEcho(t, server, 7777)
		dst = netip.AddrPortFrom(server.IP, 7777)
		cp = proctest.NewControlPlane(t)
		a1, a2 = startNodeAgent(t, ctx, "node-agent-1"), startNodeAgent(t, ctx, "node-agent-2")
		a1.capture(t, ctx, cp, server, "node1")
		a2.capture(t, ctx, cp, client, "node2")
		a1.capture(t, ctx, cp, local, "node1")
		z1 = startZtunnel(t, cp, n1.AddPod("ztunnel-1"), a1.sock, "node1", "HTTP2", grace, serverExtra...)
		z2 = startZtunnel(t, cp, n2.AddPod("ztunnel-2"), a2.sock, "node2", "HTTP2", grace)
		waitFor(t, "ztunnels ready", func() bool { return z1.ready() && z2.ready() })
		return cp, c, a1, a2, z1, z2, n1, n2, a2.nsOf[client], a1.nsOf[local], dst
	}

	t.Run("client-then-server", func(t *testing.T) {
		cp, _, a1, a2, z1, z2, n1, n2, clientNS, localNS, dst := setup(t)
		var ps []*patternConn
		for i := range conns {
			ps = append(ps, startPattern(t, clientNS, dst, i))
		}
		// Node-local connections (client and server both behind node1's
		// ztunnel, the fast path: no tunnel) are handed over as pairs.
		for i := range localConns {
			ps = append(ps, startPattern(t, localNS, dst, conns+i))
		}
		progress(t, "traffic before the upgrades", ps)

		for _, side := range []struct {
			name  string
			agent *nodeAgent
			old   **ztunnel
			node  *netns.Node
			held  int
		}{{"client side (outbound)", a2, &z2, n2, conns}, {"server side (inbound and node-local)", a1, &z1, n1, conns + localConns}} {
			old := *side.old
			nu := upgrade(t, cp, side.agent, old, side.node.AddPod("ztunnel-new-"+side.node.Name), side.node.Name, grace)
			if !exitedWithin(old, grace) {
				t.Fatalf("%s: old ztunnel still running %s after SIGTERM: connections not handed over", side.name, grace)
			}
			if !old.out.Contains("drained: every connection ended") {
				t.Fatalf("%s: old ztunnel did not report a complete drain", side.name)
			}
			if !old.out.HasLine("connection hand-over done", fmt.Sprintf(`"handedOver": %d,`, side.held), `"kept": 0`) {
				t.Fatalf("%s: old ztunnel did not hand over all %d connections", side.name, side.held)
			}
			// Far past the old one's grace: only the new one serves them.
			time.Sleep(2 * grace)
			progress(t, side.name+": traffic after the upgrade, past the old ztunnel's grace", ps)
			*side.old = nu
		}
		total := finishPatterns(t, ps)
		t.Logf("%d cross-node and %d node-local connections survived both upgrades, %d bytes echoed and verified, none lost, repeated or reordered", conns, localConns, total)
	})

	t.Run("istio-like-peer-falls-back-to-drain", func(t *testing.T) {
		// The server's ztunnel takes no sessions: it ignores the offer as
		// Istio's does, so the client's upgrade can only drain.
		cp, _, _, a2, _, z2, _, n2, clientNS, _, dst := setup(t, "-handover-socket", "off")
		p := startPattern(t, clientNS, dst, 0)
		progress(t, "traffic before the upgrade", []*patternConn{p})
		sigterm := time.Now()
		upgrade(t, cp, a2, z2, n2.AddPod("ztunnel-new"), "node2", grace)
		waitFor(t, "old ztunnel finds nothing to hand over", func() bool {
			return z2.out.HasLine("connection hand-over done", `"handedOver": 0`)
		})
		progress(t, "traffic during the drain", []*patternConn{p})
		waitFor(t, "old ztunnel exits when its grace ends", func() bool { return exitedWithin(z2, 10*time.Millisecond) })
		if !z2.out.Contains("drain grace elapsed") {
			t.Fatal("old ztunnel exited before its grace without the connection ending")
		}
		waitFor(t, "the drained connection ends with the old ztunnel", func() bool { return p.failure() != nil })
		if time.Since(sigterm) < grace {
			t.Fatal("connection ended before the grace period")
		}
		if err := p.failure(); err != nil && strings.Contains(err.Error(), "byte ") {
			t.Fatalf("bytes corrupted during the drain: %v", err)
		}
	})
}
