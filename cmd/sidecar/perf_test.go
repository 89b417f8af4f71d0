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
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/netnsutil"
	"github.com/ambientmesh/ambient/test/meshtest"
	"github.com/ambientmesh/ambient/test/netns"
	"github.com/ambientmesh/ambient/test/perftest"
	"github.com/ambientmesh/ambient/test/proctest"
)

// TestSidecarPerf measures sidecar-to-sidecar overhead with the real
// binary (two sidecar processes, HBONE with mTLS between two nodes) against
// direct pod-to-pod TCP over the same topology, in one run, as
// test/ztunnel's TestPerf does for ztunnel. Without SIDECAR_PERF=1 it is a
// smoke (short phases, the mesh path checked, nothing reported as a
// measurement); with it, the sidecar is built as the image builds it and
// the figures are logged:
//
//	sudo SIDECAR_PERF=1 go test ./cmd/sidecar -run TestSidecarPerf -v -timeout 10m
func TestSidecarPerf(t *testing.T) {
	netns.RequireRoot(t)
	p := perftest.ParamsFromEnv("SIDECAR_PERF")
	c := netns.NewCluster(t)
	n1, n2 := c.AddNode("n1"), c.AddNode("n2")
	client, server := n1.AddPod("sleep"), n2.AddPod("httpbin")
	directClient, directServer := n1.AddPod("direct-client"), n2.AddPod("direct-server")
	ns := map[*netns.Pod]*os.File{}
	for _, pod := range []*netns.Pod{client, server, directClient, directServer} {
		f, err := pod.Open()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		ns[pod] = f
	}
	cp := proctest.NewControlPlane(t)
	for _, pod := range []*netns.Pod{client, server} {
		cp.ServeIn(t, ns[pod])
		cp.Workload(t, &workloadapi.Workload{Uid: discovery.PodUID("Kubernetes", "default", pod.Name), Name: pod.Name, Namespace: "default",
			Addresses: [][]byte{pod.IP.AsSlice()}, ServiceAccount: pod.Name, TrustDomain: "cluster.local",
			TunnelProtocol: workloadapi.TunnelProtocol_HBONE, NativeTunnel: true, Status: workloadapi.WorkloadStatus_HEALTHY})
	}
	exe := proctest.Executable(t)
	if p.Full {
		exe = buildSidecar(t)
	}
	env := []string{runMainEnv + "=1", "LOG_LEVEL=info"}
	_, clientPID := proctest.StartSidecar(t, proctest.Sidecar{Exe: exe, PodNS: ns[client], ProbeNS: ns[directClient], IP: client.IP, Name: client.Name, Roots: cp.Roots, Env: env})
	serverOut, serverPID := proctest.StartSidecar(t, proctest.Sidecar{Exe: exe, PodNS: ns[server], ProbeNS: ns[directServer], IP: server.IP, Name: server.Name, Roots: cp.Roots, Env: env})
	for _, pod := range []*netns.Pod{server, directServer} {
		serveConns(t, ns[pod], ":9100", perftest.Sink)
		serveConns(t, ns[pod], ":9101", meshtest.Echo)
		serveHTTP(t, ns[pod], ":8080")
	}
	ctx := context.Background()
	// The app's connections: user 1000, redirected to its sidecar.
	mesh := func(dst netip.AddrPort) (net.Conn, error) {
		return netns.DialAs(ctx, ns[client], dst, meshtest.SidecarAppUID)
	}
	direct := func(dst netip.AddrPort) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, ns[directClient], netip.AddrPort{}, dst, netnsutil.SocketOptions{})
	}
	idle := [2]float64{perftest.RSS(t, clientPID), perftest.RSS(t, serverPID)}
	idleParts := perftest.RSSParts(t, clientPID)

	srv := func(ip netip.Addr) perftest.Server {
		return perftest.Server{Sink: netip.AddrPortFrom(ip, 9100), Echo: netip.AddrPortFrom(ip, 9101), HTTP: netip.AddrPortFrom(ip, 8080)}
	}
	r := perftest.Compare(t, p, mesh, srv(server.IP), direct, srv(directServer.IP), clientPID, serverPID)
	loadRSS := [2]float64{perftest.RSS(t, clientPID), perftest.RSS(t, serverPID)}

	// The traffic measured went sidecar to sidecar over HBONE: the server's
	// sidecar saw the client's identity.
	waitLine(t, serverOut, "inbound{", "peer_id="+cp.CA.ID("default", client.Name).String())
	if !p.Full {
		t.Log("smoke only; SIDECAR_PERF=1 measures")
		return
	}
	for _, l := range append(r.Lines("sidecar->sidecar"),
		fmt.Sprintf("HTTP/1.1 1 KiB POST, 4 connections, %.0f rps for %v: client sidecar %.3f vCPU per 1000 rps, server sidecar %.3f, both %.3f",
			r.RPS, p.LoadFor, r.PerKRPS(0), r.PerKRPS(1), r.PerKRPS(0)+r.PerKRPS(1)),
		fmt.Sprintf("RSS per sidecar pod: idle client %.1f MB (%s), server %.1f MB; under load client %.1f MB, server %.1f MB",
			idle[0]/1e6, idleParts, idle[1]/1e6, loadRSS[0]/1e6, loadRSS[1]/1e6),
	) {
		t.Log("PERF " + l)
	}
}

// buildSidecar builds the binary as the image does, so memory figures are
// what ships.
func buildSidecar(t *testing.T) string {
	bin := filepath.Join(proctest.SharedDir(t), "sidecar")
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "github.com/ambientmesh/ambient/cmd/sidecar").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// serveConns runs handler for each connection accepted on addr in ns.
func serveConns(t *testing.T, ns *os.File, addr string, handler func(net.Conn)) {
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
			go handler(c)
		}
	}()
}

func serveHTTP(t *testing.T, ns *os.File, addr string) {
	ln, err := netnsutil.ListenTCP(ns, addr, netnsutil.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}
