// Package ca issues the mesh's X.509 certificates: a self-signed root, an
// intermediate that signs workloads, and short-lived workload certificates
// whose only identity is a SPIFFE URI SAN. It is used by the operator (mesh
// CA), the control plane's certificate service, and tests.
package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// clockSkew backdates NotBefore so peers with slightly slow clocks accept new certificates.
const clockSkew = 2 * time.Minute

// Authority signs certificates with Cert/Key. Chain is the certificates above
// Cert up to (and excluding) the root; Roots is the trust bundle.
type Authority struct {
	Cert  *x509.Certificate
	Key   crypto.Signer
	Chain []*x509.Certificate
	Roots []*x509.Certificate
	Now   func() time.Time // injectable clock; time.Now when nil
}

func (a *Authority) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

// NewKey generates the ECDSA P-256 key used for every mesh certificate.
func NewKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// NewSelfSignedRoot creates a root CA for trustDomain valid for ttl.
func NewSelfSignedRoot(trustDomain string, ttl time.Duration, now time.Time) (*x509.Certificate, crypto.Signer, error) {
	key, err := NewKey()
	if err != nil {
		return nil, nil, err
	}
	tmpl, err := caTemplate("Ambient Mesh Root CA", trustDomain, now, ttl, 1)
	if err != nil {
		return nil, nil, err
	}
	cert, err := create(tmpl, tmpl, key.Public(), key)
	return cert, key, err
}

// NewIntermediate creates a CA signed by parent, with path length 0 so it can
// sign only leaf certificates.
func NewIntermediate(parent *Authority, trustDomain string, ttl time.Duration) (*Authority, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	now := parent.now()
	notAfter := minTime(now.Add(ttl), parent.Cert.NotAfter)
	tmpl, err := caTemplate("Ambient Mesh Intermediate CA", trustDomain, now, notAfter.Sub(now), 0)
	if err != nil {
		return nil, err
	}
	cert, err := create(tmpl, parent.Cert, key.Public(), parent.Key)
	if err != nil {
		return nil, err
	}
	chain := append([]*x509.Certificate{}, parent.Chain...)
	if !isSelfSigned(parent.Cert) {
		chain = append([]*x509.Certificate{parent.Cert}, chain...)
	}
	return &Authority{Cert: cert, Key: key, Chain: chain, Roots: parent.Roots, Now: parent.Now}, nil
}

// Errors from SignCSR.
var (
	ErrBadCSR         = errors.New("invalid certificate signing request")
	ErrWrongTrustDom  = errors.New("identity is not in the CA's trust domain")
	ErrTTLNotPositive = errors.New("certificate lifetime must be positive")
	// ErrBadIdentity: the identity does not format as a valid SPIFFE ID
	// (found by FuzzSignCSR: a name with bytes Kubernetes never allows was
	// signed as is).
	ErrBadIdentity = errors.New("identity is not a valid SPIFFE ID")
)

// SignCSR issues a workload certificate for id from a PEM or DER CSR. The
// CSR's own subject and SANs are ignored: the identity comes only from the
// caller's authorization decision. The lifetime never exceeds the CA's own.
func (a *Authority) SignCSR(csrBytes []byte, id identity.Identity, ttl time.Duration) (*x509.Certificate, error) {
	if ttl <= 0 {
		return nil, ErrTTLNotPositive
	}
	if block, _ := pem.Decode(csrBytes); block != nil {
		csrBytes = block.Bytes
	}
	csr, err := x509.ParseCertificateRequest(csrBytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadCSR, err)
	}
	return a.SignPublicKey(csr.PublicKey, id, ttl)
}

// SignPublicKey issues a workload certificate binding pub to id.
func (a *Authority) SignPublicKey(pub crypto.PublicKey, id identity.Identity, ttl time.Duration) (*x509.Certificate, error) {
	if p, err := identity.Parse(id.String()); err != nil || p != id {
		return nil, fmt.Errorf("%w: %q", ErrBadIdentity, id.String())
	}
	if td := TrustDomainOf(a.Cert); td != "" && td != id.TrustDomain {
		return nil, fmt.Errorf("%w: %s not in %s", ErrWrongTrustDom, id, td)
	}
	uri, err := url.Parse(id.String())
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              minTime(now.Add(ttl), a.Cert.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{uri},
	}
	return create(tmpl, a.Cert, pub, a.Key)
}

// ChainFor returns leaf plus the intermediates needed to reach a root.
func (a *Authority) ChainFor(leaf *x509.Certificate) []*x509.Certificate {
	chain := []*x509.Certificate{leaf}
	if !isSelfSigned(a.Cert) {
		chain = append(chain, a.Cert)
	}
	return append(chain, a.Chain...)
}

// RootPool returns the trust bundle as a pool.
func (a *Authority) RootPool() *x509.CertPool {
	pool := x509.NewCertPool()
	for _, r := range a.Roots {
		pool.AddCert(r)
	}
	return pool
}

// TrustDomainOf reads the trust domain a CA was created for (its SPIFFE URI
// SAN spiffe://<td>), or "" when it has none (e.g. a user-supplied CA).
func TrustDomainOf(cert *x509.Certificate) string {
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" && (u.Path == "" || u.Path == "/") {
			return u.Host
		}
	}
	return ""
}

func caTemplate(cn, trustDomain string, now time.Time, ttl time.Duration, maxPathLen int) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{trustDomain}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            maxPathLen,
		MaxPathLenZero:        maxPathLen == 0,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: trustDomain}},
	}, nil
}

func create(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
