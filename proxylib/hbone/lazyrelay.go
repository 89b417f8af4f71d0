package hbone

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
)

// relayLazily relays between a socket and a stream that pushes lazily:
// socket→stream is copied by the calling goroutine; stream→socket has no
// goroutine of its own — the stream pushes into the socket, and a drain
// goroutine runs only while the socket is full or to deliver the end or a
// reset. So an idle tunnel costs one goroutine, not two. Semantics are
// Relay's: EOF half-closes the other side, an error aborts both.
func relayLazily(sock HalfCloser, st HalfCloser, lp LazyPusher, sink Sink) (sockToSt, stToSock int64, err error) {
	// ending serializes the first abort with the clean end of the stream:
	// a stream reset by the abort must not then be ended cleanly (the abort
	// closing sock can also hide the reset the push took).
	var ending sync.Mutex
	var first error // the abort's cause; nil while none
	abort := func(e error) {
		ending.Lock()
		if first != nil {
			ending.Unlock()
			return
		}
		first = e
		ending.Unlock()
		reset(sock)
		reset(st)
	}
	endStream := func() error {
		ending.Lock()
		defer ending.Unlock()
		if first != nil {
			return nil
		}
		return st.CloseWrite()
	}
	done := make(chan error, 1)
	var finished atomic.Bool
	var sockShut atomic.Bool // the stream ended: sock's writing is shut down
	finish := func(e error) {
		if finished.CompareAndSwap(false, true) {
			if e != nil {
				abort(e)
			}
			done <- e
		}
	}
	// Drains never overlap (the stream starts one only after the previous
	// reported ErrWouldBlock), so drained needs no lock; it is read after
	// done.
	var drained int64
	drain := func() {
		if finished.Load() {
			return
		}
		buf := getSmall()
		defer putSmall(buf)
		for {
			n, rerr := lp.TryRead(*buf)
			if n > 0 {
				w, werr := sock.Write((*buf)[:n])
				drained += int64(w)
				if werr != nil {
					finish(werr)
					return
				}
				continue
			}
			switch {
			case errors.Is(rerr, ErrWouldBlock):
			case errors.Is(rerr, io.EOF):
				sockShut.Store(true)
				finish(sock.CloseWrite())
			default:
				finish(rerr)
			}
			return
		}
	}
	lp.PushLazily(sink, func() { go drain() })
	sockToSt, e := CopyAdaptive(st, sock)
	if e == nil && !sockShut.Load() && EndedByReset(sock) {
		e = syscall.ECONNRESET // the push took the reset; this read saw EOF
	}
	if e == nil {
		e = endStream()
	}
	if e != nil {
		abort(e)
	}
	<-done
	stToSock = drained + lp.PushLazily(nil, nil)
	sock.Close()
	st.Close()
	return sockToSt, stToSock, first
}

// lazyPair reports whether a and b are a socket and a lazily pushing
// stream, in either order, and the sink for the socket.
func lazyPair(a, b HalfCloser) (sock, st HalfCloser, lp LazyPusher, sink Sink, swapped bool) {
	if p, ok := b.(LazyPusher); ok {
		if s := SinkFor(a); s != nil {
			return a, b, p, s, false
		}
	}
	if p, ok := a.(LazyPusher); ok {
		if s := SinkFor(b); s != nil {
			return b, a, p, s, true
		}
	}
	return nil, nil, nil, nil, false
}

// RelaySocketStream relays as Relay does when one side is a socket and the
// other a stream that pushes lazily (an HBONE tunnel of the h2 engine),
// with one goroutine; ok is false (nothing done) for any other pair.
func RelaySocketStream(a, b HalfCloser) (aToB, bToA int64, err error, ok bool) {
	sock, st, lp, sink, swapped := lazyPair(a, b)
	if lp == nil {
		return 0, 0, nil, false
	}
	toSt, toSock, err := relayLazily(sock, st, lp, sink)
	if swapped {
		return toSock, toSt, err, true
	}
	return toSt, toSock, err, true
}
