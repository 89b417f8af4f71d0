package controllers

// Root rotation (docs/operations.md, "Rotating the mesh root"). The state
// lives on Secret ambient-ca (annotations, and for a self-signed mesh the
// next root's keys), so each step is one write of that Secret: it either
// happens whole or not at all, and a restarted operator resumes it.
//
//	Overlapping: the bundle (root.crt) carries old and new roots; the old
//	  chain still signs. Lasts spec.ca.rootRotation.overlap, the time for
//	  every proxy's mounted bundle to follow.
//	Reissuing: the new chain signs; the bundle lists the new root first,
//	  which changes it, and proxies re-issue every certificate when their
//	  bundle changes. The old root stays until every certificate the old
//	  chain issued has expired: none was issued after the switch, and none
//	  lives longer than workloadCertTTL.
//	Completed: the bundle holds the new root only.

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	meshv1 "github.com/ambientmesh/ambient/api/v1alpha1"
	"github.com/ambientmesh/ambient/proxylib/ca"
)

// Annotations on Secret ambient-ca recording a root rotation.
const (
	AnnRotationPhase   = "mesh.ambient.dev/root-rotation-phase"
	AnnRotationSince   = "mesh.ambient.dev/root-rotation-since"
	AnnOldChainUntil   = "mesh.ambient.dev/root-rotation-old-chain-until"
	AnnRotationTrigger = "mesh.ambient.dev/root-rotation-trigger"
)

// Keys of ambient-ca holding the next self-signed root and intermediate
// while the bundle overlaps (never readable by workloads: mesh namespace,
// operator only).
const (
	caSecretNextRootKey = "next-root.key"
	caSecretNextCert    = "next-ca.crt"
	caSecretNextKey     = "next-ca.key"
)

// defaultOverlap applies when the API server did not default the field.
const defaultOverlap = 2 * time.Minute

// rotation is a root rotation's recorded state.
type rotation struct {
	Phase         string // "" (none yet), or a meshv1.Reason{Overlapping,Reissuing,Completed}
	Since         time.Time
	OldChainUntil time.Time
	Trigger       string
	// Entered: this reconcile moved to Phase. Wait: what the current phase
	// waits for (status message); Next: when to look again.
	Entered bool
	Wait    string
	Next    time.Time
}

func readRotation(s *corev1.Secret) rotation {
	a := s.Annotations
	r := rotation{Phase: a[AnnRotationPhase], Trigger: a[AnnRotationTrigger]}
	r.Since, _ = time.Parse(time.RFC3339, a[AnnRotationSince])
	r.OldChainUntil, _ = time.Parse(time.RFC3339, a[AnnOldChainUntil])
	return r
}

// annotations renders r for the Secret.
func (r rotation) annotations() map[string]string {
	a := map[string]string{}
	set := func(k, v string) {
		if v != "" {
			a[k] = v
		}
	}
	set(AnnRotationPhase, r.Phase)
	set(AnnRotationTrigger, r.Trigger)
	if !r.Since.IsZero() {
		a[AnnRotationSince] = r.Since.UTC().Format(time.RFC3339)
	}
	if r.Phase == meshv1.ReasonReissuing && !r.OldChainUntil.IsZero() {
		a[AnnOldChainUntil] = r.OldChainUntil.UTC().Format(time.RFC3339)
	}
	return a
}

func (r *rotation) enter(phase string, now time.Time) {
	r.Phase, r.Since, r.Entered, r.Wait = phase, now, true, ""
}

func overlapOf(mesh *meshv1.AmbientMesh) time.Duration {
	if d := mesh.Spec.CA.RootRotation.Overlap.Duration; d > 0 {
		return d
	}
	return defaultOverlap
}

// oldChainBound is when the last certificate the old chain can have issued
// expires, for a switch at now: workload certificates live at most
// workloadCertTTL, and control-plane replicas reload the Secret within the
// overlap (they watch it and re-read it periodically).
func oldChainBound(mesh *meshv1.AmbientMesh, now time.Time) time.Time {
	ttl := mesh.Spec.CA.WorkloadCertTTL.Duration
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	return now.Add(ttl + overlapOf(mesh)).Truncate(time.Second).Add(time.Second)
}

// rootNearExpiry: a third or less of the root's life is left, when the
// self-signed root is rotated without being asked.
func (m *caManager) rootNearExpiry(root *x509.Certificate) bool {
	return m.needsRotation(root)
}

// signingRoot is the root a's chain verifies to.
func signingRoot(a *ca.Authority) (*x509.Certificate, error) {
	inter := x509.NewCertPool()
	for _, c := range a.Chain {
		inter.AddCert(c)
	}
	for _, r := range a.Roots {
		if a.Cert.Equal(r) {
			return r, nil
		}
		pool := x509.NewCertPool()
		pool.AddCert(r)
		if _, err := a.Cert.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: a.Cert.NotBefore.Add(time.Minute),
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
			return r, nil
		}
	}
	return nil, fmt.Errorf("CA certificate %q does not chain to any root of the bundle", a.Cert.Subject.CommonName)
}

// bundle orders roots with first (the signing root) first, without
// duplicates: the order is part of the bundle, so a switch of signing root
// changes what every proxy reads.
func bundle(first *x509.Certificate, rest ...[]*x509.Certificate) []*x509.Certificate {
	out := []*x509.Certificate{first}
	for _, rs := range rest {
		for _, r := range rs {
			if !containsCert(out, r) {
				out = append(out, r)
			}
		}
	}
	return out
}

func containsCert(list []*x509.Certificate, c *x509.Certificate) bool {
	for _, x := range list {
		if x.Equal(c) {
			return true
		}
	}
	return false
}

func rotationFailure(format string, args ...any) error {
	return &caError{reason: meshv1.ReasonRootRotationFailed, err: fmt.Errorf(format, args...), rotation: true}
}

// stepSelfSigned advances a self-signed root rotation by at most one phase,
// writing the Secret once. It returns the authority now signing. A trigger
// changed while a rotation runs is queued (it starts the next rotation once
// this one completes), and the status says so.
func (m *caManager) stepSelfSigned(ctx context.Context, mesh *meshv1.AmbientMesh, secret *corev1.Secret, auth *ca.Authority) (*ca.Authority, rotation, error) {
	auth, r, err := m.stepSelfSignedPhase(ctx, mesh, secret, auth)
	trigger := mesh.Spec.CA.RootRotation.Trigger
	running := r.Phase == meshv1.ReasonOverlapping || r.Phase == meshv1.ReasonReissuing
	if running && trigger != "" && trigger != r.Trigger {
		if r.Wait == "" {
			r.Wait = "root rotation " + r.Phase
		}
		r.Wait += fmt.Sprintf("; spec.ca.rootRotation.trigger %q is queued: it starts another rotation when this one completes", trigger)
	}
	return auth, r, err
}

func (m *caManager) stepSelfSignedPhase(ctx context.Context, mesh *meshv1.AmbientMesh, secret *corev1.Secret, auth *ca.Authority) (*ca.Authority, rotation, error) {
	r := readRotation(secret)
	now := m.now()
	switch r.Phase {
	case meshv1.ReasonOverlapping:
		if at := r.Since.Add(overlapOf(mesh)); now.Before(at) {
			r.Next, r.Wait = at, fmt.Sprintf("trust bundle carries old and new roots; the new chain signs from %s", at.UTC().Format(time.RFC3339))
			return auth, r, nil
		}
		if wait, err := m.overlapPending(ctx, mesh, secret.Data[CASecretRootCert]); err != nil || wait != "" {
			r.Next, r.Wait = now.Add(5*time.Second), wait
			return auth, r, err
		}
		next, err := loadNextSelfSigned(secret, auth)
		if err != nil {
			return nil, r, rotationFailure("Secret %s/%s: next root: %v; old root kept: delete keys %s, %s, %s and annotation %s to restart the rotation",
				secret.Namespace, secret.Name, err, caSecretNextRootKey, caSecretNextCert, caSecretNextKey, AnnRotationPhase)
		}
		r.enter(meshv1.ReasonReissuing, now)
		r.OldChainUntil = oldChainBound(mesh, now)
		data := map[string][]byte{
			CASecretRootCert: ca.EncodeCerts(next.Roots...),
			CASecretRootKey:  secret.Data[caSecretNextRootKey],
			CASecretCert:     secret.Data[caSecretNextCert],
			CASecretKey:      secret.Data[caSecretNextKey],
		}
		return next, r, m.writeRotation(ctx, secret, data, r)
	case meshv1.ReasonReissuing:
		if now.Before(r.OldChainUntil) {
			r.Next, r.Wait = r.OldChainUntil, fmt.Sprintf("workload certificates are re-issued from the new root; the old root is removed at %s, when the last old-chain certificate has expired", r.OldChainUntil.UTC().Format(time.RFC3339))
			return auth, r, nil
		}
		r.enter(meshv1.ReasonCompleted, now)
		auth.Roots = auth.Roots[:1]
		data := cloneData(secret.Data)
		data[CASecretRootCert] = ca.EncodeCerts(auth.Roots...)
		return auth, r, m.writeRotation(ctx, secret, data, r)
	}
	trigger := mesh.Spec.CA.RootRotation.Trigger
	if (trigger == "" || trigger == r.Trigger) && !m.rootNearExpiry(auth.Roots[0]) {
		return auth, r, nil
	}
	root, key, err := ca.NewSelfSignedRoot(mesh.Spec.TrustDomain, mesh.Spec.CA.RootCertTTL.Duration, now)
	if err != nil {
		return nil, r, err
	}
	nextRoot := &ca.Authority{Cert: root, Key: key, Roots: []*x509.Certificate{root}, Now: m.now}
	inter, err := ca.NewIntermediate(nextRoot, mesh.Spec.TrustDomain, intermediateTTL(mesh))
	if err != nil {
		return nil, r, err
	}
	next, err := secretData(nextRoot, inter)
	if err != nil {
		return nil, r, err
	}
	data := cloneData(secret.Data)
	auth.Roots = bundle(auth.Roots[0], auth.Roots, []*x509.Certificate{root})
	data[CASecretRootCert] = ca.EncodeCerts(auth.Roots...)
	data[caSecretNextRootKey], data[caSecretNextCert], data[caSecretNextKey] = next[CASecretRootKey], next[CASecretCert], next[CASecretKey]
	r.enter(meshv1.ReasonOverlapping, now)
	r.Trigger = trigger
	r.Next = now.Add(overlapOf(mesh))
	return auth, r, m.writeRotation(ctx, secret, data, r)
}

// loadNextSelfSigned is the authority of the next root's intermediate,
// trusting the new root first and the old ones after it.
func loadNextSelfSigned(secret *corev1.Secret, cur *ca.Authority) (*ca.Authority, error) {
	next, err := ca.LoadAuthority(secret.Data[caSecretNextCert], secret.Data[caSecretNextKey], secret.Data[CASecretRootCert])
	if err != nil {
		return nil, err
	}
	root, err := signingRoot(next)
	if err != nil {
		return nil, err
	}
	rootKey, err := ca.ParseKey(secret.Data[caSecretNextRootKey])
	if err != nil || !keyMatches(rootKey, root) {
		return nil, fmt.Errorf("%s does not hold the key of the new root", caSecretNextRootKey)
	}
	if root.Equal(cur.Roots[0]) {
		return nil, fmt.Errorf("the next intermediate chains to the current root")
	}
	next.Roots = bundle(root, cur.Roots)
	next.Now = cur.Now
	return next, nil
}

func cloneData(d map[string][]byte) map[string][]byte {
	out := make(map[string][]byte, len(d))
	for k, v := range d {
		out[k] = v
	}
	return out
}

// writeRotation stores data and r on the Secret in one update; a conflict
// (another replica moved first) fails the reconcile, which then re-reads.
func (m *caManager) writeRotation(ctx context.Context, secret *corev1.Secret, data map[string][]byte, r rotation) error {
	secret.Data = data
	if secret.Annotations == nil {
		secret.Annotations = map[string]string{}
	}
	for _, k := range []string{AnnRotationPhase, AnnRotationSince, AnnOldChainUntil, AnnRotationTrigger} {
		delete(secret.Annotations, k)
	}
	for k, v := range r.annotations() {
		secret.Annotations[k] = v
	}
	if err := m.client.Update(ctx, secret); err != nil {
		return fmt.Errorf("root rotation (%s): %w", r.Phase, err)
	}
	return nil
}

// planUserRotation decides what the mirror of a user-supplied CA holds,
// given the previous mirror: the user adds the new root to ca.crt (the
// bundle overlaps), then switches tls.crt/tls.key to the new chain (the
// switch is held back until the overlap has lasted), then removes the old
// root (which the mirror keeps publishing until the old chain's
// certificates have expired). A switch to a root the proxies were never
// given is refused and nothing changes.
func (m *caManager) planUserRotation(ctx context.Context, mesh *meshv1.AmbientMesh, prev *corev1.Secret, user *ca.Authority, userKey []byte) (*ca.Authority, map[string][]byte, rotation, error) {
	now := m.now()
	newRoot, err := signingRoot(user)
	if err != nil {
		return nil, nil, rotation{}, err
	}
	var prevAuth *ca.Authority
	if prev != nil {
		prevAuth, _ = LoadCASecret(prev)
	}
	if prevAuth == nil {
		// First install (or an unreadable mirror, which we own): take it as is.
		user.Roots = bundle(newRoot, user.Roots)
		return user, mirrorData(user, userKey), rotation{}, nil
	}
	r := readRotation(prev)
	r.Trigger = ""
	oldRoot, err := signingRoot(prevAuth)
	if err != nil {
		oldRoot = prevAuth.Roots[0]
	}
	published := prevAuth.Roots
	if !newRoot.Equal(oldRoot) {
		if !containsCert(published, newRoot) {
			return nil, nil, r, rotationFailure("the CA certificate now chains to root %q, which proxies do not trust yet; old root kept: first add the new root to ca.crt next to the old one and keep the old tls.crt/tls.key for spec.ca.rootRotation.overlap (%s), then switch them", newRoot.Subject.CommonName, overlapOf(mesh))
		}
		if r.Phase == meshv1.ReasonOverlapping {
			if at := r.Since.Add(overlapOf(mesh)); now.Before(at) {
				// Too early: keep signing with the old chain.
				prevAuth.Roots = bundle(oldRoot, published, user.Roots)
				r.Next, r.Wait = at, fmt.Sprintf("the new CA certificate is used from %s, when every proxy has the overlapping bundle", at.UTC().Format(time.RFC3339))
				return prevAuth, cloneMirror(prev, prevAuth), r, nil
			}
		}
		if wait, err := m.overlapPending(ctx, mesh, prev.Data[CASecretRootCert]); err != nil || wait != "" {
			prevAuth.Roots = bundle(oldRoot, published, user.Roots)
			r.Next, r.Wait = now.Add(5*time.Second), wait
			return prevAuth, cloneMirror(prev, prevAuth), r, err
		}
		r.enter(meshv1.ReasonReissuing, now)
		r.OldChainUntil = oldChainBound(mesh, now)
		user.Roots = bundle(newRoot, user.Roots, published)
		r.Wait = reissuingWait(r)
		r.Next = r.OldChainUntil
		return user, mirrorData(user, userKey), r, nil
	}
	// Signing root unchanged.
	if added := !allIn(user.Roots, published); added {
		if r.Phase != meshv1.ReasonOverlapping {
			r.enter(meshv1.ReasonOverlapping, now)
		}
		at := r.Since.Add(overlapOf(mesh))
		if now.Before(at) {
			r.Next = at // the user acts next; no need to look again after that
		}
		r.Wait = fmt.Sprintf("trust bundle carries old and new roots; switch tls.crt/tls.key to the new chain after %s", at.UTC().Format(time.RFC3339))
	}
	roots := user.Roots
	if r.Phase == meshv1.ReasonReissuing {
		if now.Before(r.OldChainUntil) {
			roots = bundle(newRoot, user.Roots, published) // the old root stays until its certificates expired
			r.Wait, r.Next = reissuingWait(r), r.OldChainUntil
		} else if len(user.Roots) == 1 {
			r.enter(meshv1.ReasonCompleted, now)
		} else {
			r.Wait = "old-chain certificates have expired: remove the old root from ca.crt to complete the rotation"
		}
	} else if r.Phase == meshv1.ReasonOverlapping && r.Wait == "" {
		r.Wait = "trust bundle carries old and new roots; switch tls.crt/tls.key to the new chain"
	}
	user.Roots = bundle(newRoot, roots)
	return user, mirrorData(user, userKey), r, nil
}

// overlapPending says why the new chain may not sign yet although the
// overlap has lasted: some namespace's trust bundle is not the overlapping
// one (roots) yet. "" when it is everywhere.
func (m *caManager) overlapPending(ctx context.Context, mesh *meshv1.AmbientMesh, roots []byte) (string, error) {
	if m.bundleBehind == nil {
		return "", nil
	}
	behind, err := m.bundleBehind(ctx, mesh, roots)
	if err != nil || len(behind) == 0 {
		return "", err
	}
	return fmt.Sprintf("the overlapping trust bundle is not yet published in %d namespaces (%s); the new chain signs once it is", len(behind), strings.Join(behind[:min(len(behind), 5)], ", ")), nil
}

func reissuingWait(r rotation) string {
	return fmt.Sprintf("workload certificates are re-issued from the new root; the old root stays in the bundle until %s, when the last old-chain certificate has expired", r.OldChainUntil.UTC().Format(time.RFC3339))
}

func allIn(list, in []*x509.Certificate) bool {
	for _, c := range list {
		if !containsCert(in, c) {
			return false
		}
	}
	return true
}

func mirrorData(a *ca.Authority, key []byte) map[string][]byte {
	return map[string][]byte{
		CASecretRootCert: ca.EncodeCerts(a.Roots...),
		CASecretCert:     ca.EncodeCerts(append([]*x509.Certificate{a.Cert}, a.Chain...)...),
		CASecretKey:      key,
	}
}

// cloneMirror keeps the previous mirror's signer with a's bundle.
func cloneMirror(prev *corev1.Secret, a *ca.Authority) map[string][]byte {
	return map[string][]byte{
		CASecretRootCert: ca.EncodeCerts(a.Roots...),
		CASecretCert:     prev.Data[CASecretCert],
		CASecretKey:      prev.Data[CASecretKey],
	}
}
