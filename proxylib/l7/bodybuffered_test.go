package l7

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
)

func TestBodyBuffered(t *testing.T) {
	body := strings.Repeat("b", 1024)
	cases := []struct {
		name     string
		head     string
		arrived  string // bytes after the head already read from the socket
		readOnce bool
		want     bool
	}{
		{"whole body arrived with the head", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n", body, false, true},
		{"body partly arrived", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n", body[:100], false, false},
		{"body partly read already", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n", body, true, false},
		{"chunked", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "400\r\n" + body + "\r\n0\r\n\r\n", false, false},
		{"100-continue pending", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\nExpect: 100-continue\r\n\r\n", body, false, false},
		{"no body", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", "", false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(tc.head)))
			if err != nil {
				t.Fatal(err)
			}
			// The rest of the body has not arrived: reading past what is
			// buffered would block on this pipe.
			src, more := net.Pipe()
			defer src.Close()
			defer more.Close()
			br := bufio.NewReaderSize(io.MultiReader(strings.NewReader(tc.arrived), src), 16<<10)
			if tc.arrived != "" {
				br.Peek(len(tc.arrived))
			}
			b := newRequestBody(req, br, bufio.NewWriter(io.Discard))
			if tc.readOnce {
				b.Read(make([]byte, 10))
			}
			if got := BodyBuffered(b); got != tc.want {
				t.Errorf("BodyBuffered = %v, want %v", got, tc.want)
			}
		})
	}
	if BodyBuffered(bytes.NewReader([]byte(body))) {
		t.Error("a body that is not the server's counts as buffered")
	}
}

// TestInMemoryBodyIsOneUpstreamWrite pins the net/http behaviour
// BodyBuffered exists for: a request whose body is in memory goes out in
// one write, a streamed body's head is flushed on its own first.
func TestInMemoryBodyIsOneUpstreamWrite(t *testing.T) {
	be := backend(t, false)
	target := netip.MustParseAddrPort(be.Listener.Addr().String())
	var writes atomic.Int64
	up := NewUpstream(func(ctx context.Context, ep netip.AddrPort) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", ep.String())
		return &countingConn{Conn: c, writes: &writes}, err
	})
	defer up.Close()
	payload := bytes.Repeat([]byte("p"), 1024)
	send := func(body io.Reader) int64 {
		writes.Store(0)
		req, _ := http.NewRequest(http.MethodPost, "http://"+target.String()+"/", body)
		req.ContentLength = int64(len(payload))
		resp, err := up.RoundTrip(req, target, false)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return writes.Load()
	}
	if n := send(io.NopCloser(bytes.NewReader(payload))); n != 1 {
		t.Errorf("in-memory body: %d upstream writes, want 1", n)
	}
	if n := send(struct{ io.Reader }{bytes.NewReader(payload)}); n != 2 {
		t.Errorf("streamed body: %d upstream writes, want 2 (head flushed first); if net/http changed, BodyBuffered may no longer be needed", n)
	}
}

type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}
