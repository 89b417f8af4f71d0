package handover

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/hbone/h2"
	"github.com/ambientmesh/ambient/proxylib/hbone/hbonetest"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// tunnels makes real HBONE tunnels (the h2 engine, mutual TLS on
// loopback), the kind a session relays between two of our ztunnels.
type tunnels struct {
	t        *testing.T
	dialer   *h2.Dialer
	req      hbone.DialRequest
	accepted chan hbone.Stream
}

func newTunnels(t *testing.T) *tunnels {
	ca := hbonetest.NewCA(t, hbonetest.DefaultTrustDomain)
	client, server := ca.ID("ns", "client"), ca.ID("ns", "server")
	tn := &tunnels{t: t, accepted: make(chan hbone.Stream, 1)}
	done := make(chan struct{})
	srv, err := h2.NewServer(h2.ServerConfig{Certs: ca.Source(t, server), Identity: server,
		Handler: hbone.HandlerFunc(func(_ context.Context, _ *hbone.Request, resp hbone.Responder) {
			st, err := resp.Accept()
			if err != nil {
				return
			}
			tn.accepted <- st
			<-done // the test owns the stream
		})})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	if tn.dialer, err = h2.NewDialer(h2.DialerConfig{Certs: ca.Source(t, client)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(done)
		tn.dialer.Close()
		srv.Close()
	})
	tn.req = hbone.DialRequest{Source: client, Expected: []identity.Identity{server},
		ProxyAddr: ln.Addr().(*net.TCPAddr).AddrPort(), Target: netip.MustParseAddrPort("127.0.0.1:9")}
	return tn
}

// open returns both ends of a new tunnel: the dialer's and the server's.
func (tn *tunnels) open() (hbone.Stream, hbone.Stream) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := tn.dialer.Dial(ctx, tn.req)
	if err != nil {
		tn.t.Fatal(err)
	}
	select {
	case peer := <-tn.accepted:
		return st, peer
	case <-time.After(10 * time.Second):
		tn.t.Fatal("tunnel not accepted")
	}
	return nil, nil
}

// goroutinesIn counts goroutines whose stack has fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// TestIdleSessionHasNoTunnelReader: on a tunnel that pushes (the h2
// engine), an idle session relay parks one goroutine (the app reader), not
// a second one reading the tunnel; bytes from the peer are written into
// the app socket by the tunnel itself.
func TestIdleSessionHasNoTunnelReader(t *testing.T) {
	tn := newTunnels(t)
	const n = 10
	for range n {
		client, app := tcpPair(t)
		tun, peer := tn.open()
		r := NewRelay(app, tun, 0, 0)
		go r.Run()
		t.Cleanup(func() { peer.Close() })
		roundTrip(t, client, peer, "ping")
		roundTrip(t, peer, client, "pong")
	}
	time.Sleep(50 * time.Millisecond) // every relay parked again
	if got := goroutinesIn("handover.(*Relay).down("); got != 0 {
		t.Errorf("%d goroutines read idle tunnels (handover.(*Relay).down), want 0: the tunnel pushes", got)
	}
	if got := goroutinesIn("handover.(*Relay).Run("); got != n {
		t.Errorf("%d relays parked in Run (the app reader), want %d", got, n)
	}
}

// TestPushModeCountsEveryByte: bytes the tunnel pushed, bytes a drain wrote
// while the app read slowly, and bytes read after a Pause switched the
// relay to a reading goroutine are all delivered once, in order, and
// counted (WaitRecv and Counts are exact).
func TestPushModeCountsEveryByte(t *testing.T) {
	for _, pause := range []bool{false, true} {
		tn := newTunnels(t)
		client, app := tcpPair(t)
		app.SetWriteBuffer(4 << 10) // the app's socket fills: drains and pushes mix
		tun, peer := tn.open()
		r := NewRelay(app, tun, 0, 0)
		ran := make(chan error, 1)
		go func() { _, err := r.Run(); ran <- err }()

		const total = 2 << 20
		payload := make([]byte, total)
		for i := range payload {
			payload[i] = byte(i*7 + i/251)
		}
		go func() {
			peer.Write(payload)
			peer.CloseWrite()
		}()
		got := make(chan []byte, 1)
		go func() { // a slow reader
			var b bytes.Buffer
			chunk := make([]byte, 16<<10)
			for {
				time.Sleep(200 * time.Microsecond)
				n, err := client.Read(chunk)
				b.Write(chunk[:n])
				if err != nil {
					got <- b.Bytes()
					return
				}
			}
		}()
		if pause {
			time.Sleep(20 * time.Millisecond) // mid-transfer
			if _, err := r.Pause(10 * time.Second); err != nil {
				t.Fatalf("Pause: %v", err)
			}
			if err := r.WaitRecv(total, 20*time.Second); err != nil {
				t.Fatalf("WaitRecv after Pause: %v", err)
			}
			r.Unpause()
		}
		b := <-got
		if !bytes.Equal(b, payload) {
			t.Fatalf("pause=%v: the app got %d bytes, want %d in order", pause, len(b), total)
		}
		client.CloseWrite() // ends the app's direction: Run returns
		if err := <-ran; err != nil {
			t.Fatalf("pause=%v: Run: %v", pause, err)
		}
		if _, recv := r.Counts(); recv != total {
			t.Fatalf("pause=%v: Counts recv = %d, want %d", pause, recv, total)
		}
	}
}

// roundTrip writes msg on from and reads it on to.
func roundTrip(t *testing.T, from io.Writer, to io.Reader, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if d, ok := to.(interface{ SetReadDeadline(time.Time) error }); ok {
		d.SetReadDeadline(time.Now().Add(10 * time.Second))
		defer d.SetReadDeadline(time.Time{})
	}
	if _, err := io.ReadFull(to, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}
