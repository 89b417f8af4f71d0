package controllers

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
)

// maxIntermediateTTL caps the self-signed intermediate's lifetime; it is
// re-issued from the root when a third of its life is left.
const maxIntermediateTTL = 365 * 24 * time.Hour

// caError is a CA problem the user must fix; it carries the condition reason.
type caError struct {
	reason string
	err    error
	// rotation: the error stops a root rotation (RootRotation False).
	rotation bool
}

func (e *caError) Error() string { return e.err.Error() }
func (e *caError) Unwrap() error { return e.err }

func caFailure(reason, format string, args ...any) error {
	return &caError{reason: reason, err: fmt.Errorf(format, args...)}
}

// meshCA is the outcome of a CA reconcile: the signing authority and the
// trust bundle to publish.
type meshCA struct {
	Authority *ca.Authority
	RootsPEM  []byte
	// Issued: this reconcile created the self-signed root; Rotated: it
	// re-issued the intermediate.
	Issued, Rotated bool
	// Root is the root rotation's state.
	Root rotation
}

// rootExpiry is the earliest expiry among the trust bundle's roots.
func (m *meshCA) rootExpiry() time.Time {
	var t time.Time
	for _, r := range m.Authority.Roots {
		if t.IsZero() || r.NotAfter.Before(t) {
			t = r.NotAfter
		}
	}
	return t
}

// LoadCASecret reads the mesh CA from the operator's Secret (docs/interfaces.md).
func LoadCASecret(s *corev1.Secret) (*ca.Authority, error) {
	return ca.LoadAuthority(s.Data[CASecretCert], s.Data[CASecretKey], s.Data[CASecretRootCert])
}

// caManager keeps Secret <mesh-ns>/ambient-ca current. Reads go straight to
// the API server (reader is uncached): Secrets are never cached by the
// operator, so keys do not sit in an informer.
type caManager struct {
	client client.Client
	reader client.Reader
	now    func() time.Time
	// bundleBehind names the namespaces whose published trust bundle is
	// not roots yet: a root rotation does not let the new chain sign
	// before the overlap bundle is everywhere (nil: not checked).
	bundleBehind func(ctx context.Context, mesh *meshv1.AmbientMesh, roots []byte) ([]string, error)
}

func (m *caManager) ensure(ctx context.Context, mesh *meshv1.AmbientMesh) (*meshCA, error) {
	if mesh.Spec.CA.Type == meshv1.CAFromSecret {
		return m.ensureFromUserSecret(ctx, mesh)
	}
	return m.ensureSelfSigned(ctx, mesh)
}

func (m *caManager) getSecret(ctx context.Context, ns, name string) (*corev1.Secret, error) {
	s := &corev1.Secret{}
	err := m.reader.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, s)
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	return s, err
}

func (m *caManager) ensureSelfSigned(ctx context.Context, mesh *meshv1.AmbientMesh) (*meshCA, error) {
	secret, err := m.getSecret(ctx, mesh.Spec.Namespace, CASecretName)
	if err != nil {
		return nil, err
	}
	if secret == nil {
		return m.createSelfSigned(ctx, mesh)
	}
	auth, err := LoadCASecret(secret)
	if err != nil {
		// Never overwrite a broken root silently: every workload trusts it.
		return nil, caFailure(meshv1.ReasonCASecretInvalid, "Secret %s/%s: %v; delete it to generate a new root (all workload certificates will be re-issued)", mesh.Spec.Namespace, CASecretName, err)
	}
	if err := checkTrustDomain(auth, mesh.Spec.TrustDomain); err != nil {
		return nil, caFailure(meshv1.ReasonCASecretInvalid, "Secret %s/%s: %v", mesh.Spec.Namespace, CASecretName, err)
	}
	auth, root, err := m.stepSelfSigned(ctx, mesh, secret, auth)
	if err != nil {
		return nil, err
	}
	rotated := false
	if root.Phase != meshv1.ReasonOverlapping && m.needsRotation(auth.Cert) {
		next, err := m.rotateIntermediate(ctx, mesh, secret, auth)
		if err != nil {
			return nil, err
		}
		rotated, auth = next != auth, next
	}
	return &meshCA{Authority: auth, RootsPEM: ca.EncodeCerts(auth.Roots...), Rotated: rotated, Root: root}, nil
}

// needsRotation: a third or less of the signing certificate's life is left.
func (m *caManager) needsRotation(c *x509.Certificate) bool {
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotAfter.Sub(m.now()) < life/3
}

func (m *caManager) createSelfSigned(ctx context.Context, mesh *meshv1.AmbientMesh) (*meshCA, error) {
	now := m.now()
	rootCert, rootKey, err := ca.NewSelfSignedRoot(mesh.Spec.TrustDomain, mesh.Spec.CA.RootCertTTL.Duration, now)
	if err != nil {
		return nil, err
	}
	root := &ca.Authority{Cert: rootCert, Key: rootKey, Roots: []*x509.Certificate{rootCert}, Now: m.now}
	inter, err := ca.NewIntermediate(root, mesh.Spec.TrustDomain, intermediateTTL(mesh))
	if err != nil {
		return nil, err
	}
	data, err := secretData(root, inter)
	if err != nil {
		return nil, err
	}
	secret := &corev1.Secret{
		ObjectMeta: meshObjectMeta(mesh, CASecretName, "ca"),
		Type:       corev1.SecretTypeOpaque,
		Data:       data,
	}
	// The trigger in force at creation does not rotate the new root.
	secret.Annotations = rotation{Trigger: mesh.Spec.CA.RootRotation.Trigger}.annotations()
	if err := m.client.Create(ctx, secret); err != nil {
		if apierrors.IsAlreadyExists(err) {
			// Another replica (leader change) created it first: use theirs.
			return m.ensureSelfSigned(ctx, mesh)
		}
		return nil, fmt.Errorf("create CA Secret: %w", err)
	}
	return &meshCA{Authority: inter, RootsPEM: data[CASecretRootCert], Issued: true}, nil
}

func (m *caManager) rotateIntermediate(ctx context.Context, mesh *meshv1.AmbientMesh, secret *corev1.Secret, cur *ca.Authority) (*ca.Authority, error) {
	rootKey, err := ca.ParseKey(secret.Data[CASecretRootKey])
	if err != nil || len(cur.Roots) == 0 || !keyMatches(rootKey, cur.Roots[0]) {
		return cur, nil // no usable root key (user-supplied CA): keep signing until expiry
	}
	root := &ca.Authority{Cert: cur.Roots[0], Key: rootKey, Roots: cur.Roots, Now: m.now}
	inter, err := ca.NewIntermediate(root, mesh.Spec.TrustDomain, intermediateTTL(mesh))
	if err != nil {
		return nil, err
	}
	data, err := secretData(root, inter)
	if err != nil {
		return nil, err
	}
	data[CASecretRootCert] = secret.Data[CASecretRootCert] // the bundle, overlapping during a root rotation
	secret.Data = data
	if err := m.client.Update(ctx, secret); err != nil {
		return nil, fmt.Errorf("rotate intermediate: %w", err)
	}
	return inter, nil
}

func keyMatches(key crypto.Signer, cert *x509.Certificate) bool {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(cert.PublicKey)
}

func intermediateTTL(mesh *meshv1.AmbientMesh) time.Duration {
	return min(mesh.Spec.CA.RootCertTTL.Duration, maxIntermediateTTL)
}

func secretData(root, inter *ca.Authority) (map[string][]byte, error) {
	rootKey, err := ca.EncodeKey(root.Key)
	if err != nil {
		return nil, err
	}
	interKey, err := ca.EncodeKey(inter.Key)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		CASecretRootCert: ca.EncodeCerts(root.Cert),
		CASecretRootKey:  rootKey,
		CASecretCert:     ca.EncodeCerts(append([]*x509.Certificate{inter.Cert}, inter.Chain...)...),
		CASecretKey:      interKey,
	}, nil
}

// ensureFromUserSecret validates the user's kubernetes.io/tls-style Secret and
// mirrors it into ambient-ca, the one place the CA service reads from.
func (m *caManager) ensureFromUserSecret(ctx context.Context, mesh *meshv1.AmbientMesh) (*meshCA, error) {
	if mesh.Spec.CA.SecretRef == nil || mesh.Spec.CA.SecretRef.Name == "" {
		return nil, caFailure(meshv1.ReasonCASecretMissing, "spec.ca.secretRef.name is empty; name a Secret in namespace %s", mesh.Spec.Namespace)
	}
	name := mesh.Spec.CA.SecretRef.Name
	user, err := m.getSecret(ctx, mesh.Spec.Namespace, name)
	if err != nil {
		return nil, err
	}
	if user == nil {
		return nil, caFailure(meshv1.ReasonCASecretMissing, "Secret %s/%s named by spec.ca.secretRef does not exist; create it with tls.crt and tls.key (and optionally ca.crt)", mesh.Spec.Namespace, name)
	}
	prev, err := m.getSecret(ctx, mesh.Spec.Namespace, CASecretName)
	if err != nil {
		return nil, err
	}
	auth, key, err := validateUserCA(user.Data, mesh.Spec.TrustDomain, m.now())
	if err != nil {
		// The mirror (what proxies trust and the CA signs with) is kept.
		return nil, &caError{reason: meshv1.ReasonCASecretInvalid, err: fmt.Errorf("Secret %s/%s: %v", mesh.Spec.Namespace, name, err), rotation: prev != nil}
	}
	auth, data, root, err := m.planUserRotation(ctx, mesh, prev, auth, key)
	if err != nil {
		var ce *caError
		if errors.As(err, &ce) {
			return nil, err
		}
		return nil, &caError{reason: meshv1.ReasonCASecretInvalid, err: fmt.Errorf("Secret %s/%s: %v", mesh.Spec.Namespace, name, err), rotation: prev != nil}
	}
	mirror := &corev1.Secret{
		ObjectMeta: meshObjectMeta(mesh, CASecretName, "ca"),
		Type:       corev1.SecretTypeOpaque,
		Data:       data,
	}
	mirror.Annotations = root.annotations()
	if err := apply(ctx, m.client, mirror); err != nil {
		return nil, err
	}
	return &meshCA{Authority: auth, RootsPEM: mirror.Data[CASecretRootCert], Root: root}, nil
}

// validateUserCA checks a user-supplied CA (tls.crt, tls.key, optional
// ca.crt): a CA certificate matching its key, chaining to a root, for the
// mesh's trust domain, not expired. Hostile bytes yield an error, never a
// panic (FuzzValidateUserCA).
func validateUserCA(data map[string][]byte, trustDomain string, now time.Time) (*ca.Authority, []byte, error) {
	auth, err := ca.LoadAuthority(data[corev1.TLSCertKey], data[corev1.TLSPrivateKeyKey], data["ca.crt"])
	if err != nil {
		return nil, nil, err
	}
	if err := checkTrustDomain(auth, trustDomain); err != nil {
		return nil, nil, err
	}
	if !auth.Cert.NotAfter.After(now) {
		return nil, nil, fmt.Errorf("CA certificate expired at %s", auth.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key, err := ca.EncodeKey(auth.Key)
	if err != nil {
		return nil, nil, err
	}
	return auth, key, nil
}

// checkTrustDomain refuses a CA minted for another trust domain.
func checkTrustDomain(a *ca.Authority, td string) error {
	if got := ca.TrustDomainOf(a.Cert); got != "" && got != td {
		return fmt.Errorf("CA certificate is for trust domain %q, mesh uses %q", got, td)
	}
	return nil
}

func caReason(err error) (reason string, userFixable, rotation bool) {
	var ce *caError
	if errors.As(err, &ce) {
		return ce.reason, true, ce.rotation
	}
	return "", false, false
}
