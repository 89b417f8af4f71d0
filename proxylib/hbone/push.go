package hbone

import "errors"

// Sink takes bytes without ever blocking: a socket written by the goroutine
// that received the bytes (a tunnel connection's reader), so a relay's
// goroutine need not be woken for each message.
type Sink interface {
	// TryWrite writes a prefix of p without blocking and returns its length
	// (less than len(p) when the socket's buffer is full). An error means
	// the sink is broken; nothing of p was written then.
	TryWrite(p []byte) (int, error)
}

// ErrWouldBlock is TryRead's "nothing queued": the drain that called it
// ends, and the stream starts another when there is more.
var ErrWouldBlock = errors.New("hbone: nothing queued")

// LazyPusher is a stream that writes the bytes it receives straight into a
// Sink and needs no goroutine waiting on it: it starts a
// drain itself (pending) when bytes it could not push are queued, or it
// ended or failed. A relay direction from it into a socket then costs no
// goroutine while idle.
type LazyPusher interface {
	// PushLazily starts pushing into s, with pending called (with no lock
	// held) to start a drain; nil, nil stops and returns the bytes pushed.
	PushLazily(s Sink, pending func()) (pushed int64)
	// TryRead reads queued bytes without waiting: io.EOF at the end, the
	// stream's error after a reset, ErrWouldBlock when nothing is queued
	// (the drain ends).
	TryRead(p []byte) (int, error)
}
