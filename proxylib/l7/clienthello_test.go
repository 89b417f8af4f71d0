package l7

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

// The server name is read from a real ClientHello, nothing is written back
// to the client, and the bytes read are replayed in full, followed by what
// the client sends next.
func TestPeekServerName(t *testing.T) {
	for _, name := range []string{"shop.example.com", ""} {
		client, server := net.Pipe()
		sent := &bytes.Buffer{}
		go func() {
			rec := &teeConn{Conn: client, w: sent}
			c := tls.Client(rec, &tls.Config{ServerName: name, InsecureSkipVerify: name == ""})
			c.SetDeadline(time.Now().Add(5 * time.Second))
			_ = c.Handshake() // never answered
		}()
		got, br, err := PeekServerName(server, 5*time.Second)
		if err != nil || got != name {
			t.Fatalf("PeekServerName = %q, %v; want %q", got, err, name)
		}
		replay := make([]byte, sent.Len())
		if _, err := io.ReadFull(br, replay); err != nil || !bytes.Equal(replay, sent.Bytes()) {
			t.Fatalf("replayed %d bytes (%v), want the %d the client sent", len(replay), err, sent.Len())
		}
		server.Close()
		client.Close()
	}
}

func TestPeekServerNameRefusesOtherProtocols(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		client.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	}()
	if _, _, err := PeekServerName(server, time.Second); err == nil {
		t.Fatal("an HTTP request was read as a ClientHello")
	}
	// Silent clients time out.
	c2, s2 := net.Pipe()
	defer c2.Close()
	if _, _, err := PeekServerName(s2, 50*time.Millisecond); err == nil {
		t.Fatal("a silent client did not time out")
	}
}

type teeConn struct {
	net.Conn
	w io.Writer
}

func (c *teeConn) Write(p []byte) (int, error) {
	c.w.Write(p)
	return c.Conn.Write(p)
}
