package gateway

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ambientmesh/ambient/proxylib/route"
)

// tlsConfig terminates TLS on a port: the certificate is that of the
// listener whose hostname matches the client's SNI, read from CertDir.
// A client naming no listener's host fails the handshake.
func (l *Listeners) tlsConfig(port uint16) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"h2", "http/1.1"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			l.mu.Lock()
			p := l.plan[port]
			l.mu.Unlock()
			ls, ok := route.ListenerFor(p, strings.ToLower(hello.ServerName))
			if !ok || ls.TLS == nil || len(ls.TLS.CertificateRefs) == 0 {
				return nil, fmt.Errorf("no HTTPS listener on port %d for server name %q", port, hello.ServerName)
			}
			gw := l.Engine.Gateway()
			if gw == nil {
				return nil, fmt.Errorf("no Gateway served")
			}
			gwNS := gw.Namespace
			ref := ls.TLS.CertificateRefs[0]
			dir := route.CertificateDir(gwNS, route.SecretKey{Namespace: route.SecretNamespace(gwNS, ref), Name: string(ref.Name)})
			return l.certs.get(filepath.Join(l.CertDir, dir))
		},
	}
}

// certCache holds certificates read from Secret volumes, re-read when the
// kubelet updates the files (certificate rotation without restart).
type certCache struct {
	mu      sync.Mutex
	entries map[string]certEntry
}

type certEntry struct {
	mod  time.Time
	cert *tls.Certificate
}

func (c *certCache) get(dir string) (*tls.Certificate, error) {
	crt, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	st, err := os.Stat(crt)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", dir, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[dir]; ok && e.mod.Equal(st.ModTime()) {
		return e.cert, nil
	}
	pair, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", dir, err)
	}
	if c.entries == nil {
		c.entries = map[string]certEntry{}
	}
	c.entries[dir] = certEntry{mod: st.ModTime(), cert: &pair}
	return &pair, nil
}
