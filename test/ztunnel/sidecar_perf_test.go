package ztunnel

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

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
	p := perftest.ParamsFromEnv("SIDECAR_PERF")
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "ztunnels ready")
	directClient := pm.addPlainPod(0, "direct-client")
	directServer := pm.addPlainPod(1, "direct-server")
	for _, pod := range []*meshtest.Pod{pm.httpbin, directServer} {
		pod.ServeTCP(t, 9100, perftest.Sink)
		pod.ServeTCP(t, 9101, meshtest.Echo)
		pod.ServeHTTP(t, 8080)
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
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", exe, "github.com/ambientmesh/ambient/cmd/sidecar")
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // static, as the image
	if out, err := build.CombinedOutput(); err != nil {
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

	srv := func(pod *meshtest.Pod) perftest.Server {
		return perftest.Server{Sink: pod.Addr(9100), Echo: pod.Addr(9101), HTTP: pod.Addr(8080)}
	}
	r := perftest.Compare(t, p, mesh, srv(pm.httpbin), direct, srv(directServer), scPID, zt.cmd.Process.Pid)
	loadRSS := perftest.RSS(t, scPID)

	// The measured traffic was the sidecar's HBONE, authorized by the
	// destination ztunnel with the sidecar's identity.
	zt.waitLog(t, "peer_id=spiffe://cluster.local/ns/default/sa/"+sc.Name+"}: got CONNECT request to "+pm.httpbin.Addr(9100).String())
	if !p.Full {
		t.Log("smoke only; SIDECAR_PERF=1 measures")
		return
	}
	for _, l := range append(r.Lines("sidecar->ambient"),
		fmt.Sprintf("HTTP/1.1 1 KiB POST, 4 connections, %.0f rps for %v: client sidecar %.3f vCPU per 1000 rps, destination ztunnel %.3f",
			r.RPS, p.LoadFor, r.PerKRPS(0), r.PerKRPS(1)),
		fmt.Sprintf("sidecar pod RSS: idle %.1f MB (%s), under load %.1f MB", idle/1e6, idleParts, loadRSS/1e6),
	) {
		t.Log("PERF " + l)
	}
}
