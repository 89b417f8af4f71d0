package controlplane

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

const servingCertTTL = 24 * time.Hour

// certSource keeps the control plane's serving certificate, re-issued from
// the current mesh CA at half life or when the CA changes.
type certSource struct {
	load     func(context.Context) (*ca.Authority, error)
	dnsNames func() []string
	log      logr.Logger
	// every is the fallback reload period (default a minute); changed
	// nudges a reload at once (the CA Secret watch).
	every   time.Duration
	changed chan struct{}

	mu   sync.RWMutex
	auth *ca.Authority
	cert *tls.Certificate
	leaf *x509.Certificate
}

func (s *certSource) authority(ctx context.Context) (*ca.Authority, error) {
	s.mu.RLock()
	a := s.auth
	s.mu.RUnlock()
	if a == nil {
		return nil, errors.New("mesh CA not loaded")
	}
	return a, nil
}

// refresh reloads the CA and re-issues the certificate if needed.
func (s *certSource) refresh(ctx context.Context) error {
	a, err := s.load(ctx)
	if err != nil {
		return err
	}
	s.mu.RLock()
	same := s.auth != nil && s.auth.Cert.Equal(a.Cert)
	fresh := s.leaf != nil && time.Until(s.leaf.NotAfter) > s.leaf.NotAfter.Sub(s.leaf.NotBefore)/2
	s.mu.RUnlock()
	if same && fresh {
		return nil
	}
	cert, leaf, err := issueServingCert(a, s.dnsNames())
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.auth, s.cert, s.leaf = a, cert, leaf
	s.mu.Unlock()
	s.log.Info("serving certificate issued", "dnsNames", leaf.DNSNames, "notAfter", leaf.NotAfter)
	return nil
}

// nudge asks run for a reload now (never blocks; one pending is enough).
func (s *certSource) nudge() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *certSource) run(ctx context.Context) {
	every := s.every
	if every <= 0 {
		every = time.Minute
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.changed:
		}
		if err := s.refresh(ctx); err != nil {
			s.log.Error(err, "refreshing serving certificate; keeping the current one")
		}
	}
}

func (s *certSource) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			s.mu.RLock()
			defer s.mu.RUnlock()
			if s.cert == nil {
				return nil, errors.New("no serving certificate yet")
			}
			return s.cert, nil
		},
	}
}

// issueServingCert signs a P-256 server certificate for dnsNames.
func issueServingCert(a *ca.Authority, dnsNames []string) (*tls.Certificate, *x509.Certificate, error) {
	key, err := ca.NewKey()
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	notAfter := now.Add(servingCertTTL)
	if a.Cert.NotAfter.Before(notAfter) {
		notAfter = a.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: dnsNames[0]},
		DNSNames:     dnsNames,
		NotBefore:    now.Add(-2 * time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, key.Public(), a.Key)
	if err != nil {
		return nil, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	chain := [][]byte{der}
	for _, c := range a.ChainFor(leaf)[1:] {
		chain = append(chain, c.Raw)
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, leaf, nil
}
