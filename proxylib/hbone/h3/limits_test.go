package h3

import (
	"context"
	"crypto/tls"
	"strings"

	"io"
	"net/http"
	"net/url"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// TestTunnelQuotaPerIdentity: more tunnels than one identity's quota are
// refused with 429; closing one frees a slot (reliability case 15).
func TestTunnelQuotaPerIdentity(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServerWith(t, mesh.source(t, serverID), echoHandler(nil), func(c *ServerConfig) { c.MaxTunnelsPerIdentity = 2 })
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	var open []hbone.Stream
	for range 2 {
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, s)
	}
	_, err := d.Dial(context.Background(), dialReq(srv))
	if hbone.StatusOf(err) != http.StatusTooManyRequests {
		t.Fatalf("third tunnel: %v, want 429", err)
	}
	open[0].Close()
	waitFor(t, "a closed tunnel frees its quota", func() bool {
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err != nil {
			return false
		}
		s.Close()
		return true
	})
	open[1].Close()
}

// TestStreamIdleTimeout: a tunnel with no bytes either way is reset by the
// server; the client sees an error, not a hang (reliability case 16).
func TestStreamIdleTimeout(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServerWith(t, mesh.source(t, serverID), echoHandler(nil), func(c *ServerConfig) { c.StreamIdleTimeout = 200 * time.Millisecond })
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	s, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	echo(t, s, "active tunnels stay up")
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadAll(s)
	if !isReset(err) || isTimeout(err) {
		t.Fatalf("idle tunnel read: %v, want reset by the server", err)
	}
}

// TestRapidReset opens and cancels thousands of requests: concurrent
// handlers stay bounded by the stream limit and everything is released
// (reliability case 12).
func TestRapidReset(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	const maxStreams = 20
	var running, peak atomic.Int32
	srv := startServerWith(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		n := running.Add(1)
		defer running.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		s, err := resp.Accept()
		if err != nil {
			return
		}
		io.Copy(io.Discard, s) // ends when the client resets
		s.Close()
	}, func(c *ServerConfig) { c.MaxIncomingStreams = maxStreams })
	before := runtime.NumGoroutine()
	cc := rawClient(t, mesh.source(t, clientID), srv)
	for i := range 2000 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		rs, err := cc.OpenRequestStream(ctx)
		cancel()
		if err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
		authority := "10.0.0.5:80"
		rs.SendRequestHeader(&http.Request{Method: http.MethodConnect, Host: authority, URL: &url.URL{Host: authority}, Header: http.Header{}})
		if i%100 == 0 { // some reach the handler before the reset
			if _, err := rs.ReadResponse(); err != nil {
				t.Fatalf("stream %d: %v", i, err)
			}
		}
		rs.CancelWrite(quic.StreamErrorCode(0x10c))
		rs.CancelRead(quic.StreamErrorCode(0x10c))
	}
	if peak.Load() == 0 {
		t.Fatal("no handler ran: the test proved nothing")
	}
	if p := peak.Load(); p > maxStreams {
		t.Errorf("%d handlers ran at once, stream limit is %d", p, maxStreams)
	}
	waitFor(t, "handlers released", func() bool { return running.Load() == 0 })
	waitFor(t, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= before+20 })
}

// TestOversizedHeadersRefused: a header list over the 64 KiB limit is
// answered 431 and never reaches the handler (reliability case 13).
func TestOversizedHeadersRefused(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	var called atomic.Bool
	srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		called.Store(true)
		resp.Reject(http.StatusForbidden, "test")
	})
	cc := rawClient(t, mesh.source(t, clientID), srv)
	rs, err := cc.OpenRequestStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	authority := "10.0.0.5:80"
	big := strings.Repeat("x", 100<<10)
	err = rs.SendRequestHeader(&http.Request{Method: http.MethodConnect, Host: authority, URL: &url.URL{Host: authority},
		Header: http.Header{"Baggage": {big}}})
	if err == nil { // the server may answer 431 or reset the stream (H3_EXCESSIVE_LOAD)
		resp, err := rs.ReadResponse()
		if err == nil && resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status %d, want 431 or a stream error", resp.StatusCode)
		}
	}
	if called.Load() {
		t.Fatal("handler saw an oversized request")
	}
}

// TestStalledHandshakeClosed: a client that stops in the middle of the TLS
// handshake is dropped by the server's handshake timeout (reliability case 14).
func TestStalledHandshakeClosed(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServerWith(t, mesh.source(t, serverID), echoHandler(nil), func(c *ServerConfig) { c.HandshakeTimeout = 300 * time.Millisecond })
	client := mesh.source(t, clientID)
	release := make(chan struct{})
	tlsConf := hbone.ClientTLSConfig(client, clientID, []identity.Identity{serverID}, "h3")
	tlsConf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		<-release // stall after the server's flight, before our Finished
		return client.Certificate(context.Background(), clientID)
	}
	go func() {
		time.Sleep(1500 * time.Millisecond) // well past the server's handshake timeout
		close(release)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, srv.Addr().String(), tlsConf, &quic.Config{HandshakeIdleTimeout: 5 * time.Second, MaxIdleTimeout: 2 * time.Second})
	if err == nil {
		// the handshake completed on our side; the server must not serve it
		cc := (&http3.Transport{}).NewClientConn(qc)
		rs, err := cc.OpenRequestStream(ctx)
		if err == nil {
			authority := "10.0.0.5:80"
			if err = rs.SendRequestHeader(&http.Request{Method: http.MethodConnect, Host: authority, URL: &url.URL{Host: authority}, Header: http.Header{}}); err == nil {
				_, err = rs.ReadResponse()
			}
		}
		qc.CloseWithError(0, "")
		if err == nil {
			t.Fatal("a handshake stalled past the server's timeout was still served")
		}
	}
}
