package h2

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrStreamIdle resets a tunnel that moved no bytes for StreamIdleTimeout.
var ErrStreamIdle = errors.New("hbone: tunnel idle timeout")

// idleWatch calls onIdle once no activity was noted for timeout. Activity is
// an atomic store, so the hot path costs no timer reset.
type idleWatch struct {
	timeout time.Duration
	moved   atomic.Bool  // any byte ever
	last    atomic.Int64 // unix nanos of the last activity
	timer   *time.Timer
	onIdle  func()
}

func newIdleWatch(timeout time.Duration, onIdle func()) *idleWatch {
	if timeout <= 0 {
		return nil
	}
	w := &idleWatch{timeout: timeout, onIdle: onIdle}
	w.last.Store(time.Now().UnixNano())
	w.timer = time.AfterFunc(timeout, w.check)
	return w
}

func (w *idleWatch) touch() {
	if w != nil {
		w.last.Store(time.Now().UnixNano())
	}
}

func (w *idleWatch) check() {
	idle := time.Since(time.Unix(0, w.last.Load()))
	if idle >= w.timeout {
		w.onIdle()
		return
	}
	w.timer.Reset(w.timeout - idle)
}

func (w *idleWatch) stop() {
	if w != nil {
		w.timer.Stop()
	}
}

// addr adapts a netip-less address for net.Conn.
type tunnelAddr string

func (a tunnelAddr) Network() string { return "hbone" }
func (a tunnelAddr) String() string  { return string(a) }

// clientStream is the dialer's side of a tunnel: we write the request body
// through a pipe and read the response body.
type clientStream struct {
	body    io.ReadCloser // response body
	pw      *bodyPipe     // request body
	cancel  func()        // resets the stream if it is still open
	release func()        // returns the pool slot (once)
	idle    *idleWatch
	local   net.Addr
	remote  net.Addr

	closeOnce sync.Once
}

func (s *clientStream) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	if n > 0 {
		s.idle.touch()
	}
	return n, err
}

func (s *clientStream) Write(p []byte) (int, error) {
	n, err := s.pw.Write(p)
	if n > 0 {
		s.idle.touch()
	}
	return n, err
}

// CloseWrite ends the request body: END_STREAM on our direction only.
func (s *clientStream) CloseWrite() error { return s.pw.Close() }

// Close ends the tunnel; if either direction is still open the peer sees
// RST_STREAM(CANCEL).
func (s *clientStream) Close() error {
	s.closeOnce.Do(func() {
		s.idle.stop()
		s.pw.CloseWithError(net.ErrClosed)
		s.body.Close()
		s.cancel()
		s.release()
	})
	return nil
}

func (s *clientStream) LocalAddr() net.Addr  { return s.local }
func (s *clientStream) RemoteAddr() net.Addr { return s.remote }

// Deadlines are not supported on the dialing side (x/net's client cannot
// interrupt one stream's read); use StreamIdleTimeout or Close.
func (s *clientStream) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (s *clientStream) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (s *clientStream) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }

// serverStream is the accepting side: the request body is read, the response
// is written. The HTTP handler goroutine waits on done and returns when the
// stream finishes: normally (END_STREAM) or aborted (RST_STREAM).
//
// x/net recycles the ResponseWriter's state once its handler returns (later
// calls dereference nil or another stream's state), so nothing may touch w,
// rc or body after that: finishing first stops and waits out every user of
// them, and the handler marks the stream gone before it returns; from then
// on every method is a no-op or returns net.ErrClosed.
type serverStream struct {
	w      http.ResponseWriter
	rc     *http.ResponseController
	body   io.ReadCloser
	idle   *idleWatch
	local  net.Addr
	remote net.Addr

	wmu sync.Mutex // held across a Write; finishing waits for the writer
	rmu sync.Mutex // held across a Read; the handler waits for the reader

	mu       sync.Mutex // guards the flags and every rc call outside Write
	finished bool       // no more writes: the handler may return once done closes
	gone     bool       // the handler returned: w, rc and body are x/net's again
	aborted  atomic.Bool
	done     chan struct{} // closed when finishing completed
}

func (s *serverStream) Read(p []byte) (int, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if s.isGone() {
		return 0, s.endErr()
	}
	// A Read blocked here when the handler is about to return is ended by
	// handlerReturned's read deadline, which then waits for it on rmu.
	n, err := s.body.Read(p)
	if n > 0 {
		s.idle.touch()
	}
	if err != nil && err != io.EOF && s.endedCleanly() {
		err = io.EOF // our CloseWrite ended the stream; not a peer reset
	}
	return n, err
}

func (s *serverStream) isGone() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gone
}

func (s *serverStream) endedCleanly() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.finished && !s.aborted.Load()
}

// endErr is what reads return once the stream is over.
func (s *serverStream) endErr() error {
	if s.endedCleanly() {
		return io.EOF
	}
	return net.ErrClosed
}

func (s *serverStream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.writable() {
		return 0, net.ErrClosed
	}
	n, err := s.w.Write(p)
	if err == nil {
		err = s.rc.Flush()
	}
	if n > 0 {
		s.idle.touch()
	}
	return n, err
}

func (s *serverStream) writable() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.finished && !s.gone
}

// CloseWrite ends the response (END_STREAM). x/net's server ends a stream
// when its handler returns, so the read side ends too: a peer still sending
// gets RST_STREAM(NO_ERROR) (RFC 9113 §8.1), as after a TCP close.
func (s *serverStream) CloseWrite() error {
	s.finish(false)
	return nil
}

// Close aborts the tunnel with RST_STREAM unless it already ended cleanly.
func (s *serverStream) Close() error {
	s.finish(true)
	return nil
}

// finish ends the stream once: the first caller (CloseWrite, Close, the
// idle timer or the handler on a peer reset) decides clean or aborted; later
// callers return at once. It stops new writes, unblocks a writer stuck on
// flow control (abort) and a blocked reader, waits for the writer to leave,
// then lets the handler return by closing done.
func (s *serverStream) finish(abort bool) {
	s.mu.Lock()
	if s.finished || s.gone {
		s.mu.Unlock()
		return
	}
	s.finished = true
	if abort {
		s.aborted.Store(true)
		// Unblock a writer stuck on flow control and a reader; x/net
		// resets the stream.
		now := time.Now()
		_ = s.rc.SetWriteDeadline(now)
		_ = s.rc.SetReadDeadline(now)
	}
	s.mu.Unlock()
	s.wmu.Lock() // the writer, if any, has failed or completed
	s.wmu.Unlock()
	s.idle.stop()
	close(s.done)
}

// handlerReturned is called by the HTTP handler, after done closed, just
// before it returns to x/net: it makes every later call a no-op and ends and
// waits out a Read still inside x/net's request body.
func (s *serverStream) handlerReturned() {
	s.mu.Lock()
	s.gone = true
	// A past read deadline only closes x/net's body pipe locally (no frame
	// is sent): a blocked Read returns, bytes already received first.
	_ = s.rc.SetReadDeadline(time.Now())
	s.mu.Unlock()
	s.rmu.Lock()
	s.rmu.Unlock()
}

func (s *serverStream) LocalAddr() net.Addr  { return s.local }
func (s *serverStream) RemoteAddr() net.Addr { return s.remote }

func (s *serverStream) SetDeadline(t time.Time) error {
	return s.setDeadlines(t, true, true)
}
func (s *serverStream) SetReadDeadline(t time.Time) error  { return s.setDeadlines(t, true, false) }
func (s *serverStream) SetWriteDeadline(t time.Time) error { return s.setDeadlines(t, false, true) }

// setDeadlines refuses once the handler returned; mu keeps the handler from
// returning while a deadline call is inside x/net.
func (s *serverStream) setDeadlines(t time.Time, read, write bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return net.ErrClosed
	}
	var errs []error
	if read {
		errs = append(errs, s.rc.SetReadDeadline(t))
	}
	if write {
		errs = append(errs, s.rc.SetWriteDeadline(t))
	}
	return errors.Join(errs...)
}
