package hboneload

import (
	"context"
	"crypto/tls"
	"encoding/binary"

	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/quic-go/quic-go"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Result is one client measurement, printed as JSON by the client role.
type Result struct {
	Mode           string  `json:"mode"`
	Bytes          int64   `json:"bytes,omitempty"`
	Streams        int     `json:"streams,omitempty"`
	Seconds        float64 `json:"seconds"`
	BytesPerSecond float64 `json:"bytes_per_second,omitempty"`
	P50Micros      float64 `json:"p50_us,omitempty"`
	P99Micros      float64 `json:"p99_us,omitempty"`
	Ops            int     `json:"ops,omitempty"`
	OpsPerSecond   float64 `json:"ops_per_second,omitempty"`
}

// Throughput sends total bytes split over streams connections to addr (a
// sink in discard mode, possibly through proxies) and times until every
// stream's byte count is acknowledged: a fixed amount of work, not a fixed time.
func Throughput(addr string, total int64, streams int) (Result, error) {
	per := total / int64(streams)
	chunk := make([]byte, 256<<10)
	start := time.Now()
	errc := make(chan error, streams)
	for range streams {
		go func() { errc <- sendCounted(addr, per, chunk) }()
	}
	var firstErr error
	for range streams {
		if err := <-errc; err != nil && firstErr == nil {
			firstErr = err
		}
	}
	el := time.Since(start).Seconds()
	sent := per * int64(streams)
	return Result{Mode: "throughput", Bytes: sent, Streams: streams, Seconds: el, BytesPerSecond: float64(sent) / el}, firstErr
}

func sendCounted(addr string, n int64, chunk []byte) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte{modeDiscard}); err != nil {
		return err
	}
	for left := n; left > 0; {
		b := chunk
		if int64(len(b)) > left {
			b = b[:left]
		}
		w, err := c.Write(b)
		if err != nil {
			return err
		}
		left -= int64(w)
	}
	c.(*net.TCPConn).CloseWrite()
	var count [8]byte
	if _, err := io.ReadFull(c, count[:]); err != nil {
		return fmt.Errorf("reading byte count: %w", err)
	}
	if got := int64(binary.BigEndian.Uint64(count[:])); got != n {
		return fmt.Errorf("sink counted %d bytes, sent %d", got, n)
	}
	return nil
}

// PingPong measures round trips of size-byte messages on one connection
// through an echo sink, after warmup round trips.
func PingPong(addr string, n, size, warmup int) (Result, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return Result{}, err
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	if _, err := c.Write([]byte{modeEcho}); err != nil {
		return Result{}, err
	}
	msg, back := make([]byte, size), make([]byte, size)
	lat := make([]time.Duration, 0, n)
	start := time.Now()
	for i := range n + warmup {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return Result{}, err
		}
		if _, err := io.ReadFull(c, back); err != nil {
			return Result{}, err
		}
		if i >= warmup {
			lat = append(lat, time.Since(t0))
		}
	}
	slices.Sort(lat)
	return Result{Mode: "pingpong", Ops: n, Seconds: time.Since(start).Seconds(),
		P50Micros: micros(lat[len(lat)/2]), P99Micros: micros(lat[len(lat)*99/100])}, nil
}

func micros(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// Hold opens n echo connections to addr with bounded concurrency, checks each
// carries a byte end to end, and returns them open (idle tunnels).
func Hold(addr string, n int) ([]net.Conn, error) {
	raiseFileLimit()
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c, err := openEcho(addr)
				if err != nil {
					mu.Lock()
					firstErr = cmpErr(firstErr, fmt.Errorf("connection %d: %w", i, err))
					mu.Unlock()
					return
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	return conns, firstErr
}

func openEcho(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	b := []byte{modeEcho, 'x'}
	if _, err := c.Write(b); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, b[:1]); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

func cmpErr(old, new error) error {
	if old != nil {
		return old
	}
	return new
}

// Opens measures tunnel opens per second over the transport's pooled
// connections: Dial (CONNECT answered after the server proxy reached the
// target) then Close, from workers goroutines, n in total.
func Opens(transportName, certsDir string, proxy, target netip.AddrPort, n, workers int) (Result, error) {
	tr, err := lookupTransport(transportName)
	if err != nil {
		return Result{}, err
	}
	certs, err := LoadCerts(certsDir)
	if err != nil {
		return Result{}, err
	}
	d, err := tr.newDialer(certs, logr.Discard())
	if err != nil {
		return Result{}, err
	}
	defer d.Close()
	req := hbone.DialRequest{Source: ClientProxyID, Expected: []identity.Identity{ServerProxyID}, ProxyAddr: proxy, Target: target}
	open := func() error {
		s, err := d.Dial(context.Background(), req)
		if err != nil {
			return err
		}
		return s.Close()
	}
	if err := open(); err != nil { // warm the pool: connection set up outside the timing
		return Result{}, err
	}
	return runOps("opens", n, workers, open)
}

// Handshakes measures new mutual-TLS connections per second against a proxy:
// proto "tcp" for TLS over TCP (TLS relay, HTTP/2), "quic" for QUIC.
func Handshakes(proto, alpn, certsDir, addr string, n, workers int) (Result, error) {
	certs, err := LoadCerts(certsDir)
	if err != nil {
		return Result{}, err
	}
	tlsConf := hbone.ClientTLSConfig(certs, ClientProxyID, []identity.Identity{ServerProxyID}, alpn)
	var op func() error
	switch proto {
	case "tcp":
		op = func() error {
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, tlsConf)
			if err != nil {
				return err
			}
			return c.Close()
		}
	case "quic":
		op = func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := quic.DialAddr(ctx, addr, tlsConf, &quic.Config{})
			if err != nil {
				return err
			}
			return c.CloseWithError(0, "")
		}
	default:
		return Result{}, fmt.Errorf("handshake protocol %q: %w", proto, errUsage)
	}
	return runOps("handshakes", n, workers, op)
}

func runOps(mode string, n, workers int, op func() error) (Result, error) {
	var next, failed atomic.Int64
	var lastErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				if err := op(); err != nil {
					failed.Add(1)
					lastErr.Store(err)
				}
			}
		})
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	ok := n - int(failed.Load())
	r := Result{Mode: mode, Ops: ok, Seconds: el, OpsPerSecond: float64(ok) / el}
	if f := failed.Load(); f > 0 {
		return r, fmt.Errorf("%d of %d operations failed, last: %v", f, n, lastErr.Load())
	}
	return r, nil
}
