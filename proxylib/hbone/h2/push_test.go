package h2_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
)

// relayResult is what the server side's relay reported.
type relayResult struct {
	st           hbone.Stream
	toUp, toDown int64
	err          error
}

// recordingRelay returns a handler that relays every tunnel to its CONNECT
// target and reports each relay's result on the channel. sndbuf > 0 sets
// the upstream socket's send buffer.
func recordingRelay(sndbuf int) (hbone.Handler, <-chan relayResult) {
	results := make(chan relayResult, 4)
	h := hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		c, err := net.Dial("tcp", req.Target.String())
		if err != nil {
			resp.Reject(http.StatusServiceUnavailable, err.Error())
			return
		}
		if sndbuf > 0 {
			c.(*net.TCPConn).SetWriteBuffer(sndbuf)
		}
		st, err := resp.Accept()
		if err != nil {
			c.Close()
			return
		}
		r := relayResult{st: st}
		r.toDown, r.toUp, r.err = hbone.Relay(c.(*net.TCPConn), st)
		results <- r
	})
	return h, results
}

// An idle relay from a tunnel into a socket is not woken for each message:
// the connection's reader pushes it into the socket itself. Every byte of a
// request/response exchange then arrives by push, and the relay's count
// still includes them.
func TestIdleTunnelPushesIntoTheSocket(t *testing.T) {
	h, results := recordingRelay(0)
	e := newEnv(t, withHandler(h))
	st := e.dial(t, e.echo.Addr)
	const rounds, size = 50, 1024
	msg := bytes.Repeat([]byte("p"), size)
	for range rounds {
		roundTrip(t, st, msg)
		// Idle between messages, as the case is: without a pause the next
		// message can arrive while the drain that delivered the previous
		// one is still returning (seen in 2 of 36 package runs on a busy
		// machine: every message then queued behind the one before).
		time.Sleep(2 * time.Millisecond)
	}
	st.CloseWrite()
	if _, err := io.ReadAll(st); err != nil {
		t.Fatal(err)
	}
	r := <-results
	if r.err != nil || r.toUp != rounds*size || r.toDown != rounds*size {
		t.Fatalf("relay moved %d up / %d down, err %v; want %d each", r.toUp, r.toDown, r.err, rounds*size)
	}
	// A message that arrives before the relay is back to waiting (it was
	// still returning from writing the previous one) is queued instead; on a
	// loaded machine that happens, but most must be pushed.
	if got := h2.Pushed(r.st); got < rounds*size/2 {
		t.Fatalf("pushed %d of %d bytes; want most messages pushed by the reader", got, rounds*size)
	}
}

// A socket that cannot take everything at once gets the rest from the
// relay, in order: bytes pushed, queued and copied never reorder.
func TestPushIntoASlowSocketKeepsOrder(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		var b bytes.Buffer
		buf := make([]byte, 700)
		for reads := 0; ; reads++ {
			n, err := c.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
			if reads%64 == 0 {
				time.Sleep(time.Millisecond) // let the sender's socket fill
			}
		}
		got <- b.Bytes()
	}()
	h, results := recordingRelay(4 << 10) // a small send buffer: pushes find it full
	e := newEnv(t, withHandler(h))
	st := e.dial(t, ln.Addr().(*net.TCPAddr).AddrPort())
	var want bytes.Buffer
	for i := range 2000 {
		chunk := bytes.Repeat([]byte{byte(i)}, 1+i*37%3000) // sizes 1..3000, byte = sequence number
		want.Write(chunk)
		if _, err := st.Write(chunk); err != nil {
			t.Fatal(err)
		}
		if i%100 == 0 {
			time.Sleep(time.Millisecond) // idle gaps: the relay goes back to waiting, pushes resume
		}
	}
	st.CloseWrite()
	if b := <-got; !bytes.Equal(b, want.Bytes()) {
		t.Fatalf("sink got %d bytes, want %d in order (first difference at %d)", len(b), want.Len(), firstDiff(b, want.Bytes()))
	}
	st.Close()
	r := <-results
	if r.toUp != int64(want.Len()) {
		t.Fatalf("relay counted %d bytes up, want %d", r.toUp, want.Len())
	}
	if p := h2.Pushed(r.st); p == 0 || p == int64(want.Len()) {
		t.Fatalf("pushed %d of %d bytes; want some pushed and some copied by the relay (else this test proves nothing)", p, want.Len())
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// A socket that fails while bytes are pushed into it fails the relay, and
// the tunnel's sender sees the reset: a broken sink is never silent.
func TestPushIntoAResetSocketResetsTheTunnel(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c.(*net.TCPConn)
		}
	}()
	h, results := recordingRelay(0)
	e := newEnv(t, withHandler(h))
	st := e.dial(t, ln.Addr().(*net.TCPAddr).AddrPort())
	c := <-accepted
	st.Write([]byte("first"))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	c.SetLinger(0)
	c.Close() // RST: the next push fails
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := st.Write([]byte("more")); err != nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, rerr := io.ReadAll(st)
	var re *h2.ResetError
	if !errors.As(rerr, &re) {
		t.Fatalf("sender's read after the sink broke: %v, want a stream reset", rerr)
	}
	if r := <-results; r.err == nil {
		t.Fatal("relay reported no error for a reset socket")
	}
}

// An idle tunnel relayed into a socket costs one goroutine (the relay's
// caller, reading the socket): the tunnel→socket direction has none while
// idle, since received bytes are pushed and a drain runs only when needed.
func TestIdleRelayedTunnelCostsOneGoroutine(t *testing.T) {
	e := newEnv(t)
	const tunnels = 50
	base := runtime.NumGoroutine()
	var open []hbone.Stream
	for range tunnels {
		st := e.dial(t, e.echo.Addr)
		roundTrip(t, st, []byte("x")) // the relay is running and idle again
		open = append(open, st)
	}
	defer func() {
		for _, st := range open {
			st.Close()
		}
	}()
	// Per tunnel: the server's handler (relaying) and the echo server's
	// connection goroutine; the client reads its tunnels itself.
	var per float64
	for range 50 {
		per = float64(runtime.NumGoroutine()-base) / tunnels
		if per <= 2.2 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%.2f goroutines per idle tunnel (handler, echo connection, relay), want about 2", per)
}
