// Package l7 is the waypoint's HTTP layer: protocol sniffing (HTTP/1.1,
// HTTP/2 prior knowledge, otherwise opaque TCP), a strict HTTP/1.1 server
// loop that refuses request-smuggling shapes before anything is parsed
// leniently, h2c (prior knowledge and Upgrade), header hygiene (hop-by-hop
// stripping, X-Forwarded-For / X-Forwarded-Client-Cert set by us), W3C trace
// context, and an upstream transport that speaks the downstream protocol to
// each endpoint over a caller-supplied dialer (HBONE in the waypoint).
package l7

import (
	"bufio"
	"bytes"
	"net"
	"time"
)

// Protocol is what a tunnel carries.
type Protocol int

const (
	TCP Protocol = iota
	HTTP1
	HTTP2
)

func (p Protocol) String() string {
	switch p {
	case HTTP1:
		return "http/1.1"
	case HTTP2:
		return "h2c"
	}
	return "tcp"
}

// h2Preface is the HTTP/2 client connection preface (RFC 9113 §3.4).
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// maxMethodLen bounds the method token we wait for.
const maxMethodLen = 16

// Sniff decides the protocol from the first bytes the client sends, waiting
// at most timeout (server-first protocols send nothing and become TCP). The
// returned reader holds the peeked bytes and must be used for all reads.
func Sniff(conn net.Conn, timeout time.Duration) (Protocol, *bufio.Reader) {
	br := bufio.NewReaderSize(conn, 16<<10)
	if timeout > 0 {
		_ = conn.SetReadDeadline(time.Now().Add(timeout))
		defer conn.SetReadDeadline(time.Time{})
	}
	n := 1
	for {
		b, err := br.Peek(n)
		if len(b) == 0 {
			return TCP, br
		}
		p, decided := classify(b)
		if decided || err != nil {
			return p, br
		}
		n = len(b) + 1
		if buffered := br.Buffered(); buffered > len(b) {
			n = buffered
		}
	}
}

// classify looks at a prefix of the stream. decided is false while more
// bytes could change the answer.
func classify(b []byte) (Protocol, bool) {
	if len(b) < len(h2Preface) && bytes.HasPrefix([]byte(h2Preface), b) {
		return TCP, false
	}
	if bytes.HasPrefix(b, []byte(h2Preface)) {
		return HTTP2, true
	}
	for i, c := range b {
		switch {
		case c == ' ' && i > 0:
			return HTTP1, true
		case c < 'A' || c > 'Z':
			return TCP, true
		case i >= maxMethodLen:
			return TCP, true
		}
	}
	return TCP, len(b) > maxMethodLen
}
