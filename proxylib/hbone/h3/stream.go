// Package h3 is the experimental HBONE transport: HTTP CONNECT over HTTP/3
// (QUIC, UDP 15008, ALPN h3) with the same SPIFFE mutual TLS and the same
// verification as the HTTP/2 transport (proxylib/hbone/verify.go).
package h3

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// quicStream is what a tunnel needs from either side's HTTP/3 stream:
// *http3.RequestStream on the client, *http3.Stream on the server.
type quicStream interface {
	io.ReadWriter
	Close() error // ends our send direction (FIN)
	CancelRead(quic.StreamErrorCode)
	CancelWrite(quic.StreamErrorCode)
	SetDeadline(time.Time) error
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// errCodeReset is sent when a tunnel is closed before both directions ended
// cleanly, so the peer sees a reset rather than a clean end of stream.
const errCodeReset = quic.StreamErrorCode(http3.ErrCodeRequestCanceled)

// stream adapts an HTTP/3 CONNECT stream to hbone.Stream. CloseWrite sends
// FIN on our direction only; Close resets whatever has not ended cleanly.
type stream struct {
	str           quicStream
	local, remote net.Addr

	writeClosed atomic.Bool
	readDone    atomic.Bool
	closeOnce   sync.Once
	onClose     func() // releases the pool's stream slot or quota; may be nil

	// idle resets the tunnel after a period without bytes in either
	// direction; nil when disabled.
	idle *idleTimer
}

func newStream(str quicStream, local, remote net.Addr, onClose func()) *stream {
	return &stream{str: str, local: local, remote: remote, onClose: onClose}
}

func (s *stream) Read(b []byte) (int, error) {
	n, err := s.str.Read(b)
	if n > 0 {
		s.idle.touch()
	}
	if errors.Is(err, io.EOF) {
		s.readDone.Store(true)
	}
	return n, err
}

func (s *stream) Write(b []byte) (int, error) {
	n, err := s.str.Write(b)
	if n > 0 {
		s.idle.touch()
	}
	return n, err
}

// CloseWrite half-closes: the peer reads EOF, we can still read.
func (s *stream) CloseWrite() error {
	if s.writeClosed.Swap(true) {
		return nil
	}
	return s.str.Close()
}

// Close ends the tunnel. Directions that have not ended cleanly are reset,
// which the peer observes as an error, not as EOF.
func (s *stream) Close() error {
	s.closeOnce.Do(func() {
		s.idle.stop()
		if !s.writeClosed.Swap(true) {
			s.str.CancelWrite(errCodeReset)
		}
		if !s.readDone.Load() {
			s.str.CancelRead(errCodeReset)
		}
		if s.onClose != nil {
			s.onClose()
		}
	})
	return nil
}

func (s *stream) LocalAddr() net.Addr                { return s.local }
func (s *stream) RemoteAddr() net.Addr               { return s.remote }
func (s *stream) SetDeadline(t time.Time) error      { return s.str.SetDeadline(t) }
func (s *stream) SetReadDeadline(t time.Time) error  { return s.str.SetReadDeadline(t) }
func (s *stream) SetWriteDeadline(t time.Time) error { return s.str.SetWriteDeadline(t) }

// idleTimer fires when neither direction moved a byte for timeout. Activity
// is one atomic store; the timer re-arms itself for the remaining time.
type idleTimer struct {
	timeout time.Duration
	last    atomic.Int64 // unix nanoseconds of the last byte
	timer   *time.Timer
	onIdle  func()
}

func newIdleTimer(timeout time.Duration, onIdle func()) *idleTimer {
	if timeout <= 0 {
		return nil
	}
	t := &idleTimer{timeout: timeout, onIdle: onIdle}
	t.touch()
	t.timer = time.AfterFunc(timeout, t.check)
	return t
}

func (t *idleTimer) touch() {
	if t != nil {
		t.last.Store(time.Now().UnixNano())
	}
}

func (t *idleTimer) check() {
	idle := time.Since(time.Unix(0, t.last.Load()))
	if idle >= t.timeout {
		t.onIdle()
		return
	}
	t.timer.Reset(t.timeout - idle)
}

func (t *idleTimer) stop() {
	if t != nil {
		t.timer.Stop()
	}
}
