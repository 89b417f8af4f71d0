// Package webhookcert gives the operator's webhook server a TLS certificate
// without cert-manager: a self-signed CA and serving certificate kept in a
// Secret of the operator's namespace (shared by every replica), written to
// the webhook server's certificate directory, and injected as caBundle into
// the ValidatingWebhookConfiguration.
package webhookcert

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/ambientmesh/ambient/proxylib/ca"
)

const (
	validity    = 365 * 24 * time.Hour
	renewBefore = 30 * 24 * time.Hour
	caCertKey   = "ca.crt"
)

// The manager injects the CA bundle into its validating webhook configuration.
// (A package-level marker: controller-gen ignores RBAC markers in a type's doc comment.)
// +kubebuilder:rbac:groups=admissionregistration.k8s.io,resources=validatingwebhookconfigurations;mutatingwebhookconfigurations,verbs=get;list;watch;patch

// Manager keeps the webhook serving certificate current.
type Manager struct {
	Client client.Client
	// Namespace and SecretName locate the certificate Secret.
	Namespace, SecretName string
	// ServiceName is the webhook Service; the certificate is for its DNS names.
	ServiceName string
	// WebhookConfigName is the ValidatingWebhookConfiguration to inject into.
	WebhookConfigName string
	// MutatingWebhookConfigName is the MutatingWebhookConfiguration (the
	// sidecar injector) to inject into; "" for none.
	MutatingWebhookConfigName string
	CertDir                   string
	Log                       logr.Logger
	Now                       func() time.Time
}

func (m *Manager) now() time.Time {
	if m.Now != nil {
		return m.Now()
	}
	return time.Now()
}

// Ensure makes the Secret hold a valid certificate, writes it to CertDir and
// injects the CA into the webhook configuration. Safe to call repeatedly.
func (m *Manager) Ensure(ctx context.Context) error {
	secret, err := m.ensureSecret(ctx)
	if err != nil {
		return err
	}
	if err := m.writeFiles(secret); err != nil {
		return err
	}
	return m.injectCABundle(ctx, secret.Data[caCertKey])
}

// Start re-runs Ensure periodically (a manager Runnable), so a renewed
// certificate (perhaps renewed by another replica) or a re-applied webhook
// configuration is fixed up.
func (m *Manager) Start(ctx context.Context) error {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := m.Ensure(ctx); err != nil {
				m.Log.Error(err, "webhook certificate upkeep failed")
			}
		}
	}
}

// NeedLeaderElection is false: every replica serves webhooks and needs the files.
func (m *Manager) NeedLeaderElection() bool { return false }

func (m *Manager) ensureSecret(ctx context.Context) (*corev1.Secret, error) {
	secret := &corev1.Secret{}
	err := m.Client.Get(ctx, client.ObjectKey{Namespace: m.Namespace, Name: m.SecretName}, secret)
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, err
	}
	if err == nil && m.valid(secret) {
		return secret, nil
	}
	data, err := m.generate()
	if err != nil {
		return nil, err
	}
	if secret.ResourceVersion == "" {
		secret = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: m.Namespace, Name: m.SecretName},
			Type:       corev1.SecretTypeTLS,
			Data:       data,
		}
		if err := m.Client.Create(ctx, secret); err != nil {
			if apierrors.IsAlreadyExists(err) { // another replica won the race
				return m.ensureSecret(ctx)
			}
			return nil, err
		}
	} else {
		// The API server trusts the previous CA too until it expires:
		// the other replicas serve the previous certificate until they
		// read the renewed one (Start), and their webhook calls must not
		// fail meanwhile.
		if prev, err := ca.ParseCerts(secret.Data[caCertKey]); err == nil && m.now().Before(prev[0].NotAfter) {
			data[caCertKey] = append(data[caCertKey], ca.EncodeCerts(prev[0])...)
		}
		secret.Data = data
		if err := m.Client.Update(ctx, secret); err != nil {
			return nil, err
		}
	}
	m.Log.Info("issued webhook serving certificate", "secret", m.SecretName, "service", m.ServiceName)
	return secret, nil
}

// valid: the certificate is for our Service, chains to the stored CA and
// is not about to expire.
func (m *Manager) valid(s *corev1.Secret) bool {
	certs, err := ca.ParseCerts(s.Data[corev1.TLSCertKey])
	if err != nil {
		return false
	}
	roots, err := ca.ParseCerts(s.Data[caCertKey])
	if err != nil {
		return false
	}
	pool := x509.NewCertPool()
	pool.AddCert(roots[0])
	_, err = certs[0].Verify(x509.VerifyOptions{
		DNSName: m.dnsNames()[2], Roots: pool, CurrentTime: m.now().Add(renewBefore),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	return err == nil
}

func (m *Manager) dnsNames() []string {
	return []string{
		m.ServiceName,
		m.ServiceName + "." + m.Namespace,
		m.ServiceName + "." + m.Namespace + ".svc",
		m.ServiceName + "." + m.Namespace + ".svc.cluster.local",
	}
}

func (m *Manager) generate() (map[string][]byte, error) {
	now := m.now()
	caKey, err := ca.NewKey()
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "ambient-webhook-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validity),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ca.NewKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: m.dnsNames()[2]},
		DNSNames: m.dnsNames(), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validity),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	keyPEM, err := ca.EncodeKey(key)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		corev1.TLSCertKey:       ca.EncodeCerts(cert),
		corev1.TLSPrivateKeyKey: keyPEM,
		caCertKey:               ca.EncodeCerts(caCert),
	}, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	return n
}

// writeFiles writes tls.crt/tls.key atomically; the webhook server's
// certificate watcher reloads them.
func (m *Manager) writeFiles(s *corev1.Secret) error {
	if err := os.MkdirAll(m.CertDir, 0o700); err != nil {
		return err
	}
	for _, k := range []string{corev1.TLSCertKey, corev1.TLSPrivateKeyKey} {
		path := filepath.Join(m.CertDir, k)
		if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, s.Data[k]) {
			continue
		}
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, s.Data[k], 0o600); err != nil {
			return err
		}
		if err := os.Rename(tmp, path); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) injectCABundle(ctx context.Context, caPEM []byte) error {
	vwc := &admissionv1.ValidatingWebhookConfiguration{}
	if err := m.inject(ctx, m.WebhookConfigName, vwc, caPEM, func() (cs []*admissionv1.WebhookClientConfig) {
		for i := range vwc.Webhooks {
			cs = append(cs, &vwc.Webhooks[i].ClientConfig)
		}
		return cs
	}); err != nil {
		return err
	}
	mwc := &admissionv1.MutatingWebhookConfiguration{}
	return m.inject(ctx, m.MutatingWebhookConfigName, mwc, caPEM, func() (cs []*admissionv1.WebhookClientConfig) {
		for i := range mwc.Webhooks {
			cs = append(cs, &mwc.Webhooks[i].ClientConfig)
		}
		return cs
	})
}

// inject reads the webhook configuration name into obj and patches caPEM
// into every client config of it (configs lists them); "" is none.
func (m *Manager) inject(ctx context.Context, name string, obj client.Object, caPEM []byte, configs func() []*admissionv1.WebhookClientConfig) error {
	if name == "" {
		return nil
	}
	if err := m.Client.Get(ctx, client.ObjectKey{Name: name}, obj); err != nil {
		return fmt.Errorf("webhook configuration %s: %w", name, err)
	}
	patch := client.MergeFrom(obj.DeepCopyObject().(client.Object))
	changed := false
	for _, cc := range configs() {
		if !bytes.Equal(cc.CABundle, caPEM) {
			cc.CABundle = caPEM
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return m.Client.Patch(ctx, obj, patch)
}
