// Package perftest holds the measurements the data-path benchmarks share
// (test/ztunnel TestPerf, cmd/sidecar TestSidecarPerf): throughput, echo
// latency percentiles, paced HTTP load and a process's CPU and memory from
// /proc. Paths are given as dial functions so each benchmark measures its
// mesh path and its direct baseline the same way in one run.
package perftest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Dial opens a connection to dst from the measured client.
type Dial func(dst netip.AddrPort) (net.Conn, error)

// Sink reads and drops everything.
func Sink(c net.Conn) {
	defer c.Close()
	io.Copy(io.Discard, c)
}

// Throughput sends as fast as possible for d over one connection.
func Throughput(t *testing.T, from Dial, dst netip.AddrPort, d time.Duration) float64 {
	c, err := from(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 256<<10)
	var n int64
	start := time.Now()
	for time.Since(start) < d {
		w, err := c.Write(buf)
		n += int64(w)
		if err != nil {
			t.Fatal(err)
		}
	}
	return float64(n) / time.Since(start).Seconds()
}

// LatencyPair measures 1 KiB echo round trips (p50, p99) on two paths,
// alternating one round trip on each.
func LatencyPair(t *testing.T, fromA Dial, dstA netip.AddrPort, fromB Dial, dstB netip.AddrPort, n int) ([2]time.Duration, [2]time.Duration) {
	l := Latency(t, n, []Dial{fromA, fromB}, []netip.AddrPort{dstA, dstB})
	return l[0], l[1]
}

// Latency measures 1 KiB echo round trips (p50, p99) on each path (from[i]
// to dst[i]), one round trip on each in turn, so load changes on the shared
// machine hit every path alike.
func Latency(t *testing.T, n int, from []Dial, dst []netip.AddrPort) [][2]time.Duration {
	conns := make([]net.Conn, len(from))
	for i := range from {
		c, err := from[i](dst[i])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[i] = c
	}
	msg := bytes.Repeat([]byte("a"), 1024)
	buf := make([]byte, 1024)
	rt := func(c net.Conn) time.Duration {
		start := time.Now()
		c.Write(msg)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	samples := make([][]time.Duration, len(conns))
	for i := 0; i < n+100; i++ {
		for j, c := range conns {
			d := rt(c)
			if i >= 100 { // warm-up
				samples[j] = append(samples[j], d)
			}
		}
	}
	out := make([][2]time.Duration, len(conns))
	for j, ds := range samples {
		sort.Slice(ds, func(a, b int) bool { return ds[a] < ds[b] })
		out[j] = [2]time.Duration{ds[len(ds)/2], ds[len(ds)*99/100]}
	}
	return out
}

// HTTPLoad posts 1 KiB bodies at rate rps over conns keep-alive
// connections for d and returns the achieved rate.
func HTTPLoad(t *testing.T, from Dial, dst netip.AddrPort, rps, conns int, d time.Duration) float64 {
	body := bytes.Repeat([]byte("b"), 1024)
	var mu sync.Mutex
	done := 0
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := from(dst)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			br := bufio.NewReader(c)
			tick := time.NewTicker(time.Second * time.Duration(conns) / time.Duration(rps))
			defer tick.Stop()
			for time.Since(start) < d {
				<-tick.C
				req, _ := http.NewRequest(http.MethodPost, "http://"+dst.String()+"/", bytes.NewReader(body))
				if err := req.Write(c); err != nil {
					t.Error(err)
					return
				}
				resp, err := http.ReadResponse(br, req)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				mu.Lock()
				done++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return float64(done) / time.Since(start).Seconds()
}

// RSS is the resident set size of pid in bytes.
func RSS(t *testing.T, pid int) float64 { return ProcStatus(t, pid, "VmRSS") }

// ProcStatus reads a kB field of /proc/<pid>/status, in bytes.
func ProcStatus(t *testing.T, pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb * 1024
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// RSSParts says where resident memory is: anonymous (heap, stacks, runtime)
// and file-backed (the binary's pages).
func RSSParts(t *testing.T, pid int) string {
	return fmt.Sprintf("anon %.1f MB, file %.1f MB", ProcStatus(t, pid, "RssAnon")/1e6, ProcStatus(t, pid, "RssFile")/1e6)
}

// CPUSeconds is user+system CPU time of pid.
func CPUSeconds(t *testing.T, pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// Params are a benchmark's phase lengths: a smoke unless Full.
type Params struct {
	Full    bool
	Bulk    time.Duration // single-stream throughput, split into 6 alternating slices
	RTTs    int           // echo round trips per path
	LoadFor time.Duration // paced HTTP load
	RPS     int
}

// ParamsFromEnv measures when env is "1" (env+"_SECONDS" lengthens the
// load phase, default 5 s); otherwise the phases are a smoke's.
func ParamsFromEnv(env string) Params {
	if os.Getenv(env) != "1" {
		return Params{Bulk: 300 * time.Millisecond, RTTs: 100, LoadFor: time.Second, RPS: 200}
	}
	p := Params{Full: true, Bulk: 3 * time.Second, RTTs: 2000, LoadFor: 5 * time.Second, RPS: 1000}
	if v, err := strconv.Atoi(os.Getenv(env + "_SECONDS")); err == nil && v > 0 {
		p.LoadFor = time.Duration(v) * time.Second
	}
	return p
}

// Server is where a path's server listens: a sink, an echo and HTTP.
type Server struct{ Sink, Echo, HTTP netip.AddrPort }

// Path is one way from the measured client to its servers. The CPU of
// PIDs is sampled while the paced HTTP load runs over it; a path without
// PIDs (a direct baseline) gets no load phase.
type Path struct {
	Dial   Dial
	Server Server
	PIDs   []int
	// OnLoad, when set, is called as the load phase starts (to profile it).
	OnLoad func()
}

// PathResult is what Measure found on one path.
type PathResult struct {
	Bps float64
	Lat [2]time.Duration // p50, p99
	RPS float64          // achieved during its load phase
	CPU []float64        // vCPU of each of its PIDs during its load phase
}

// PerKRPS is vCPU per 1000 rps of the path's pid i.
func (r PathResult) PerKRPS(i int) float64 { return r.CPU[i] / (r.RPS / 1000) }

// Measure runs single-stream throughput (alternating slices over the paths,
// so load changes on the shared machine hit them alike), echo latency
// (alternating round trips) and, on each path with PIDs, the paced HTTP
// load while sampling their CPU.
func Measure(t *testing.T, p Params, paths ...Path) []PathResult {
	rs := make([]PathResult, len(paths))
	for i := 0; i < 6; i++ {
		for j, pa := range paths {
			rs[j].Bps += Throughput(t, pa.Dial, pa.Server.Sink, p.Bulk/6) / 6
		}
	}
	var dials []Dial
	var echos []netip.AddrPort
	for _, pa := range paths {
		dials, echos = append(dials, pa.Dial), append(echos, pa.Server.Echo)
	}
	for j, l := range Latency(t, p.RTTs, dials, echos) {
		rs[j].Lat = l
	}
	for j, pa := range paths {
		if len(pa.PIDs) == 0 {
			continue
		}
		before := make([]float64, len(pa.PIDs))
		for i, pid := range pa.PIDs {
			before[i] = CPUSeconds(t, pid)
		}
		if pa.OnLoad != nil {
			pa.OnLoad()
		}
		start := time.Now()
		rs[j].RPS = HTTPLoad(t, pa.Dial, pa.Server.HTTP, p.RPS, 4, p.LoadFor)
		wall := time.Since(start).Seconds()
		for i, pid := range pa.PIDs {
			rs[j].CPU = append(rs[j].CPU, (CPUSeconds(t, pid)-before[i])/wall)
		}
		if rs[j].RPS <= 0 {
			t.Fatalf("path %d: no requests answered", j)
		}
	}
	for j, r := range rs {
		if r.Bps <= 0 || r.Lat[0] <= 0 {
			t.Fatalf("path %d: no traffic measured: %.0f B/s, p50 %v", j, r.Bps, r.Lat[0])
		}
	}
	return rs
}

// Result is one run's mesh path against its direct baseline.
type Result struct {
	MeshBps, DirectBps float64
	MeshLat, DirectLat [2]time.Duration // p50, p99
	RPS                float64          // achieved during the load phase
	CPU                []float64        // vCPU of each pid during the load phase
}

// Compare measures the mesh path, sampling pids' CPU during its load, against
// the direct baseline (Measure).
func Compare(t *testing.T, p Params, mesh Dial, meshSrv Server, direct Dial, directSrv Server, pids ...int) Result {
	rs := Measure(t, p, Path{Dial: mesh, Server: meshSrv, PIDs: pids}, Path{Dial: direct, Server: directSrv})
	return Result{MeshBps: rs[0].Bps, DirectBps: rs[1].Bps, MeshLat: rs[0].Lat, DirectLat: rs[1].Lat, RPS: rs[0].RPS, CPU: rs[0].CPU}
}

// PerKRPS is vCPU per 1000 rps of pid i.
func (r Result) PerKRPS(i int) float64 { return r.CPU[i] / (r.RPS / 1000) }

// Lines reports throughput and latency, the mesh path named path.
func (r Result) Lines(path string) []string {
	return []string{
		fmt.Sprintf("single-stream throughput: %s %.2f Gbit/s, direct %.2f Gbit/s, ratio %.2f", path, r.MeshBps*8/1e9, r.DirectBps*8/1e9, r.MeshBps/r.DirectBps),
		fmt.Sprintf("1 KiB echo latency: %s p50 %v p99 %v; direct p50 %v p99 %v; added p50 %v p99 %v",
			path, r.MeshLat[0], r.MeshLat[1], r.DirectLat[0], r.DirectLat[1], r.MeshLat[0]-r.DirectLat[0], r.MeshLat[1]-r.DirectLat[1]),
	}
}
