package caclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb"
	"github.com/ambientmesh/ambient/proxylib/caclient/capb/caservice"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// misbehavingCA signs with a real Authority but lets a test tamper with
// what it returns.
type misbehavingCA struct {
	caservice.UnimplementedIstioCertificateServiceServer
	auth   *ca.Authority
	tamper func(req *capb.IstioCertificateRequest, id identity.Identity) (pubFromCSR bool, signAs identity.Identity, garbage string)
	gotTok string
}

func (m *misbehavingCA) CreateCertificate(ctx context.Context, req *capb.IstioCertificateRequest) (*capb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) == 1 {
		m.gotTok = v[0]
	}
	id := identity.MustParse(req.GetMetadata().GetFields()[ImpersonatedIdentityKey].GetStringValue())
	pubFromCSR, signAs, garbage := m.tamper(req, id)
	if garbage != "" {
		return &capb.IstioCertificateResponse{CertChain: []string{garbage}}, nil
	}
	var cert *x509.Certificate
	var err error
	if pubFromCSR {
		cert, err = m.auth.SignCSR([]byte(req.Csr), signAs, time.Hour)
	} else {
		other, _ := ca.NewKey()
		cert, err = m.auth.SignPublicKey(other.Public(), signAs, time.Hour)
	}
	if err != nil {
		return nil, err
	}
	return &capb.IstioCertificateResponse{CertChain: []string{string(ca.EncodeCerts(m.auth.ChainFor(cert)...))}}, nil
}

func TestSignChecksWhatTheCAReturns(t *testing.T) {
	rootCert, rootKey, err := ca.NewSelfSignedRoot("cluster.local", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	auth := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}}
	serverCert, err := issueTestServerCert(auth)
	if err != nil {
		t.Fatal(err)
	}
	want := identity.MustParse("spiffe://cluster.local/ns/app/sa/web")
	tests := []struct {
		name    string
		tamper  func(*capb.IstioCertificateRequest, identity.Identity) (bool, identity.Identity, string)
		wantErr string
	}{
		{"honest CA", func(_ *capb.IstioCertificateRequest, id identity.Identity) (bool, identity.Identity, string) {
			return true, id, ""
		}, ""},
		{"other identity", func(*capb.IstioCertificateRequest, identity.Identity) (bool, identity.Identity, string) {
			return true, identity.MustParse("spiffe://cluster.local/ns/app/sa/other"), ""
		}, "asked for"},
		{"other key", func(_ *capb.IstioCertificateRequest, id identity.Identity) (bool, identity.Identity, string) {
			return false, id, ""
		}, "another key"},
		{"not PEM", func(*capb.IstioCertificateRequest, identity.Identity) (bool, identity.Identity, string) {
			return false, identity.Identity{}, "garbage"
		}, "no certificate"},
		{"oversized", func(*capb.IstioCertificateRequest, identity.Identity) (bool, identity.Identity, string) {
			return false, identity.Identity{}, strings.Repeat("A", maxChainPEM+1)
		}, "too large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := &misbehavingCA{auth: auth, tamper: tt.tamper}
			gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS13})))
			caservice.RegisterIstioCertificateServiceServer(gs, srv)
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go func() { _ = gs.Serve(lis) }()
			defer gs.Stop()
			c, err := New(Config{Address: lis.Addr().String(), TLS: &tls.Config{RootCAs: auth.RootPool(), ServerName: "ca.test", MinVersion: tls.VersionTLS13},
				Token: func() (string, error) { return "tok", nil }})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			chain, err := c.Sign(context.Background(), testCSR(t), want, time.Hour)
			if tt.wantErr == "" {
				if err != nil || len(chain) == 0 {
					t.Fatalf("Sign: %v", err)
				}
				if srv.gotTok != "Bearer tok" {
					t.Fatalf("token sent as %q", srv.gotTok)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func testCSR(t *testing.T) []byte {
	key, _ := ca.NewKey()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// issueTestServerCert makes a DNS server certificate "ca.test" from auth.
func issueTestServerCert(auth *ca.Authority) (tls.Certificate, error) {
	key, err := ca.NewKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big1(), DNSNames: []string{"ca.test"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, auth.Cert, key.Public(), auth.Key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func big1() *big.Int { return big.NewInt(7) }
