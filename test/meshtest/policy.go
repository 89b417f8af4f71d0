package meshtest

import (
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// Exact matches s exactly.
func Exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}

// AllowPolicy is a namespace-wide ALLOW policy "default/<name>" admitting
// the principals.
func AllowPolicy(name string, principals ...string) *security.Authorization {
	var ms []*security.StringMatch
	for _, p := range principals {
		ms = append(ms, Exact(p))
	}
	return &security.Authorization{Name: name, Namespace: Namespace, Scope: security.Scope_NAMESPACE, Action: security.Action_ALLOW,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{Principals: ms}}}}}}}
}

// StrictPolicy is Istio's conversion of PeerAuthentication STRICT for the
// namespace ("default/converted_peer_authentication_default").
func StrictPolicy() *security.Authorization {
	return &security.Authorization{Name: "converted_peer_authentication_default", Namespace: Namespace, Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{
			{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}}}}}}}}}
}
