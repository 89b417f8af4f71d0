package policy

import (
	"sort"
	"strings"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// Names of the synthetic policies PeerAuthentication becomes (Istio's; '_'
// cannot appear in Kubernetes names, so they never collide).
const (
	StaticStrictPolicyName  = "istio_converted_static_strict"
	ConvertedPeerAuthPrefix = "converted_peer_authentication_"
)

type mtlsMode = apisecurity.PeerAuthentication_MutualTLS_Mode

const (
	modeUnset      = apisecurity.PeerAuthentication_MutualTLS_UNSET
	modeDisable    = apisecurity.PeerAuthentication_MutualTLS_DISABLE
	modePermissive = apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE
	modeStrict     = apisecurity.PeerAuthentication_MutualTLS_STRICT
)

// denyPlaintext matches connections without a peer identity.
func denyPlaintext(ports ...uint32) *security.Rules {
	return &security.Rules{Matches: []*security.Match{{
		NotPrincipals:    []*security.StringMatch{{MatchType: &security.StringMatch_Presence{}}},
		DestinationPorts: ports,
	}}}
}

// StaticStrictPolicy is the DENY policy that makes a workload STRICT: it
// rejects connections that carry no mTLS identity. Workloads whose effective
// mode is STRICT list it in authorization_policies.
func StaticStrictPolicy(rootNamespace string) *security.Authorization {
	return &security.Authorization{
		Name:      StaticStrictPolicyName,
		Namespace: rootNamespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups:    []*security.Group{{Rules: []*security.Rules{denyPlaintext()}}},
	}
}

func modeOf(m *apisecurity.PeerAuthentication_MutualTLS) mtlsMode { return m.GetMode() }

// notStrict: PERMISSIVE and DISABLE both admit plaintext in ambient mode.
func notStrict(m mtlsMode) bool { return m == modePermissive || m == modeDisable }

// TranslatePeerAuthentication returns the synthetic DENY policies of a
// workload PeerAuthentication with port-level modes (selector, not in the
// root namespace). A workload's default mode may be inherited (top level
// UNSET), so up to two variants are produced and WorkloadPeerAuthenticationKeys
// picks the one matching the workload's effective default:
//
//	converted_peer_authentication_<name>               default STRICT: deny plaintext except on PERMISSIVE/DISABLE ports
//	converted_peer_authentication_<name>_strict_ports  default PERMISSIVE: deny plaintext on STRICT ports
func TranslatePeerAuthentication(rootNamespace string, pa *securityv1.PeerAuthentication) []*security.Authorization {
	spec := &pa.Spec
	if pa.Namespace == rootNamespace || len(spec.GetSelector().GetMatchLabels()) == 0 || len(spec.GetPortLevelMtls()) == 0 {
		return nil
	}
	top := modeOf(spec.GetMtls())
	exempt, strictPorts := portsByMode(spec.GetPortLevelMtls())
	var out []*security.Authorization
	if len(exempt) > 0 && !notStrict(top) {
		deny := denyPlaintext()
		deny.Matches[0].NotDestinationPorts = exempt
		out = append(out, syntheticDeny(pa, ConvertedPeerAuthPrefix+pa.Name, deny))
	}
	if len(strictPorts) > 0 && top != modeStrict {
		out = append(out, syntheticDeny(pa, ConvertedPeerAuthPrefix+pa.Name+strictPortsSuffix, denyPlaintext(strictPorts...)))
	}
	return out
}

const strictPortsSuffix = "_strict_ports"

func syntheticDeny(pa *securityv1.PeerAuthentication, name string, rules ...*security.Rules) *security.Authorization {
	return &security.Authorization{
		Name:      name,
		Namespace: pa.Namespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups:    []*security.Group{{Rules: rules}},
	}
}

// portsByMode splits port-level settings into plaintext-admitting and STRICT ports.
func portsByMode(m map[uint32]*apisecurity.PeerAuthentication_MutualTLS) (exempt, strict []uint32) {
	for _, port := range sortedPorts(m) {
		switch pm := modeOf(m[port]); {
		case pm == modeStrict:
			strict = append(strict, port)
		case notStrict(pm):
			exempt = append(exempt, port)
		}
	}
	return exempt, strict
}

func sortedPorts(m map[uint32]*apisecurity.PeerAuthentication_MutualTLS) []uint32 {
	out := make([]uint32, 0, len(m))
	for p := range m {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// oldest picks the policy Istio honours on conflict: the oldest, then by name.
func oldest(cur, cand *securityv1.PeerAuthentication) *securityv1.PeerAuthentication {
	if cur == nil {
		return cand
	}
	if cand.CreationTimestamp.Before(&cur.CreationTimestamp) ||
		(cand.CreationTimestamp.Equal(&cur.CreationTimestamp) && cand.Name < cur.Name) {
		return cand
	}
	return cur
}

// WorkloadPeerAuthenticationKeys returns the policy keys ("<ns>/<name>") a
// workload must reference for its effective PeerAuthentication: the static
// STRICT policy and/or its own port-level policy. pas are the policies of
// the root namespace and of the workload's namespace.
func WorkloadPeerAuthenticationKeys(rootNamespace, namespace string, podLabels map[string]string, pas []*securityv1.PeerAuthentication) []string {
	var mesh, ns, wl *securityv1.PeerAuthentication
	for _, pa := range pas {
		sel := pa.Spec.GetSelector().GetMatchLabels()
		switch {
		case len(sel) == 0 && pa.Namespace == rootNamespace:
			mesh = oldest(mesh, pa)
		case len(sel) == 0 && pa.Namespace == namespace:
			ns = oldest(ns, pa)
		case len(sel) > 0 && pa.Namespace == namespace && pa.Namespace != rootNamespace &&
			labels.SelectorFromSet(sel).Matches(labels.Set(podLabels)):
			wl = oldest(wl, pa)
		}
	}
	strict := false
	for _, pa := range []*securityv1.PeerAuthentication{mesh, ns} {
		if pa != nil && modeOf(pa.Spec.GetMtls()) != modeUnset {
			strict = modeOf(pa.Spec.GetMtls()) == modeStrict
		}
	}
	portPolicy := ""
	if wl != nil {
		switch top := modeOf(wl.Spec.GetMtls()); {
		case top == modeStrict:
			strict = true
		case notStrict(top):
			strict = false
		}
		exempt, strictPorts := portsByMode(wl.Spec.GetPortLevelMtls())
		switch {
		case strict && len(exempt) > 0:
			// The converted policy is STRICT with the port exceptions.
			portPolicy, strict = wl.Namespace+"/"+ConvertedPeerAuthPrefix+wl.Name, false
		case !strict && len(strictPorts) > 0:
			portPolicy = wl.Namespace + "/" + ConvertedPeerAuthPrefix + wl.Name + strictPortsSuffix
		}
	}
	var keys []string
	if strict {
		keys = append(keys, rootNamespace+"/"+StaticStrictPolicyName)
	}
	if portPolicy != "" {
		keys = append(keys, portPolicy)
	}
	sort.Strings(keys)
	return keys
}

// IsSynthetic reports whether a policy name was generated from a
// PeerAuthentication (and so has no AuthorizationPolicy object).
func IsSynthetic(name string) bool {
	return name == StaticStrictPolicyName || strings.HasPrefix(name, ConvertedPeerAuthPrefix)
}
