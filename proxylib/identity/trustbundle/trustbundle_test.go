package trustbundle

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

type root struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newRoot(t *testing.T) root {
	t.Helper()
	c, k, err := ca.NewSelfSignedRoot("cluster.local", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return root{c, k}
}

// serve runs a TLS server for name with a certificate from r.
func (r root) serve(t *testing.T, name string) string {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, r.cert, &key.PublicKey, r.key)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func write(t *testing.T, path string, roots ...root) {
	t.Helper()
	var data []byte
	for _, r := range roots {
		data = append(data, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.cert.Raw})...)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func dial(b *Bundle, addr string) error {
	c, err := tls.Dial("tcp", addr, b.ClientTLS("ca.test"))
	if err == nil {
		c.Close()
	}
	return err
}

// TestRotation: a root added to the file is trusted by the next handshake,
// a root removed is not; nothing restarts.
func TestRotation(t *testing.T) {
	oldRoot, newRoot := newRoot(t), newRoot(t)
	oldSrv, newSrv := oldRoot.serve(t, "ca.test"), newRoot.serve(t, "ca.test")
	path := filepath.Join(t.TempDir(), "root-cert.pem")
	write(t, path, oldRoot)
	b, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	changes := make(chan *x509.CertPool, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.Watch(ctx, 10*time.Millisecond, logr.Discard(), func(p *x509.CertPool) { changes <- p })

	if err := dial(b, oldSrv); err != nil {
		t.Fatalf("old root before rotation: %v", err)
	}
	if err := dial(b, newSrv); err == nil {
		t.Fatal("new root trusted before it is in the bundle")
	}
	write(t, path, oldRoot, newRoot) // rotation starts: both trusted
	<-changes
	if err := dial(b, oldSrv); err != nil {
		t.Fatalf("old root during rotation: %v", err)
	}
	if err := dial(b, newSrv); err != nil {
		t.Fatalf("new root during rotation: %v", err)
	}
	write(t, path, newRoot) // rotation ends: the old root is gone
	<-changes
	if err := dial(b, oldSrv); err == nil {
		t.Fatal("removed root still trusted")
	}
	if err := dial(b, newSrv); err != nil {
		t.Fatalf("new root after rotation: %v", err)
	}
	if err := dial(b, newSrv); err != nil {
		t.Fatal(err)
	}
	if c, err := tls.Dial("tcp", newSrv, b.ClientTLS("other.test")); err == nil {
		c.Close()
		t.Fatal("a certificate for another name was accepted")
	}
}

// TestBrokenFileKeepsRoots: a truncated or empty bundle is an error and the
// proxy keeps verifying with the roots it had.
func TestBrokenFileKeepsRoots(t *testing.T) {
	r := newRoot(t)
	srv := r.serve(t, "ca.test")
	path := filepath.Join(t.TempDir(), "root-cert.pem")
	write(t, path, r)
	b, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "-----BEGIN CERTIFICATE-----\nMIIB", "not pem"} {
		if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := b.Reload(); err == nil {
			t.Errorf("bundle %q accepted", bad)
		}
		if err := dial(b, srv); err != nil {
			t.Fatalf("roots lost after a broken bundle %q: %v", bad, err)
		}
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.pem")); err == nil {
		t.Fatal("missing bundle loaded")
	}
}
