package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/meshtransport"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/netns"
	"github.com/ambientmesh/ambient/test/proctest"
)

// The test binary doubles as the sidecar binary: re-executed with this
// variable set it runs main, so the processes below are the real program.
const runMainEnv = "SIDECAR_TEST_RUN_MAIN"

func TestMain(m *testing.M) { proctest.RunMain(m, runMainEnv, main) }

// startIn starts cmd inside ns (a child inherits the forking thread's
// network namespace).
func startIn(t *testing.T, ns *os.File, cmd *exec.Cmd) {
	t.Helper()
	if err := netnsutil.Run(ns, cmd.Start); err != nil {
		t.Fatal(err)
	}
}

// serve answers each connection with name and closes.
func serve(t *testing.T, ns *os.File, addr, name string) {
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{})
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
			io.WriteString(c, name)
			c.Close()
		}
	}()
}

func readAll(t *testing.T, c net.Conn, err error) string {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	return string(b)
}

// newWebPod: one node with pod "web", published to a control plane that
// serves inside its network namespace (for its sidecar), and pod "peer".
func newWebPod(t *testing.T) (pod, peer *netns.Pod, podNS, peerNS *os.File, cp *proctest.ControlPlane) {
	netns.RequireRoot(t)
	n := netns.NewCluster(t).AddNode("n1")
	pod, peer = n.AddPod("web"), n.AddPod("peer")
	var err error
	if podNS, err = pod.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { podNS.Close() })
	if peerNS, err = peer.Open(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peerNS.Close() })
	cp = proctest.NewControlPlane(t)
	cp.ServeIn(t, podNS)
	cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", "web"), Name: "web", Namespace: "default",
		Addresses: [][]byte{pod.IP.AsSlice()}, ServiceAccount: "web", TrustDomain: "cluster.local",
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, NativeTunnel: true, Status: workloadapi.WorkloadStatus_HEALTHY})
	return pod, peer, podNS, peerNS, cp
}

// TestSidecarProcess runs the real binary as the injector's pod spec does:
// `sidecar init` as a user holding CAP_NET_ADMIN only, then the sidecar as
// user 1337 without any capability, inside the pod's network namespace,
// with certificates and discovery from a control plane. The app's
// connections out, plaintext in and HBONE in all pass through it.
func TestSidecarProcess(t *testing.T) {
	pod, peer, podNS, peerNS, cp := newWebPod(t)
	self := cp.CA.ID("default", "web")
	exe := proctest.Executable(t)
	out, pid := proctest.StartSidecar(t, proctest.Sidecar{Exe: exe, PodNS: podNS, ProbeNS: peerNS, IP: pod.IP, Name: "web", Roots: cp.Roots, Env: []string{runMainEnv + "=1"}})
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), "CapEff:\t0000000000000000") {
		t.Fatalf("sidecar has capabilities:\n%s", status)
	}

	serve(t, podNS, "[::]:8080", "app")
	serve(t, peerNS, "[::]:9090", "peer")
	ctx := context.Background()
	t.Run("app outbound through the sidecar", func(t *testing.T) {
		dst := netip.AddrPortFrom(peer.IP, 9090)
		conn, err := netns.DialAs(ctx, podNS, dst, 1000)
		if got := readAll(t, conn, err); got != "peer" {
			t.Fatalf("got %q", got)
		}
		waitLine(t, out, "outbound{", "proxying to "+dst.String()+" using passthrough")
	})
	t.Run("plaintext inbound through the sidecar", func(t *testing.T) {
		dst := netip.AddrPortFrom(pod.IP, 8080)
		conn, err := netnsutil.DialTCP(ctx, peerNS, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
		if got := readAll(t, conn, err); got != "app" {
			t.Fatalf("got %q", got)
		}
		waitLine(t, out, "inbound{", "peer_id=none", "dst.addr="+dst.String())
	})
	t.Run("HBONE inbound as the pod's own identity", func(t *testing.T) {
		client := cp.CA.ID("default", "sleep")
		certs := identity.NewStaticSource("cluster.local", cp.CA.Roots())
		certs.Set(client, cp.CA.Issue(t, client))
		tr, err := meshtransport.New(meshtransport.ForPods(meshtransport.Config{Certs: certs}))
		if err != nil {
			t.Fatal(err)
		}
		d, err := tr.NewDialer(peerNS)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		conn, err := d.Dial(dctx, hbone.DialRequest{Source: client, Expected: []identity.Identity{self},
			ProxyAddr: netip.AddrPortFrom(pod.IP, hbone.Port), Target: netip.AddrPortFrom(pod.IP, 8080)})
		if got := readAll(t, conn, err); got != "app" {
			t.Fatalf("got %q", got)
		}
		waitLine(t, out, "inbound{", "peer_id="+client.String(), "complete")
	})
}

func waitLine(t *testing.T, out *proctest.LogBuffer, parts ...string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if out.HasLine(parts...) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("no sidecar log line with %q", parts)
}
