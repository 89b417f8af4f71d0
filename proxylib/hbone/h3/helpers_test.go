package h3

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/hbone"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

const trustDomain = "cluster.local"

var (
	clientID = identity.MustParse("spiffe://cluster.local/ns/client/sa/client")
	serverID = identity.MustParse("spiffe://cluster.local/ns/server/sa/server")
	otherID  = identity.MustParse("spiffe://cluster.local/ns/other/sa/other")
)

// testMesh is a real mesh CA issuing real ECDSA workload certificates.
type testMesh struct {
	auth *ca.Authority
	td   string
}

func newTestMesh(t testing.TB, td string) *testMesh {
	t.Helper()
	root, key, err := ca.NewSelfSignedRoot(td, 24*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &testMesh{auth: &ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}}, td: td}
}

// issue signs a certificate with exactly the given URI SANs (possibly
// malformed ones), bypassing the CA's own checks so tests can forge.
func (m *testMesh) issue(t testing.TB, sans ...string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var uris []*url.URL
	for _, s := range sans {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		uris = append(uris, u)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         uris,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.auth.Cert, key.Public(), m.auth.Key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// certSource serves fixed certificates per identity; overrides let a test
// present a certificate that does not match the identity asked for.
type certSource struct {
	mesh  *testMesh // roots and trust domain used to verify peers
	mu    sync.Mutex
	certs map[identity.Identity]*tls.Certificate
}

func (m *testMesh) source(t testing.TB, ids ...identity.Identity) *certSource {
	s := &certSource{mesh: m, certs: map[identity.Identity]*tls.Certificate{}}
	for _, id := range ids {
		s.certs[id] = m.issue(t, id.String())
	}
	return s
}

func (s *certSource) set(id identity.Identity, c *tls.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.certs[id] = c
}

func (s *certSource) Certificate(_ context.Context, id identity.Identity) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.certs[id]; c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("no certificate for %s", id)
}
func (s *certSource) Roots() *x509.CertPool { return s.mesh.auth.RootPool() }
func (s *certSource) TrustDomain() string   { return s.mesh.td }

// accepted is what a test handler saw.
type accepted struct {
	req    *hbone.Request
	stream hbone.Stream
}

// startServer runs an h3 server on 127.0.0.1 with handler; it is shut down
// (forcibly) when the test ends.
func startServer(t testing.TB, certs hbone.CertSource, handler hbone.HandlerFunc) *Server {
	t.Helper()
	return startServerWith(t, certs, handler, nil)
}

func startServerWith(t testing.TB, certs hbone.CertSource, handler hbone.HandlerFunc, mod func(*ServerConfig)) *Server {
	t.Helper()
	cfg := ServerConfig{Certs: certs, Identity: serverID, Handler: handler, Log: testLog(t)}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return srv
}

// echoHandler accepts every tunnel, reports it, and echoes until EOF, then
// half-closes back.
func echoHandler(seen chan<- accepted) hbone.HandlerFunc {
	return func(ctx context.Context, req *hbone.Request, resp hbone.Responder) {
		s, err := resp.Accept()
		if err != nil {
			return
		}
		if seen != nil {
			seen <- accepted{req: req, stream: s}
		}
		_, _ = io.Copy(s, s)
		_ = s.CloseWrite()
		// wait for the client to finish before closing, so Close is clean
		_, _ = io.Copy(io.Discard, s)
		s.Close()
	}
}

func newTestDialer(t testing.TB, certs hbone.CertSource, mod func(*DialerConfig)) *Dialer {
	t.Helper()
	cfg := DialerConfig{Certs: certs, Log: testLog(t), HandshakeTimeout: 2 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	d, err := NewDialer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func dialReq(srv *Server, expected ...identity.Identity) hbone.DialRequest {
	if expected == nil {
		expected = []identity.Identity{serverID}
	}
	return hbone.DialRequest{
		Source:    clientID,
		Expected:  expected,
		ProxyAddr: srv.Addr().(*net.UDPAddr).AddrPort(),
		Target:    netip.MustParseAddrPort("10.1.2.3:8080"),
	}
}

func isReset(err error) bool {
	return err != nil && !errors.Is(err, io.EOF)
}

func testLog(t testing.TB) logr.Logger {
	if tt, ok := t.(*testing.T); ok {
		return testr.New(tt)
	}
	return logr.Discard()
}
