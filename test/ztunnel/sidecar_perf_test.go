package ztunnel

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
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

// TestSidecarToAmbientPerf measures a sidecar client (the real cmd/sidecar,
// built as the image builds it) calling an ambient pod served by a real
// ztunnel process on another node, against direct pod-to-pod TCP, in one
// run (TestPerf's method). Without SIDECAR_PERF=1 it is a smoke: short
// phases, the path checked (the ztunnel saw the sidecar's identity).
//
//	sudo SIDECAR_PERF=1 go test ./test/ztunnel -run TestSidecarToAmbientPerf -v -timeout 10m
func TestSidecarToAmbientPerf(t *testing.T) {
	full := os.Getenv("SIDECAR_PERF") == "1"
	bulk, rtts, loadFor, rps := 300*time.Millisecond, 100, time.Second, 200
	if full {
		bulk, rtts, loadFor, rps = 3*time.Second, 2000, 5*time.Second, 1000
		if v, err := strconv.Atoi(os.Getenv("SIDECAR_PERF_SECONDS")); err == nil && v > 0 {
			loadFor = time.Duration(v) * time.Second
		}
	}
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "ztunnels ready")
	directClient := pm.addPlainPod(0, "direct-client")
	directServer := pm.addPlainPod(1, "direct-server")
	for _, p := range []*meshtest.Pod{pm.httpbin, directServer} {
		p.ServeTCP(t, 9100, perftest.Sink)
		p.ServeTCP(t, 9101, meshtest.Echo)
		p.ServeHTTP(t, 8080)
	}

	// The sidecar pod on node1, next to the ambient sleep: its ztunnel
	// leaves it alone; its sidecar gets certificates and discovery from the
	// control plane on its own loopback.
	sc := pm.Nodes[0].AddPod("sc-sleep")
	scNS, err := sc.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer scNS.Close()
	probeNS, err := directClient.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer probeNS.Close()
	pm.cp.serveIn(scNS)
	pm.cp.workload(&workloadapi.Workload{Uid: discovery.PodUID(meshtest.ClusterID, "default", sc.Name), Name: sc.Name, Namespace: "default",
		Addresses: [][]byte{sc.IP.AsSlice()}, ServiceAccount: sc.Name, TrustDomain: pm.CA.TrustDomain, ClusterId: meshtest.ClusterID,
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE, NativeTunnel: true, Status: workloadapi.WorkloadStatus_HEALTHY})
	dir := proctest.SharedDir(t)
	roots, err := os.ReadFile(pm.cp.roots)
	if err != nil {
		t.Fatal(err)
	}
	rootsPath, exe := filepath.Join(dir, "roots.pem"), filepath.Join(dir, "sidecar")
	if err := os.WriteFile(rootsPath, roots, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", exe, "github.com/ambientmesh/ambient/cmd/sidecar").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	_, scPID := proctest.StartSidecar(t, proctest.Sidecar{Exe: exe, PodNS: scNS, ProbeNS: probeNS, IP: sc.IP, Name: sc.Name,
		Roots: rootsPath, Token: testToken, Env: []string{"CLUSTER_ID=" + meshtest.ClusterID}})

	ctx := context.Background()
	mesh := func(dst netip.AddrPort) (net.Conn, error) {
		return netns.DialAs(ctx, scNS, dst, meshtest.SidecarAppUID)
	}
	direct := func(dst netip.AddrPort) (net.Conn, error) {
		return netnsutil.DialTCP(ctx, probeNS, netip.AddrPort{}, dst, netnsutil.SocketOptions{})
	}
	zt := pm.zts[1] // the destination ztunnel
	idle, idleParts := perftest.RSS(t, scPID), perftest.RSSParts(t, scPID)

	var meshBps, directBps float64
	for i := 0; i < 6; i++ {
		meshBps += perftest.Throughput(t, mesh, pm.httpbin.Addr(9100), bulk/6) / 6
		directBps += perftest.Throughput(t, direct, directServer.Addr(9100), bulk/6) / 6
	}
	meshLat, directLat := perftest.LatencyPair(t, mesh, pm.httpbin.Addr(9101), direct, directServer.Addr(9101), rtts)

	cpu0, ztCPU0, wall0 := perftest.CPUSeconds(t, scPID), perftest.CPUSeconds(t, zt.cmd.Process.Pid), time.Now()
	achieved := perftest.HTTPLoad(t, mesh, pm.httpbin.Addr(8080), rps, 4, loadFor)
	wall := time.Since(wall0).Seconds()
	cpu, ztCPU := (perftest.CPUSeconds(t, scPID)-cpu0)/wall, (perftest.CPUSeconds(t, zt.cmd.Process.Pid)-ztCPU0)/wall
	loadRSS := perftest.RSS(t, scPID)

	// The measured traffic was the sidecar's HBONE, authorized by the
	// destination ztunnel with the sidecar's identity.
	zt.waitLog(t, "peer_id=spiffe://cluster.local/ns/default/sa/"+sc.Name+"}: got CONNECT request to "+pm.httpbin.Addr(9100).String())
	if achieved <= 0 || meshBps <= 0 || meshLat[0] <= 0 {
		t.Fatalf("no traffic measured: %.0f rps, %.0f B/s, p50 %v", achieved, meshBps, meshLat[0])
	}
	if !full {
		t.Log("smoke only; SIDECAR_PERF=1 measures")
		return
	}
	krps := achieved / 1000
	for _, l := range []string{
		fmt.Sprintf("single-stream throughput: sidecar->ambient %.2f Gbit/s, direct %.2f Gbit/s, ratio %.2f", meshBps*8/1e9, directBps*8/1e9, meshBps/directBps),
		fmt.Sprintf("1 KiB echo latency: sidecar->ambient p50 %v p99 %v; direct p50 %v p99 %v; added p50 %v p99 %v",
			meshLat[0], meshLat[1], directLat[0], directLat[1], meshLat[0]-directLat[0], meshLat[1]-directLat[1]),
		fmt.Sprintf("HTTP/1.1 1 KiB POST, 4 connections, %.0f rps for %v: client sidecar %.3f vCPU per 1000 rps, destination ztunnel %.3f",
			achieved, loadFor, cpu/krps, ztCPU/krps),
		fmt.Sprintf("sidecar pod RSS: idle %.1f MB (%s), under load %.1f MB", idle/1e6, idleParts, loadRSS/1e6),
	} {
		t.Log("PERF " + l)
	}
}
