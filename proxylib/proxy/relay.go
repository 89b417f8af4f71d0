package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// halfCloser is a connection that can end its write direction only.
type halfCloser interface{ CloseWrite() error }

// Relay copies bytes both ways between down (the client side) and up (the
// upstream side) until both directions end, honouring half-close: when one
// side finishes writing, the other side's write direction is closed and the
// reverse direction keeps flowing. A read or write error aborts both sides
// (TCP is reset, a tunnel gets a stream reset), so resets propagate rather
// than hang. It returns the bytes received from the client (down→up) and
// sent to it (up→down), and the first real error. Both connections are
// closed on return.
func Relay(down, up net.Conn) (received, sent int64, err error) {
	if dh, ok := down.(hbone.HalfCloser); ok {
		if uh, ok := up.(hbone.HalfCloser); ok {
			if received, sent, err, ok := hbone.RelaySocketStream(dh, uh); ok {
				return received, sent, real(err)
			}
		}
	}
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	abort := func(e error) {
		once.Do(func() {
			first = e
			reset(down)
			reset(up)
		})
	}
	// downShut/upShut: that side's writing was shut down (its reverse
	// direction ended cleanly), after which a clean EOF also leaves a TCP
	// socket in CLOSE (see hbone.EndedByReset).
	var downShut, upShut atomic.Bool
	wg.Add(1)
	go func() {
		defer wg.Done()
		var e error
		if sent, e = copyHalf(down, up, &upShut, &downShut); e != nil {
			abort(e)
		}
	}()
	var e error
	if received, e = copyHalf(up, down, &downShut, &upShut); e != nil {
		abort(e)
	}
	wg.Wait()
	down.Close()
	up.Close()
	return received, sent, real(first)
}

// copyHalf copies src to dst, then half-closes dst (noting it in
// dstShut). TCP to TCP (the node local fast path) uses the kernel's splice
// through io.Copy. An EOF from a TCP src whose peer in fact reset it (the
// reverse direction's write took the reset) is an error, so the reset
// propagates instead of a clean end.
func copyHalf(dst, src net.Conn, srcShut, dstShut *atomic.Bool) (int64, error) {
	var n int64
	var err error
	_, srcTCP := src.(*net.TCPConn)
	_, dstTCP := dst.(*net.TCPConn)
	if srcTCP && dstTCP {
		n, err = io.Copy(dst, src)
	} else {
		n, err = hbone.CopyAdaptive(dst, src)
	}
	if err != nil {
		return n, err
	}
	if !srcShut.Load() && hbone.EndedByReset(src) {
		return n, syscall.ECONNRESET
	}
	dstShut.Store(true)
	if hc, ok := dst.(halfCloser); ok {
		if cerr := hc.CloseWrite(); cerr == nil {
			return n, nil
		}
	}
	dst.Close()
	return n, nil
}

// reset aborts c: TCP with RST (linger 0), a tunnel stream by Close.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func real(err error) error {
	if err == nil || errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
		return nil
	}
	return err
}
