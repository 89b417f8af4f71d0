package controllers

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// userCAData is a user-supplied root CA as a kubernetes.io/tls Secret would hold it.
func userCAData(t *testing.T, trustDomain string) map[string][]byte {
	t.Helper()
	cert, key, err := ca.NewSelfSignedRoot(trustDomain, 48*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := ca.EncodeKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{"tls.crt": ca.EncodeCerts(cert), "tls.key": keyPEM}
}

// caTestMesh is a mesh object as the API server would default it (not created).
func caTestMesh(ns string) *meshv1.AmbientMesh {
	m := &meshv1.AmbientMesh{ObjectMeta: metav1.ObjectMeta{Name: "ca-unit", UID: "00000000-0000-0000-0000-000000000001"}}
	m.Spec.Namespace = ns
	m.Spec.TrustDomain = "td.example"
	m.Spec.CA.Type = meshv1.CASelfSigned
	m.Spec.CA.RootCertTTL = metav1.Duration{Duration: 10 * 365 * 24 * time.Hour}
	m.Spec.CA.WorkloadCertTTL = metav1.Duration{Duration: 24 * time.Hour}
	return m
}

func caTestNamespace(t *testing.T, name string) {
	t.Helper()
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
}

// TestSelfSignedCALifecycle: the CA Secret is created once, reused, signs
// workload certificates that chain to the published root with exactly the
// SPIFFE identity, and its intermediate is rotated under the same root.
func TestSelfSignedCALifecycle(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "ca-unit")
	now := time.Now()
	m := &caManager{client: k8s, reader: k8s, now: func() time.Time { return now }}
	mesh := caTestMesh("ca-unit")

	first, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	again, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Authority.Cert.Equal(first.Authority.Cert) {
		t.Fatal("second ensure replaced the CA")
	}
	secret := &corev1.Secret{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: "ca-unit", Name: CASecretName}, secret); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{CASecretRootCert, CASecretRootKey, CASecretCert, CASecretKey} {
		if len(secret.Data[k]) == 0 {
			t.Errorf("Secret lacks %s", k)
		}
	}
	// The CA service loads the same authority from the Secret.
	auth, err := LoadCASecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	auth.Now = func() time.Time { return now } // same clock as the TTL bound below
	if !auth.Cert.IsCA || auth.Cert.MaxPathLen != 0 || !auth.Cert.MaxPathLenZero {
		t.Errorf("signing cert must be an intermediate with pathlen 0")
	}
	if strings.Contains(string(first.RootsPEM), "PRIVATE") {
		t.Fatal("trust bundle contains a key")
	}

	id := identity.Identity{TrustDomain: "td.example", Namespace: "app", ServiceAccount: "reviews"}
	key, _ := ca.NewKey()
	leaf, err := auth.SignPublicKey(key.Public(), id, mesh.Spec.CA.WorkloadCertTTL.Duration)
	if err != nil {
		t.Fatal(err)
	}
	roots, err := ca.ParseCerts(first.RootsPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range auth.ChainFor(leaf)[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("workload cert does not chain to the published root: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://td.example/ns/app/sa/reviews" || len(leaf.DNSNames) != 0 {
		t.Errorf("SANs: %v %v", leaf.URIs, leaf.DNSNames)
	}
	if ttl := leaf.NotAfter.Sub(now); ttl > 24*time.Hour || ttl < 23*time.Hour {
		t.Errorf("workload TTL %v, want 24h", ttl)
	}
	if _, err := auth.SignPublicKey(key.Public(), identity.Identity{TrustDomain: "evil.example", Namespace: "a", ServiceAccount: "b"}, time.Hour); err == nil {
		t.Error("signed an identity of another trust domain")
	}

	// Two thirds into the intermediate's life it is re-issued under the same root.
	now = auth.Cert.NotAfter.Add(-time.Hour)
	rotated, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	if rotated.Authority.Cert.Equal(auth.Cert) {
		t.Fatal("intermediate not rotated")
	}
	if string(rotated.RootsPEM) != string(first.RootsPEM) {
		t.Fatal("rotation changed the root")
	}
	if err := rotated.Authority.Cert.CheckSignatureFrom(roots[0]); err != nil {
		t.Fatalf("rotated intermediate not signed by the root: %v", err)
	}
}

func TestCASecretProblems(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "ca-bad")
	m := &caManager{client: k8s, reader: k8s, now: time.Now}
	expired := userCAData(t, "td.example")
	m2 := &caManager{client: k8s, reader: k8s, now: func() time.Time { return time.Now().Add(72 * time.Hour) }}

	tests := []struct {
		name    string
		mgr     *caManager
		secret  map[string][]byte // nil: no Secret
		reason  string
		message string
	}{
		{"missing", m, nil, meshv1.ReasonCASecretMissing, "does not exist"},
		{"garbage", m, map[string][]byte{"tls.crt": []byte("x"), "tls.key": []byte("y")}, meshv1.ReasonCASecretInvalid, "tls.crt"},
		{"key mismatch", m, map[string][]byte{"tls.crt": userCAData(t, "td.example")["tls.crt"], "tls.key": userCAData(t, "td.example")["tls.key"]}, meshv1.ReasonCASecretInvalid, "does not match"},
		{"other trust domain", m, userCAData(t, "other.example"), meshv1.ReasonCASecretInvalid, "other.example"},
		{"expired", m2, expired, meshv1.ReasonCASecretInvalid, "expired"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := "user-ca-" + strings.ReplaceAll(tc.name, " ", "-")
			if tc.secret != nil {
				s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ca-bad", Name: name}, Data: tc.secret}
				if err := k8s.Create(ctx, s); err != nil {
					t.Fatal(err)
				}
			}
			mesh := caTestMesh("ca-bad")
			mesh.Spec.CA.Type = meshv1.CAFromSecret
			mesh.Spec.CA.SecretRef = &corev1.LocalObjectReference{Name: name}
			_, err := tc.mgr.ensure(ctx, mesh)
			reason, ok, _ := caReason(err)
			if !ok || reason != tc.reason || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("case %d: got %v (reason %q), want reason %s mentioning %q", i, err, reason, tc.reason, tc.message)
			}
		})
	}

	// A corrupted self-signed Secret is reported, never silently replaced.
	bad := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ca-bad", Name: CASecretName}, Data: map[string][]byte{CASecretCert: []byte("junk")}}
	if err := k8s.Create(ctx, bad); err != nil {
		t.Fatal(err)
	}
	_, err := m.ensure(ctx, caTestMesh("ca-bad"))
	var ce *caError
	if !errors.As(err, &ce) || ce.reason != meshv1.ReasonCASecretInvalid {
		t.Fatalf("corrupted Secret: %v", err)
	}
	if err := k8s.Get(ctx, client.ObjectKeyFromObject(bad), bad); err != nil || string(bad.Data[CASecretCert]) != "junk" {
		t.Fatal("corrupted Secret was overwritten")
	}
}

// TestConcurrentCACreation: two replicas (a leader change mid-reconcile)
// creating the CA at once end up with one root, never two.
func TestConcurrentCACreation(t *testing.T) {
	caTestNamespace(t, "ca-race")
	mesh := caTestMesh("ca-race")
	results := make(chan []byte, 2)
	errs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		go func() {
			m := &caManager{client: k8s, reader: k8s, now: time.Now}
			got, err := m.ensure(context.Background(), mesh)
			if err != nil {
				errs <- err
				return
			}
			results <- got.RootsPEM
		}()
	}
	var roots [][]byte
	for i := 0; i < 2; i++ {
		select {
		case err := <-errs:
			t.Fatal(err)
		case r := <-results:
			roots = append(roots, r)
		}
	}
	if string(roots[0]) != string(roots[1]) {
		t.Fatal("two replicas ended with different mesh roots")
	}
}
