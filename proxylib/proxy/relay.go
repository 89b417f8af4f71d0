package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// halfCloser is a connection that can end its write direction only.
type halfCloser interface{ CloseWrite() error }

// Buffer sizes of the adaptive copy: an idle connection blocks in Read with
// only a small buffer; a read that fills it switches to a pooled large one
// for bulk transfer, given back after the first short read.
const (
	smallBuffer = 2 << 10
	largeBuffer = 32 << 10
)

var largeBuffers = sync.Pool{New: func() any { b := make([]byte, largeBuffer); return &b }}

// Relay copies bytes both ways between down (the client side) and up (the
// upstream side) until both directions end, honouring half-close: when one
// side finishes writing, the other side's write direction is closed and the
// reverse direction keeps flowing. A read or write error aborts both sides
// (TCP is reset, a tunnel gets a stream reset), so resets propagate rather
// than hang. It returns the bytes received from the client (down→up) and
// sent to it (up→down), and the first real error. Both connections are
// closed on return.
func Relay(down, up net.Conn) (received, sent int64, err error) {
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
	wg.Add(1)
	go func() {
		defer wg.Done()
		var e error
		if sent, e = copyHalf(down, up); e != nil {
			abort(e)
		}
	}()
	var e error
	if received, e = copyHalf(up, down); e != nil {
		abort(e)
	}
	wg.Wait()
	down.Close()
	up.Close()
	return received, sent, real(first)
}

// copyHalf copies src to dst, then half-closes dst. TCP to TCP (the node
// local fast path) uses the kernel's splice through io.Copy.
func copyHalf(dst, src net.Conn) (int64, error) {
	var n int64
	var err error
	_, srcTCP := src.(*net.TCPConn)
	_, dstTCP := dst.(*net.TCPConn)
	if srcTCP && dstTCP {
		n, err = io.Copy(dst, src)
	} else {
		n, err = adaptiveCopy(dst, src)
	}
	if err != nil {
		return n, err
	}
	if hc, ok := dst.(halfCloser); ok {
		if cerr := hc.CloseWrite(); cerr == nil {
			return n, nil
		}
	}
	dst.Close()
	return n, nil
}

func adaptiveCopy(dst io.Writer, src io.Reader) (int64, error) {
	small := make([]byte, smallBuffer)
	buf := small
	var large *[]byte
	defer func() {
		if large != nil {
			largeBuffers.Put(large)
		}
	}()
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return total, nil
			}
			return total, rerr
		}
		switch {
		case large == nil && n == len(buf):
			large = largeBuffers.Get().(*[]byte)
			buf = *large
		case large != nil && n < len(buf)/2:
			largeBuffers.Put(large)
			large, buf = nil, small
		}
	}
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
