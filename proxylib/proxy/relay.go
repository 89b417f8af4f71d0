package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// halfCloser is a connection that can end its write direction only.
type halfCloser interface{ CloseWrite() error }

// Relay copies bytes both ways between down (the client side) and up (the
// upstream side) until both directions end, honouring half-close: when one
// side finishes writing, the other side's write direction is closed and the
// reverse direction keeps flowing. It returns the bytes received from the
// client (down→up) and sent to it (up→down), and the first real error.
// Both connections are closed on return.
func Relay(down, up net.Conn) (received, sent int64, err error) {
	var wg sync.WaitGroup
	var errUp, errDown error
	wg.Add(1)
	go func() {
		defer wg.Done()
		sent, errDown = pipe(down, up)
	}()
	received, errUp = pipe(up, down)
	wg.Wait()
	down.Close()
	up.Close()
	return received, sent, firstReal(errUp, errDown)
}

// pipe copies src to dst, then half-closes dst (or closes it fully when it
// cannot half-close, and a copy error resets both).
func pipe(dst, src net.Conn) (int64, error) {
	n, err := io.Copy(dst, src)
	if err != nil {
		// An error in one direction tears down the whole connection so the
		// other direction does not hang.
		src.Close()
		dst.Close()
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

func firstReal(errs ...error) error {
	for _, e := range errs {
		if e != nil && !errors.Is(e, net.ErrClosed) && !errors.Is(e, io.EOF) {
			return e
		}
	}
	return nil
}
