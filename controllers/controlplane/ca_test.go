package controlplane

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambientmesh/ambient/proxylib/ca"
	"github.com/ambientmesh/ambient/proxylib/caclient"
	xds "github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/grpcwire"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

func newCSR(t *testing.T) []byte {
	t.Helper()
	key, err := ca.NewKey()
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func caClient(t *testing.T, tok string) *caclient.Client {
	t.Helper()
	c, err := caclient.New(caclient.Config{Address: s.caAddr, TLS: s.clientTLS(), Token: func() (string, error) { return tok, nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// saSigner is the API server's service-account signing key (envtest writes
// it next to its serving certificates).
func saSigner(t *testing.T) crypto.Signer {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.env.ControlPlane.APIServer.CertDir, "sa-signer.key"))
	if err != nil {
		t.Fatal(err)
	}
	k, err := ca.ParseKey(b)
	if err != nil {
		block, _ := pem.Decode(b)
		if block == nil {
			t.Fatal("sa-signer.key is not PEM")
		}
		rk, err2 := x509.ParsePKCS1PrivateKey(block.Bytes)
		if err2 != nil {
			t.Fatalf("parsing sa-signer.key: %v / %v", err, err2)
		}
		return rk
	}
	return k
}

// mintToken builds a pod-bound service-account JWT signed by key, as the
// API server would, with the given expiry.
func mintToken(t *testing.T, key crypto.Signer, pod *corev1.Pod, exp time.Time) string {
	t.Helper()
	var sa corev1.ServiceAccount
	if err := s.k8s.Get(context.Background(), client.ObjectKey{Namespace: pod.Namespace, Name: pod.Spec.ServiceAccountName}, &sa); err != nil {
		t.Fatal(err)
	}
	alg := "RS256"
	if _, ok := key.(*ecdsa.PrivateKey); ok {
		alg = "ES256"
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(key.Public())
	kid := sha256.Sum256(pubDER)
	header := map[string]any{"alg": alg, "kid": base64.RawURLEncoding.EncodeToString(kid[:])}
	now := time.Now()
	claims := map[string]any{
		"iss": s.env.ControlPlane.APIServer.SecureServing.URL("https", "/").String(),
		"sub": "system:serviceaccount:" + pod.Namespace + ":" + sa.Name,
		"aud": []string{xds.TokenAudience},
		"iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(), "exp": exp.Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      pod.Namespace,
			"serviceaccount": map[string]any{"name": sa.Name, "uid": string(sa.UID)},
			"pod":            map[string]any{"name": pod.Name, "uid": string(pod.UID)},
		},
	}
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signing := enc(header) + "." + enc(claims)
	digest := sha256.Sum256([]byte(signing))
	var sig []byte
	var err error
	switch k := key.(type) {
	case *rsa.PrivateKey:
		sig, err = rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, digest[:])
	case *ecdsa.PrivateKey:
		r, sv, e := ecdsa.Sign(rand.Reader, k, digest[:])
		err = e
		sig = append(r.FillBytes(make([]byte, 32)), sv.FillBytes(make([]byte, 32))...)
	}
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// TestCA covers reliability case 23: the CA signs an identity only for a pod
// on the caller's node; other nodes, unknown pods, forged and expired
// tokens are refused.
func TestCA(t *testing.T) {
	ctx := context.Background()
	zt := ztunnel(t, "zt-ca", "node-a", "10.200.0.7")
	ensureNamespace(t, "ca-app", map[string]string{ambientLabel: "ambient"})
	createPod(t, podSpec{ns: "ca-app", name: "web", node: "node-a", sa: "web", ip: "10.7.0.1"})
	createPod(t, podSpec{ns: "ca-app", name: "db", node: "node-b", sa: "db", ip: "10.7.0.2"})
	appPod := createPod(t, podSpec{ns: "ca-app", name: "client", node: "node-a", sa: "client", ip: "10.7.0.3"})
	gw := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "ca-app"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: []gwv1.Listener{{Name: "mesh", Port: 15008, Protocol: "HBONE"}}}}
	if err := s.k8s.Create(ctx, gw); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), gw) })
	wpPod := createWaypointPod(t, "ca-app", "waypoint", "node-b", "10.7.0.4")
	impostor := createPod(t, podSpec{ns: "ca-app", name: "impostor", node: "node-b", sa: "client", ip: "10.7.0.5",
		labels: map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint"}})
	// Pods anyone allowed to create pods in the namespace can make: the
	// waypoint's service account, with or without its label, but not
	// created by the waypoint's Deployment.
	saCopy := createPod(t, podSpec{ns: "ca-app", name: "sa-copy", node: "node-a", sa: "waypoint", ip: "10.7.0.6"})
	labelAndSACopy := createPod(t, podSpec{ns: "ca-app", name: "label-and-sa-copy", node: "node-a", sa: "waypoint", ip: "10.7.0.7",
		labels: map[string]string{"gateway.networking.k8s.io/gateway-name": "waypoint"}})
	// An ingress gateway (class istio) in a namespace outside the mesh: its
	// objects and identity are <gateway>-istio, as Istio names them.
	ensureNamespace(t, "ca-edge", nil)
	ingress := &gwv1.Gateway{ObjectMeta: metav1.ObjectMeta{Name: "public", Namespace: "ca-edge"},
		Spec: gwv1.GatewaySpec{GatewayClassName: "istio", Listeners: []gwv1.Listener{{Name: "http", Port: 80, Protocol: "HTTP"}}}}
	if err := s.k8s.Create(ctx, ingress); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.k8s.Delete(context.Background(), ingress) })
	gwPod := createL7ProxyPod(t, "ca-edge", "public", "public-istio", "node-b", "10.7.0.11")
	gwSACopy := createPod(t, podSpec{ns: "ca-edge", name: "gw-sa-copy", node: "node-a", sa: "public-istio", ip: "10.7.0.12",
		labels: map[string]string{"gateway.networking.k8s.io/gateway-name": "public"}})
	sidecar := createPod(t, podSpec{ns: "ca-app", name: "sidecar", node: "node-b", sa: "web-sc", ip: "10.7.0.8", sidecar: true})
	sidecarAsWaypoint := createPod(t, podSpec{ns: "ca-app", name: "sidecar-wp-sa", node: "node-b", sa: "waypoint", ip: "10.7.0.9", sidecar: true})
	// Annotated as injected, without the sidecar container: an app pod.
	fakeInjected := createPod(t, podSpec{ns: "ca-app", name: "fake-injected", node: "node-b", sa: "client", ip: "10.7.0.10",
		labels: map[string]string{"networking.istio.io/tunnel": "http"}, annotations: map[string]string{"sidecar.istio.io/status": "{}"}})
	eventually(t, "waypoint known", func() bool { return s.cp.Discovery.IsWaypoint("ca-app", "waypoint") })
	eventually(t, "ingress gateway known", func() bool { return s.cp.Discovery.IsL7Proxy("ca-edge", "public-istio") })
	// Pods must be in the manager's cache before node checks can pass.
	eventually(t, "pods cached", func() bool {
		var p corev1.Pod
		return s.cp.reader.Get(ctx, client.ObjectKey{Namespace: "ca-app", Name: "web"}, &p) == nil &&
			s.cp.reader.Get(ctx, client.ObjectKey{Namespace: "ca-app", Name: wpPod.Name}, &p) == nil &&
			s.cp.reader.Get(ctx, client.ObjectKey{Namespace: "ca-app", Name: saCopy.Name}, &p) == nil
	})

	realKey := saSigner(t)
	forgedKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ztTok := token(t, zt, xds.TokenAudience)
	id := func(ns, sa string) identity.Identity {
		return identity.Identity{TrustDomain: "cluster.local", Namespace: ns, ServiceAccount: sa}
	}
	tests := []struct {
		name string
		tok  string
		id   identity.Identity
		want codes.Code
	}{
		{"ztunnel, pod on its node", ztTok, id("ca-app", "web"), codes.OK},
		{"ztunnel, pod on another node", ztTok, id("ca-app", "db"), codes.PermissionDenied},
		{"ztunnel, no such pod", ztTok, id("ca-app", "ghost"), codes.PermissionDenied},
		{"ztunnel, another trust domain", ztTok, identity.Identity{TrustDomain: "evil.org", Namespace: "ca-app", ServiceAccount: "web"}, codes.PermissionDenied},
		{"minted token with the API server's key (control)", mintToken(t, realKey, zt, time.Now().Add(time.Hour)), id("ca-app", "web"), codes.OK},
		{"expired token", mintToken(t, realKey, zt, time.Now().Add(-time.Minute)), id("ca-app", "web"), codes.Unauthenticated},
		{"forged token (other key)", mintToken(t, forgedKey, zt, time.Now().Add(time.Hour)), id("ca-app", "web"), codes.Unauthenticated},
		{"token for another audience", token(t, zt, "other"), id("ca-app", "web"), codes.Unauthenticated},
		{"application pod", token(t, appPod, xds.TokenAudience), id("ca-app", "client"), codes.PermissionDenied},
		{"waypoint, own identity", token(t, wpPod, xds.TokenAudience), id("ca-app", "waypoint"), codes.OK},
		{"waypoint, someone else", token(t, wpPod, xds.TokenAudience), id("ca-app", "web"), codes.PermissionDenied},
		{"pod copying the waypoint label", token(t, impostor, xds.TokenAudience), id("ca-app", "client"), codes.PermissionDenied},
		{"pod copying the waypoint's label and service account", token(t, labelAndSACopy, xds.TokenAudience), id("ca-app", "waypoint"), codes.PermissionDenied},
		{"ztunnel, app pod on its node running as the waypoint's service account", ztTok, id("ca-app", "waypoint"), codes.PermissionDenied},
		{"ingress gateway, own identity", token(t, gwPod, xds.TokenAudience), id("ca-edge", "public-istio"), codes.OK},
		{"ingress gateway, someone else", token(t, gwPod, xds.TokenAudience), id("ca-app", "web"), codes.PermissionDenied},
		{"pod copying the ingress gateway's label and service account", token(t, gwSACopy, xds.TokenAudience), id("ca-edge", "public-istio"), codes.PermissionDenied},
		{"ztunnel, pod on its node running as the ingress gateway's service account", ztTok, id("ca-edge", "public-istio"), codes.PermissionDenied},
		{"sidecar, its own pod's identity", token(t, sidecar, xds.TokenAudience), id("ca-app", "web-sc"), codes.OK},
		{"sidecar, another pod's identity", token(t, sidecar, xds.TokenAudience), id("ca-app", "web"), codes.PermissionDenied},
		{"sidecar, another namespace", token(t, sidecar, xds.TokenAudience), id("other", "web-sc"), codes.PermissionDenied},
		{"sidecar pod running as the waypoint's service account", token(t, sidecarAsWaypoint, xds.TokenAudience), id("ca-app", "waypoint"), codes.PermissionDenied},
		{"pod annotated as injected without the sidecar", token(t, fakeInjected, xds.TokenAudience), id("ca-app", "client"), codes.PermissionDenied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chain, err := caClient(t, tt.tok).Sign(ctx, newCSR(t), tt.id, 48*time.Hour)
			if got := codes.Code(grpcwire.CodeOf(err)); got != tt.want {
				t.Fatalf("code = %v (%v), want %v", got, err, tt.want)
			}
			if tt.want != codes.OK {
				return
			}
			got, err := identity.FromCertificate(chain[0])
			if err != nil || got != tt.id {
				t.Fatalf("certificate identity = %v (%v), want %v", got, err, tt.id)
			}
			inter := x509.NewCertPool()
			for _, c := range chain[1:] {
				inter.AddCert(c)
			}
			if _, err := chain[0].Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				t.Fatalf("chain does not verify to the mesh root: %v", err)
			}
			if life := chain[0].NotAfter.Sub(time.Now()); life > 24*time.Hour+time.Minute {
				t.Fatalf("lifetime %v exceeds the mesh default of 24h", life)
			}
		})
	}

	// A ztunnel whose pod is gone can no longer sign, even with a live token.
	if err := s.k8s.Delete(ctx, zt, client.GracePeriodSeconds(0)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deleted ztunnel refused", func() bool {
		_, err := caClient(t, ztTok).Sign(ctx, newCSR(t), id("ca-app", "web"), time.Hour)
		c := codes.Code(grpcwire.CodeOf(err))
		return c == codes.Unauthenticated || c == codes.PermissionDenied
	})
}
