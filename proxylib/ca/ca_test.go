package ca

import (
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

func newTestCA(t *testing.T, now time.Time) *Authority {
	t.Helper()
	root, key, err := NewSelfSignedRoot("cluster.local", 10*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	rootCA := &Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}, Now: func() time.Time { return now }}
	inter, err := NewIntermediate(rootCA, "cluster.local", 5*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return inter
}

func csrFor(t *testing.T) []byte {
	t.Helper()
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(nil, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestSignedChainVerifiesWithSPIFFEIdentity(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a := newTestCA(t, now)
	id := identity.MustParse("spiffe://cluster.local/ns/ambient-demo/sa/sleep")
	leaf, err := a.SignCSR(csrFor(t), id, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chain := a.ChainFor(leaf)
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: a.RootPool(), Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("chain does not verify: %v", err)
	}
	got, err := identity.FromCertificate(leaf)
	if err != nil || got != id {
		t.Fatalf("identity = %v, %v; want %v", got, err, id)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Fatalf("leaf carries SANs besides the SPIFFE URI")
	}
	if ttl := leaf.NotAfter.Sub(now); ttl != 24*time.Hour {
		t.Fatalf("ttl = %v, want 24h", ttl)
	}
}

func TestTTLCappedByCA(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a := newTestCA(t, now)
	leaf, err := a.SignCSR(csrFor(t), identity.MustParse("spiffe://cluster.local/ns/a/sa/b"), 365*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.NotAfter.After(a.Cert.NotAfter) {
		t.Fatalf("leaf outlives its CA: %v > %v", leaf.NotAfter, a.Cert.NotAfter)
	}
}

func TestSignRejects(t *testing.T) {
	now := time.Now()
	a := newTestCA(t, now)
	good := csrFor(t)
	tampered := append([]byte{}, good...)
	tampered[len(tampered)-5] ^= 0xff
	tests := []struct {
		name string
		csr  []byte
		id   identity.Identity
		ttl  time.Duration
		want error
	}{
		{"garbage", []byte("not a csr"), identity.MustParse("spiffe://cluster.local/ns/a/sa/b"), time.Hour, ErrBadCSR},
		{"bad signature", tampered, identity.MustParse("spiffe://cluster.local/ns/a/sa/b"), time.Hour, ErrBadCSR},
		{"other trust domain", good, identity.MustParse("spiffe://evil.example/ns/a/sa/b"), time.Hour, ErrWrongTrustDom},
		{"zero ttl", good, identity.MustParse("spiffe://cluster.local/ns/a/sa/b"), 0, ErrTTLNotPositive},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := a.SignCSR(tt.csr, tt.id, tt.ttl); !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestLoadAuthorityRoundTrip(t *testing.T) {
	now := time.Now()
	a := newTestCA(t, now)
	keyPEM, err := EncodeKey(a.Key)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := LoadAuthority(EncodeCerts(append([]*x509.Certificate{a.Cert}, a.Chain...)...), keyPEM, EncodeCerts(a.Roots...))
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Cert.Equal(a.Cert) || len(loaded.Roots) != 1 {
		t.Fatalf("loaded authority differs")
	}
	other := newTestCA(t, now)
	otherKey, _ := EncodeKey(other.Key)
	if _, err := LoadAuthority(EncodeCerts(a.Cert), otherKey, EncodeCerts(a.Roots...)); err == nil {
		t.Fatal("mismatched key accepted")
	}
	if _, err := LoadAuthority(EncodeCerts(a.Cert), keyPEM, EncodeCerts(other.Roots...)); err == nil {
		t.Fatal("CA that does not chain to the given root accepted")
	}
}
