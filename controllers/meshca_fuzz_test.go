package controllers

import (
	"testing"
	"time"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

// FuzzValidateUserCA feeds arbitrary Secret contents to the bring-your-own
// CA check: it must never panic, and anything it accepts must be a usable
// CA for the trust domain.
func FuzzValidateUserCA(f *testing.F) {
	cert, key, err := ca.NewSelfSignedRoot("fuzz.example", 48*time.Hour, time.Now())
	if err != nil {
		f.Fatal(err)
	}
	keyPEM, _ := ca.EncodeKey(key)
	certPEM := ca.EncodeCerts(cert)
	f.Add(certPEM, keyPEM, []byte(nil))
	f.Add(certPEM, keyPEM, certPEM)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), keyPEM, []byte{})
	f.Add([]byte{}, []byte{}, []byte{})
	f.Fuzz(func(t *testing.T, crt, k, extra []byte) {
		auth, mirroredKey, err := validateUserCA(map[string][]byte{"tls.crt": crt, "tls.key": k, "ca.crt": extra}, "fuzz.example", time.Now())
		if err != nil {
			return
		}
		if !auth.Cert.IsCA || len(auth.Roots) == 0 || len(mirroredKey) == 0 {
			t.Fatalf("accepted an unusable CA: isCA=%v roots=%d", auth.Cert.IsCA, len(auth.Roots))
		}
		if td := ca.TrustDomainOf(auth.Cert); td != "" && td != "fuzz.example" {
			t.Fatalf("accepted a CA for trust domain %q", td)
		}
	})
}
