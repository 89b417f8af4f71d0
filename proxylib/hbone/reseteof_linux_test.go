package hbone_test

import (
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// TestEndedByReset: a read that sees EOF after a write took the peer's
// reset is told apart from a clean FIN by the socket's state.
func TestEndedByReset(t *testing.T) {
	t.Run("fin", func(t *testing.T) {
		ours, theirs := tcpPair(t)
		theirs.Close()
		ours.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := ours.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("read after FIN: %v, want EOF", err)
		}
		if hbone.EndedByReset(ours) {
			t.Error("a FIN counted as a reset")
		}
	})
	t.Run("reset taken by a write", func(t *testing.T) {
		ours, theirs := tcpPair(t)
		theirs.SetLinger(0)
		theirs.Close()
		// The write meets the reset (once the RST has arrived) and consumes
		// it; the read that follows sees only EOF.
		deadline := time.Now().Add(5 * time.Second)
		var werr error
		for werr == nil && time.Now().Before(deadline) {
			_, werr = ours.Write([]byte("x"))
			time.Sleep(time.Millisecond)
		}
		if !errors.Is(werr, syscall.ECONNRESET) && !errors.Is(werr, syscall.EPIPE) {
			t.Fatalf("write after the reset: %v", werr)
		}
		ours.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := ours.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("read after the write took the reset: %v, want EOF (the case this guards)", err)
		}
		if !hbone.EndedByReset(ours) {
			t.Error("a reset consumed by a write counted as a clean end")
		}
	})
}

// lazyStream is a lazily pushing stream for relay tests (a stand-in for an
// h2 tunnel): the test pushes into the relay's socket through its sink, as
// a tunnel's reader goroutine would, and the stream records how it ended.
type lazyStream struct {
	mu       sync.Mutex
	sink     hbone.Sink
	pending  func()
	err      error // what TryRead reports once the push failed
	wroteEnd bool  // CloseWrite: the tunnel ended cleanly (END_STREAM)
	closed   bool
}

func (s *lazyStream) Read([]byte) (int, error)    { return 0, io.EOF }
func (s *lazyStream) Write(p []byte) (int, error) { return len(p), nil }
func (s *lazyStream) CloseWrite() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wroteEnd = true
	return nil
}
func (s *lazyStream) Close() error { s.mu.Lock(); s.closed = true; s.mu.Unlock(); return nil }
func (s *lazyStream) PushLazily(sink hbone.Sink, pending func()) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sink, s.pending = sink, pending
	return 0
}
func (s *lazyStream) TryRead([]byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return 0, s.err
	}
	return 0, hbone.ErrWouldBlock
}

// gatedConn holds the relay's reads of a socket until the test opens the
// gate, so the push can take the reset first.
type gatedConn struct {
	*net.TCPConn
	gate chan struct{}
}

func (c *gatedConn) Read(p []byte) (int, error) { <-c.gate; return c.TCPConn.Read(p) }

// TestRelayResetTakenByPushResetsTheStream: the app resets its socket; the
// push into it takes the reset, and the relay's read then sees EOF. The
// tunnel must be reset, not ended cleanly (before, the relay half-closed
// it: the peer read a clean end of a transfer that had failed).
func TestRelayResetTakenByPushResetsTheStream(t *testing.T) {
	ours, theirs := tcpPair(t)
	sock := &gatedConn{TCPConn: ours, gate: make(chan struct{})}
	st := &lazyStream{}
	done := make(chan error, 1)
	go func() { _, _, err, _ := hbone.RelaySocketStream(sock, st); done <- err }()
	var sink hbone.Sink
	for deadline := time.Now().Add(5 * time.Second); sink == nil && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		st.mu.Lock()
		sink = st.sink
		st.mu.Unlock()
	}
	if sink == nil {
		t.Fatal("the relay never started pushing")
	}
	theirs.SetLinger(0)
	theirs.Close()
	var werr error
	for deadline := time.Now().Add(5 * time.Second); werr == nil && time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		_, werr = sink.TryWrite([]byte("x"))
	}
	if werr == nil {
		t.Fatal("pushing into a reset socket never failed")
	}
	st.mu.Lock()
	st.err = werr
	pending := st.pending
	st.mu.Unlock()
	pending() // the stream reports the failed push, as a tunnel does
	close(sock.gate)
	select {
	case err := <-done:
		if err == nil {
			t.Error("relay reported no error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end")
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.wroteEnd || !st.closed {
		t.Errorf("stream ended cleanly=%v closed=%v; want reset (closed without END_STREAM)", st.wroteEnd, st.closed)
	}
}
