package h2_test

import (
	"bytes"
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
)

// Tests for what the tunnel engine owns beyond x/net's Framer: framing and
// flow-control violations, stream-id reuse and control-frame floods from a
// hostile peer, each answered with the error code RFC 9113 names.

// holdOpen accepts every tunnel and never reads it until the test ends.
func holdOpen(t *testing.T) hbone.Handler {
	return hbone.HandlerFunc(func(ctx context.Context, _ *hbone.Request, resp hbone.Responder) {
		st, err := resp.Accept()
		if err != nil {
			return
		}
		<-ctx.Done() // the stream ended or the connection died
		st.Close()
	})
}

func withTuning(tu h2.Tuning) envOption { return func(e *env) { e.serverConf.Tuning = tu } }

// goAwayCode reads until GOAWAY (its code) or the end of the connection.
func (rc *rawConn) goAwayCode(within time.Duration) (http2.ErrCode, bool) {
	rc.conn.SetReadDeadline(time.Now().Add(within))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			return 0, false
		}
		if ga, ok := f.(*http2.GoAwayFrame); ok {
			return ga.ErrCode, true
		}
	}
}

// resetCode reads until RST_STREAM on id (its code), GOAWAY or the end.
func (rc *rawConn) resetCode(id uint32, within time.Duration) (http2.ErrCode, bool) {
	rc.conn.SetReadDeadline(time.Now().Add(within))
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			return 0, false
		}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return f.ErrCode, true
			}
		case *http2.GoAwayFrame:
			return 0, false
		}
	}
}

func (rc *rawConn) connect(id uint32, target netip.AddrPort) {
	rc.t.Helper()
	rc.writeHeaders(id, false, ":method", "CONNECT", ":authority", target.String())
	if got := rc.status(id); got != 200 {
		rc.t.Fatalf("CONNECT on stream %d: status %d, want 200", id, got)
	}
}

func TestFrameLargerThanAdvertisedIsFrameSizeError(t *testing.T) {
	e := newEnv(t, withHandler(holdOpen(t)))
	rc := e.rawConn(t)
	rc.connect(1, e.echo.Addr)
	// The server advertises 16 KiB frames; a 20 KiB DATA frame breaks it.
	if err := rc.fr.WriteData(1, false, make([]byte, 20<<10)); err != nil {
		t.Fatal(err)
	}
	code, ok := rc.goAwayCode(10 * time.Second)
	if !ok || code != http2.ErrCodeFrameSize {
		t.Fatalf("GOAWAY %v (sent: %v), want FRAME_SIZE_ERROR", code, ok)
	}
	if !rc.closed(10 * time.Second) {
		t.Fatal("connection not closed after a frame-size error")
	}
}

func TestStreamWindowOverrunIsFlowControlError(t *testing.T) {
	e := newEnv(t, withHandler(holdOpen(t)), withTuning(h2.Tuning{StreamWindow: 65535, ConnWindow: 1 << 20}))
	rc := e.rawConn(t)
	rc.connect(1, e.echo.Addr)
	chunk := make([]byte, 16<<10)
	for sent := 0; sent < 65535+len(chunk); sent += len(chunk) { // the handler never reads
		if err := rc.fr.WriteData(1, false, chunk); err != nil {
			t.Fatal(err)
		}
	}
	code, ok := rc.resetCode(1, 10*time.Second)
	if !ok || code != http2.ErrCodeFlowControl {
		t.Fatalf("RST_STREAM %v (sent: %v), want FLOW_CONTROL_ERROR on the stream", code, ok)
	}
	// Only the stream: the connection still serves.
	rc.connect(3, e.echo.Addr)
}

func TestConnectionWindowOverrunIsFlowControlError(t *testing.T) {
	e := newEnv(t, withHandler(holdOpen(t)), withTuning(h2.Tuning{StreamWindow: 65535, ConnWindow: 65535}))
	rc := e.rawConn(t)
	rc.connect(1, e.echo.Addr)
	rc.connect(3, e.echo.Addr)
	chunk := make([]byte, 16<<10)
	for i := 0; i < 3; i++ { // 48 KiB per stream, 96 KiB on a 64 KiB connection window
		for _, id := range []uint32{1, 3} {
			if err := rc.fr.WriteData(id, false, chunk); err != nil {
				t.Fatal(err)
			}
		}
	}
	code, ok := rc.goAwayCode(10 * time.Second)
	if !ok || code != http2.ErrCodeFlowControl {
		t.Fatalf("GOAWAY %v (sent: %v), want FLOW_CONTROL_ERROR", code, ok)
	}
}

func TestStreamIDReuseIsProtocolError(t *testing.T) {
	for name, ids := range map[string][]uint32{
		"same id again":      {1, 1},
		"lower id than seen": {3, 1},
		"even id":            {2},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, withHandler(holdOpen(t)))
			rc := e.rawConn(t)
			for _, id := range ids {
				rc.writeHeaders(id, false, ":method", "CONNECT", ":authority", e.echo.Addr.String())
			}
			code, ok := rc.goAwayCode(10 * time.Second)
			if !ok || code != http2.ErrCodeProtocol {
				t.Fatalf("GOAWAY %v (sent: %v), want PROTOCOL_ERROR", code, ok)
			}
		})
	}
}

func TestControlFrameFloodIsEnhanceYourCalm(t *testing.T) {
	for name, send := range map[string]func(fr *http2.Framer) error{
		"PING": func(fr *http2.Framer) error { return fr.WritePing(false, [8]byte{1}) },
		"SETTINGS": func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 0})
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			rc := e.rawConn(t)
			go func() { // never reading the answers
				for range 5000 {
					if send(rc.fr) != nil {
						return
					}
				}
			}()
			code, ok := rc.goAwayCode(20 * time.Second)
			if !ok || code != http2.ErrCodeEnhanceYourCalm {
				t.Fatalf("GOAWAY %v (sent: %v), want ENHANCE_YOUR_CALM", code, ok)
			}
			if !rc.closed(10 * time.Second) {
				t.Fatal("flooding connection not closed")
			}
			st := e.dial(t, e.echo.Addr) // others are unaffected
			roundTrip(t, st, []byte("ok"))
			st.Close()
		})
	}
}

// TestManyTunnelsShareOneConnection: tunnels multiplexed on one pooled
// connection each carry their own bytes both ways, with large transfers
// interleaved.
func TestManyTunnelsShareOneConnection(t *testing.T) {
	e := newEnv(t)
	d := e.newDialer(t, h2.DialerConfig{MaxStreamsPerConn: 1000})
	const tunnels, size = 64, 1 << 20
	errs := make(chan error, tunnels)
	for i := range tunnels {
		go func() {
			st, err := d.Dial(context.Background(), e.request(e.echo.Addr))
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			want := bytes.Repeat([]byte{byte(i)}, size)
			go func() {
				st.Write(want)
				st.CloseWrite()
			}()
			got, err := io.ReadAll(st)
			if err == nil && !bytes.Equal(got, want) {
				err = io.ErrUnexpectedEOF
			}
			errs <- err
		}()
	}
	for range tunnels {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if s := d.Stats(); s.Conns != 1 {
		t.Fatalf("%d pooled connections, want 1", s.Conns)
	}
}
