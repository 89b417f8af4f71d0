package h2_test

// Unit benchmarks of the tunnel itself (no upstream socket), with raw TCP
// and plain TLS 1.3 on loopback measured in the same run as baselines:
//
//	go test -run '^$' -bench . -benchtime 2s ./proxylib/hbone/h2/
//
// The cross-process harness (client, proxies and server in separate
// processes) is hack/bench.sh.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
)

const chunk = 32 << 10

// benchHandler: without a header it counts what it reads until EOF and
// answers with the count; with x-bench-download: n it writes n bytes.
func benchHandler() hbone.Handler {
	return hbone.HandlerFunc(func(_ context.Context, req *hbone.Request, resp hbone.Responder) {
		st, err := resp.Accept()
		if err != nil {
			return
		}
		defer st.Close()
		if v := req.Header.Get("x-bench-download"); v != "" {
			n, _ := strconv.ParseInt(v, 10, 64)
			buf := make([]byte, chunk)
			for n > 0 {
				w, err := st.Write(buf[:min(int64(len(buf)), n)])
				if err != nil {
					return
				}
				n -= int64(w)
			}
			st.CloseWrite()
			return
		}
		n, _ := io.CopyBuffer(io.Discard, st, make([]byte, chunk))
		binary.Write(st, binary.BigEndian, n)
		st.CloseWrite()
	})
}

func benchTunnel(b *testing.B, server, client h2.Tuning, download bool) {
	e := newEnv(b, withHandler(benchHandler()), func(e *env) { e.serverConf.Tuning = server })
	d := e.newDialer(b, h2.DialerConfig{Tuning: client})
	req := e.request(e.echo.Addr)
	total := int64(b.N) * chunk
	if download {
		req.Header = http.Header{"X-Bench-Download": {strconv.FormatInt(total, 10)}}
	}
	st, err := d.Dial(context.Background(), req)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	b.SetBytes(chunk)
	b.ReportAllocs()
	b.ResetTimer()
	buf := make([]byte, chunk)
	if download {
		st.CloseWrite()
		n, err := io.CopyBuffer(io.Discard, st, buf)
		if err != nil || n != total {
			b.Fatalf("downloaded %d of %d: %v", n, total, err)
		}
		return
	}
	for range b.N {
		if _, err := st.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	st.CloseWrite()
	var n int64
	if err := binary.Read(st, binary.BigEndian, &n); err != nil || n != total {
		b.Fatalf("server counted %d of %d: %v", n, total, err)
	}
}

func BenchmarkTunnelThroughput(b *testing.B) {
	for _, dir := range []string{"upload", "download"} {
		b.Run(dir, func(b *testing.B) { benchTunnel(b, h2.Tuning{}, h2.Tuning{}, dir == "download") })
	}
}

// BenchmarkTunnelTuning compares frame sizes and windows (the defaults are
// chosen from this). The server's frame size stays 16 KiB (see Tuning); the
// client's is what the server may send it.
func BenchmarkTunnelTuning(b *testing.B) {
	for _, tc := range []struct {
		name           string
		server, client h2.Tuning
	}{
		{"win1m-cframe16k", h2.Tuning{ConnWindow: 1 << 20, StreamWindow: 1 << 20}, h2.Tuning{ConnWindow: 1 << 20, StreamWindow: 1 << 20, MaxReadFrameSize: 16 << 10}},
		{"win4m-cframe16k", h2.Tuning{}, h2.Tuning{MaxReadFrameSize: 16 << 10}},
		{"win4m-cframe64k", h2.Tuning{}, h2.Tuning{MaxReadFrameSize: 64 << 10}},
		{"win4m-cframe1m", h2.Tuning{}, h2.Tuning{MaxReadFrameSize: 1 << 20}},
		{"win4m-sframe64k", h2.Tuning{MaxReadFrameSize: 64 << 10}, h2.Tuning{MaxReadFrameSize: 16 << 10}},
	} {
		for _, dir := range []string{"upload", "download"} {
			b.Run(tc.name+"/"+dir, func(b *testing.B) { benchTunnel(b, tc.server, tc.client, dir == "download") })
		}
	}
}

// BenchmarkTunnelOpen measures pooled tunnel opens: CONNECT, 200, close, on
// an already established connection.
func BenchmarkTunnelOpen(b *testing.B) {
	e := newEnv(b, withHandler(hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
		st, err := resp.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, st)
		st.Close()
	})))
	warm := e.dial(b, e.echo.Addr)
	warm.Close()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			st, err := e.dialer.Dial(context.Background(), e.request(e.echo.Addr))
			if err != nil {
				b.Fatal(err)
			}
			st.Close()
		}
	})
}

// Baselines in the same run.

func BenchmarkBaselineTCP(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	benchStream(b, ln, func() (net.Conn, error) { return net.Dial("tcp", ln.Addr().String()) })
}

func BenchmarkBaselineTLS13(b *testing.B) {
	e := newEnv(b)
	cert := e.ca.Issue(b, e.server)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ln := tls.NewListener(inner, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*cert}})
	defer ln.Close()
	benchStream(b, ln, func() (net.Conn, error) {
		return tls.Dial("tcp", inner.Addr().String(), &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true})
	})
}

// benchStream sends b.N chunks over one connection to a discarding server.
func benchStream(b *testing.B, ln net.Listener, dial func() (net.Conn, error)) {
	counted := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			counted <- -1
			return
		}
		defer c.Close()
		n, _ := io.CopyBuffer(io.Discard, c, make([]byte, chunk))
		counted <- n
	}()
	c, err := dial()
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(chunk)
	b.ResetTimer()
	buf := make([]byte, chunk)
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	c.Close()
	if n := <-counted; n != int64(b.N)*chunk {
		b.Fatal(fmt.Sprintf("server counted %d", n))
	}
}

// BenchmarkIdleTunnelMemory opens 1000 idle tunnels (client and server in
// this process, the server handler parked in Read) and reports heap+stack
// bytes per tunnel for both sides together. Run it with -benchtime 1x: later
// iterations reuse freed stacks and pooled buffers and under-report.
func BenchmarkIdleTunnelMemory(b *testing.B) {
	const tunnels = 1000
	e := newEnv(b, withHandler(hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
		st, err := resp.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, st)
		st.Close()
	})))
	d := e.newDialer(b, h2.DialerConfig{MaxStreamsPerConn: tunnels})
	warm, _ := d.Dial(context.Background(), e.request(e.echo.Addr))
	warm.Close()
	for range b.N {
		before := memInUse()
		open := make([]hbone.Stream, 0, tunnels)
		for range tunnels {
			st, err := d.Dial(context.Background(), e.request(e.echo.Addr))
			if err != nil {
				b.Fatal(err)
			}
			open = append(open, st)
		}
		after := memInUse()
		b.ReportMetric(float64(after-before)/tunnels, "bytes/tunnel")
		for _, st := range open {
			st.Close()
		}
	}
}

func memInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse + m.StackInuse)
}

// BenchmarkRecordBatching compares the tunnel with and without TLS record
// batching (batchconn.go) in the same run.
func BenchmarkRecordBatching(b *testing.B) {
	for _, dir := range []string{"upload", "download"} {
		for _, on := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/batch=%v", dir, on), func(b *testing.B) {
				defer h2.SetRecordBatching(h2.SetRecordBatching(on))
				benchTunnel(b, h2.Tuning{}, h2.Tuning{}, dir == "download")
			})
		}
	}
}
