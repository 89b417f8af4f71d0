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
type serverStream struct {
	w      http.ResponseWriter
	rc     *http.ResponseController
	body   io.ReadCloser
	idle   *idleWatch
	local  net.Addr
	remote net.Addr

	wmu      sync.Mutex // serialises writes with finishing the handler
	finished bool       // no more writes: the handler may return
	aborted  atomic.Bool
	done     chan struct{}
	doneOnce sync.Once
}

func (s *serverStream) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	if n > 0 {
		s.idle.touch()
	}
	if err != nil && err != io.EOF && s.endedCleanly() {
		err = io.EOF // our CloseWrite ended the stream; not a peer reset
	}
	return n, err
}

func (s *serverStream) endedCleanly() bool {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.finished && !s.aborted.Load()
}

func (s *serverStream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.finished {
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

func (s *serverStream) finish(abort bool) {
	if abort {
		s.wmu.Lock()
		alreadyDone := s.finished
		s.wmu.Unlock()
		if !alreadyDone {
			s.aborted.Store(true)
			// Unblock a writer stuck on flow control; x/net resets the stream.
			now := time.Now()
			_ = s.rc.SetWriteDeadline(now)
			_ = s.rc.SetReadDeadline(now)
		}
	}
	s.wmu.Lock()
	s.finished = true
	s.wmu.Unlock()
	s.doneOnce.Do(func() {
		s.idle.stop()
		close(s.done)
	})
}

func (s *serverStream) LocalAddr() net.Addr  { return s.local }
func (s *serverStream) RemoteAddr() net.Addr { return s.remote }

func (s *serverStream) SetDeadline(t time.Time) error {
	return errors.Join(s.rc.SetReadDeadline(t), s.rc.SetWriteDeadline(t))
}
func (s *serverStream) SetReadDeadline(t time.Time) error  { return s.rc.SetReadDeadline(t) }
func (s *serverStream) SetWriteDeadline(t time.Time) error { return s.rc.SetWriteDeadline(t) }
