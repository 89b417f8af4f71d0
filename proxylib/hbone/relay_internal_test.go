package hbone

import (
	"net"
	"testing"
	"time"
)

// signalWriter reports each write on a channel.
type signalWriter chan []byte

func (w signalWriter) Write(p []byte) (int, error) {
	w <- append([]byte(nil), p...)
	return len(p), nil
}

// TestCopyAdaptiveIdleSocketHoldsNoBuffer: between messages a TCP source is
// waited on without a buffer; the data and the end still arrive.
func TestCopyAdaptiveIdleSocketHoldsNoBuffer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); accepted <- c }()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	src := <-accepted
	defer src.Close()

	before := smallHeld.Load()
	out := make(signalWriter, 1)
	done := make(chan error, 1)
	go func() { _, err := CopyAdaptive(out, src); done <- err }()
	for _, msg := range []string{"first", "second"} {
		client.Write([]byte(msg))
		if got := string(<-out); got != msg {
			t.Fatalf("copied %q, want %q", got, msg)
		}
		// Idle now: the copy must be parked without its small buffer.
		deadline := time.Now().Add(10 * time.Second)
		for smallHeld.Load() != before {
			if time.Now().After(deadline) {
				t.Fatalf("idle copy holds %d small buffers", smallHeld.Load()-before)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	client.(*net.TCPConn).CloseWrite()
	if err := <-done; err != nil {
		t.Fatalf("copy ended with %v, want a clean EOF", err)
	}
}
