package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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

// TestSidecarProcess runs the real binary as the injector's pod spec does:
// `sidecar init` as a user holding CAP_NET_ADMIN only, then the sidecar as
// user 1337 without any capability, inside the pod's network namespace,
// with certificates and discovery from a control plane. The app's
// connections out, plaintext in and HBONE in all pass through it.
func TestSidecarProcess(t *testing.T) {
	netns.RequireRoot(t)
	c := netns.NewCluster(t)
	n := c.AddNode("n1")
	pod, peer := n.AddPod("web"), n.AddPod("peer")
	podNS, err := pod.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer podNS.Close()
	peerNS, err := peer.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer peerNS.Close()
	cp := proctest.NewControlPlane(t)
	cp.ServeIn(t, podNS)
	self := cp.CA.ID("default", "web")
	cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", "web"), Name: "web", Namespace: "default",
		Addresses: [][]byte{pod.IP.AsSlice()}, ServiceAccount: "web", TrustDomain: "cluster.local",
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, NativeTunnel: true, Status: workloadapi.WorkloadStatus_HEALTHY})
	exe := proctest.Executable(t)
	out, pid := startSidecar(t, cp, exe, podNS, peerNS, pod.IP, "web", runMainEnv+"=1")
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

// startSidecar runs exe as the injected pod runs it: `sidecar init` as a
// user holding CAP_NET_ADMIN only, then the sidecar as user 1337 without
// any capability, in podNS, serving pod name (service account name) with
// the control plane cp; it returns once the sidecar is ready, asked as the
// kubelet does from probeNS on :15021. env is added to the processes'.
func startSidecar(t *testing.T, cp *proctest.ControlPlane, exe string, podNS, probeNS *os.File, ip netip.Addr, name string, env ...string) (*proctest.LogBuffer, int) {
	t.Helper()
	token := filepath.Join(proctest.SharedDir(t), "token")
	if err := os.WriteFile(token, []byte(proctest.Token), 0o644); err != nil {
		t.Fatal(err)
	}
	// The init container: CAP_NET_ADMIN only (an unprivileged user with it
	// as an ambient capability), nothing else.
	initOut := proctest.NewLogBuffer(t, name+" init")
	initCmd := exec.Command(exe, "init")
	initCmd.Env = append(append(os.Environ(), env...), "SIDECAR_UID=1337")
	initCmd.Stdout, initCmd.Stderr = initOut, initOut
	initCmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4000, Gid: 4000},
		AmbientCaps: []uintptr{unix.CAP_NET_ADMIN}}
	startIn(t, podNS, initCmd)
	if err := initCmd.Wait(); err != nil {
		t.Fatalf("sidecar init with CAP_NET_ADMIN only: %v", err)
	}

	// The sidecar: user 1337, no capabilities.
	out := proctest.NewLogBuffer(t, name+" sidecar")
	cpName := "ambient-controlplane.ambient-system.svc"
	sc := exec.Command(exe, "-pod-name", name, "-pod-namespace", "default", "-service-account", name,
		"-xds-address", "127.0.0.1:15010", "-xds-server-name", cpName, "-ca-address", "127.0.0.1:15012", "-ca-server-name", cpName,
		"-token-path", token, "-root-cert", cp.Roots)
	sc.Env = append(os.Environ(), env...)
	sc.Stdout, sc.Stderr = out, out
	sc.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	startIn(t, podNS, sc)
	exited := make(chan error, 1)
	go func() { exited <- sc.Wait() }()
	t.Cleanup(func() {
		sc.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			sc.Process.Kill()
			<-exited
		}
	})
	ready := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, probeNS, netip.AddrPort{}, netip.MustParseAddrPort(addr), netnsutil.SocketOptions{})
	}}}
	for i := 0; ; i++ {
		resp, err := ready.Get(fmt.Sprintf("http://%s/healthz/ready", netip.AddrPortFrom(ip, 15021)))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("sidecar exited: %v", err)
		default:
		}
		if i == 300 {
			t.Fatalf("sidecar never ready: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return out, sc.Process.Pid
}
