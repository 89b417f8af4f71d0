package waypoint

import (
	"testing"

	"github.com/ambientmesh/ambient/proxylib/discovery"
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
