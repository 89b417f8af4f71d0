package ztunnel

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/test/meshtest"
	"github.com/ambientmesh/ambient/test/perftest"
)

// TestPerf measures the data path through two real ztunnel processes against
// direct pod-to-pod TCP over the same veth/bridge topology and against the
// floor of any user-space TLS proxy pair there (perftest.RelayFloor), in one
// run. Without ZTUNNEL_PERF=1 it is a smoke (short phases, the paths
// checked, nothing reported as a measurement); with it, the figures are
// logged:
//
//	sudo ZTUNNEL_PERF=1 go test ./test/ztunnel -run 'TestPerf$' -v -timeout 15m
//
// ZTUNNEL_PERF_SECONDS lengthens each load phase (default 5 s): CPU per
// request is the figure machine load disturbs least, and longer runs average
// out what it does. ZTUNNEL_PROFILE=/tmp/zt.prof also saves CPU, heap and
// goroutine profiles.
func TestPerf(t *testing.T) {
	p := perftest.ParamsFromEnv("ZTUNNEL_PERF")
	pm := newProcessMesh(t)
	waitUntil(t, func() bool { return pm.zts[0].ready() && pm.zts[1].ready() }, "ztunnels ready")
	directClient := pm.addPlainPod(0, "direct-client")
	directServer := pm.addPlainPod(1, "direct-server")
	for _, pod := range []*meshtest.Pod{pm.httpbin, directServer} {
		pod.ServeTCP(t, 9100, perftest.Sink)
		pod.ServeTCP(t, 9101, meshtest.Echo)
		pod.ServeHTTP(t, 8080)
	}
	srv := func(pod *meshtest.Pod) perftest.Server {
		return perftest.Server{Sink: pod.Addr(9100), Echo: pod.Addr(9101), HTTP: pod.Addr(8080)}
	}
	floor := perftest.StartRelayFloor(t, directClient.Name, directServer.Name, directServer.IP, srv(directServer))
	zt := pm.zts[0] // the client-side ztunnel is measured for CPU and memory
	idle, idleParts := perftest.RSS(t, zt.cmd.Process.Pid), perftest.RSSParts(t, zt.cmd.Process.Pid)
	profile := os.Getenv("ZTUNNEL_PROFILE")
	if profile != "" {
		zt.fetch(t, profile+".idleheap", "/debug/pprof/heap")
		go zt.profile(t, profile+".throughput", 3)
		go pm.zts[1].profile(t, profile+".throughput-server", 3)
	}
	meshPath := perftest.Path{Dial: pm.sleep.Dial, Server: srv(pm.httpbin), PIDs: []int{zt.cmd.Process.Pid, pm.zts[1].cmd.Process.Pid}}
	if profile != "" {
		meshPath.OnLoad = func() { go zt.profile(t, profile+".requests", 4) }
	}
	paths := []perftest.Path{meshPath,
		{Dial: directClient.Dial, Server: srv(directServer)},
		{Dial: directClient.Dial, Server: floor.Server, PIDs: floor.PIDs[:]}}
	// The same floor in C (OpenSSL), when socat is installed: throughput
	// and latency only (a process per connection, no pid to sample).
	socat, haveSocat := perftest.StartSocatFloor(t, directClient.Name, directServer.Name, directServer.IP, srv(directServer), directClient.Dial)
	if haveSocat {
		paths = append(paths, perftest.Path{Dial: directClient.Dial, Server: socat})
	}
	rs := perftest.Measure(t, p, paths...)
	mesh, direct, relays := rs[0], rs[1], rs[2]
	loadRSS := perftest.RSS(t, zt.cmd.Process.Pid)

	tunnels := 1000
	if !p.Full {
		tunnels = 50
	}
	before, memBefore := perftest.RSS(t, zt.cmd.Process.Pid), zt.memStats(t)
	serverBefore := perftest.RSS(t, pm.zts[1].cmd.Process.Pid)
	var conns []net.Conn
	for i := 0; i < tunnels; i++ {
		c, err := pm.sleep.Dial(pm.httpbin.Addr(9101))
		if err != nil {
			t.Fatalf("conn %d: %v", i, err)
		}
		roundTrip(t, c, "x")
		conns = append(conns, c)
	}
	time.Sleep(500 * time.Millisecond)
	after, memAfter := perftest.RSS(t, zt.cmd.Process.Pid), zt.memStats(t)
	// An idle ztunnel's runtime collects at least every 2 minutes, and each
	// collection halves stacks that idle goroutines no longer use; two
	// forced collections show where idle tunnels settle.
	zt.memStatsAfterGC(t)
	memSettled := zt.memStatsAfterGC(t)
	if profile != "" {
		zt.fetch(t, profile+".connheap", "/debug/pprof/heap")
		zt.fetch(t, profile+".goroutines", "/debug/pprof/goroutine?debug=1")
	}
	serverSide := perftest.RSS(t, pm.zts[1].cmd.Process.Pid)
	for _, c := range conns {
		c.Close()
	}
	// The traffic measured went ztunnel to ztunnel over HBONE.
	pm.zts[1].waitLog(t, "peer_id=spiffe://cluster.local/ns/default/sa/sleep}: got CONNECT request to "+pm.httpbin.Addr(8080).String())
	if !p.Full {
		t.Log("smoke only; ZTUNNEL_PERF=1 measures")
		return
	}

	perK := func(stat map[string]int64, base map[string]int64, name string) float64 {
		return float64(stat[name]-base[name]) / float64(tunnels) / 1024
	}
	report := []string{
		fmt.Sprintf("single-stream throughput: mesh %.2f Gbit/s, direct %.2f Gbit/s, ratio %.2f", mesh.Bps*8/1e9, direct.Bps*8/1e9, mesh.Bps/direct.Bps),
		fmt.Sprintf("1 KiB echo latency: mesh p50 %v p99 %v; direct p50 %v p99 %v; added p50 %v p99 %v",
			mesh.Lat[0], mesh.Lat[1], direct.Lat[0], direct.Lat[1], mesh.Lat[0]-direct.Lat[0], mesh.Lat[1]-direct.Lat[1]),
		fmt.Sprintf("HTTP/1.1 1 KiB POST, 4 connections, %.0f rps achieved for %v: client ztunnel %.3f vCPU => %.3f vCPU per 1000 rps (server ztunnel %.3f), RSS %.1f MB",
			mesh.RPS, p.LoadFor, mesh.CPU[0], mesh.PerKRPS(0), mesh.PerKRPS(1), loadRSS/1e6),
		fmt.Sprintf("floor, a plain mTLS relay pair: throughput %.2f Gbit/s, ratio to direct %.2f (mesh / floor %.2f)",
			relays.Bps*8/1e9, relays.Bps/direct.Bps, mesh.Bps/relays.Bps),
		fmt.Sprintf("floor: 1 KiB echo added over direct p50 %v p99 %v (mesh adds over the floor p50 %v p99 %v)",
			relays.Lat[0]-direct.Lat[0], relays.Lat[1]-direct.Lat[1], mesh.Lat[0]-relays.Lat[0], mesh.Lat[1]-relays.Lat[1]),
		fmt.Sprintf("floor: %.0f rps achieved: client relay %.3f vCPU per 1000 rps (server relay %.3f); client ztunnel / client relay %.2f",
			relays.RPS, relays.PerKRPS(0), relays.PerKRPS(1), mesh.PerKRPS(0)/relays.PerKRPS(0)),
		socatLine(haveSocat, rs, direct),
		fmt.Sprintf("idle RSS (2 pods adopted): %.1f MB (%s)", idle/1e6, idleParts),
		fmt.Sprintf("%d open tunnels: client ztunnel RSS %.1f -> %.1f MB (+%.1f MB per 1000), server ztunnel RSS %.1f -> %.1f MB (+%.1f MB per 1000)",
			tunnels, before/1e6, after/1e6, (after-before)/1e6*1000/float64(tunnels), serverBefore/1e6, serverSide/1e6, (serverSide-serverBefore)/1e6*1000/float64(tunnels)),
		fmt.Sprintf("per open tunnel, client ztunnel: goroutine stacks %.1f KiB, heap %.1f KiB (Go runtime's StackInuse/HeapInuse growth / tunnels)",
			perK(memAfter, memBefore, "StackInuse"), perK(memAfter, memBefore, "HeapInuse")),
		fmt.Sprintf("per idle tunnel after two collections (the runtime runs one every 2 min): goroutine stacks %.1f KiB, heap %.1f KiB",
			perK(memSettled, memBefore, "StackInuse"), perK(memSettled, memBefore, "HeapInuse")),
	}
	for _, l := range report {
		t.Log("PERF " + l)
	}
}

// addPlainPod adds a pod outside the mesh (direct baseline).
func (pm *processMesh) addPlainPod(nodeIdx int, name string) *meshtest.Pod {
	n := pm.Nodes[nodeIdx]
	return &meshtest.Pod{Pod: n.AddPod(name), PodName: name, Namespace: "default", ServiceAccount: name, Node: n}
}

// memStats reads the Go runtime's memory statistics (the "# Name = value"
// lines of the admin heap profile in text form).
func (z *ztunnelProcess) memStats(t *testing.T) map[string]int64 {
	return z.readMemStats(t, "/debug/pprof/heap?debug=1")
}

// memStatsAfterGC is memStats after a garbage collection.
func (z *ztunnelProcess) memStatsAfterGC(t *testing.T) map[string]int64 {
	return z.readMemStats(t, "/debug/pprof/heap?debug=1&gc=1")
}

func (z *ztunnelProcess) readMemStats(t *testing.T, uri string) map[string]int64 {
	path := filepath.Join(t.TempDir(), "heap.txt")
	z.fetch(t, path, uri)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	stats := map[string]int64{}
	for _, l := range strings.Split(string(b), "\n") {
		name, value, ok := strings.Cut(strings.TrimPrefix(l, "# "), " = ")
		value, _, _ = strings.Cut(value, " / ") // "Stack = inuse / sys"
		if name == "Stack" {
			name = "StackInuse"
		}
		if v, err := strconv.ParseInt(value, 10, 64); ok && err == nil {
			stats[name] = v
		}
	}
	if stats["HeapInuse"] == 0 || stats["StackInuse"] == 0 {
		t.Fatalf("no memory statistics from ztunnel's admin endpoint:\n%.300s", b)
	}
	return stats
}

// profile saves a CPU profile of the process (admin pprof) to path.
func (z *ztunnelProcess) profile(t *testing.T, path string, seconds int) {
	z.fetch(t, path, fmt.Sprintf("/debug/pprof/profile?seconds=%d", seconds))
}

// fetch saves an admin endpoint's answer to path.
func (z *ztunnelProcess) fetch(t *testing.T, path, uri string) {
	b, err := z.request("127.0.0.1:15000", uri, 0)
	if err != nil {
		t.Log("profile:", err)
		return
	}
	os.WriteFile(path, b, 0o644)
}

// socatLine reports the C floor (the last path) when it ran.
func socatLine(ran bool, rs []perftest.PathResult, direct perftest.PathResult) string {
	if !ran {
		return "floor in C: socat not installed, not measured"
	}
	s := rs[len(rs)-1]
	return fmt.Sprintf("floor in C, a socat+OpenSSL relay pair: throughput %.2f Gbit/s, ratio to direct %.2f; 1 KiB echo added over direct p50 %v p99 %v",
		s.Bps*8/1e9, s.Bps/direct.Bps, s.Lat[0]-direct.Lat[0], s.Lat[1]-direct.Lat[1])
}
