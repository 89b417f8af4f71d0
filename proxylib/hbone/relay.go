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
// reading through an AdaptiveReader: a small buffer while the source is
// idle, a pooled CopyBufferSize one during bulk transfer, and none at all
// while a socket or tunnel source is idle.
func CopyAdaptive(dst io.Writer, src io.Reader) (total int64, err error) {
	var r AdaptiveReader
	r.Init(src)
	defer r.Release()
	for {
		p, rerr := r.Read()
		if len(p) > 0 {
			w, werr := dst.Write(p)
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		r.Used(len(p))
		if errors.Is(rerr, io.EOF) {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// AdaptiveReader reads a source into pooled buffers sized to its traffic:
// a small one while reads are short, a CopyBufferSize one while they fill
// it, and, when the source can be waited on without a buffer (a socket, a
// stream with WaitReadable), none while it is idle. The zero value needs
// Init; a value on the reader's stack allocates nothing per read.
type AdaptiveReader struct {
	src        io.Reader
	waiter     waiter
	small, big *[]byte
	shortReads int
}

// Init sets the source.
func (r *AdaptiveReader) Init(src io.Reader) { *r = AdaptiveReader{src: src, waiter: waiterFor(src)} }

// Read waits for src and reads it. The bytes are valid until Used.
func (r *AdaptiveReader) Read() ([]byte, error) {
	if r.big == nil && r.small == nil {
		if r.waiter != nil {
			r.waiter.wait() // an error is reported by the Read below
		}
		r.small = getSmall()
	}
	buf := *r.small
	if r.big != nil {
		buf = *r.big
	}
	n, err := r.src.Read(buf)
	return buf[:n], err
}

// Used adapts the buffers once the n bytes of the last Read are passed on
// (it may return them to the pool).
func (r *AdaptiveReader) Used(n int) {
	switch {
	case r.big == nil && n == len(*r.small):
		r.big, r.shortReads = copyBuffers.Get().(*[]byte), 0
	case r.big != nil && n < SmallBufferSize:
		if r.shortReads++; r.shortReads >= 2 {
			putBuffer(&copyBuffers, r.big)
			r.big = nil
		}
	case r.big != nil:
		r.shortReads = 0
	}
	if r.waiter != nil && r.big == nil {
		putSmall(r.small) // idle again: wait without it
		r.small = nil
	}
}

// Release returns the buffers; the reader may be used again after it.
func (r *AdaptiveReader) Release() {
	putSmall(r.small)
	putBuffer(&copyBuffers, r.big)
	r.small, r.big = nil, nil
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
