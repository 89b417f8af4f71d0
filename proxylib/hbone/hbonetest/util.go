package hbonetest

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"math/big"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		panic(err)
	}
	return n
}

func createCert(tmpl *x509.Certificate, issuer *ca.Authority, key *ecdsa.PrivateKey) (*x509.Certificate, error) {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer.Cert, key.Public(), issuer.Key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}
