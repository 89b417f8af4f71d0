package handover

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair is a connected loopback TCP pair.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestDetachLocalLosesNothing: a node-local relay stopped at a clean byte
// boundary while both ends keep sending, then continued by a new relay on
// the same sockets (as the new ztunnel does), delivers every byte once, in
// order, both ways.
func TestDetachLocalLosesNothing(t *testing.T) {
	for _, bulk := range []bool{false, true} {
		detachLocal(t, bulk)
	}
}

// detachLocal runs the test with senders in chunks, or in one write.
func detachLocal(t *testing.T, bulk bool) {
	client, app := tcpPair(t)  // the client app and ztunnel's socket to it
	server, peer := tcpPair(t) // ztunnel's socket to the server app, and the server app
	r := NewRelay(app, server, 0, 0)
	ran := make(chan bool, 1)
	go func() { d, _ := r.Run(); ran <- d }()

	const total = 4 << 20
	payload := make([]byte, total)
	for i := range payload {
		payload[i] = byte(i*31 + i/253)
	}
	// Both apps send at once, in chunks (so the detach lands mid-transfer);
	// each side's received stream is checked.
	send := func(c *net.TCPConn) {
		if bulk {
			c.Write(payload)
			c.CloseWrite()
			return
		}
		for off := 0; off < total; off += 64 << 10 {
			c.Write(payload[off : off+64<<10])
			time.Sleep(time.Millisecond)
		}
		c.CloseWrite()
	}
	go send(client)
	go send(peer)
	gotAtServer, gotAtClient := make(chan []byte, 1), make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(peer); gotAtServer <- b }()
	go func() { b, _ := io.ReadAll(client); gotAtClient <- b }()

	if bulk {
		time.Sleep(2 * time.Millisecond)
	} else {
		time.Sleep(20 * time.Millisecond) // mid-transfer
	}
	if err := r.DetachLocal(5 * time.Second); err != nil {
		if bulk && err == ErrBusy {
			return // a direction already ended: not suspendable, correctly
		}
		t.Fatalf("DetachLocal: %v", err)
	}
	if !<-ran {
		t.Fatal("Run did not report the relay detached")
	}
	sent, recv := r.Counts()
	if sent == total && recv == total {
		t.Log("transfer finished before the detach; the continuation still runs")
	}
	next := NewRelay(app, server, sent, recv)
	nextErr := make(chan error, 1)
	go func() { _, err := next.Run(); nextErr <- err }()
	for name, ch := range map[string]chan []byte{"server": gotAtServer, "client": gotAtClient} {
		select {
		case got := <-ch:
			if !bytes.Equal(got, payload) {
				t.Fatalf("%s received %d bytes, want the %d sent, in order (detached at %d/%d; continuation: %v)", name, len(got), total, sent, recv, <-nextErr)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: transfer did not finish after the continuation", name)
		}
	}
	if s, r := next.Counts(); s != total || r != total {
		t.Fatalf("session counts %d/%d, want %d both ways", s, r, total)
	}
}

// TestPauseRefusedAfterHalfClose: a relay whose direction ended is never
// suspended (its state could not be resumed).
func TestPauseRefusedAfterHalfClose(t *testing.T) {
	client, app := tcpPair(t)
	server, _ := tcpPair(t)
	r := NewRelay(app, server, 0, 0)
	go r.Run()
	client.CloseWrite()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := r.Pause(time.Second); err == ErrBusy {
			break
		}
		r.Unpause()
		if time.Now().After(deadline) {
			t.Fatal("a half-closed relay could still be paused")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
