package controllers

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/ambientmesh/ambient/controllers/proxyauth"
	"github.com/ambientmesh/ambient/proxylib/route"
)

// A pod mounts Secrets of its own namespace only. A certificate Secret of
// another namespace that a ReferenceGrant opens to the Gateway is therefore
// copied into the Gateway's namespace (tls.crt and tls.key only, owned by
// the Gateway, labelled as the operator's) and the copy is mounted; the
// copy follows the source (a Secret change re-reconciles) and is deleted
// once the grant, the reference or the Gateway goes. The copy is readable
// by whoever may read Secrets in the Gateway's namespace: granting a
// Gateway namespace a Secret means trusting that namespace with it.

// Labels and annotation of a certificate copy.
const (
	componentCertificateCopy = "gateway-certificate"
	// AnnotationCertificateSource names the Secret a copy was made from.
	AnnotationCertificateSource = "mesh.ambient.dev/certificate-source"
)

// CertMount is one certificate Secret of the ingress gateway: the Secret
// mounted (the referenced one, or its copy for another namespace's) and
// the directory under GatewayCertDir the gateway reads it from
// (route.CertificateDir).
type CertMount struct {
	Dir, Secret string
}

// listenerPlan is what an ingress gateway serves: route.Plan with the
// cluster's ReferenceGrants, less the HTTPS listeners whose certificates
// do not resolve (missing Secret, no valid key pair), which the data path
// could not serve either.
type listenerPlan struct {
	ports    []route.Port
	rejected map[gwv1.SectionName]route.Rejection
	mounts   []CertMount
	// copies are the Secrets to write into the Gateway's namespace.
	copies []*corev1.Secret
}

// referenceGrants reads every ReferenceGrant (none when the CRD is not
// installed).
func referenceGrants(ctx context.Context, c client.Reader) (*route.Grants, error) {
	var list gwv1beta1.ReferenceGrantList
	if err := c.List(ctx, &list); err != nil {
		if meta.IsNoMatchError(err) {
			return nil, nil
		}
		return nil, err
	}
	gs := make([]route.Grant, 0, len(list.Items))
	for _, rg := range list.Items {
		if rg.DeletionTimestamp.IsZero() {
			gs = append(gs, route.Grant{Namespace: rg.Namespace, Spec: rg.Spec})
		}
	}
	return route.NewGrants(gs), nil
}

// planListeners decides what the ingress gateway of gw serves, reading
// ReferenceGrants and the certificate Secrets (from the API server:
// Secrets are not cached).
func planListeners(ctx context.Context, c client.Reader, gw *gwv1.Gateway) (listenerPlan, error) {
	grants, err := referenceGrants(ctx, c)
	if err != nil {
		return listenerPlan{}, err
	}
	ports, rejected := route.Plan(gw, grants)
	secrets := map[route.SecretKey]*corev1.Secret{}
	problems := map[route.SecretKey]string{}
	bad := map[gwv1.SectionName]route.Rejection{}
	for _, p := range ports {
		for _, l := range p.Listeners {
			if l.TLS == nil {
				continue
			}
			for _, ref := range l.TLS.CertificateRefs {
				key := route.SecretKey{Namespace: route.SecretNamespace(gw.Namespace, ref), Name: string(ref.Name)}
				if _, seen := problems[key]; !seen {
					s, problem, err := certificateSecret(ctx, c, key)
					if err != nil {
						return listenerPlan{}, err
					}
					secrets[key], problems[key] = s, problem
				}
				if problems[key] != "" {
					bad[l.Name] = route.Rejection{Reason: gwv1.ListenerReasonInvalidCertificateRef, Refs: true, Message: problems[key]}
					break
				}
			}
		}
	}
	for name, rej := range bad {
		rejected[name] = rej
	}
	plan := listenerPlan{ports: route.WithoutListeners(ports, bad), rejected: rejected}
	for _, key := range route.CertificateSecrets(gw.Namespace, plan.ports) {
		m := CertMount{Dir: route.CertificateDir(gw.Namespace, key), Secret: key.Name}
		if key.Namespace != gw.Namespace {
			cp := certificateCopy(gw, key, secrets[key])
			m.Secret = cp.Name
			plan.copies = append(plan.copies, cp)
		}
		plan.mounts = append(plan.mounts, m)
	}
	return plan, nil
}

// certificateSecret reads a certificate Secret; problem says why it cannot
// serve (not found, no valid tls.crt/tls.key pair).
func certificateSecret(ctx context.Context, c client.Reader, key route.SecretKey) (*corev1.Secret, string, error) {
	s := &corev1.Secret{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: key.Namespace, Name: key.Name}, s); err != nil {
		if client.IgnoreNotFound(err) != nil {
			return nil, "", err
		}
		return nil, fmt.Sprintf("certificateRef Secret %s/%s not found", key.Namespace, key.Name), nil
	}
	if _, err := tls.X509KeyPair(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey]); err != nil {
		return nil, fmt.Sprintf("certificateRef Secret %s/%s holds no valid %s/%s pair: %v", key.Namespace, key.Name, corev1.TLSCertKey, corev1.TLSPrivateKeyKey, err), nil
	}
	return s, "", nil
}

// certificateCopy is the copy, in gw's namespace, of the certificate
// Secret src of another namespace.
func certificateCopy(gw *gwv1.Gateway, key route.SecretKey, src *corev1.Secret) *corev1.Secret {
	sum := sha256.Sum256([]byte(key.Namespace + "/" + key.Name))
	return &corev1.Secret{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"},
		ObjectMeta: metav1.ObjectMeta{
			Namespace: gw.Namespace,
			Name:      proxyauth.IngressObjectName(gw.Name) + "-cert-" + hex.EncodeToString(sum[:5]),
			Labels: map[string]string{
				LabelManagedBy: ManagedByValue, LabelPartOf: "ambient", LabelComponent: componentCertificateCopy,
				LabelGatewayName: gw.Name,
			},
			Annotations:     map[string]string{AnnotationCertificateSource: key.Namespace + "/" + key.Name},
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(gw, gwv1.SchemeGroupVersion.WithKind("Gateway"))},
		},
		Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       src.Data[corev1.TLSCertKey],
			corev1.TLSPrivateKeyKey: src.Data[corev1.TLSPrivateKeyKey],
		},
	}
}

// syncCertificateCopies writes the plan's copies and deletes the Gateway's
// other copies (a grant or reference that went away).
func syncCertificateCopies(ctx context.Context, c client.Client, gw *gwv1.Gateway, copies []*corev1.Secret) error {
	want := map[string]bool{}
	for _, cp := range copies {
		want[cp.Name] = true
		if taken, err := nameTaken(ctx, c, cp, gw); err != nil {
			return err
		} else if taken != "" {
			return fmt.Errorf("certificate copy: %s", taken)
		}
		if err := apply(ctx, c, cp); err != nil {
			return err
		}
	}
	var have corev1.SecretList
	if err := c.List(ctx, &have, client.InNamespace(gw.Namespace), client.MatchingLabels{
		LabelManagedBy: ManagedByValue, LabelComponent: componentCertificateCopy, LabelGatewayName: gw.Name,
	}); err != nil {
		return err
	}
	for i := range have.Items {
		s := &have.Items[i]
		if want[s.Name] || !metav1.IsControlledBy(s, gw) {
			continue
		}
		if err := c.Delete(ctx, s); client.IgnoreNotFound(err) != nil {
			return err
		}
	}
	return nil
}

// certificateRefsTo reports whether gw refers to a certificate Secret in
// namespace ns (named name, or any when name is "").
func certificateRefsTo(gw *gwv1.Gateway, ns, name string) bool {
	for _, l := range gw.Spec.Listeners {
		if l.TLS == nil {
			continue
		}
		for _, ref := range l.TLS.CertificateRefs {
			if route.SecretNamespace(gw.Namespace, ref) == ns && (name == "" || string(ref.Name) == name) {
				return true
			}
		}
	}
	return false
}
