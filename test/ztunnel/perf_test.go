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
// direct pod-to-pod TCP over the same veth/bridge topology, in one run. It is
// heavy, so it runs only with ZTUNNEL_PERF=1:
//
//	sudo ZTUNNEL_PERF=1 go test ./test/ztunnel -run TestPerf -v
func TestPerf(t *testing.T) {
	if os.Getenv("ZTUNNEL_PERF") != "1" {
		t.Skip("set ZTUNNEL_PERF=1 to measure")
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
	zt := pm.zts[0] // the client-side ztunnel is measured for CPU and memory
	idle, idleParts := perftest.RSS(t, zt.cmd.Process.Pid), perftest.RSSParts(t, zt.cmd.Process.Pid)
	if out := os.Getenv("ZTUNNEL_PROFILE"); out != "" {
		zt.fetch(t, out+".idleheap", "/debug/pprof/heap")
	}

	const dur = 3 * time.Second
	if out := os.Getenv("ZTUNNEL_PROFILE"); out != "" {
		go zt.profile(t, out+".throughput", 3)
		go pm.zts[1].profile(t, out+".throughput-server", 3)
	}
	// The machine is shared: mesh and direct are measured in alternating
	// slices so load changes hit both alike.
	var mesh, direct float64
	for i := 0; i < 6; i++ {
		mesh += perftest.Throughput(t, pm.sleep.Dial, pm.httpbin.Addr(9100), dur/6) / 6
		direct += perftest.Throughput(t, directClient.Dial, directServer.Addr(9100), dur/6) / 6
	}
	meshLat, directLat := perftest.LatencyPair(t, pm.sleep.Dial, pm.httpbin.Addr(9101), directClient.Dial, directServer.Addr(9101), 2000)

	if out := os.Getenv("ZTUNNEL_PROFILE"); out != "" {
		go zt.profile(t, out+".requests", 4)
	}
	// ZTUNNEL_PERF_SECONDS lengthens the request phase (default 5 s): CPU
	// per request is the figure machine load disturbs least, and longer
	// runs average out what it does.
	loadFor := 5 * time.Second
	if v, err := strconv.Atoi(os.Getenv("ZTUNNEL_PERF_SECONDS")); err == nil && v > 0 {
		loadFor = time.Duration(v) * time.Second
	}
	cpuBefore, serverCPUBefore, wallBefore := perftest.CPUSeconds(t, zt.cmd.Process.Pid), perftest.CPUSeconds(t, pm.zts[1].cmd.Process.Pid), time.Now()
	rpsAchieved := perftest.HTTPLoad(t, pm.sleep.Dial, pm.httpbin.Addr(8080), 1000, 4, loadFor)
	wall := time.Since(wallBefore).Seconds()
	cpu := (perftest.CPUSeconds(t, zt.cmd.Process.Pid) - cpuBefore) / wall
	serverCPU := (perftest.CPUSeconds(t, pm.zts[1].cmd.Process.Pid) - serverCPUBefore) / wall
	loadRSS := perftest.RSS(t, zt.cmd.Process.Pid)

	before, memBefore := perftest.RSS(t, zt.cmd.Process.Pid), zt.memStats(t)
	serverBefore := perftest.RSS(t, pm.zts[1].cmd.Process.Pid)
	var conns []net.Conn
	for i := 0; i < 1000; i++ {
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
	if out := os.Getenv("ZTUNNEL_PROFILE"); out != "" {
		zt.fetch(t, out+".connheap", "/debug/pprof/heap")
		zt.fetch(t, out+".goroutines", "/debug/pprof/goroutine?debug=1")
	}
	serverSide := perftest.RSS(t, pm.zts[1].cmd.Process.Pid)
	for _, c := range conns {
		c.Close()
	}

	report := []string{
		fmt.Sprintf("single-stream throughput: mesh %.2f Gbit/s, direct %.2f Gbit/s, ratio %.2f", mesh*8/1e9, direct*8/1e9, mesh/direct),
		fmt.Sprintf("1 KiB echo latency: mesh p50 %v p99 %v; direct p50 %v p99 %v; added p50 %v p99 %v",
			meshLat[0], meshLat[1], directLat[0], directLat[1], meshLat[0]-directLat[0], meshLat[1]-directLat[1]),
		fmt.Sprintf("HTTP/1.1 1 KiB POST, 4 connections, %.0f rps achieved for %v: client ztunnel %.3f vCPU => %.3f vCPU per 1000 rps (server ztunnel %.3f), RSS %.1f MB",
			rpsAchieved, loadFor, cpu, cpu/(rpsAchieved/1000), serverCPU/(rpsAchieved/1000), loadRSS/1e6),
		fmt.Sprintf("idle RSS (2 pods adopted): %.1f MB (%s)", idle/1e6, idleParts),
		fmt.Sprintf("1000 open tunnels: client ztunnel RSS %.1f -> %.1f MB (+%.1f MB per 1000), server ztunnel RSS %.1f -> %.1f MB (+%.1f MB per 1000)",
			before/1e6, after/1e6, (after-before)/1e6, serverBefore/1e6, serverSide/1e6, (serverSide-serverBefore)/1e6),
		fmt.Sprintf("per open tunnel, client ztunnel: goroutine stacks %.1f KiB, heap %.1f KiB (Go runtime's StackInuse/HeapInuse growth / 1000)",
			float64(memAfter["StackInuse"]-memBefore["StackInuse"])/1000/1024, float64(memAfter["HeapInuse"]-memBefore["HeapInuse"])/1000/1024),
		fmt.Sprintf("per idle tunnel after two collections (the runtime runs one every 2 min): goroutine stacks %.1f KiB, heap %.1f KiB",
			float64(memSettled["StackInuse"]-memBefore["StackInuse"])/1000/1024, float64(memSettled["HeapInuse"]-memBefore["HeapInuse"])/1000/1024),
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
