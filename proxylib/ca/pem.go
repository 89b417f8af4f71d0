package ca

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
)

// EncodeCerts PEM-encodes certificates in order.
func EncodeCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// EncodeKey PEM-encodes a private key as PKCS#8.
func EncodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCerts decodes every CERTIFICATE block; it fails on any other content.
func ParseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate found")
	}
	return certs, nil
}

// ParseKey decodes a PKCS#8, PKCS#1 or SEC1 private key.
func ParseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM private key found")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		if s, ok := k.(crypto.Signer); ok {
			return s, nil
		}
		return nil, errors.New("private key cannot sign")
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	return nil, errors.New("unsupported private key format")
}

// LoadAuthority builds an Authority from a user-supplied CA certificate chain
// (leaf CA first; remaining certificates are intermediates, a trailing
// self-signed one is the root) and its key. extraRoots (e.g. ca.crt) are
// added to the trust bundle. It checks the key matches and the cert is a CA.
func LoadAuthority(certPEM, keyPEM, extraRootsPEM []byte) (*Authority, error) {
	certs, err := ParseCerts(certPEM)
	if err != nil {
		return nil, fmt.Errorf("tls.crt: %w", err)
	}
	key, err := ParseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls.key: %w", err)
	}
	leaf := certs[0]
	if !leaf.IsCA || leaf.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("tls.crt is not a CA certificate (needs basicConstraints CA:TRUE and keyCertSign)")
	}
	if !publicKeysEqual(leaf.PublicKey, key.Public()) {
		return nil, errors.New("tls.key does not match tls.crt")
	}
	a := &Authority{Cert: leaf, Key: key}
	for _, c := range certs[1:] {
		if isSelfSigned(c) {
			a.Roots = append(a.Roots, c)
		} else {
			a.Chain = append(a.Chain, c)
		}
	}
	if len(extraRootsPEM) > 0 {
		roots, err := ParseCerts(extraRootsPEM)
		if err != nil {
			return nil, fmt.Errorf("ca.crt: %w", err)
		}
		a.Roots = append(a.Roots, roots...)
	}
	if isSelfSigned(leaf) {
		a.Roots = append(a.Roots, leaf)
	}
	if len(a.Roots) == 0 {
		return nil, errors.New("no root certificate: include the root in tls.crt or ca.crt")
	}
	// The chain must verify to one of the roots.
	inter := x509.NewCertPool()
	for _, c := range a.Chain {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: a.RootPool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("CA certificate does not chain to the supplied root: %w", err)
	}
	return a, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	ea, ok := a.(equaler)
	return ok && ea.Equal(b)
}
