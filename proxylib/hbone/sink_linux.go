package hbone

import (
	"syscall"
)

// socketSink writes to a socket once, non-blocking, through the runtime's
// poller (which serializes it with the socket's other writers and refuses a
// closed socket).
type socketSink struct {
	rc    syscall.RawConn
	p     []byte
	n     int
	err   error
	write func(fd uintptr) bool // built once: no allocation per write
}

// SinkFor returns a Sink for a socket, nil for anything else.
func SinkFor(dst any) Sink {
	sc, ok := dst.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &socketSink{rc: rc}
	s.write = func(fd uintptr) bool {
		s.n, s.err = syscall.Write(int(fd), s.p)
		return true // never wait for writability: that is the relay's job
	}
	return s
}

// TryWrite is called by one goroutine at a time (the pushing stream holds
// its lock), so the fields need no synchronisation of their own.
func (s *socketSink) TryWrite(p []byte) (int, error) {
	s.p = p
	err := s.rc.Write(s.write)
	n, werr := s.n, s.err
	s.p, s.n, s.err = nil, 0, nil
	if err != nil {
		return 0, err
	}
	switch werr {
	case nil:
		return n, nil
	case syscall.EAGAIN, syscall.EINTR:
		return 0, nil // full (or interrupted): queued for the relay instead
	default:
		return 0, werr
	}
}
