package h2_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
)

// FuzzServerRequest sends arbitrary :method and :authority values to a real
// server over real TLS and checks the server's verdict against the parser:
// only a CONNECT with a valid authority reaches the handler (which answers
// 403 here), everything else is 400/405 or a protocol-level refusal, and the
// server never crashes.
func FuzzServerRequest(f *testing.F) {
	for _, seed := range [][2]string{
		{"CONNECT", "10.0.0.5:80"}, {"CONNECT", "[fd00::1]:8080"}, {"CONNECT", "10.0.0.5"},
		{"CONNECT", "example.com:443"}, {"GET", "10.0.0.5:80"}, {"CONNECT", "10.0.0.5:0"},
		{"CONNECT", "::1"}, {"connect", "10.0.0.5:80"}, {"CONNECT", ""},
	} {
		f.Add(seed[0], seed[1])
	}
	reached := make(chan *hbone.Request, 1)
	e := newEnv(f, withHandler(hbone.HandlerFunc(func(_ context.Context, req *hbone.Request, resp hbone.Responder) {
		select {
		case reached <- req:
		default:
		}
		resp.Reject(http.StatusForbidden, "fuzz")
	})))
	f.Fuzz(func(t *testing.T, method, authority string) {
		rc := e.rawConn(t)
		defer rc.conn.Close()
		if method == "CONNECT" {
			rc.writeHeaders(1, false, ":method", method, ":authority", authority)
		} else {
			rc.writeHeaders(1, false, ":method", method, ":scheme", "https", ":path", "/", ":authority", authority)
		}
		status := rc.status(1)
		var req *hbone.Request
		select {
		case req = <-reached:
		default:
		}
		target, perr := hbone.ParseAuthority(authority)
		switch status {
		case http.StatusForbidden:
			if method != "CONNECT" || perr != nil || req == nil || req.Target != target {
				t.Fatalf("%q %q reached the handler (req=%v, parse err=%v)", method, authority, req, perr)
			}
		case http.StatusBadRequest, http.StatusMethodNotAllowed, -1, 0:
			if req != nil {
				t.Fatalf("%q %q: status %d but the handler ran", method, authority, status)
			}
			if status == http.StatusBadRequest && method == "CONNECT" && perr == nil && target != e.addr {
				t.Fatalf("valid authority %q refused with 400", authority)
			}
		default:
			t.Fatalf("%q %q: unexpected status %d", method, authority, status)
		}
	})
}

// FuzzServerFrames writes an arbitrary byte stream, as frames, to the
// engine's server on a connection with an open tunnel (stream 1 relays to
// an echo server). Whatever the bytes, the server must not crash, must not
// hang (it answers or closes, and its goroutines for the connection end
// when it is closed), and must keep serving new tunnels.
func FuzzServerFrames(f *testing.F) {
	for _, seed := range frameSeeds(f) {
		f.Add(seed)
	}
	e := newEnv(f)
	warm := e.dial(f, e.echo.Addr)
	roundTrip(f, warm, []byte("warm"))
	warm.Close()
	base := runtime.NumGoroutine()
	f.Fuzz(func(t *testing.T, raw []byte) {
		rc := e.rawConn(t)
		rc.connect(1, e.echo.Addr)
		rc.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = rc.conn.Write(raw) // the server may close first
		rc.closed(50 * time.Millisecond)
		rc.conn.Close()
		st := e.dial(t, e.echo.Addr)
		roundTrip(t, st, []byte("still serving"))
		st.Close()
		if n := settle(base + 8); n > base+8 {
			t.Fatalf("%d goroutines after the connection closed, %d before", n, base)
		}
	})
}

// frameSeeds are valid and broken frame sequences for the tunnel on
// stream 1: data, flow control, pings, settings, resets, a second
// CONNECT, GOAWAY, and frames the engine must refuse.
func frameSeeds(f *testing.F) [][]byte {
	var seeds [][]byte
	enc := func(write func(fr *http2.Framer) error) []byte {
		var b bytes.Buffer
		fr := http2.NewFramer(&b, nil)
		fr.AllowIllegalWrites = true
		if err := write(fr); err != nil {
			f.Fatal(err)
		}
		return b.Bytes()
	}
	var hb bytes.Buffer
	henc := hpack.NewEncoder(&hb)
	henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	henc.WriteField(hpack.HeaderField{Name: ":authority", Value: "127.0.0.1:1"})
	block := hb.Bytes()
	for _, w := range []func(fr *http2.Framer) error{
		func(fr *http2.Framer) error { return fr.WriteData(1, false, []byte("hello")) },
		func(fr *http2.Framer) error { return fr.WriteData(1, true, []byte("bye")) },
		func(fr *http2.Framer) error { return fr.WriteWindowUpdate(1, 1<<20) },
		func(fr *http2.Framer) error { return fr.WriteWindowUpdate(0, 0) },
		func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{1}) },
		func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
		},
		func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1})
		},
		func(fr *http2.Framer) error { return fr.WriteRSTStream(1, http2.ErrCodeCancel) },
		func(fr *http2.Framer) error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block, EndHeaders: true})
		},
		func(fr *http2.Framer) error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block[:2], EndHeaders: false})
		},
		func(fr *http2.Framer) error { return fr.WriteContinuation(3, true, block[2:]) },
		func(fr *http2.Framer) error { return fr.WriteGoAway(1, http2.ErrCodeNo, nil) },
		func(fr *http2.Framer) error { return fr.WritePriority(1, http2.PriorityParam{StreamDep: 1}) },
		func(fr *http2.Framer) error {
			return fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: block, EndHeaders: true})
		},
		func(fr *http2.Framer) error { return fr.WriteRawFrame(0xfa, 0, 1, []byte{1, 2, 3}) },
		func(fr *http2.Framer) error { return fr.WriteData(5, false, []byte("idle stream")) },
	} {
		seeds = append(seeds, enc(w))
	}
	seeds = append(seeds, bytes.Join(seeds[:5], nil), []byte{0, 0, 0}, nil)
	return seeds
}

// FuzzClientFrames is the dialer's side: a peer accepts the CONNECT on
// stream 1 with 200 and then sends arbitrary bytes as frames. Dial and the
// tunnel's reads must return (with data or an error, never hang past
// their deadlines), nothing may crash, and the connection's goroutines
// must end once the dialer is closed.
func FuzzClientFrames(f *testing.F) {
	for _, seed := range frameSeeds(f) {
		f.Add(seed)
	}
	e := newEnv(f)
	cert := e.ca.Issue(f, e.server)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		Certificates: []tls.Certificate{*cert}, ClientAuth: tls.RequireAnyClientCert})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	var payload atomic.Pointer[[]byte]
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go fuzzPeer(c, *payload.Load())
		}
	}()
	base := runtime.NumGoroutine()
	f.Fuzz(func(t *testing.T, raw []byte) {
		payload.Store(&raw)
		d, err := h2.NewDialer(h2.DialerConfig{Certs: e.clientSrc})
		if err != nil {
			t.Fatal(err)
		}
		req := e.request(e.echo.Addr)
		req.ProxyAddr = ln.Addr().(*net.TCPAddr).AddrPort()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if st, err := d.Dial(ctx, req); err == nil {
			st.SetDeadline(time.Now().Add(20 * time.Millisecond)) // bounds the exec: minimizing runs it hundreds of times
			_, _ = st.Write([]byte("x"))
			buf := make([]byte, 4096)
			for {
				if _, err := st.Read(buf); err != nil {
					break
				}
			}
			st.Close()
		}
		d.Close()
		if n := settle(base + 8); n > base+8 {
			t.Fatalf("%d goroutines after the dialer closed, %d before", n, base)
		}
	})
}

// fuzzPeer answers the dialer's preface and CONNECT on stream 1 with 200,
// then writes raw and reads until the dialer closes (or 3 s).
func fuzzPeer(c net.Conn, raw []byte) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c, preface); err != nil {
		return
	}
	fr := http2.NewFramer(c, c)
	if fr.WriteSettings() != nil {
		return
	}
	for {
		fm, err := fr.ReadFrame()
		if err != nil {
			return
		}
		if s, ok := fm.(*http2.SettingsFrame); ok && !s.IsAck() {
			fr.WriteSettingsAck()
		}
		if h, ok := fm.(*http2.HeadersFrame); ok && h.StreamID == 1 {
			break
		}
	}
	var hb bytes.Buffer
	hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}) != nil {
		return
	}
	_, _ = c.Write(raw)
	_, _ = io.Copy(io.Discard, c)
}
