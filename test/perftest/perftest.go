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
	conn := func(p Dial, dst netip.AddrPort) net.Conn {
		c, err := p(dst)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := conn(fromA, dstA), conn(fromB, dstB)
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
	var da, db []time.Duration
	for i := 0; i < n+100; i++ {
		x, y := rt(a), rt(b)
		if i >= 100 { // warm-up
			da, db = append(da, x), append(db, y)
		}
	}
	pct := func(ds []time.Duration) [2]time.Duration {
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return [2]time.Duration{ds[len(ds)/2], ds[len(ds)*99/100]}
	}
	return pct(da), pct(db)
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

// Result is one run's mesh path against its direct baseline.
type Result struct {
	MeshBps, DirectBps float64
	MeshLat, DirectLat [2]time.Duration // p50, p99
	RPS                float64          // achieved during the load phase
	CPU                []float64        // vCPU of each pid during the load phase
}

// Compare runs throughput (alternating slices, so load changes on the shared
// machine hit both paths), echo latency (alternating round trips) and the
// paced HTTP load over the mesh path while sampling pids' CPU.
func Compare(t *testing.T, p Params, mesh Dial, meshSrv Server, direct Dial, directSrv Server, pids ...int) Result {
	var r Result
	for i := 0; i < 6; i++ {
		r.MeshBps += Throughput(t, mesh, meshSrv.Sink, p.Bulk/6) / 6
		r.DirectBps += Throughput(t, direct, directSrv.Sink, p.Bulk/6) / 6
	}
	r.MeshLat, r.DirectLat = LatencyPair(t, mesh, meshSrv.Echo, direct, directSrv.Echo, p.RTTs)
	before := make([]float64, len(pids))
	for i, pid := range pids {
		before[i] = CPUSeconds(t, pid)
	}
	start := time.Now()
	r.RPS = HTTPLoad(t, mesh, meshSrv.HTTP, p.RPS, 4, p.LoadFor)
	wall := time.Since(start).Seconds()
	for i, pid := range pids {
		r.CPU = append(r.CPU, (CPUSeconds(t, pid)-before[i])/wall)
	}
	if r.RPS <= 0 || r.MeshBps <= 0 || r.MeshLat[0] <= 0 {
		t.Fatalf("no traffic measured: %.0f rps, %.0f B/s, p50 %v", r.RPS, r.MeshBps, r.MeshLat[0])
	}
	return r
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
