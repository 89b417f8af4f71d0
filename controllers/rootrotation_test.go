package controllers

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/kubeevents"
)

// rotationIssue signs a workload certificate with the authority the CA
// service would load from Secret ambient-ca now.
func rotationIssue(t *testing.T, ns string, now time.Time) *tls.Certificate {
	t.Helper()
	secret := &corev1.Secret{}
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: CASecretName}, secret); err != nil {
		t.Fatal(err)
	}
	auth, err := LoadCASecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	auth.Now = func() time.Time { return now }
	key, _ := ca.NewKey()
	leaf, err := auth.SignPublicKey(key.Public(), identity.Identity{TrustDomain: "td.example", Namespace: "app", ServiceAccount: "web"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := &tls.Certificate{Leaf: leaf, PrivateKey: key}
	for _, x := range auth.ChainFor(leaf) {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// verifies: c chains to a bundle of roots at now.
func verifies(c *tls.Certificate, roots []*x509.Certificate, now time.Time) error {
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, der := range c.Certificate[1:] {
		x, _ := x509.ParseCertificate(der)
		inter.AddCert(x)
	}
	_, err := c.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func mustRoots(t *testing.T, pem []byte) []*x509.Certificate {
	t.Helper()
	r, err := ca.ParseCerts(pem)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestSelfSignedRootRotationPhases walks a triggered rotation: the overlap
// bundle is published while the old chain still signs, the new chain signs
// only after the overlap, certificates of both chains verify against the
// bundle, and the old root goes only when the last old-chain certificate
// has expired.
func TestSelfSignedRootRotationPhases(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "rot-self")
	now := time.Now()
	m := &caManager{client: k8s, reader: k8s, now: func() time.Time { return now }}
	mesh := caTestMesh("rot-self")
	mesh.Spec.CA.WorkloadCertTTL.Duration = time.Hour
	mesh.Spec.CA.RootRotation.Overlap.Duration = 2 * time.Minute

	first, err := m.ensure(ctx, mesh)
	if err != nil || first.Root.Phase != "" {
		t.Fatalf("install: %v, phase %q", err, first.Root.Phase)
	}
	oldRoot := first.Authority.Roots[0]
	oldCert := rotationIssue(t, "rot-self", now)

	mesh.Spec.CA.RootRotation.Trigger = "2026-12"
	over, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	bundle := mustRoots(t, over.RootsPEM)
	if over.Root.Phase != meshv1.ReasonOverlapping || !over.Root.Entered || len(bundle) != 2 || !bundle[0].Equal(oldRoot) {
		t.Fatalf("after trigger: phase %q entered %v, %d roots", over.Root.Phase, over.Root.Entered, len(bundle))
	}
	newRoot := bundle[1]
	// Nothing of the new chain is issued yet: proxies with the old bundle
	// still verify everything.
	during := rotationIssue(t, "rot-self", now)
	if err := verifies(during, []*x509.Certificate{oldRoot}, now); err != nil {
		t.Fatalf("a certificate issued while overlapping does not verify with the old root alone: %v", err)
	}
	now = now.Add(time.Minute)
	if again, err := m.ensure(ctx, mesh); err != nil || again.Root.Phase != meshv1.ReasonOverlapping || again.Root.Entered || again.Root.Next.IsZero() {
		t.Fatalf("within the overlap: %v %+v", err, again.Root)
	}

	// The overlap has lasted, but a namespace does not have the bundle yet.
	now = now.Add(time.Minute + time.Second)
	m.bundleBehind = func(context.Context, *meshv1.AmbientMesh, []byte) ([]string, error) { return []string{"late-ns"}, nil }
	if held, err := m.ensure(ctx, mesh); err != nil || held.Root.Phase != meshv1.ReasonOverlapping || !strings.Contains(held.Root.Wait, "late-ns") {
		t.Fatalf("switched to the new chain before the bundle was everywhere: %v %+v", err, held.Root)
	}
	m.bundleBehind = nil
	re, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	bundle = mustRoots(t, re.RootsPEM)
	if re.Root.Phase != meshv1.ReasonReissuing || len(bundle) != 2 || !bundle[0].Equal(newRoot) || !bundle[1].Equal(oldRoot) {
		t.Fatalf("after overlap: phase %q, %d roots", re.Root.Phase, len(bundle))
	}
	newCert := rotationIssue(t, "rot-self", now)
	if err := verifies(newCert, []*x509.Certificate{newRoot}, now); err != nil {
		t.Fatalf("reissued certificate does not chain to the new root: %v", err)
	}
	if err := verifies(newCert, []*x509.Certificate{oldRoot}, now); err == nil {
		t.Fatal("reissued certificate chains to the old root")
	}
	if err := verifies(oldCert, bundle, now); err != nil {
		t.Fatalf("old-chain certificate refused by the overlap bundle: %v", err)
	}
	if want := now.Add(time.Hour + 2*time.Minute); re.Root.OldChainUntil.Before(want) {
		t.Fatalf("old root removable at %s, before the last old-chain certificate can expire (%s)", re.Root.OldChainUntil, want)
	}

	now = re.Root.OldChainUntil.Add(-time.Second)
	if still, err := m.ensure(ctx, mesh); err != nil || still.Root.Phase != meshv1.ReasonReissuing || len(mustRoots(t, still.RootsPEM)) != 2 {
		t.Fatalf("old root removed while old-chain certificates may be in use: %v %+v", err, still.Root)
	}
	now = re.Root.OldChainUntil
	done, err := m.ensure(ctx, mesh)
	if err != nil {
		t.Fatal(err)
	}
	bundle = mustRoots(t, done.RootsPEM)
	if done.Root.Phase != meshv1.ReasonCompleted || len(bundle) != 1 || !bundle[0].Equal(newRoot) {
		t.Fatalf("completion: phase %q, %d roots", done.Root.Phase, len(bundle))
	}
	if err := verifies(oldCert, bundle, now.Add(-2*time.Hour)); err == nil {
		t.Fatal("old-chain certificate still verifies after the old root was removed")
	}
	// The same trigger does not start another rotation.
	if idle, err := m.ensure(ctx, mesh); err != nil || idle.Root.Phase != meshv1.ReasonCompleted || idle.Root.Entered {
		t.Fatalf("same trigger again: %v %+v", err, idle.Root)
	}
	secret := &corev1.Secret{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: "rot-self", Name: CASecretName}, secret); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{caSecretNextRootKey, caSecretNextCert, caSecretNextKey} {
		if _, ok := secret.Data[k]; ok {
			t.Errorf("completed rotation left %s in the Secret", k)
		}
	}
}

// TestSelfSignedRootRotationBrokenNextRoot: a damaged next root stops the
// rotation with RootRotationFailed and changes nothing.
func TestSelfSignedRootRotationBrokenNextRoot(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "rot-broken")
	now := time.Now()
	m := &caManager{client: k8s, reader: k8s, now: func() time.Time { return now }}
	mesh := caTestMesh("rot-broken")
	if _, err := m.ensure(ctx, mesh); err != nil {
		t.Fatal(err)
	}
	mesh.Spec.CA.RootRotation.Trigger = "x"
	if _, err := m.ensure(ctx, mesh); err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKey{Namespace: "rot-broken", Name: CASecretName}
	secret := &corev1.Secret{}
	if err := k8s.Get(ctx, key, secret); err != nil {
		t.Fatal(err)
	}
	secret.Data[caSecretNextCert] = []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	if err := k8s.Update(ctx, secret); err != nil {
		t.Fatal(err)
	}
	before := secret.ResourceVersion
	now = now.Add(10 * time.Minute)
	_, err := m.ensure(ctx, mesh)
	reason, fixable, rotation := caReason(err)
	if err == nil || reason != meshv1.ReasonRootRotationFailed || !fixable || !rotation || !strings.Contains(err.Error(), "old root kept") {
		t.Fatalf("got %v (reason %q)", err, reason)
	}
	if err := k8s.Get(ctx, key, secret); err != nil {
		t.Fatal(err)
	}
	if secret.ResourceVersion != before || secret.Annotations[AnnRotationPhase] != meshv1.ReasonOverlapping {
		t.Fatal("a failed step changed the CA Secret")
	}
}

// userCA is a root and an intermediate under it, as a user would bring.
type userCA struct {
	root  *x509.Certificate
	inter *ca.Authority
}

func newUserCA(t *testing.T) userCA {
	t.Helper()
	cert, key, err := ca.NewSelfSignedRoot("td.example", 48*time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	inter, err := ca.NewIntermediate(&ca.Authority{Cert: cert, Key: key, Roots: []*x509.Certificate{cert}}, "td.example", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return userCA{root: cert, inter: inter}
}

// secretData: tls.crt/tls.key of u's intermediate, ca.crt the given roots.
func (u userCA) secretData(t *testing.T, roots ...*x509.Certificate) map[string][]byte {
	t.Helper()
	key, err := ca.EncodeKey(u.inter.Key)
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{"tls.crt": ca.EncodeCerts(u.inter.Cert), "tls.key": key, "ca.crt": ca.EncodeCerts(roots...)}
}

// TestUserCARootRotation: bring-your-own rotation by editing the Secret.
// Switching the signer to a root never published is refused with the old
// CA kept; adding the new root overlaps; the switch waits for the overlap;
// the old root is published until the old chain's certificates expired,
// even if the user removes it earlier.
func TestUserCARootRotation(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "rot-byo")
	now := time.Now()
	m := &caManager{client: k8s, reader: k8s, now: func() time.Time { return now }}
	mesh := caTestMesh("rot-byo")
	mesh.Spec.CA.Type = meshv1.CAFromSecret
	mesh.Spec.CA.SecretRef = &corev1.LocalObjectReference{Name: "user-ca"}
	mesh.Spec.CA.WorkloadCertTTL.Duration = time.Hour
	mesh.Spec.CA.RootRotation.Overlap.Duration = time.Minute
	oldCA, newCA := newUserCA(t), newUserCA(t)
	user := &corev1.Secret{}
	user.Namespace, user.Name = "rot-byo", "user-ca"
	user.Data = oldCA.secretData(t, oldCA.root)
	if err := k8s.Create(ctx, user); err != nil {
		t.Fatal(err)
	}
	edit := func(data map[string][]byte) {
		t.Helper()
		user.Data = data
		if err := k8s.Update(ctx, user); err != nil {
			t.Fatal(err)
		}
	}
	step := func(what string) *meshCA {
		t.Helper()
		got, err := m.ensure(ctx, mesh)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return got
	}
	if got := step("install"); got.Root.Phase != "" {
		t.Fatalf("install phase %q", got.Root.Phase)
	}
	oldCert := rotationIssue(t, "rot-byo", now)

	// Switching straight to a new chain: refused, nothing changes.
	edit(newCA.secretData(t, newCA.root, oldCA.root))
	_, err := m.ensure(ctx, mesh)
	if reason, _, rot := caReason(err); reason != meshv1.ReasonRootRotationFailed || !rot || !strings.Contains(err.Error(), "do not trust yet") {
		t.Fatalf("switch without overlap: %v", err)
	}
	if c := rotationIssue(t, "rot-byo", now); verifies(c, []*x509.Certificate{oldCA.root}, now) != nil {
		t.Fatal("the refused switch changed the signing CA")
	}

	// Step 1: both roots in ca.crt, old signer.
	edit(oldCA.secretData(t, oldCA.root, newCA.root))
	got := step("overlap")
	if got.Root.Phase != meshv1.ReasonOverlapping || len(mustRoots(t, got.RootsPEM)) != 2 {
		t.Fatalf("overlap: %+v", got.Root)
	}
	// Step 2: switch the signer; held back until the overlap has lasted.
	edit(newCA.secretData(t, newCA.root, oldCA.root))
	got = step("early switch")
	if got.Root.Phase != meshv1.ReasonOverlapping || verifies(rotationIssue(t, "rot-byo", now), []*x509.Certificate{oldCA.root}, now) != nil {
		t.Fatalf("switched before the overlap lasted: %+v", got.Root)
	}
	now = now.Add(time.Minute)
	got = step("switch")
	if got.Root.Phase != meshv1.ReasonReissuing {
		t.Fatalf("switch: %+v", got.Root)
	}
	newCert := rotationIssue(t, "rot-byo", now)
	bundle := mustRoots(t, got.RootsPEM)
	if verifies(newCert, []*x509.Certificate{newCA.root}, now) != nil || verifies(oldCert, bundle, now) != nil || !bundle[0].Equal(newCA.root) {
		t.Fatal("after the switch: new chain must sign, old-chain certificates must still verify, the new root listed first")
	}
	// Step 3 too early: the old root stays published.
	edit(newCA.secretData(t, newCA.root))
	got = step("early removal")
	if len(mustRoots(t, got.RootsPEM)) != 2 || got.Root.Phase != meshv1.ReasonReissuing {
		t.Fatalf("old root dropped while old-chain certificates may be in use: %+v", got.Root)
	}
	now = got.Root.OldChainUntil
	got = step("completion")
	if bundle = mustRoots(t, got.RootsPEM); got.Root.Phase != meshv1.ReasonCompleted || len(bundle) != 1 || !bundle[0].Equal(newCA.root) {
		t.Fatalf("completion: %+v, %d roots", got.Root, len(bundle))
	}

	// A malformed root in ca.crt later: CA error, rotation False, mirror kept.
	edit(map[string][]byte{"tls.crt": user.Data["tls.crt"], "tls.key": user.Data["tls.key"], "ca.crt": []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")})
	_, err = m.ensure(ctx, mesh)
	if _, _, rot := caReason(err); err == nil || !rot {
		t.Fatalf("malformed new root: %v", err)
	}
	mirror := &corev1.Secret{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: "rot-byo", Name: CASecretName}, mirror); err != nil {
		t.Fatal(err)
	}
	if r := mustRoots(t, mirror.Data[CASecretRootCert]); len(r) != 1 || !r[0].Equal(newCA.root) {
		t.Fatal("a malformed Secret changed the published bundle")
	}
}

// TestRootRotationCondition: the phase shows as the RootRotation condition.
func TestRootRotationCondition(t *testing.T) {
	for _, tc := range []struct {
		r    rotation
		want string
	}{
		{rotation{}, ""},
		{rotation{Phase: meshv1.ReasonOverlapping, Wait: "w"}, meshv1.ReasonOverlapping},
		{rotation{Phase: meshv1.ReasonReissuing}, meshv1.ReasonReissuing},
		{rotation{Phase: meshv1.ReasonCompleted}, meshv1.ReasonCompleted},
	} {
		st := newMeshStatus(&meshv1.AmbientMesh{})
		st.rootRotation(tc.r)
		c := meta.FindStatusCondition(st.status.Conditions, meshv1.ConditionRootRotation)
		if tc.want == "" {
			if c != nil {
				t.Errorf("no rotation yet, got condition %+v", c)
			}
			continue
		}
		if c == nil || c.Reason != tc.want || c.Status != "True" || c.Message == "" {
			t.Errorf("%s: got %+v", tc.want, c)
		}
	}
}

// TestRootRotationThroughOperator: through the running operator, a new
// trigger puts the mesh in RootRotation=True/Overlapping with its Event
// and the overlap bundle published to namespaces; a Secret CA switched to
// a root never published gives RootRotation=False/RootRotationFailed with
// a Warning, and the published bundle stays the old root.
func TestRootRotationThroughOperator(t *testing.T) {
	ctx := context.Background()
	t.Run("self-signed", func(t *testing.T) {
		mesh := newMesh(t, "rot-op", "rot-op-ns", nil)
		waitCondition(t, "rot-op", meshv1.ConditionCAReady, "True", meshv1.ReasonCAIssued)
		if err := updateMesh(t, "rot-op", func(m *meshv1.AmbientMesh) { m.Spec.CA.RootRotation.Trigger = "now" }); err != nil {
			t.Fatal(err)
		}
		waitCondition(t, "rot-op", meshv1.ConditionRootRotation, "True", meshv1.ReasonOverlapping)
		waitEvent(t, mesh, "AmbientMesh", wantEvent{kubeevents.Normal, EventRootRotation})
		resyncMesh(t, "rot-op")
		eventually(t, "overlap bundle in a namespace", func() error {
			cm := &corev1.ConfigMap{}
			if err := k8s.Get(ctx, client.ObjectKey{Namespace: "rot-op-resync", Name: RootCertConfigMap}, cm); err != nil {
				return err
			}
			if n := strings.Count(cm.Data[RootCertKey], "BEGIN CERTIFICATE"); n != 2 {
				return fmt.Errorf("%d roots", n)
			}
			return nil
		})
	})
	t.Run("secret-ca-refused", func(t *testing.T) {
		createNamespace(t, "rot-op-byo")
		oldCA, newCA := newUserCA(t), newUserCA(t)
		user := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "rot-op-byo", Name: "user-ca"}, Data: oldCA.secretData(t, oldCA.root)}
		if err := k8s.Create(ctx, user); err != nil {
			t.Fatal(err)
		}
		mesh := newMesh(t, "rot-op-byo", "rot-op-byo", func(m *meshv1.AmbientMesh) {
			m.Spec.TrustDomain = "td.example"
			m.Spec.CA.Type = meshv1.CAFromSecret
			m.Spec.CA.SecretRef = &corev1.LocalObjectReference{Name: "user-ca"}
		})
		waitCondition(t, "rot-op-byo", meshv1.ConditionCAReady, "True", meshv1.ReasonCAIssued)
		user.Data = newCA.secretData(t, newCA.root)
		if err := k8s.Update(ctx, user); err != nil {
			t.Fatal(err)
		}
		waitCondition(t, "rot-op-byo", meshv1.ConditionRootRotation, "False", meshv1.ReasonRootRotationFailed)
		waitEvent(t, mesh, "AmbientMesh", wantEvent{kubeevents.Warning, EventRootRotationFailed})
		mirror := &corev1.Secret{}
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: "rot-op-byo", Name: CASecretName}, mirror); err != nil {
			t.Fatal(err)
		}
		if r := mustRoots(t, mirror.Data[CASecretRootCert]); len(r) != 1 || !r[0].Equal(oldCA.root) {
			t.Fatal("the refused switch changed the published bundle")
		}
	})
}

// TestBundleBehind: the namespaces whose trust bundle is not the given
// roots are named; a namespace holding it is not.
func TestBundleBehind(t *testing.T) {
	ctx := context.Background()
	mesh := newMesh(t, "rot-behind", "rot-behind-ns", nil)
	waitCondition(t, "rot-behind", meshv1.ConditionCAReady, "True", meshv1.ReasonCAIssued)
	r := &AmbientMeshReconciler{Client: k8s}
	cm := &corev1.ConfigMap{}
	eventually(t, "bundle in the mesh namespace", func() error {
		return k8s.Get(ctx, client.ObjectKey{Namespace: "rot-behind-ns", Name: RootCertConfigMap}, cm)
	})
	current := []byte(cm.Data[RootCertKey])
	eventually(t, "bundle everywhere", func() error {
		behind, err := r.bundleBehind(ctx, mesh, current)
		if err != nil || len(behind) > 0 {
			return fmt.Errorf("behind %v (%v)", behind, err)
		}
		return nil
	})
	behind, err := r.bundleBehind(ctx, mesh, append([]byte("other roots\n"), current...))
	if err != nil || len(behind) == 0 || !slices.Contains(behind, "rot-behind-ns") {
		t.Fatalf("a bundle no namespace holds: behind %v (%v)", behind, err)
	}
}

// A trigger changed while a rotation runs does not disturb it: the status
// says it is queued, and it starts the next rotation once this one has
// completed.
func TestSelfSignedRootRotationQueuesANewTrigger(t *testing.T) {
	ctx := context.Background()
	caTestNamespace(t, "rot-queue")
	now := time.Now()
	m := &caManager{client: k8s, reader: k8s, now: func() time.Time { return now }}
	mesh := caTestMesh("rot-queue")
	mesh.Spec.CA.WorkloadCertTTL.Duration = time.Hour
	mesh.Spec.CA.RootRotation.Overlap.Duration = 2 * time.Minute
	if _, err := m.ensure(ctx, mesh); err != nil {
		t.Fatal(err)
	}
	mesh.Spec.CA.RootRotation.Trigger = "first"
	if st, err := m.ensure(ctx, mesh); err != nil || st.Root.Phase != meshv1.ReasonOverlapping || strings.Contains(st.Root.Wait, "queued") {
		t.Fatalf("first trigger: %v %+v", err, st.Root)
	}
	mesh.Spec.CA.RootRotation.Trigger = "second"
	queued := `"second" is queued`
	st, err := m.ensure(ctx, mesh)
	if err != nil || st.Root.Phase != meshv1.ReasonOverlapping || st.Root.Entered || !strings.Contains(st.Root.Wait, queued) {
		t.Fatalf("second trigger while overlapping: %v %+v, want the same rotation with %s in its status", err, st.Root, queued)
	}
	now = now.Add(2*time.Minute + time.Second)
	re, err := m.ensure(ctx, mesh)
	if err != nil || re.Root.Phase != meshv1.ReasonReissuing || !strings.Contains(re.Root.Wait, queued) {
		t.Fatalf("after the overlap: %v %+v, want Reissuing with %s", err, re.Root, queued)
	}
	now = re.Root.OldChainUntil
	if done, err := m.ensure(ctx, mesh); err != nil || done.Root.Phase != meshv1.ReasonCompleted {
		t.Fatalf("completion: %v %+v", err, done.Root)
	}
	next, err := m.ensure(ctx, mesh)
	if err != nil || next.Root.Phase != meshv1.ReasonOverlapping || !next.Root.Entered || next.Root.Trigger != "second" || strings.Contains(next.Root.Wait, "queued") {
		t.Fatalf("after completion: %v %+v, want a new rotation for trigger second", err, next.Root)
	}
}
