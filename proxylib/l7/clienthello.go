package l7

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"
)

// maxClientHello bounds what is buffered while reading a ClientHello (the
// largest handshake message crypto/tls accepts, plus record headers).
const maxClientHello = 64<<10 + 5*16

var errHelloRead = errors.New("client hello read")

// PeekServerName reads a TLS ClientHello from conn without answering it and
// returns the server name (SNI) it asks for ("" when it names none), and a
// reader that yields every byte read and then the rest of conn, so the
// handshake can be relayed untouched (TLS passthrough). The ClientHello is
// parsed by crypto/tls. A client that sends no ClientHello within timeout,
// or something else, gets an error.
func PeekServerName(conn net.Conn, timeout time.Duration) (string, *bufio.Reader, error) {
	if timeout > 0 {
		_ = conn.SetReadDeadline(time.Now().Add(timeout))
		defer conn.SetReadDeadline(time.Time{})
	}
	var seen bytes.Buffer
	rec := &recordingConn{Conn: conn, r: io.TeeReader(io.LimitReader(conn, maxClientHello), &seen)}
	var name string
	got := false
	srv := tls.Server(rec, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		name, got = h.ServerName, true
		return nil, errHelloRead // stop: nothing is ever written back
	}})
	err := srv.Handshake()
	if !got {
		if err == nil {
			err = errors.New("no ClientHello")
		}
		return "", nil, err
	}
	return name, bufio.NewReader(io.MultiReader(&seen, conn)), nil
}

// recordingConn reads through r and writes nothing: the handshake's alert
// on stopping must not reach the client, whose TLS session belongs to the
// backend.
type recordingConn struct {
	net.Conn
	r io.Reader
}

func (c *recordingConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *recordingConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *recordingConn) Close() error                { return nil }
