// Package trustbundle keeps a proxy's mesh roots current. The operator
// writes the roots to a ConfigMap that the kubelet projects as a file; when
// the CA's roots change (rotation, bring-your-own CA), the file changes and
// every new handshake — HBONE peers, the CA, discovery — must verify
// against the roots of now, without restarting the proxy.
package trustbundle

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

// DefaultInterval is how often proxies re-read the mounted bundle.
const DefaultInterval = 10 * time.Second

// Bundle is the trust bundle read from a file.
type Bundle struct {
	path string
	mu   sync.RWMutex
	pool *x509.CertPool
	cert []*x509.Certificate
	sum  [32]byte
}

// Load reads path; a bundle without a certificate is an error.
func Load(path string) (*Bundle, error) {
	b := &Bundle{path: path}
	if _, err := b.Reload(); err != nil {
		return nil, err
	}
	return b, nil
}

// Pool is the current root pool.
func (b *Bundle) Pool() *x509.CertPool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.pool
}

// Certs are the current roots.
func (b *Bundle) Certs() []*x509.Certificate {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.cert
}

// Reload re-reads the file. An unreadable or empty bundle is an error and
// leaves the current roots in place: a half-written file must never leave
// a proxy trusting nothing, or something else.
func (b *Bundle) Reload() (changed bool, err error) {
	data, err := os.ReadFile(b.path)
	if err != nil {
		return false, fmt.Errorf("trust bundle: %w", err)
	}
	sum := sha256.Sum256(data)
	b.mu.RLock()
	same := b.pool != nil && sum == b.sum
	b.mu.RUnlock()
	if same {
		return false, nil
	}
	certs, err := ca.ParseCerts(data)
	if err == nil && len(certs) == 0 {
		err = errors.New("no certificate")
	}
	if err != nil {
		return false, fmt.Errorf("trust bundle %s: %w", b.path, err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	b.mu.Lock()
	b.pool, b.cert, b.sum = pool, certs, sum
	b.mu.Unlock()
	return true, nil
}

// Watch re-reads the file every interval until ctx ends and calls onChange
// with the new pool after each change. Polling, not inotify: the kubelet
// replaces ConfigMap files by swapping a symlink, which file watches miss.
func (b *Bundle) Watch(ctx context.Context, every time.Duration, log logr.Logger, onChange func(*x509.CertPool)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		changed, err := b.Reload()
		if err != nil {
			log.Error(err, "keeping the current trust bundle")
			continue
		}
		if changed {
			log.Info("trust bundle changed", "roots", len(b.Certs()))
			if onChange != nil {
				onChange(b.Pool())
			}
		}
	}
}

// ClientTLS is a TLS client configuration for serverName that verifies the
// server's chain against the bundle's roots at the time of each handshake
// (tls.Config.RootCAs would freeze them).
func (b *Bundle) ClientTLS(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// Verification is not skipped: VerifyConnection below does it in
		// full with the current roots, as crypto/tls would.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("trust bundle: server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: serverName, Roots: b.Pool(),
				Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			return err
		},
	}
}
