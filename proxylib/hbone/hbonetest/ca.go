// Package hbonetest provides real test fixtures for HBONE and identity
// tests: an in-process mesh CA (root + intermediate, proxylib/ca), workload
// identities and certificates (also deliberately malformed ones), a static
// certificate source, a switchable CA client backed by the real CA, a fake
// clock, and a TCP echo upstream. Its API is shared by the h2/h3 transports,
// ztunnel and waypoint tests: extend it, do not change it.
package hbonetest

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// DefaultTrustDomain is the trust domain used when a test does not care.
const DefaultTrustDomain = "cluster.local"

// CA is an in-process mesh CA: a self-signed root and an intermediate that
// signs workload certificates, exactly as the operator sets it up.
type CA struct {
	TrustDomain  string
	Root         *x509.Certificate
	Intermediate *ca.Authority

	mu  sync.Mutex
	now func() time.Time
}

// NewCA creates a root (valid ten years) and an intermediate for trustDomain.
func NewCA(t testing.TB, trustDomain string) *CA {
	t.Helper()
	now := time.Now()
	root, key, err := ca.NewSelfSignedRoot(trustDomain, 10*365*24*time.Hour, now.Add(-24*time.Hour))
	if err != nil {
		t.Fatalf("hbonetest: root CA: %v", err)
	}
	rootAuth := &ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}}
	inter, err := ca.NewIntermediate(rootAuth, trustDomain, 5*365*24*time.Hour)
	if err != nil {
		t.Fatalf("hbonetest: intermediate CA: %v", err)
	}
	c := &CA{TrustDomain: trustDomain, Root: root, Intermediate: inter, now: time.Now}
	inter.Now = c.Now
	return c
}

// Now is the CA's clock (wall clock unless SetClock was called).
func (c *CA) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now()
}

// SetClock makes the CA stamp certificates with now() (e.g. a FakeClock's Now).
func (c *CA) SetClock(now func() time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = now
}

// Roots is the trust bundle (the root alone).
func (c *CA) Roots() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(c.Root)
	return pool
}

// RootPEM is the trust bundle as PEM (what the root ConfigMap carries).
func (c *CA) RootPEM() []byte { return ca.EncodeCerts(c.Root) }

// ID builds an identity in this CA's trust domain.
func (c *CA) ID(namespace, serviceAccount string) identity.Identity {
	return identity.Identity{TrustDomain: c.TrustDomain, Namespace: namespace, ServiceAccount: serviceAccount}
}

// Issue returns a one-hour workload certificate for id (leaf + intermediate).
func (c *CA) Issue(t testing.TB, id identity.Identity) *tls.Certificate {
	t.Helper()
	return c.IssueCert(t, CertOptions{URIs: []string{id.String()}})
}

// CertOptions describes a possibly malformed leaf for hostile-input tests.
type CertOptions struct {
	URIs      []string  // URI SANs verbatim (zero, several, malformed: all allowed)
	DNSNames  []string  // DNS SANs (must never be what authorizes a peer)
	NotBefore time.Time // default: CA clock − 1 minute
	NotAfter  time.Time // default: NotBefore + 1 hour
}

// IssueCert signs an arbitrary leaf with the intermediate.
func (c *CA) IssueCert(t testing.TB, o CertOptions) *tls.Certificate {
	t.Helper()
	key, err := ca.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	leaf := signLeaf(t, c.Intermediate, key, o, c.Now())
	return &tls.Certificate{Certificate: [][]byte{leaf.Raw, c.Intermediate.Cert.Raw}, PrivateKey: key, Leaf: leaf}
}

// Source returns a static certificate source holding a fresh certificate for
// each id, verifying peers with this CA's roots.
func (c *CA) Source(t testing.TB, ids ...identity.Identity) *identity.StaticSource {
	t.Helper()
	s := identity.NewStaticSource(c.TrustDomain, c.Roots())
	for _, id := range ids {
		s.Set(id, c.Issue(t, id))
	}
	return s
}

// ErrCAUnavailable is what a switched-off CAClient returns.
var ErrCAUnavailable = errors.New("hbonetest: CA unavailable")

// CAClient implements identity.CAClient with the real CA in process; tests
// switch it off to simulate an outage of the network CA.
type CAClient struct {
	ca    *CA
	down  atomic.Bool
	calls atomic.Int64
}

// Client returns a CA client signing with this CA.
func (c *CA) Client() *CAClient { return &CAClient{ca: c} }

// SetAvailable switches the CA on or off.
func (cl *CAClient) SetAvailable(up bool) { cl.down.Store(!up) }

// Calls counts Sign requests, successful or not.
func (cl *CAClient) Calls() int { return int(cl.calls.Load()) }

// Sign signs the CSR for id with ttl, or fails while switched off. A zero
// ttl takes this CA's own lifetime, 24h, as the mesh CA's workloadCertTTL.
func (cl *CAClient) Sign(ctx context.Context, csrPEM []byte, id identity.Identity, ttl time.Duration) ([]*x509.Certificate, error) {
	cl.calls.Add(1)
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if cl.down.Load() {
		return nil, ErrCAUnavailable
	}
	leaf, err := cl.ca.Intermediate.SignCSR(csrPEM, id, ttl)
	if err != nil {
		return nil, err
	}
	return append(cl.ca.Intermediate.ChainFor(leaf), cl.ca.Root), nil
}

func signLeaf(t testing.TB, issuer *ca.Authority, key *ecdsa.PrivateKey, o CertOptions, now time.Time) *x509.Certificate {
	t.Helper()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-time.Minute)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = o.NotBefore.Add(time.Hour)
	}
	var uris []*url.URL
	for _, s := range o.URIs {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatalf("hbonetest: URI SAN %q: %v", s, err)
		}
		uris = append(uris, u)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		NotBefore:             o.NotBefore,
		NotAfter:              o.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  uris,
		DNSNames:              o.DNSNames,
	}
	leaf, err := createCert(tmpl, issuer, key)
	if err != nil {
		t.Fatalf("hbonetest: sign leaf: %v", err)
	}
	return leaf
}
