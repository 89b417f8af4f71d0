//go:build !linux

package hbone

import "io"

type readWaiter struct{}

// readWaiterFor: bufferless waiting is only implemented on Linux; elsewhere
// idle directions keep their small buffer.
func readWaiterFor(io.Reader) *readWaiter { return nil }

func (*readWaiter) wait() error { return nil }

// SinkFor: pushing into sockets is only implemented on Linux.
func SinkFor(any) Sink { return nil }

// EndedByReset: the socket's state is only read on Linux.
func EndedByReset(any) bool { return false }
