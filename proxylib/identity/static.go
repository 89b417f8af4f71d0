package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync"
)

// StaticSource is an in-memory certificate source for tests and fixed
// deployments: it hands out exactly the certificates it was given, without
// checking their validity (so tests can present expired ones on purpose).
// It satisfies hbone.CertSource.
type StaticSource struct {
	trustDomain string
	roots       *x509.CertPool

	mu    sync.RWMutex
	certs map[Identity]*tls.Certificate
}

// NewStaticSource returns an empty source for trustDomain, verifying peers
// with roots.
func NewStaticSource(trustDomain string, roots *x509.CertPool) *StaticSource {
	return &StaticSource{trustDomain: trustDomain, roots: roots, certs: map[Identity]*tls.Certificate{}}
}

// Set installs (or replaces) the certificate for id.
func (s *StaticSource) Set(id Identity, cert *tls.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.certs[id] = cert
}

// Certificate returns the certificate installed for id.
func (s *StaticSource) Certificate(_ context.Context, id Identity) (*tls.Certificate, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	c, ok := s.certs[id]
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNoCertificate, id)
	}
	return c, nil
}

// Roots returns the trust bundle.
func (s *StaticSource) Roots() *x509.CertPool { return s.roots }

// TrustDomain returns the local trust domain.
func (s *StaticSource) TrustDomain() string { return s.trustDomain }
