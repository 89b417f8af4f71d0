package hboneload

import (
	"errors"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"io"
	"net"
	"sync"
	"syscall"
)

// halfCloser is a connection whose write side can end separately: TCP, TLS
// and every hbone.Stream.
type halfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Buffers: an idle tunnel blocks in Read, holding its buffer, so reads start
// small (idle tunnels stay cheap) and switch to a large pooled buffer once a
// read fills the small one (bulk transfer); they drop back after short reads.
const (
	smallBufferSize = 2 << 10
	copyBufferSize  = 64 << 10 // several TLS records or QUIC packets per read
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBufferSize); return &b }}

// relayFunc copies both directions of a tunnel; see RelayConfig.Copy.
type relayFunc func(a, b halfCloser)

// relays: "shared" is hbone.Relay, the copy loop the proxies use; "adaptive"
// is pipe below, which holds only small buffers while a tunnel is idle.
var relays = map[string]relayFunc{
	"shared":   func(a, b halfCloser) { hbone.Relay(a, b) },
	"adaptive": pipe,
}

// pipe relays a<->b until both directions ended, using the calling goroutine
// for one direction. A clean end of one direction is passed on as a
// half-close; an error resets both sides.
func pipe(a, b halfCloser) {
	reset := func() {
		resetClose(a)
		resetClose(b)
	}
	done := make(chan struct{})
	go func() {
		if err := copyHalf(b, a); err != nil {
			reset() // unblocks the other direction at once
		}
		close(done)
	}()
	if err := copyHalf(a, b); err != nil {
		reset()
	}
	<-done
	a.Close()
	b.Close()
}

func copyHalf(dst, src halfCloser) error {
	small := make([]byte, smallBufferSize)
	buf := small
	var big *[]byte
	shortReads := 0
	defer func() {
		if big != nil {
			bufPool.Put(big)
		}
	}()
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return dst.CloseWrite()
		}
		if err != nil {
			return err
		}
		switch {
		case big == nil && n == len(buf):
			big = bufPool.Get().(*[]byte)
			buf, shortReads = *big, 0
		case big != nil && n < smallBufferSize:
			if shortReads++; shortReads >= 2 {
				bufPool.Put(big)
				big, buf = nil, small
			}
		case big != nil:
			shortReads = 0
		}
	}
}

// resetClose closes c abortively: a TCP connection sends RST (SO_LINGER 0),
// an HBONE stream is reset by its own Close.
func resetClose(c halfCloser) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// raiseFileLimit lifts RLIMIT_NOFILE as far as the process may (root may
// raise the hard limit too): 10k tunnels need well over 20k descriptors in
// a relay process.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	want := uint64(1 << 17)
	if lim.Max < want {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}); err == nil {
			return
		}
	}
	lim.Cur = lim.Max
	_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
}

// frameFitChunk is the largest write that an HTTP/2 DATA frame (9-byte
// header) carries inside one 16 KiB TLS record.
const frameFitChunk = 16384 - 9

// frameFitStream splits writes so that each becomes one DATA frame filling
// exactly one TLS record, instead of a full record plus a 9-byte one. It is
// the experiment behind the h2 tuning note in docs/performance.md.
type frameFitStream struct{ hbone.Stream }

func (s frameFitStream) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n, err := s.Stream.Write(p[:min(len(p), frameFitChunk)])
		written += n
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}
