package main

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// echoAdvancedRef is the image the mesh conformance manifests
// (sigs.k8s.io/gateway-api/conformance mesh/manifests.yaml, v1.6.3) run.
const echoAdvancedRef = "registry.k8s.io/gateway-api/echo-advanced:v1.5.1"

// echoAdvancedImage packages Istio's echo server as the entrypoint (the
// manifests give only args) with its client on PATH (the suite execs
// `client URL ...` in the pods) and the key pair its --crt/--key flags name.
func echoAdvancedImage(dir string) (image, error) {
	server, client := filepath.Join(dir, "server"), filepath.Join(dir, "client")
	clientBin, err := os.ReadFile(client)
	if err != nil {
		return image{}, err
	}
	if _, err := os.Stat(server); err != nil {
		return image{}, err
	}
	crt, key, err := echoCertificate()
	if err != nil {
		return image{}, err
	}
	return image{file: "echo-advanced.tar", ref: echoAdvancedRef, binary: server, path: "/usr/local/bin/server",
		entrypoint: []string{"/usr/local/bin/server"},
		files: []file{{path: "/usr/bin/client", mode: 0o755, data: clientBin},
			{path: "/cert.crt", mode: 0o644, data: crt}, {path: "/cert.key", mode: 0o644, data: key}}}, nil
}

// echoCertificate is a self-signed test certificate for the echo server's
// TLS port. Ed25519 signing is deterministic, so with a fixed seed and
// validity the image keeps its digest from build to build.
func echoCertificate() (crt, key []byte, err error) {
	seed := sha256.Sum256([]byte("ambient lab echo-advanced test certificate"))
	priv := ed25519.NewKeyFromSeed(seed[:])
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "echo"},
		DNSNames:     []string{"echo", "*.gateway-conformance-mesh.svc.cluster.local"},
		NotBefore:    time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:     time.Date(2036, 1, 1, 0, 0, 0, 0, time.UTC),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return nil, nil, fmt.Errorf("test certificate: %w", err)
	}
	pk, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), nil
}
