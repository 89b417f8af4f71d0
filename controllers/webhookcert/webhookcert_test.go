package webhookcert

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
)

// The certificate logic is pure; a fake client stands in for the Secret
// store (the envtest suite in controllers/ exercises the webhook server).
func TestEnsureIssuesReusesAndRenews(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(scheme).Build()
	now := time.Now()
	dir := t.TempDir()
	m := &Manager{Client: c, Namespace: "ops", SecretName: "wh-cert", ServiceName: "wh", CertDir: dir, Log: logr.Discard(), Now: func() time.Time { return now }}
	ctx := context.Background()
	if err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	first := secretData(t, c)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"))
	if err != nil {
		t.Fatalf("files written are not a key pair: %v", err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(first["ca.crt"])
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "wh.ops.svc", Roots: roots}); err != nil {
		t.Fatalf("serving cert does not verify for the Service name: %v", err)
	}

	if err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if string(secretData(t, c)["tls.crt"]) != string(first["tls.crt"]) {
		t.Fatal("valid certificate was replaced")
	}

	now = now.Add(validity - renewBefore/2) // inside the renewal window
	if err := m.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	if string(secretData(t, c)["tls.crt"]) == string(first["tls.crt"]) {
		t.Fatal("expiring certificate was not renewed")
	}
	// Another replica still serves the previous certificate until it
	// reads the renewed one: the injected bundle must trust both.
	bundle := x509.NewCertPool()
	if !bundle.AppendCertsFromPEM(secretData(t, c)["ca.crt"]) {
		t.Fatal("no CA bundle after renewal")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "wh.ops.svc", Roots: bundle, CurrentTime: now}); err != nil {
		t.Fatalf("the previous serving certificate is not trusted after the renewal: %v", err)
	}
	onDisk, _ := os.ReadFile(filepath.Join(dir, "tls.crt"))
	if string(onDisk) != string(secretData(t, c)["tls.crt"]) {
		t.Fatal("renewed certificate not written to the cert dir")
	}
}

func secretData(t *testing.T, c client.Client) map[string][]byte {
	t.Helper()
	s := &corev1.Secret{}
	if err := c.Get(context.Background(), client.ObjectKey{Namespace: "ops", Name: "wh-cert"}, s); err != nil {
		t.Fatal(err)
	}
	return s.Data
}
