package hbone

import (
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// readWaiter parks until a socket has bytes (or EOF, or an error) to read,
// without a buffer: an idle tunnel direction then holds no memory of its own.
type readWaiter struct {
	rc  syscall.RawConn
	fds [1]unix.PollFd
}

// readWaiterFor returns a waiter for a socket source, nil for anything else
// (a tunnel stream, a TLS connection, a wrapper).
func readWaiterFor(src io.Reader) *readWaiter {
	sc, ok := src.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return &readWaiter{rc: rc}
}

// wait returns once a read would not block. Go's poller is edge-triggered
// and bytes may already be queued, so each wake-up asks poll(2) (timeout 0)
// rather than trusting readiness; unlike a peeking recv, poll does not
// consume a pending socket error (a reset must reach the Read). Deadlines
// and Close end the wait with an error, which the caller's next Read reports
// in its usual form.
func (w *readWaiter) wait() error {
	return w.rc.Read(func(fd uintptr) bool {
		w.fds[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
		n, err := unix.Poll(w.fds[:], 0)
		return n != 0 || err != nil // data, EOF, error or EINTR: Read next
	})
}
