package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// FuzzSignCSR feeds arbitrary CSRs (DER or PEM), identities and lifetimes
// to the CA. It must refuse with one of its errors, or issue a leaf that
// binds exactly the CSR's key to exactly the requested SPIFFE identity:
// nothing the CSR asks for (subject, SANs, CA rights, extensions) may
// reach the certificate, and the lifetime never exceeds the request.
func FuzzSignCSR(f *testing.F) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a := newTestCA(&testing.T{}, now)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	plain, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, ec)
	greedy, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:     pkix.Name{CommonName: "root", Organization: []string{"system:masters"}},
		DNSNames:    []string{"kubernetes.default"},
		IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)},
		URIs:        []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/kube-system/sa/admin"}},
		ExtraExtensions: []pkix.Extension{{Id: []int{2, 5, 29, 19}, Critical: true,
			Value: []byte{0x30, 0x03, 0x01, 0x01, 0xff}}}, // basicConstraints CA:TRUE
	}, rk)
	for _, csr := range [][]byte{plain, greedy, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: plain}), plain[:len(plain)/2], nil} {
		f.Add(csr, "cluster.local", "default", "sa", int64(3600))
	}
	f.Add(plain, "other.domain", "default", "sa", int64(3600))
	f.Add(plain, "cluster.local", "ns", "sa", int64(0))
	f.Add(plain, "cluster.local", "ns", "sa", int64(-5))
	f.Fuzz(func(t *testing.T, csrBytes []byte, td, ns, sa string, ttlSeconds int64) {
		id := identity.Identity{TrustDomain: td, Namespace: ns, ServiceAccount: sa}
		ttl := time.Duration(ttlSeconds) * time.Second
		parsed, perr := identity.Parse(id.String())
		valid := perr == nil && parsed == id
		cert, err := a.SignCSR(csrBytes, id, ttl)
		if err != nil {
			if !errors.Is(err, ErrBadCSR) && !errors.Is(err, ErrWrongTrustDom) && !errors.Is(err, ErrTTLNotPositive) && !errors.Is(err, ErrBadIdentity) {
				t.Fatalf("refused with an unexpected error: %v", err)
			}
			if errors.Is(err, ErrBadIdentity) && valid {
				t.Fatalf("valid identity %q refused: %v", id, err)
			}
			return
		}
		if ttl <= 0 {
			t.Fatalf("issued with lifetime %s", ttl)
		}
		if !valid {
			t.Fatalf("issued for an invalid identity %+v (%s): %v", id, id, perr)
		}
		der := csrBytes
		if b, _ := pem.Decode(csrBytes); b != nil {
			der = b.Bytes
		}
		csr, perr := x509.ParseCertificateRequest(der)
		if perr != nil || csr.CheckSignature() != nil {
			t.Fatalf("issued for a CSR that does not parse or verify: %v", perr)
		}
		if !publicKeysEqual(cert.PublicKey, csr.PublicKey) {
			t.Fatal("certificate key differs from the CSR's")
		}
		if len(cert.URIs) != 1 || cert.URIs[0].String() != id.String() {
			t.Fatalf("URIs %v, want exactly %s", cert.URIs, id)
		}
		if len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.EmailAddresses) > 0 || cert.Subject.String() != "" {
			t.Fatalf("CSR content reached the certificate: subject %q dns %v ip %v email %v", cert.Subject, cert.DNSNames, cert.IPAddresses, cert.EmailAddresses)
		}
		if cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign != 0 {
			t.Fatal("workload certificate may sign certificates")
		}
		if cert.NotAfter.After(now.Add(ttl)) || cert.NotAfter.After(a.Cert.NotAfter) {
			t.Fatalf("valid until %s, beyond %s or the CA's %s", cert.NotAfter, now.Add(ttl), a.Cert.NotAfter)
		}
		inter := x509.NewCertPool()
		for _, c := range a.ChainFor(cert)[1:] {
			inter.AddCert(c)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: a.RootPool(), Intermediates: inter, CurrentTime: now,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("issued certificate does not verify: %v", err)
		}
	})
}
