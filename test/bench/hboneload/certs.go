// Package hboneload is the HBONE benchmark harness, kept beside the tests
// rather than in the library (cmd/hbone-load is its thin main): the
// benchmark roles (sink, relays, clients) that run as separate processes, and the orchestrator that
// measures HBONE over HTTP/2 and HTTP/3 against raw TCP and a plain TLS 1.3
// relay in one run and renders the results with ratios and goals.
package hboneload

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

const trustDomain = "cluster.local"

// The two proxy identities of the benchmark mesh.
var (
	ClientProxyID = identity.MustParse("spiffe://cluster.local/ns/bench/sa/client")
	ServerProxyID = identity.MustParse("spiffe://cluster.local/ns/bench/sa/server")
)

// WriteCerts creates a mesh root and one workload certificate per proxy
// identity in dir, as PEM files that every role process loads.
func WriteCerts(dir string) error {
	now := time.Now()
	root, key, err := ca.NewSelfSignedRoot(trustDomain, 24*time.Hour, now)
	if err != nil {
		return err
	}
	auth := &ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}}
	if err := os.WriteFile(filepath.Join(dir, "root.pem"), ca.EncodeCerts(root), 0o600); err != nil {
		return err
	}
	for name, id := range map[string]identity.Identity{"client": ClientProxyID, "server": ServerProxyID} {
		k, err := ca.NewKey()
		if err != nil {
			return err
		}
		leaf, err := auth.SignPublicKey(k.Public(), id, 12*time.Hour)
		if err != nil {
			return err
		}
		keyPEM, err := ca.EncodeKey(k)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name+".pem"), ca.EncodeCerts(auth.ChainFor(leaf)...), 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name+"-key.pem"), keyPEM, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// LoadCerts reads what WriteCerts wrote into a certificate source holding
// both proxy identities.
func LoadCerts(dir string) (*identity.StaticSource, error) {
	rootPEM, err := os.ReadFile(filepath.Join(dir, "root.pem"))
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("no root certificate in %s", dir)
	}
	src := identity.NewStaticSource(trustDomain, roots)
	for name, id := range map[string]identity.Identity{"client": ClientProxyID, "server": ServerProxyID} {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"))
		if err != nil {
			return nil, err
		}
		src.Set(id, &cert)
	}
	return src, nil
}
