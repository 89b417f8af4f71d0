package proxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// pipeConn hides the *net.TCPConn type (so the copy takes the adaptive
// path, as for a tunnel stream) but keeps CloseWrite.
type pipeConn struct{ *net.TCPConn }

func TestRelayHalfCloseAndCounts(t *testing.T) {
	for _, name := range []string{"tcp-tcp (splice)", "tcp-pipe (adaptive)"} {
		t.Run(name, func(t *testing.T) {
			client, down := tcpPair(t)
			var up, server net.Conn
			if name == "tcp-tcp (splice)" {
				up, server = tcpPair(t)
			} else {
				up, server = tcpPair(t)
				up = pipeConn{up.(*net.TCPConn)}
			}
			payload := bytes.Repeat([]byte("0123456789abcdef"), 20000) // 320 KB, crosses buffer switch
			type res struct {
				recv, sent int64
				err        error
			}
			done := make(chan res, 1)
			go func() { r, s, err := Relay(down, up); done <- res{r, s, err} }()
			go func() {
				client.Write(payload)
				client.(*net.TCPConn).CloseWrite()
			}()
			got, err := io.ReadAll(server)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("server got %d bytes, err %v", len(got), err)
			}
			server.Write([]byte("reply after client half-close"))
			server.Close()
			reply, _ := io.ReadAll(client)
			if string(reply) != "reply after client half-close" {
				t.Fatalf("client got %q", reply)
			}
			select {
			case r := <-done:
				if r.recv != int64(len(payload)) || r.sent != int64(len(reply)) || r.err != nil {
					t.Fatalf("Relay = %d, %d, %v", r.recv, r.sent, r.err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("relay did not finish")
			}
		})
	}
}

func TestRelayResetPropagates(t *testing.T) {
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	done := make(chan struct{})
	go func() { Relay(down, up); close(done) }()
	client.Write([]byte("x"))
	buf := make([]byte, 1)
	io.ReadFull(server, buf)
	server.(*net.TCPConn).SetLinger(0)
	server.Close() // upstream reset
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(buf); err == nil {
		t.Fatal("client read succeeded after upstream reset")
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("relay hung after upstream reset")
	}
}
