package h2_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// x/net recycles a stream's ResponseWriter state once the HTTP handler
// returns, so any later use of it by the tunnel's stream crashes the whole
// server. These tests drive the stream past that point.

// afterReturn is what the handler saw when it used its stream after the
// server's HTTP handler had returned.
type afterReturn struct {
	deadline, readDeadline, writeDeadline error
	writeErr, readErr                     error
}

// TestStreamUseAfterHandlerReturned: a finished stream's deadline, Write,
// Read, CloseWrite and Close calls made after x/net's handler returned are
// refused or no-ops, never a crash.
func TestStreamUseAfterHandlerReturned(t *testing.T) {
	clientSawEnd := make(chan struct{})
	got := make(chan afterReturn, 1)
	var first atomic.Bool
	first.Store(true)
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		if !first.CompareAndSwap(true, false) {
			relayTo(resp, req)
			return
		}
		st, err := resp.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		st.CloseWrite() // ends the response: x/net's handler returns
		<-clientSawEnd  // the end reached the peer: the handler has returned
		var r afterReturn
		// The old stream passed the first calls straight to x/net: poll
		// until refused so the call lands after x/net let go of the stream.
		for i := 0; i < 1000; i++ {
			if r.deadline = st.SetDeadline(time.Time{}); r.deadline != nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
		r.readDeadline = st.SetReadDeadline(time.Now())
		r.writeDeadline = st.SetWriteDeadline(time.Now())
		_, r.writeErr = st.Write([]byte("late"))
		_, r.readErr = st.Read(make([]byte, 8))
		st.CloseWrite()
		st.Close()
		got <- r
	})))
	st := e.dial(t, e.echo.Addr)
	defer st.Close()
	if _, err := io.ReadAll(st); err != nil {
		t.Fatalf("response did not end cleanly: %v", err)
	}
	close(clientSawEnd)
	var r afterReturn
	select {
	case r = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("handler did not finish")
	}
	for name, err := range map[string]error{"SetDeadline": r.deadline, "SetReadDeadline": r.readDeadline, "SetWriteDeadline": r.writeDeadline, "Write": r.writeErr} {
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after the handler returned: %v, want net.ErrClosed", name, err)
		}
	}
	if r.readErr != io.EOF {
		t.Errorf("Read after a clean end: %v, want io.EOF", r.readErr)
	}
	roundTrip(t, e.dial(t, e.echo.Addr), []byte("server still alive"))
}

// TestConcurrentCloseWriteAndClose: the relay half-closes in one goroutine
// while the other aborts (Close). Whichever finishes the stream, the loser
// must not touch x/net's stream after the handler returned.
func TestConcurrentCloseWriteAndClose(t *testing.T) {
	const tunnels = 300
	var handlers atomic.Int32
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		handlers.Add(1)
		defer handlers.Add(-1)
		st, err := resp.Accept()
		if err != nil {
			return
		}
		start := make(chan struct{})
		var wg sync.WaitGroup
		for _, end := range []func() error{st.CloseWrite, st.Close, st.Close} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				end()
				st.SetDeadline(time.Now())
			}()
		}
		close(start)
		wg.Wait()
		st.SetWriteDeadline(time.Time{})
		st.Write([]byte("late"))
	})))
	runTunnels(t, e, tunnels, &handlers, func(st hbone.Stream) { io.Copy(io.Discard, st) })
}

// TestClientResetWhileRelayCopies: the load-test crash. The upstream streams
// bytes (the server's Relay is mid-copy, often blocked on flow control) and
// ends at varying points while the client resets the tunnel: the reset
// reaches the HTTP handler (ctx) and the relay (Read/Write error → Close)
// at the same time as the upstream's EOF (CloseWrite).
func TestClientResetWhileRelayCopies(t *testing.T) {
	const tunnels = 300
	var handlers atomic.Int32
	chunk := make([]byte, 32<<10)
	var n sync.Mutex
	i := 0
	target := upstream(t, func(c *net.TCPConn) {
		n.Lock()
		i++
		rounds := i % 7 // some end before the reset, some after
		n.Unlock()
		for r := 0; r < rounds; r++ {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		handlers.Add(1)
		defer handlers.Add(-1)
		up, err := net.Dial("tcp", req.Target.String())
		if err != nil {
			resp.Reject(http.StatusServiceUnavailable, err.Error())
			return
		}
		st, err := resp.Accept()
		if err != nil {
			up.Close()
			return
		}
		hbone.Relay(up.(*net.TCPConn), st)
		st.SetDeadline(time.Now()) // a late call from a handler that outlives the stream
	})))
	runTunnelsTo(t, e, target, tunnels, 8, &handlers, func(st hbone.Stream) {
		st.Write([]byte("hello"))
		st.Read(make([]byte, 1024)) // the relay is copying now
		st.Close()                  // RST_STREAM(CANCEL) mid-copy
	})
}

// relayTo accepts and relays to the CONNECT target, like the default handler.
func relayTo(resp hbone.Responder, req *hbone.Request) {
	up, err := net.Dial("tcp", req.Target.String())
	if err != nil {
		resp.Reject(http.StatusServiceUnavailable, err.Error())
		return
	}
	st, err := resp.Accept()
	if err != nil {
		up.Close()
		return
	}
	hbone.Relay(up.(*net.TCPConn), st)
}

func runTunnels(t *testing.T, e *env, n int, handlers *atomic.Int32, client func(hbone.Stream)) {
	runTunnelsTo(t, e, e.echo.Addr, n, 8, handlers, client)
}

// runTunnelsTo opens n tunnels to target, workers at a time, runs client on
// each, then checks every server handler returned.
func runTunnelsTo(t *testing.T, e *env, target netip.AddrPort, n, workers int, running *atomic.Int32, client func(hbone.Stream)) {
	t.Helper()
	jobs := make(chan struct{})
	var clients sync.WaitGroup
	for range workers {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for range jobs {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				st, err := e.dialer.Dial(ctx, e.request(target))
				cancel()
				if err != nil {
					continue // the server may reset a tunnel before the answer arrives
				}
				client(st)
				st.Close()
			}
		}()
	}
	for range n {
		jobs <- struct{}{}
	}
	close(jobs)
	clients.Wait()
	eventually(t, "every server-side handler returned", func() bool { return running.Load() == 0 })
}

// TestOpenThenResetStorm is the load tool's "opens" run: each client opens a
// tunnel and resets it at once, racing the server's answer (Accept), its
// relay's Close and the HTTP handler's own reaction to the reset.
func TestOpenThenResetStorm(t *testing.T) {
	tunnels := 5000
	if testing.Short() {
		tunnels = 500
	}
	// More Ps than cores: the HTTP handler goroutine is then often descheduled
	// until the reset arrived, the interleaving that used to crash.
	prev := runtime.GOMAXPROCS(max(8, runtime.GOMAXPROCS(0)))
	defer runtime.GOMAXPROCS(prev)
	var handlers atomic.Int32
	target := upstream(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		handlers.Add(1)
		defer handlers.Add(-1)
		relayTo(resp, req)
	})))
	runTunnelsTo(t, e, target, tunnels, 32, &handlers, func(hbone.Stream) {})
}

// TestBlockedReadEndsWithTheResponse: a Read waiting for the peer when the
// response ends (CloseWrite) returns io.EOF instead of outliving the HTTP
// handler inside x/net's request body (the handler waits for it).
func TestBlockedReadEndsWithTheResponse(t *testing.T) {
	readErr := make(chan error, 1)
	e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		st, err := resp.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		reading := make(chan struct{})
		go func() {
			close(reading)
			_, err := st.Read(make([]byte, 64)) // the client sends nothing
			readErr <- err
		}()
		<-reading
		st.CloseWrite()
	})))
	st := e.dial(t, e.echo.Addr)
	defer st.Close()
	if _, err := io.ReadAll(st); err != nil {
		t.Fatalf("response did not end cleanly: %v", err)
	}
	select {
	case err := <-readErr:
		if err != io.EOF {
			t.Errorf("blocked Read after CloseWrite: %v, want io.EOF", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a Read blocked in the request body outlived the response")
	}
}
