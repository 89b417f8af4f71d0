package controllers

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
)

// selfSigned returns a PEM certificate and key for host.
func selfSigned(t *testing.T, host string) (crt, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: host},
		DNSNames: []string{host}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
}

func createTLSSecret(t *testing.T, ns, name string, crt, key []byte) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{corev1.TLSCertKey: crt, corev1.TLSPrivateKeyKey: key}}
	if err := k8s.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	return s
}

func httpsListener(name string, port gwv1.PortNumber, refs ...gwv1.SecretObjectReference) gwv1.Listener {
	all := gwv1.NamespacesFromAll
	return gwv1.Listener{Name: gwv1.SectionName(name), Port: port, Protocol: gwv1.HTTPSProtocolType,
		AllowedRoutes: &gwv1.AllowedRoutes{Namespaces: &gwv1.RouteNamespaces{From: &all}},
		TLS:           &gwv1.ListenerTLSConfig{CertificateRefs: refs}}
}

func ingressGateway(ns, name string, listeners ...gwv1.Listener) *gwv1.Gateway {
	return &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1.GatewaySpec{GatewayClassName: IngressGatewayClass, Listeners: listeners}}
}

// waitListener waits for listener name of Gateway ns/name to have the
// conditions want ("Type=Status/Reason", reason "" for any) at the
// Gateway's generation, and returns the Gateway.
func waitListener(t *testing.T, ns, name string, listener gwv1.SectionName, attached int32, want ...string) *gwv1.Gateway {
	t.Helper()
	gw := &gwv1.Gateway{}
	eventually(t, fmt.Sprintf("Gateway %s/%s listener %s %v", ns, name, listener, want), func() error {
		if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, gw); err != nil {
			return err
		}
		for _, c := range gw.Status.Conditions {
			if c.ObservedGeneration != gw.Generation {
				return fmt.Errorf("Gateway condition %s at generation %d of %d", c.Type, c.ObservedGeneration, gw.Generation)
			}
		}
		ls := findListenerStatus(gw.Status.Listeners, listener)
		if ls == nil {
			return fmt.Errorf("no status for listener %s: %+v", listener, gw.Status.Listeners)
		}
		if ls.AttachedRoutes != attached {
			return fmt.Errorf("listener %s: %d attached routes, want %d", listener, ls.AttachedRoutes, attached)
		}
		for _, w := range want {
			typ, rest, _ := strings.Cut(w, "=")
			status, reason, _ := strings.Cut(rest, "/")
			c := meta.FindStatusCondition(ls.Conditions, typ)
			if c == nil || string(c.Status) != status || reason != "" && c.Reason != reason || c.ObservedGeneration != gw.Generation {
				return fmt.Errorf("listener %s: want %s, have %+v", listener, w, ls.Conditions)
			}
		}
		return nil
	})
	return gw
}

// certVolume is the Secret mounted at dir under GatewayCertDir ("" when
// none is).
func certVolume(dep *appsv1.Deployment, dir string) string {
	pod := dep.Spec.Template.Spec
	for _, m := range pod.Containers[0].VolumeMounts {
		if m.MountPath != GatewayCertDir+"/"+dir {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				return v.Secret.SecretName
			}
		}
	}
	return ""
}

func createGrant(t *testing.T, ns, name string, from gwv1beta1.ReferenceGrantFrom, to gwv1beta1.ReferenceGrantTo) *gwv1beta1.ReferenceGrant {
	t.Helper()
	rg := &gwv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: gwv1beta1.ReferenceGrantSpec{From: []gwv1beta1.ReferenceGrantFrom{from}, To: []gwv1beta1.ReferenceGrantTo{to}}}
	if err := k8s.Create(context.Background(), rg); err != nil {
		t.Fatal(err)
	}
	return rg
}

// TestIngressCertificateReferenceGrant: a certificateRef to a Secret of
// another namespace is RefNotPermitted and not mounted until a
// ReferenceGrant there permits it; then the Secret is copied into the
// Gateway's namespace and the copy mounted, follows the source, and goes
// with the grant (GatewaySecretReferenceGrantSpecific,
// GatewaySecretReferenceGrantAllInNamespace,
// GatewaySecretMissingReferenceGrant).
func TestIngressCertificateReferenceGrant(t *testing.T) {
	ctx := context.Background()
	const ns, certNS = "rg-infra", "rg-web-backend"
	createNamespace(t, ns)
	createNamespace(t, certNS)
	newMesh(t, "rg-certs", "mesh-rg-certs", nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1beta1.ReferenceGrant{}, client.InNamespace(certNS))
	})
	crt, key := selfSigned(t, "secure.example.com")
	src := createTLSSecret(t, certNS, "certificate", crt, key)
	gw := seedsIngressGateway(ns)
	gw.Spec.Listeners[1] = httpsListener("https", 443, gwv1.SecretObjectReference{
		Group: ptr.To[gwv1.Group](""), Kind: ptr.To[gwv1.Kind]("Secret"), Name: "certificate", Namespace: ptr.To[gwv1.Namespace](certNS)})
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	waitListener(t, ns, "gateway", "https", 0, "ResolvedRefs=False/RefNotPermitted", "Accepted=True/Accepted", "Programmed=False/")
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "gateway-istio"}}
	eventually(t, "gateway deployment", exists(dep))
	dir := certNS + "_certificate"
	if v := certVolume(dep, dir); v != "" {
		t.Fatalf("Secret %s mounted without a ReferenceGrant", v)
	}

	// A grant for another Secret, or from another namespace, changes nothing.
	createGrant(t, certNS, "other-secret",
		gwv1beta1.ReferenceGrantFrom{Group: gwv1.GroupName, Kind: "Gateway", Namespace: ns},
		gwv1beta1.ReferenceGrantTo{Group: "", Kind: "Secret", Name: ptr.To[gwv1.ObjectName]("other")})
	createGrant(t, certNS, "other-namespace",
		gwv1beta1.ReferenceGrantFrom{Group: gwv1.GroupName, Kind: "Gateway", Namespace: "elsewhere"},
		gwv1beta1.ReferenceGrantTo{Group: "", Kind: "Secret"})
	time.Sleep(time.Second)
	waitListener(t, ns, "gateway", "https", 0, "ResolvedRefs=False/RefNotPermitted")

	// The specific grant: resolved, copied and mounted.
	specific := createGrant(t, certNS, "reference-grant-specific",
		gwv1beta1.ReferenceGrantFrom{Group: gwv1.GroupName, Kind: "Gateway", Namespace: ns},
		gwv1beta1.ReferenceGrantTo{Group: "", Kind: "Secret", Name: ptr.To[gwv1.ObjectName]("certificate")})
	waitListener(t, ns, "gateway", "https", 0, "ResolvedRefs=True/ResolvedRefs", "Accepted=True/Accepted")
	var copyName string
	eventually(t, "the copy mounted", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			return err
		}
		if copyName = certVolume(dep, dir); copyName == "" {
			return fmt.Errorf("nothing mounted at %s/%s", GatewayCertDir, dir)
		}
		return nil
	})
	cp := &corev1.Secret{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: copyName}, cp); err != nil {
		t.Fatalf("mounted copy %s: %v", copyName, err)
	}
	if !bytes.Equal(cp.Data[corev1.TLSCertKey], crt) || !bytes.Equal(cp.Data[corev1.TLSPrivateKeyKey], key) || len(cp.Data) != 2 {
		t.Errorf("copy holds %v, want the source's tls.crt and tls.key only", keysOf(cp.Data))
	}
	if !metav1.IsControlledBy(cp, gw) || cp.Annotations[AnnotationCertificateSource] != certNS+"/certificate" {
		t.Errorf("copy owners %+v annotations %v", cp.OwnerReferences, cp.Annotations)
	}

	// Rotation: the copy follows the source.
	crt2, key2 := selfSigned(t, "secure.example.com")
	src.Data = map[string][]byte{corev1.TLSCertKey: crt2, corev1.TLSPrivateKeyKey: key2}
	if err := k8s.Update(ctx, src); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the copy follows the source", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(cp), cp); err != nil {
			return err
		}
		if !bytes.Equal(cp.Data[corev1.TLSCertKey], crt2) {
			return fmt.Errorf("copy still holds the old certificate")
		}
		return nil
	})

	// The grant goes: refused again, the copy deleted and unmounted.
	if err := k8s.Delete(ctx, specific); err != nil {
		t.Fatal(err)
	}
	waitListener(t, ns, "gateway", "https", 0, "ResolvedRefs=False/RefNotPermitted")
	eventually(t, "copy deleted", gone(cp))
	eventually(t, "copy unmounted", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			return err
		}
		if v := certVolume(dep, dir); v != "" {
			return fmt.Errorf("%s still mounted", v)
		}
		return nil
	})

	// A grant for every Secret of the namespace.
	createGrant(t, certNS, "reference-grant-all-in-namespace",
		gwv1beta1.ReferenceGrantFrom{Group: gwv1.GroupName, Kind: "Gateway", Namespace: ns},
		gwv1beta1.ReferenceGrantTo{Group: "", Kind: "Secret"})
	waitListener(t, ns, "gateway", "https", 0, "ResolvedRefs=True/ResolvedRefs")
}

// TestIngressInvalidCertificates: a certificateRef to a missing Secret, a
// Secret without a valid key pair, or an unsupported group or kind is
// InvalidCertificateRef, and is never mounted (the pod would not start);
// the listener still counts its routes and is not programmed. A Secret
// created later resolves (GatewayInvalidTLSConfiguration,
// GatewayWithAttachedRoutes).
func TestIngressInvalidCertificates(t *testing.T) {
	ctx := context.Background()
	const ns = "rg-invalid-tls"
	createNamespace(t, ns)
	newMesh(t, "rg-invalid-tls", "mesh-rg-invalid-tls", nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(ns))
	})
	malformed := []byte("Hello world\n")
	createTLSSecret(t, ns, "malformed-certificate", malformed, malformed)
	crt, key := selfSigned(t, "valid.example.com")
	createTLSSecret(t, ns, "tls-validity-checks-certificate", crt, key)
	for name, ref := range map[string]gwv1.SecretObjectReference{
		"nonexistent-secret": {Group: ptr.To[gwv1.Group](""), Kind: ptr.To[gwv1.Kind]("Secret"), Name: "nonexistent-certificate"},
		"unsupported-group":  {Group: ptr.To[gwv1.Group]("wrong.group.company.io"), Kind: ptr.To[gwv1.Kind]("Secret"), Name: "tls-validity-checks-certificate"},
		"unsupported-kind":   {Group: ptr.To[gwv1.Group](""), Kind: ptr.To[gwv1.Kind]("WrongKind"), Name: "tls-validity-checks-certificate"},
		"malformed-secret":   {Group: ptr.To[gwv1.Group](""), Kind: ptr.To[gwv1.Kind]("Secret"), Name: "malformed-certificate"},
	} {
		if err := k8s.Create(ctx, ingressGateway(ns, "gateway-certificate-"+name, httpsListener("https", 443, ref))); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"nonexistent-secret", "unsupported-group", "unsupported-kind", "malformed-secret"} {
		waitListener(t, ns, "gateway-certificate-"+name, "https", 0, "ResolvedRefs=False/InvalidCertificateRef", "Programmed=False/")
	}

	// GatewayWithAttachedRoutes: an HTTP listener served beside an HTTPS
	// one whose Secret does not exist, which keeps counting its route.
	gw := ingressGateway(ns, "unresolved", gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType},
		httpsListener("tls", 443, gwv1.SecretObjectReference{Name: "does-not-exist"}))
	if err := k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	route := httpRoute(ns, "http-route-4", []gwv1.ParentReference{{Name: "unresolved", SectionName: ptr.To[gwv1.SectionName]("tls")}}, backend("", "does-not-exist"))
	if err := k8s.Create(ctx, route); err != nil {
		t.Fatal(err)
	}
	waitListener(t, ns, "unresolved", "tls", 1, "ResolvedRefs=False/InvalidCertificateRef", "Programmed=False/")
	waitRouteParents(t, route, map[string][]wantCond{"unresolved": {acceptedOK, backendAbsent}})
	dep := &appsv1.Deployment{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "unresolved-istio"}}
	eventually(t, "gateway deployment", exists(dep))
	if v := certVolume(dep, "does-not-exist"); v != "" {
		t.Errorf("the missing Secret %s is mounted: the pod would never start", v)
	}
	// The Secret appears: resolved and mounted.
	crt2, key2 := selfSigned(t, "late.example.com")
	createTLSSecret(t, ns, "does-not-exist", crt2, key2)
	waitListener(t, ns, "unresolved", "tls", 1, "ResolvedRefs=True/ResolvedRefs")
	eventually(t, "late Secret mounted", func() error {
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(dep), dep); err != nil {
			return err
		}
		if v := certVolume(dep, "does-not-exist"); v != "does-not-exist" {
			return fmt.Errorf("mounted %q", v)
		}
		return nil
	})
}

// TestIngressUnsupportedProtocol: a Gateway with some listeners it cannot
// serve is accepted with reason ListenersNotValid; with none, it is not
// accepted (GatewayListenerUnsupportedProtocol).
func TestIngressUnsupportedProtocol(t *testing.T) {
	ctx := context.Background()
	const ns = "rg-protocols"
	createNamespace(t, ns)
	newMesh(t, "rg-protocols", "mesh-rg-protocols", nil)
	t.Cleanup(func() { _ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns)) })
	invalid := gwv1.Listener{Name: "invalid", Port: 1111, Protocol: "INVALID"}
	if err := k8s.Create(ctx, ingressGateway(ns, "gateway-only-unsupported-protocols", invalid)); err != nil {
		t.Fatal(err)
	}
	if err := k8s.Create(ctx, ingressGateway(ns, "gateway-supported-and-unsupported-protocols",
		gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType}, invalid)); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]metav1.ConditionStatus{"gateway-only-unsupported-protocols": metav1.ConditionFalse, "gateway-supported-and-unsupported-protocols": metav1.ConditionTrue} {
		gw := waitListener(t, ns, name, "invalid", 0, "Accepted=False/UnsupportedProtocol")
		if ls := findListenerStatus(gw.Status.Listeners, "invalid"); len(ls.SupportedKinds) != 0 {
			t.Errorf("%s: invalid listener supports %v, want no kinds", name, ls.SupportedKinds)
		}
		eventually(t, name+" Accepted", func() error {
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(gw), gw); err != nil {
				return err
			}
			c := meta.FindStatusCondition(gw.Status.Conditions, string(gwv1.GatewayConditionAccepted))
			if c == nil || c.Status != want || c.Reason != string(gwv1.GatewayReasonListenersNotValid) || c.ObservedGeneration != gw.Generation {
				return fmt.Errorf("Accepted %+v, want %s/ListenersNotValid", c, want)
			}
			return nil
		})
	}
	waitListener(t, ns, "gateway-supported-and-unsupported-protocols", "http", 0, "Accepted=True/Accepted")
}

// TestIngressRouteBackendReferenceGrant: a Gateway route's backendRef to
// another namespace resolves only while a ReferenceGrant there permits it
// (RefNotPermitted otherwise), following grant changes
// (HTTPRouteReferenceGrant,
// HTTPRoutePartiallyInvalidViaInvalidReferenceGrant). A Service parent's
// route needs no grant (GAMMA).
func TestIngressRouteBackendReferenceGrant(t *testing.T) {
	ctx := context.Background()
	const ns, appNS = "rg-routes", "rg-app-backend"
	createNamespace(t, ns)
	createNamespace(t, appNS)
	newMesh(t, "rg-routes", "mesh-rg-routes", nil)
	t.Cleanup(func() {
		_ = k8s.DeleteAllOf(ctx, &gwv1.Gateway{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1.HTTPRoute{}, client.InNamespace(ns))
		_ = k8s.DeleteAllOf(ctx, &gwv1beta1.ReferenceGrant{}, client.InNamespace(appNS))
	})
	for _, s := range []string{"app-backend-v1", "app-backend-v2"} {
		createService(t, appNS, s, nil)
	}
	createService(t, ns, "local", nil)
	if err := k8s.Create(ctx, ingressGateway(ns, "same-namespace", gwv1.Listener{Name: "http", Port: 80, Protocol: gwv1.HTTPProtocolType})); err != nil {
		t.Fatal(err)
	}
	createGrant(t, appNS, "invalid-reference-grant",
		gwv1beta1.ReferenceGrantFrom{Group: gwv1.GroupName, Kind: "HTTPRoute", Namespace: ns},
		gwv1beta1.ReferenceGrantTo{Group: "", Kind: "Service", Name: ptr.To[gwv1.ObjectName]("app-backend-v1")})
	partial := httpRoute(ns, "invalid-reference-grant", []gwv1.ParentReference{gatewayParent("same-namespace")}, backend(appNS, "app-backend-v1"))
	partial.Spec.Rules = append(partial.Spec.Rules, gwv1.HTTPRouteRule{BackendRefs: []gwv1.HTTPBackendRef{{BackendRef: backend(appNS, "app-backend-v2")}}})
	granted := httpRoute(ns, "reference-grant", []gwv1.ParentReference{gatewayParent("same-namespace")}, backend(appNS, "app-backend-v1"))
	// The same backend from a Service parent (GAMMA): no grant needed.
	mesh := httpRoute(ns, "mesh", []gwv1.ParentReference{serviceParent("", "local")}, backend(appNS, "app-backend-v2"))
	for _, r := range []*gwv1.HTTPRoute{partial, granted, mesh} {
		if err := k8s.Create(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	refused := wantCond("ResolvedRefs=False/RefNotPermitted")
	waitRouteParents(t, partial, map[string][]wantCond{"same-namespace": {acceptedOK, refused}})
	waitRouteParents(t, granted, map[string][]wantCond{"same-namespace": {acceptedOK, resolvedOK}})
	waitRouteParents(t, mesh, map[string][]wantCond{"local": {acceptedOK, resolvedOK}})

	// Widening the grant to the namespace resolves the partial route.
	eventually(t, "widen the grant", func() error {
		rg := &gwv1beta1.ReferenceGrant{}
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: appNS, Name: "invalid-reference-grant"}, rg); err != nil {
			return err
		}
		rg.Spec.To[0].Name = nil
		return k8s.Update(ctx, rg)
	})
	waitRouteParents(t, partial, map[string][]wantCond{"same-namespace": {acceptedOK, resolvedOK}})
	// Deleting it refuses both again.
	if err := k8s.Delete(ctx, &gwv1beta1.ReferenceGrant{ObjectMeta: metav1.ObjectMeta{Namespace: appNS, Name: "invalid-reference-grant"}}); err != nil {
		t.Fatal(err)
	}
	waitRouteParents(t, granted, map[string][]wantCond{"same-namespace": {acceptedOK, refused}})
	waitRouteParents(t, mesh, map[string][]wantCond{"local": {acceptedOK, resolvedOK}})
}
