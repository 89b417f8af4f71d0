package hbone

import (
	"io"
	"syscall"
	"unsafe"
)

// readWaiter parks until a socket has bytes (or EOF, or an error) to read,
// without a buffer: an idle tunnel direction then holds no memory of its own.
type readWaiter struct {
	rc     syscall.RawConn
	check  func(fd uintptr) bool // built once: no allocation per wait
	polled bool                  // the current wait made its poll(2) check
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
	w := &readWaiter{rc: rc}
	w.check = func(fd uintptr) bool {
		if w.polled {
			return true
		}
		w.polled = true
		return pollReadable(int32(fd))
	}
	return w
}

// wait returns once a read would not block. Go's poller is edge-triggered
// and clears stale readiness before waiting, so bytes may already be queued:
// the first check asks poll(2) (timeout 0); unlike a peeking recv, poll does
// not consume a pending socket error (a reset must reach the Read). A later
// check follows an edge (new bytes, EOF or an error) and needs no syscall.
// Deadlines and Close end the wait with an error, which the caller's next
// Read reports in its usual form.
func (w *readWaiter) wait() error {
	w.polled = false
	return w.rc.Read(w.check)
}

// pollfd is struct pollfd of poll(2).
type pollfd struct {
	fd      int32
	events  int16
	revents int16
}

const pollIn = 0x1 // POLLIN

// pollReadable asks ppoll(2) without waiting whether a read on fd would not
// block (data, EOF or an error). A failed call (EINTR) also says "read": the
// Read then blocks as usual. The syscall package has no poll wrapper, and
// golang.org/x/sys would be a new requirement for modules importing hbone.
func pollReadable(fd int32) bool {
	p := pollfd{fd: fd, events: pollIn}
	var zero syscall.Timespec
	n, _, errno := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1, uintptr(unsafe.Pointer(&zero)), 0, 0, 0)
	return n != 0 || errno != 0
}
