package hbone

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// HalfCloser is a byte stream that can end one direction: a tunnel Stream
// or a *net.TCPConn.
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Relay buffers. An idle tunnel blocks in Read holding its buffer, so each
// direction starts with a small buffer and moves to a large pooled one only
// once a read fills the small one (bulk transfer), dropping back after short
// reads: idle tunnels stay cheap, bulk copies move several TLS records (and
// several HTTP/2 frames per handoff to the transport) per read.
//
// CopyBufferSize is 4 TLS records minus an HTTP/2 frame header: a full read
// written to an HTTP/2 tunnel becomes one DATA frame of exactly four full
// TLS records, with no 9-byte tail record.
const (
	SmallBufferSize = 2 << 10
	CopyBufferSize  = 4*16384 - 9
)

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, CopyBufferSize); return &b }}

// Relay copies between a and b in both directions until both are done. EOF
// on one side half-closes the other (CloseWrite); a read or write error
// aborts both sides (a TCP side is reset, a tunnel gets RST_STREAM), so a
// reset propagates instead of hanging. It returns the bytes copied a→b and
// b→a and the first error that aborted the relay.
func Relay(a, b HalfCloser) (aToB, bToA int64, err error) {
	if aToB, bToA, err, ok := RelaySocketStream(a, b); ok {
		return aToB, bToA, err
	}
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	abort := func(e error) {
		once.Do(func() {
			first = e
			reset(a)
			reset(b)
		})
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		n, e := copyHalf(b, a)
		aToB = n
		if e != nil {
			abort(e)
		}
	}()
	n, e := copyHalf(a, b)
	bToA = n
	if e != nil {
		abort(e)
	}
	wg.Wait()
	a.Close()
	b.Close()
	return aToB, bToA, first
}

// copyHalf copies src to dst and half-closes dst on EOF.
func copyHalf(dst, src HalfCloser) (int64, error) {
	n, err := CopyAdaptive(dst, src)
	if err != nil {
		return n, err
	}
	return n, dst.CloseWrite()
}

// CopyAdaptive copies src to dst until EOF (returned as nil) or an error,
// reading into a small buffer while the source is idle and a pooled
// CopyBufferSize one during bulk transfer (see the buffer constants). A TCP
// source is waited on without any buffer while idle (readiness, then a pooled
// small buffer for the read), so an idle direction from a socket holds none.
func CopyAdaptive(dst io.Writer, src io.Reader) (total int64, err error) {
	waiter := waiterFor(src)
	var small, big *[]byte
	defer func() {
		putSmall(small)
		putBuffer(&copyBuffers, big)
	}()
	shortReads := 0
	for {
		if big == nil && small == nil {
			if waiter != nil {
				waiter.wait() // an error is reported by the Read below
			}
			small = getSmall()
		}
		buf := *small
		if big != nil {
			buf = *big
		}
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if errors.Is(rerr, io.EOF) {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
		switch {
		case big == nil && n == len(buf):
			big, shortReads = copyBuffers.Get().(*[]byte), 0
		case big != nil && n < SmallBufferSize:
			if shortReads++; shortReads >= 2 {
				putBuffer(&copyBuffers, big)
				big = nil
			}
		case big != nil:
			shortReads = 0
		}
		if waiter != nil && big == nil {
			putSmall(small) // idle again: wait without it
			small = nil
		}
	}
}

// ReadableWaiter is a stream that can park until a Read would not block
// without holding a buffer (a tunnel): an idle direction then holds none.
// WaitReadable's error is reported again by the Read that follows.
type ReadableWaiter interface {
	WaitReadable() error
}

// waiter parks an idle copy without a buffer.
type waiter interface{ wait() error }

type streamWaiter struct{ s ReadableWaiter }

func (w streamWaiter) wait() error { return w.s.WaitReadable() }

// waiterFor returns how to wait on src without a buffer, or nil.
func waiterFor(src io.Reader) waiter {
	if s, ok := src.(ReadableWaiter); ok {
		return streamWaiter{s}
	}
	if w := readWaiterFor(src); w != nil {
		return w
	}
	return nil
}

var (
	smallBuffers = sync.Pool{New: func() any { b := make([]byte, SmallBufferSize); return &b }}
	smallHeld    atomic.Int64 // small buffers out of the pool (for tests)
)

func getSmall() *[]byte {
	smallHeld.Add(1)
	return smallBuffers.Get().(*[]byte)
}

func putSmall(b *[]byte) {
	if b != nil {
		smallHeld.Add(-1)
		smallBuffers.Put(b)
	}
}

func putBuffer(pool *sync.Pool, b *[]byte) {
	if b != nil {
		pool.Put(b)
	}
}

// reset aborts c: a TCP connection is closed with RST (linger 0), anything
// else is closed (for a tunnel that is RST_STREAM).
func reset(c HalfCloser) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
