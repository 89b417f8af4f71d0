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

// afterEnd is what the handler saw when it used its stream after both
// directions had ended.
type afterEnd struct {
	deadline, readDeadline, writeDeadline error
	writeErr, readErr                     error
}

// TestStreamUseAfterEnd: once both directions ended cleanly the tunnel is
// released; later deadline, Write, Read, CloseWrite and Close calls are
// refused or no-ops, never a crash or a frame on a closed stream.
func TestStreamUseAfterEnd(t *testing.T) {
	got := make(chan afterEnd, 1)
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
		st.CloseWrite()
		if _, err := io.ReadAll(st); err != nil { // until the client's END_STREAM
			t.Errorf("server read: %v", err)
		}
		var r afterEnd
		r.deadline = st.SetDeadline(time.Time{})
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
	st.CloseWrite()
	var r afterEnd
	select {
	case r = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("handler did not finish")
	}
	for name, err := range map[string]error{"SetDeadline": r.deadline, "SetReadDeadline": r.readDeadline, "SetWriteDeadline": r.writeDeadline, "Write": r.writeErr} {
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("%s after the stream ended: %v, want net.ErrClosed", name, err)
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

// TestHalfCloseBothWays: after the accepting side ends its direction
// (CloseWrite), a Read it has blocked keeps receiving what the client sends
// until the client's own END_STREAM, which is a clean io.EOF; the same holds
// with the roles swapped.
func TestHalfCloseBothWays(t *testing.T) {
	for _, serverFirst := range []bool{true, false} {
		t.Run(map[bool]string{true: "server ends first", false: "client ends first"}[serverFirst], func(t *testing.T) {
			serverGot := make(chan string, 1)
			e := newEnv(t, withHandler(hbone.HandlerFunc(func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
				st, err := resp.Accept()
				if err != nil {
					t.Error(err)
					return
				}
				defer st.Close()
				if serverFirst {
					st.Write([]byte("bye"))
					st.CloseWrite()
				}
				b, err := io.ReadAll(st)
				if err != nil {
					t.Errorf("server read after its CloseWrite: %v", err)
				}
				serverGot <- string(b)
				if !serverFirst {
					st.Write([]byte("bye"))
					st.CloseWrite()
				}
			})))
			st := e.dial(t, e.echo.Addr)
			defer st.Close()
			if serverFirst {
				b, err := io.ReadAll(st)
				if err != nil || string(b) != "bye" {
					t.Fatalf("client read %q, %v; want bye, EOF", b, err)
				}
			}
			st.Write([]byte("still talking"))
			st.CloseWrite()
			select {
			case got := <-serverGot:
				if got != "still talking" {
					t.Errorf("server read %q after the half-close, want %q", got, "still talking")
				}
			case <-time.After(10 * time.Second):
				t.Fatal("server never saw the client's END_STREAM")
			}
			if !serverFirst {
				b, err := io.ReadAll(st)
				if err != nil || string(b) != "bye" {
					t.Fatalf("client read %q, %v after its CloseWrite; want bye, EOF", b, err)
				}
			}
		})
	}
}
