package hbone_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"testing"

	"github.com/ambientmesh/ambient/proxylib/hbone"
)

// tcpPair returns two connected loopback TCP connections.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); accepted <- c }()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-accepted
	t.Cleanup(func() { a.Close(); b.Close() })
	return a.(*net.TCPConn), b.(*net.TCPConn)
}

func TestRelayCopiesBothWaysAndPropagatesHalfClose(t *testing.T) {
	client, relayIn := tcpPair(t)
	relayOut, server := tcpPair(t)
	type result struct {
		up, down int64
		err      error
	}
	done := make(chan result, 1)
	go func() { u, d, err := hbone.Relay(relayIn, relayOut); done <- result{u, d, err} }()

	up := make([]byte, 3<<20) // large enough to switch to the bulk buffer
	rand.Read(up)
	down := []byte("small reply")
	go func() { client.Write(up); client.CloseWrite() }()
	got, err := io.ReadAll(server) // EOF arrives only through the relay's half-close
	if err != nil || !bytes.Equal(got, up) {
		t.Fatalf("server got %d of %d bytes: %v", len(got), len(up), err)
	}
	server.Write(down)
	server.CloseWrite()
	back, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(back, down) {
		t.Fatalf("client got %q: %v", back, err)
	}
	r := <-done
	if r.err != nil || r.up != int64(len(up)) || r.down != int64(len(down)) {
		t.Fatalf("Relay = %d, %d, %v", r.up, r.down, r.err)
	}
}

func TestRelayResetPropagates(t *testing.T) {
	client, relayIn := tcpPair(t)
	relayOut, server := tcpPair(t)
	done := make(chan error, 1)
	go func() { _, _, err := hbone.Relay(relayIn, relayOut); done <- err }()
	client.Write([]byte("x"))
	server.Read(make([]byte, 1))
	server.SetLinger(0)
	server.Close() // RST towards the relay
	if err := <-done; err == nil {
		t.Fatal("Relay reported a clean end after a reset")
	}
	if _, err := io.ReadAll(client); err == nil {
		t.Fatal("client saw a clean EOF, want the reset passed on")
	}
}
