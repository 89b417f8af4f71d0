package waypoint

import (
	"testing"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"

	"github.com/ambientmesh/ambient/controllers/policy"
	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/test/meshtest"
)

// TestHairpinIsAuthorizedAsTheCaller: traffic that reaches a pod with a
// waypoint without passing that waypoint is hair-pinned through it by the
// destination's ztunnel. The caller must stay the caller on that path:
// ztunnel applies the destination's L4 policy (PeerAuthentication STRICT
// among them) to the real caller before hair-pinning, and the waypoint
// authorizes the real caller, never the destination it was handed over by.
func TestHairpinIsAuthorizedAsTheCaller(t *testing.T) {
	s := newSeedsWaypointMesh(t)
	echoV2Pod := s.v2.Addr(80)

	t.Run("a plaintext client's caller-keyed DENY fires at the waypoint", func(t *testing.T) {
		// A waypoint-only policy (as with a targetRef to the waypoint):
		// requests from unauthenticated callers are denied.
		l7(s.Mesh, `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-unauthenticated}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"]}}]
`)
		// Through the waypoint with mTLS: sleep is authenticated.
		meshtest.ExpectOK(t, s.sleep, s.echoV2, "echo-v2-1")
		// Hair-pinned plaintext: the waypoint must see no identity.
		meshtest.ExpectRefused(t, s.outside, echoV2Pod)
		s.CP.Remove(discovery.L7ResourceType, discovery.L7Key("security.istio.io", "AuthorizationPolicy", "default", "deny-unauthenticated"))
		meshtest.ExpectOK(t, s.outside, echoV2Pod, "echo-v2-1")
	})

	t.Run("STRICT refuses a plaintext client before any hair-pin", func(t *testing.T) {
		strict := meshtest.StrictPolicy()
		s.CP.Policy(strict)
		meshtest.ExpectRefused(t, s.outside, echoV2Pod)
		s.Logs.WaitFor(t, "RBAC rejected", "converted_peer_authentication_default")
		// Mesh clients go through the waypoint with mTLS and keep working.
		meshtest.ExpectOK(t, s.sleep, s.echoV2, "echo-v2-1")
	})
}

// TestRootNamespacePolicyIsMeshWide: an AuthorizationPolicy in the mesh's
// root namespace (the mesh namespace, as the operator and control plane
// have it) applies everywhere: published whole to the waypoint and in its
// L4 form to the ztunnels, a GET-only policy refuses a POST through the
// waypoint and still lets the GET through.
func TestRootNamespacePolicyIsMeshWide(t *testing.T) {
	s := newSeedsWaypointMesh(t)
	const y = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: ambient-system}
spec:
  rules: [{to: [{operation: {methods: [GET]}}]}]
`
	var ap securityv1.AuthorizationPolicy
	if err := yaml.Unmarshal([]byte(y), &ap); err != nil {
		t.Fatal(err)
	}
	if ap.Namespace != meshtest.RootNamespace {
		t.Fatalf("policy namespace %q, want the root namespace %q", ap.Namespace, meshtest.RootNamespace)
	}
	l4 := policy.TranslateAuthorizationPolicy(meshtest.RootNamespace, &ap)
	if l4 == nil || l4.GetScope() != security.Scope_GLOBAL {
		t.Fatalf("L4 form of a root-namespace policy: %v, want mesh-wide (GLOBAL)", l4)
	}
	s.CP.Policy(l4)
	js, err := yaml.YAMLToJSON([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	s.CP.Push(discovery.L7ResourceType, discovery.L7Key("security.istio.io", "AuthorizationPolicy", meshtest.RootNamespace, "get-only"),
		&meshapi.L7Resource{Group: "security.istio.io", Kind: "AuthorizationPolicy", Namespace: meshtest.RootNamespace, Name: "get-only", Json: js})
	if code, body, err := do(s.sleep, "GET", s.echoV1, "/root-get"); err != nil || code != 200 {
		t.Fatalf("GET: %d %q %v, want 200", code, body, err)
	}
	if code, body, err := do(s.sleep, "POST", s.echoV1, "/root-post"); err != nil || code != 403 {
		t.Fatalf("POST: %d %q %v, want 403 (mesh-wide GET-only policy)", code, body, err)
	}
}
