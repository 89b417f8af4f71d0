package h3

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"

	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func TestTunnelCarriesBytesIdentityAndHeaders(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	seen := make(chan accepted, 1)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(seen))
	d := newTestDialer(t, mesh.source(t, clientID), nil)

	req := dialReq(srv)
	req.Header = http.Header{"Forwarded": {`for="10.0.0.7"`}, "Baggage": {"k8s.namespace.name=client"}}
	s, err := d.Dial(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	go func() {
		s.Write(payload)
		s.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo mismatch: got %d bytes, want %d", len(got), len(payload))
	}
	s.Close()

	a := <-seen
	if a.req.Target != req.Target || a.req.Peer != clientID || a.req.Protocol != hbone.HTTP3 {
		t.Errorf("request = %+v; want target %v peer %v protocol HTTP3", a.req, req.Target, clientID)
	}
	if a.req.Header.Get("Forwarded") != `for="10.0.0.7"` || a.req.Header.Get("Baggage") != "k8s.namespace.name=client" {
		t.Errorf("headers not carried: %v", a.req.Header)
	}
	if !a.req.PeerAddr.IsValid() || !a.req.Local.IsValid() {
		t.Errorf("addresses missing: peer %v local %v", a.req.PeerAddr, a.req.Local)
	}
}

// TestIdentityVerification covers reliability cases 4-7 over real QUIC: the
// handshake fails and the handler never runs.
func TestIdentityVerification(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	otherCA := newTestMesh(t, trustDomain)
	tests := []struct {
		name       string
		clientCert func() *clientSetup
	}{
		{"client certificate from another CA", func() *clientSetup {
			return &clientSetup{client: otherCA.source(t, clientID)}
		}},
		{"client in another trust domain", func() *clientSetup {
			c := mesh.source(t)
			c.set(clientID, mesh.issue(t, "spiffe://evil.local/ns/client/sa/client"))
			return &clientSetup{client: c}
		}},
		{"client certificate with two URI SANs", func() *clientSetup {
			c := mesh.source(t)
			c.set(clientID, mesh.issue(t, clientID.String(), otherID.String()))
			return &clientSetup{client: c}
		}},
		{"client certificate with malformed SPIFFE path", func() *clientSetup {
			c := mesh.source(t)
			c.set(clientID, mesh.issue(t, "spiffe://cluster.local/client"))
			return &clientSetup{client: c}
		}},
		{"server identity not expected", func() *clientSetup {
			return &clientSetup{client: mesh.source(t, clientID), expected: []identity.Identity{otherID}}
		}},
		{"server certificate carries another SAN", func() *clientSetup {
			s := mesh.source(t)
			s.set(serverID, mesh.issue(t, otherID.String()))
			return &clientSetup{client: mesh.source(t, clientID), server: s}
		}},
		{"server certificate from another CA", func() *clientSetup {
			return &clientSetup{client: mesh.source(t, clientID), server: otherCA.source(t, serverID)}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setup := tt.clientCert()
			server := setup.server
			if server == nil {
				server = mesh.source(t, serverID)
			}
			var called atomic.Bool
			srv := startServer(t, server, func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
				called.Store(true)
				resp.Reject(http.StatusForbidden, "test")
			})
			d := newTestDialer(t, setup.client, nil)
			s, err := d.Dial(context.Background(), dialReq(srv, setup.expected...))
			if err == nil {
				s.Close()
				t.Fatal("dial succeeded; want handshake failure")
			}
			var rej *hbone.RejectedError
			if errors.As(err, &rej) || called.Load() {
				t.Fatalf("handshake passed and handler ran (err %v); want refusal during TLS", err)
			}
		})
	}
}

type clientSetup struct {
	client, server *certSource
	expected       []identity.Identity
}

func TestDialRequiresExpectedIdentity(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(nil))
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	req := dialReq(srv)
	req.Expected = nil
	if _, err := d.Dial(context.Background(), req); !errors.Is(err, hbone.ErrNoExpectedIdentity) {
		t.Fatalf("err = %v, want ErrNoExpectedIdentity", err)
	}
}

// TestMalformedRequests sends raw HTTP/3 requests a Dialer would never send
// (reliability cases 1 and 3): the handler is never called.
func TestMalformedRequests(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	var called atomic.Bool
	srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		called.Store(true)
		resp.Reject(http.StatusForbidden, "test")
	})
	cc := rawClient(t, mesh.source(t, clientID), srv)
	self := srv.Addr().String()
	tests := []struct {
		method, authority string
		want              int
	}{
		{http.MethodConnect, self, http.StatusBadRequest}, // recursion into this proxy
		{http.MethodConnect, "example.com:80", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.5:0", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.5:65536", http.StatusBadRequest},
		{http.MethodConnect, "fd00::1:80", http.StatusBadRequest},
		{http.MethodConnect, "10.0.0.5", http.StatusBadRequest},
		{http.MethodGet, "10.0.0.5:80", http.StatusMethodNotAllowed},
		{http.MethodPost, "10.0.0.5:80", http.StatusMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.authority, func(t *testing.T) {
			rs, err := cc.OpenRequestStream(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer rs.CancelRead(0)
			req := &http.Request{Method: tt.method, Host: tt.authority, URL: &url.URL{Host: tt.authority}, Header: http.Header{}}
			if tt.method != http.MethodConnect {
				req.URL = &url.URL{Scheme: "https", Host: tt.authority, Path: "/"}
			}
			if err := rs.SendRequestHeader(req); err != nil {
				t.Fatal(err)
			}
			resp, err := rs.ReadResponse()
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tt.want {
				t.Fatalf("status = %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
	if called.Load() {
		t.Fatal("handler called for a malformed request")
	}
}

// rawClient opens a verified HTTP/3 client connection without our Dialer.
func rawClient(t *testing.T, certs hbone.CertSource, srv *Server) *http3.ClientConn {
	t.Helper()
	tlsConf := hbone.ClientTLSConfig(certs, clientID, []identity.Identity{serverID}, "h3")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, srv.Addr().String(), tlsConf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qc.CloseWithError(0, "") })
	return (&http3.Transport{}).NewClientConn(qc)
}

func TestRejectStatusReachesDialer(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	// upstream refused (reliability case 9): the handler dials a closed port
	srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		if _, err := net.Dial("tcp", addr); err != nil {
			resp.Reject(http.StatusServiceUnavailable, "upstream: "+err.Error())
			return
		}
		resp.Reject(http.StatusInternalServerError, "closed port accepted")
	})
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	_, err := d.Dial(context.Background(), dialReq(srv))
	var rej *hbone.RejectedError
	if !errors.As(err, &rej) || rej.Status != http.StatusServiceUnavailable {
		t.Fatalf("err = %v, want RejectedError 503", err)
	}
	// the slot was released: the pool's connection carries no tunnel
	if n := d.activeStreams(); n != 0 {
		t.Fatalf("%d streams still counted after rejection", n)
	}
}

func TestHandlerAnsweringNothingGets500(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServer(t, mesh.source(t, serverID), func(context.Context, *hbone.Request, hbone.Responder) {})
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	_, err := d.Dial(context.Background(), dialReq(srv))
	var rej *hbone.RejectedError
	if !errors.As(err, &rej) || rej.Status != http.StatusInternalServerError {
		t.Fatalf("err = %v, want RejectedError 500", err)
	}
}

// TestHalfClose: each side ends its direction while the other keeps writing;
// every byte arrives and both sides see EOF (reliability case 10).
func TestHalfClose(t *testing.T) {
	for _, serverFirst := range []bool{false, true} {
		name := "client closes first"
		if serverFirst {
			name = "server closes first"
		}
		t.Run(name, func(t *testing.T) {
			mesh := newTestMesh(t, trustDomain)
			fromServer := bytes.Repeat([]byte("s"), 300<<10)
			fromClient := bytes.Repeat([]byte("c"), 300<<10)
			serverGot := make(chan []byte, 1)
			srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
				s, err := resp.Accept()
				if err != nil {
					return
				}
				defer s.Close()
				if serverFirst {
					s.Write(fromServer)
					s.CloseWrite()
					b, _ := io.ReadAll(s)
					serverGot <- b
					return
				}
				b, _ := io.ReadAll(s) // client half-closed: we still write afterwards
				s.Write(fromServer)
				s.CloseWrite()
				serverGot <- b
			})
			d := newTestDialer(t, mesh.source(t, clientID), nil)
			s, err := d.Dial(context.Background(), dialReq(srv))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			var clientGot []byte
			if serverFirst {
				clientGot, err = io.ReadAll(s)
				s.Write(fromClient) // still allowed after the server's FIN
				s.CloseWrite()
			} else {
				s.Write(fromClient)
				s.CloseWrite()
				clientGot, err = io.ReadAll(s)
			}
			if err != nil {
				t.Fatalf("client read: %v", err)
			}
			if !bytes.Equal(clientGot, fromServer) {
				t.Errorf("client got %d bytes, want %d", len(clientGot), len(fromServer))
			}
			if got := <-serverGot; !bytes.Equal(got, fromClient) {
				t.Errorf("server got %d bytes, want %d", len(got), len(fromClient))
			}
		})
	}
}

// TestResetPropagates: closing a tunnel before it ended cleanly is seen by
// the other side as an error, never as EOF or a hang.
func TestResetPropagates(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	t.Run("server resets", func(t *testing.T) {
		srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err != nil {
				return
			}
			s.Write([]byte("x"))
			// wait until the client saw the tunnel, then reset it (as on an
			// upstream RST): no CloseWrite
			io.ReadFull(s, make([]byte, 1))
			s.Close()
		})
		d := newTestDialer(t, mesh.source(t, clientID), nil)
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		s.Write([]byte("y"))
		_, err = io.ReadAll(s)
		if !isReset(err) || isTimeout(err) {
			t.Fatalf("client read err = %v, want a stream reset", err)
		}
	})
	t.Run("client resets", func(t *testing.T) {
		readErr := make(chan error, 1)
		srv := startServer(t, mesh.source(t, serverID), func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
			s, err := resp.Accept()
			if err != nil {
				return
			}
			defer s.Close()
			s.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = io.ReadAll(s)
			readErr <- err
		})
		d := newTestDialer(t, mesh.source(t, clientID), nil)
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err != nil {
			t.Fatal(err)
		}
		s.Write([]byte("x"))
		s.Close()
		if err := <-readErr; !isReset(err) || isTimeout(err) {
			t.Fatalf("server read err = %v, want a stream reset", err)
		}
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestPoolSharesConnectionsUpToStreamCap(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(nil))
	d := newTestDialer(t, mesh.source(t, clientID), func(c *DialerConfig) { c.MaxStreamsPerConn = 2 })
	var streams []hbone.Stream
	for range 5 {
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	if n := d.connCount(); n != 3 {
		t.Errorf("5 tunnels with cap 2 use %d connections, want 3", n)
	}
	for _, s := range streams {
		s.Close()
	}
	// a different expected set is a different pool
	if _, err := d.Dial(context.Background(), dialReq(srv, serverID, otherID)); err != nil {
		t.Fatal(err)
	}
	if n := d.poolCount(); n != 2 {
		t.Errorf("pools = %d, want 2", n)
	}
}

func TestPoolEvictsIdleConnections(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(nil))
	d := newTestDialer(t, mesh.source(t, clientID), func(c *DialerConfig) { c.PoolIdleTimeout = 50 * time.Millisecond })
	s, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
	waitFor(t, "idle connection evicted", func() bool { return d.connCount() == 0 })
}

// TestDrain covers reliability case 11: GOAWAY, in-flight tunnels finish
// within the grace period, new tunnels are refused, then a forced close.
func TestDrain(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	seen := make(chan accepted, 2)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(seen))
	d := newTestDialer(t, mesh.source(t, clientID), func(c *DialerConfig) { c.HandshakeTimeout = 300 * time.Millisecond })
	graceful, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	<-seen

	shutdownErr := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { shutdownErr <- srv.Shutdown(ctx) }()

	// once the server drains, new tunnels fail (GOAWAY or rejected stream on
	// the old connection, no QUIC answer on a new one)
	waitFor(t, "new tunnels refused", func() bool {
		s, err := d.Dial(context.Background(), dialReq(srv))
		if err == nil {
			s.Close()
		}
		return err != nil
	})
	// the in-flight tunnel still works during the grace period
	echo(t, graceful, "still here")
	select {
	case err := <-shutdownErr:
		t.Fatalf("shutdown returned %v while a tunnel was open", err)
	default:
	}
	graceful.CloseWrite()
	io.ReadAll(graceful)
	graceful.Close()
	if err := <-shutdownErr; err != nil {
		t.Fatalf("graceful shutdown: %v", err)
	}
}

func TestDrainForcesCloseAfterGrace(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	seen := make(chan accepted, 1)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(seen))
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	s, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	<-seen
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("shutdown = %v, want deadline exceeded (forced close)", err)
	}
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(s); !isReset(err) || isTimeout(err) {
		t.Fatalf("tunnel read after forced close: %v, want connection error", err)
	}
}

func TestDialerCloseRefusesNewTunnels(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	srv := startServer(t, mesh.source(t, serverID), echoHandler(nil))
	d := newTestDialer(t, mesh.source(t, clientID), nil)
	s, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if _, err := d.Dial(context.Background(), dialReq(srv)); !errors.Is(err, ErrDialerClosed) {
		t.Fatalf("dial after Close: %v, want ErrDialerClosed", err)
	}
	echo(t, s, "open tunnels finish") // existing tunnel unaffected
	s.Close()
	waitFor(t, "connection closed once its last tunnel ended", func() bool { return d.liveConns() == 0 })
}

func echo(t *testing.T, s hbone.Stream, msg string) {
	t.Helper()
	if _, err := s.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo = %q, %v; want %q", buf, err, msg)
	}
	s.SetReadDeadline(time.Time{})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 500 {
		if cond() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for: %s", what)
}

// TestCallerProvidedSockets: both ends can run on sockets the caller opened
// (as ztunnel does inside a pod's network namespace).
func TestCallerProvidedSockets(t *testing.T) {
	mesh := newTestMesh(t, trustDomain)
	seen := make(chan accepted, 1)
	srv, err := NewServer(ServerConfig{Certs: mesh.source(t, serverID), Identity: serverID, Handler: echoHandler(seen), Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	srvSock, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.ListenOn(srvSock); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })

	var clientSock *net.UDPConn
	d := newTestDialer(t, mesh.source(t, clientID), func(c *DialerConfig) {
		c.ListenPacket = func() (*net.UDPConn, error) {
			var err error
			clientSock, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			return clientSock, err
		}
	})
	s, err := d.Dial(context.Background(), dialReq(srv))
	if err != nil {
		t.Fatal(err)
	}
	echo(t, s, "on our sockets")
	s.Close()
	a := <-seen
	if a.req.PeerAddr != clientSock.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Errorf("server saw peer %v, want the caller's socket %v", a.req.PeerAddr, clientSock.LocalAddr())
	}
	if a.req.Local != srvSock.LocalAddr().(*net.UDPAddr).AddrPort() {
		t.Errorf("server local %v, want %v", a.req.Local, srvSock.LocalAddr())
	}
}
