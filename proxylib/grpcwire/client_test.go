package grpcwire_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambientmesh/ambient/proxylib/grpcwire"
)

// echoServer is a real grpc-go server: Unary echoes (or fails as the
// request asks), Bidi echoes every message until the client half-closes.
type echoServer struct {
	lis *trackingListener

	mu          sync.Mutex
	sawDeadline bool
	sawAuth     string
}

const (
	unaryMethod = "/grpcwire.test.Echo/Unary"
	bidiMethod  = "/grpcwire.test.Echo/Bidi"
)

// failMessage has characters grpc-message must percent-encode.
const failMessage = "no such thing: 100% gone\nüñí"

func (e *echoServer) unary(ctx context.Context, in *wrapperspb.BytesValue) (*wrapperspb.BytesValue, error) {
	_, hasDeadline := ctx.Deadline()
	md, _ := metadata.FromIncomingContext(ctx)
	e.mu.Lock()
	e.sawDeadline = hasDeadline
	e.sawAuth = strings.Join(md.Get("authorization"), ",")
	e.mu.Unlock()
	switch string(in.Value) {
	case "fail":
		return nil, status.Error(codes.NotFound, failMessage)
	case "sleep":
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return in, nil
}

func (e *echoServer) bidi(stream grpc.ServerStream) error {
	for {
		in := new(wrapperspb.BytesValue)
		if err := stream.RecvMsg(in); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		switch string(in.Value) {
		case "abort": // trailers after messages
			return status.Error(codes.Aborted, "aborted after "+failMessage)
		case "kill": // the server's process goes away mid-stream
			e.lis.closeAll()
			<-stream.Context().Done()
			return nil
		}
		if err := stream.SendMsg(in); err != nil {
			return err
		}
	}
}

func (e *echoServer) desc() *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: "grpcwire.test.Echo",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Unary", Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			return e.unary(ctx, in)
		}}},
		Streams: []grpc.StreamDesc{{StreamName: "Bidi", ServerStreams: true, ClientStreams: true,
			Handler: func(_ any, s grpc.ServerStream) error { return e.bidi(s) }}},
	}
}

// trackingListener remembers accepted connections so a test can cut them.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *trackingListener) closeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		_ = c.Close()
	}
}

type pki struct {
	roots *x509.CertPool
	root  *x509.Certificate
	key   *ecdsa.PrivateKey
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &pki{roots: pool, root: root, key: key}
}

func (p *pki) serverCert(t *testing.T, dnsName string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), DNSNames: []string{dnsName},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.root, key.Public(), p.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// start serves echoServer over TLS as dnsName (or plaintext h2c when
// dnsName is empty) and returns it and its address.
func start(t *testing.T, p *pki, dnsName string) (*echoServer, string) {
	t.Helper()
	var opts []grpc.ServerOption
	if dnsName != "" {
		opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{p.serverCert(t, dnsName)}, MinVersion: tls.VersionTLS13})))
	}
	gs := grpc.NewServer(opts...)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoServer{lis: &trackingListener{Listener: l}}
	gs.RegisterService(e.desc(), nil)
	go func() { _ = gs.Serve(e.lis) }()
	t.Cleanup(gs.Stop)
	return e, l.Addr().String()
}

func dial(t *testing.T, cfg grpcwire.Config) *grpcwire.Conn {
	t.Helper()
	c, err := grpcwire.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// echo starts a TLS echo server and a client that verifies it.
func echo(t *testing.T) (*echoServer, *grpcwire.Conn) {
	t.Helper()
	p := newPKI(t)
	srv, addr := start(t, p, "server.test")
	return srv, dial(t, grpcwire.Config{Address: addr, TLS: tlsConfig(p, "server.test"), Metadata: bearer})
}

// openBidi opens a Bidi stream and exchanges one message on it.
func openBidi(t *testing.T, ctx context.Context, c *grpcwire.Conn) *grpcwire.Stream {
	t.Helper()
	s, err := c.NewStream(ctx, bidiMethod)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	if err := s.Send(wrapperspb.Bytes([]byte("one"))); err != nil {
		t.Fatal(err)
	}
	if err := s.Recv(new(wrapperspb.BytesValue)); err != nil {
		t.Fatal(err)
	}
	return s
}

func tlsConfig(p *pki, serverName string) *tls.Config {
	return &tls.Config{RootCAs: p.roots, ServerName: serverName, MinVersion: tls.VersionTLS13}
}

func bearer(context.Context) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer tok"}, nil
}

func TestUnary(t *testing.T) {
	srv, c := echo(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	out := new(wrapperspb.BytesValue)
	if err := c.Invoke(ctx, unaryMethod, wrapperspb.Bytes([]byte("hello")), out); err != nil {
		t.Fatal(err)
	}
	if string(out.Value) != "hello" {
		t.Fatalf("got %q", out.Value)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !srv.sawDeadline {
		t.Error("server saw no deadline: grpc-timeout missing")
	}
	if srv.sawAuth != "Bearer tok" {
		t.Errorf("server saw authorization %q", srv.sawAuth)
	}
}

// A unary error from grpc-go is a trailers-only response; the message
// arrives percent-decoded.
func TestUnaryErrorIsTrailersOnly(t *testing.T) {
	_, c := echo(t)
	err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes([]byte("fail")), new(wrapperspb.BytesValue))
	var st *grpcwire.Status
	if !errors.As(err, &st) || st.Code != grpcwire.NotFound || st.Message != failMessage {
		t.Fatalf("got %#v, want NotFound %q", err, failMessage)
	}
	// An unknown method: grpc-go answers Unimplemented, trailers-only too.
	err = c.Invoke(context.Background(), "/grpcwire.test.Echo/Nope", wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.Unimplemented {
		t.Fatalf("unknown method: %v", err)
	}
}

func TestDeadlineExceeded(t *testing.T) {
	_, c := echo(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := c.Invoke(ctx, unaryMethod, wrapperspb.Bytes([]byte("sleep")), new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.DeadlineExceeded {
		t.Fatalf("got %v, want DeadlineExceeded", err)
	}
}

func TestBidiStreaming(t *testing.T) {
	_, c := echo(t)
	s, err := c.NewStream(context.Background(), bidiMethod)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Interleaved: each answer arrives before the next request is sent.
	for i := range 20 {
		want := bytes.Repeat([]byte{byte('a' + i)}, 1+i*1000)
		if err := s.Send(wrapperspb.Bytes(want)); err != nil {
			t.Fatal(err)
		}
		got := new(wrapperspb.BytesValue)
		if err := s.Recv(got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Value, want) {
			t.Fatalf("message %d: got %d bytes", i, len(got.Value))
		}
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if err := s.Recv(new(wrapperspb.BytesValue)); err != io.EOF {
		t.Fatalf("after CloseSend: %v, want io.EOF", err)
	}
}

// An error status in trailers that follow messages.
func TestStreamStatusInTrailers(t *testing.T) {
	_, c := echo(t)
	s := openBidi(t, context.Background(), c)
	if err := s.Send(wrapperspb.Bytes([]byte("abort"))); err != nil {
		t.Fatal(err)
	}
	err := s.Recv(new(wrapperspb.BytesValue))
	var st *grpcwire.Status
	if !errors.As(err, &st) || st.Code != grpcwire.Aborted || st.Message != "aborted after "+failMessage {
		t.Fatalf("got %#v", err)
	}
}

func TestServerGoesAwayMidStream(t *testing.T) {
	_, c := echo(t)
	s := openBidi(t, context.Background(), c)
	if err := s.Send(wrapperspb.Bytes([]byte("kill"))); err != nil {
		t.Fatal(err)
	}
	err := s.Recv(new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.Unavailable {
		t.Fatalf("got %v, want Unavailable", err)
	}
	// The next call dials a new connection.
	if err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes([]byte("again")), new(wrapperspb.BytesValue)); err != nil {
		t.Fatalf("after reconnect: %v", err)
	}
}

func TestLargeMessages(t *testing.T) {
	p := newPKI(t)
	_, addr := start(t, p, "server.test")
	c := dial(t, grpcwire.Config{Address: addr, TLS: tlsConfig(p, "server.test")})
	big := bytes.Repeat([]byte("0123456789abcdef"), (3<<20)/16) // 3 MiB, over many frames and windows
	out := new(wrapperspb.BytesValue)
	if err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes(big), out); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Value, big) {
		t.Fatalf("got %d bytes back", len(out.Value))
	}
	// Over the receive limit: refused, not buffered.
	small := dial(t, grpcwire.Config{Address: addr, TLS: tlsConfig(p, "server.test"), MaxRecvMsgSize: 1 << 20})
	err := small.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes(big), out)
	if grpcwire.CodeOf(err) != grpcwire.ResourceExhausted {
		t.Fatalf("over the limit: %v, want ResourceExhausted", err)
	}
}

// The client verifies the server as its TLS config says: a server with
// another identity (or from another root) is refused before any request.
func TestWrongServerIdentityRefused(t *testing.T) {
	p := newPKI(t)
	srv, addr := start(t, p, "impostor.test")
	c := dial(t, grpcwire.Config{Address: addr, TLS: tlsConfig(p, "server.test"), Metadata: bearer})
	err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes([]byte("hello")), new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.Unavailable || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("got %v, want Unavailable for the certificate", err)
	}
	other := newPKI(t)
	c = dial(t, grpcwire.Config{Address: addr, TLS: tlsConfig(other, "impostor.test")})
	if err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes([]byte("hello")), new(wrapperspb.BytesValue)); grpcwire.CodeOf(err) != grpcwire.Unavailable {
		t.Fatalf("other root: got %v", err)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.sawAuth != "" {
		t.Fatalf("the token reached an unverified server: %q", srv.sawAuth)
	}
}

func TestPlaintextMustBeAskedFor(t *testing.T) {
	if _, err := grpcwire.New(grpcwire.Config{Address: "127.0.0.1:1"}); err == nil {
		t.Fatal("a Conn without TLS nor Plaintext was accepted")
	}
	_, addr := start(t, nil, "")
	c := dial(t, grpcwire.Config{Address: addr, Plaintext: true})
	out := new(wrapperspb.BytesValue)
	if err := c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes([]byte("h2c")), out); err != nil || string(out.Value) != "h2c" {
		t.Fatalf("h2c: %v %q", err, out.Value)
	}
}

// A server that is not gRPC at all (an HTTP/1 listener) fails the call
// with Unavailable, and the connect timeout bounds a server that never
// answers the handshake.
func TestConnectTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // never answers the TLS handshake
		}
	}()
	p := newPKI(t)
	c := dial(t, grpcwire.Config{Address: l.Addr().String(), TLS: tlsConfig(p, "server.test"), ConnectTimeout: 200 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = c.Invoke(ctx, unaryMethod, wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.Unavailable || ctx.Err() != nil {
		t.Fatalf("got %v (ctx %v), want Unavailable from the connect timeout", err, ctx.Err())
	}
}

// The end of the stream's context unblocks a Recv waiting for the server
// (and the server sees the stream cancelled), even while the client sends
// nothing.
func TestCancelUnblocksRecv(t *testing.T) {
	_, c := echo(t)
	ctx, cancel := context.WithCancel(context.Background())
	s := openBidi(t, ctx, c)
	got := make(chan error, 1)
	go func() { got <- s.Recv(new(wrapperspb.BytesValue)) }()
	time.Sleep(50 * time.Millisecond) // let Recv block; the assertion does not depend on it
	cancel()
	select {
	case err := <-got:
		if grpcwire.CodeOf(err) != grpcwire.Canceled {
			t.Fatalf("got %v, want Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Recv still blocked after the context ended")
	}
}

// An HTTP/2 server that is not gRPC: its HTTP status is mapped, a 200 of
// another content type is refused; a TLS server that negotiates no h2 is
// refused before any request.
func TestNonGRPCAnswers(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/busy/Method":
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
		case "/auth/Method":
			w.WriteHeader(http.StatusUnauthorized)
		default:
			w.Header().Set("Content-Type", "text/html")
			_, _ = w.Write([]byte("<html>"))
		}
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	c := dial(t, grpcwire.Config{Address: srv.Listener.Addr().String(), TLS: &tls.Config{RootCAs: roots, ServerName: "example.com"}})
	for method, want := range map[string]grpcwire.Code{
		"/busy/Method": grpcwire.Unavailable, "/auth/Method": grpcwire.Unauthenticated, "/html/Method": grpcwire.Unknown,
	} {
		err := c.Invoke(context.Background(), method, wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
		if grpcwire.CodeOf(err) != want {
			t.Errorf("%s: got %v, want %v", method, err, want)
		}
	}

	// A TLS server that negotiates no protocol at all (no ALPN).
	p := newPKI(t)
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{p.serverCert(t, "server.test")}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _ = conn.(*tls.Conn).Handshake(); _, _ = io.Copy(io.Discard, conn); conn.Close() }()
		}
	}()
	c = dial(t, grpcwire.Config{Address: l.Addr().String(), TLS: tlsConfig(p, "server.test")})
	err = c.Invoke(context.Background(), unaryMethod, wrapperspb.Bytes(nil), new(wrapperspb.BytesValue))
	if grpcwire.CodeOf(err) != grpcwire.Unavailable || !strings.Contains(err.Error(), "ALPN") {
		t.Fatalf("HTTP/1 server: got %v, want Unavailable for ALPN", err)
	}
}
