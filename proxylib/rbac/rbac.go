// Package rbac is the L4 authorization engine over Istio's
// istio.security.Authorization model, evaluated at the destination.
//
// Semantics (as Istio documents and ztunnel implements):
//   - a DENY policy that matches denies, whatever ALLOW policies say;
//   - with no ALLOW policy the connection is allowed;
//   - with ALLOW policies, at least one must match, else the connection is denied.
//
// A policy matches when any of its groups matches (a policy without groups
// matches nothing: Istio's "ALLOW with no rules" allows nothing, and a policy
// whose only rules needed L7 attributes arrives without groups, so it fails
// closed). A group matches when all of its rules match (a group without rules,
// Istio's empty rule "{}", matches everything). A rule matches when any of its
// matches does. A match holds when every non-empty field holds.
//
// A policy marked ambient_l7_derived (the lossy L4 form of an L7 policy) is
// skipped for connections from the destination's own waypoint, which
// enforced the whole policy; every other peer still gets it.
package rbac

import (
	"net/netip"
	"strings"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Conn is what authorization knows about a connection at the destination.
type Conn struct {
	// Source is the verified peer identity; nil for plaintext.
	Source  *identity.Identity
	SrcIP   netip.Addr
	DstIP   netip.Addr
	DstPort uint16
	// FromDestinationWaypoint: Source is the verified identity of the
	// destination workload's own waypoint. Only the proxy sets it, from
	// discovery, never from anything the peer sends.
	FromDestinationWaypoint bool
	// ToDestinationWaypoint: the proxy is about to hair-pin this connection
	// to the destination's waypoint, which enforces the L7-derived policies
	// whole against the same caller. Only the proxy sets it.
	ToDestinationWaypoint bool
	// L7EnforcedHere: the proxy hands this connection to its own L7 engine
	// (a sidecar on its pod's inbound), which enforces the L7-derived
	// policies whole, failing closed on their L7 rules for opaque TCP.
	// Only the proxy sets it.
	L7EnforcedHere bool
}

// Decision is the outcome of Evaluate. Policy names the deciding policy
// ("<ns>/<name>"): the matching DENY, the matching ALLOW, or "" when no ALLOW
// policy exists (allowed) or none of them matched (denied).
type Decision struct {
	Allowed bool
	Policy  string
	Action  security.Action
}

// Evaluate applies policies (already selected for the destination workload)
// to c.
func Evaluate(policies []*security.Authorization, c Conn) Decision {
	haveAllow := false
	for _, p := range policies {
		if enforcedByWaypoint(p, c) {
			continue
		}
		if p.GetAction() != security.Action_DENY {
			haveAllow = true
			continue
		}
		if Matches(p, c) {
			return Decision{Allowed: false, Policy: key(p), Action: security.Action_DENY}
		}
	}
	if !haveAllow {
		return Decision{Allowed: true}
	}
	for _, p := range policies {
		if p.GetAction() == security.Action_ALLOW && !enforcedByWaypoint(p, c) && Matches(p, c) {
			return Decision{Allowed: true, Policy: key(p), Action: security.Action_ALLOW}
		}
	}
	return Decision{Allowed: false, Action: security.Action_ALLOW}
}

// enforcedByWaypoint: the connection comes from (or is being hair-pinned
// to) the destination's waypoint, or goes to this proxy's own L7 engine,
// which enforces this L7-derived policy whole, so its lossy L4 form (e.g.
// the deny-all left by dropped L7 ALLOW rules) must not apply here.
func enforcedByWaypoint(p *security.Authorization, c Conn) bool {
	viaWaypoint := (c.FromDestinationWaypoint && c.Source != nil) || c.ToDestinationWaypoint || c.L7EnforcedHere
	return viaWaypoint && p.GetAmbientL7Derived()
}

func key(p *security.Authorization) string { return p.GetNamespace() + "/" + p.GetName() }

// Matches reports whether policy p matches c (ignoring its action).
func Matches(p *security.Authorization, c Conn) bool {
	for _, g := range p.GetGroups() {
		if groupMatches(g, c) {
			return true
		}
	}
	return false
}

func groupMatches(g *security.Group, c Conn) bool {
	for _, r := range g.GetRules() {
		if !rulesMatch(r, c) {
			return false
		}
	}
	return true
}

func rulesMatch(r *security.Rules, c Conn) bool {
	for _, m := range r.GetMatches() {
		if matchHolds(m, c) {
			return true
		}
	}
	return false
}

func matchHolds(m *security.Match, c Conn) bool {
	var principal, namespace string
	if c.Source != nil {
		principal, namespace = c.Source.Principal(), c.Source.Namespace
	}
	has := c.Source != nil
	return include(m.GetNamespaces(), namespace, has) && !exclude(m.GetNotNamespaces(), namespace, has) &&
		include(m.GetPrincipals(), principal, has) && !exclude(m.GetNotPrincipals(), principal, has) &&
		includeIP(m.GetSourceIps(), c.SrcIP) && !excludeIP(m.GetNotSourceIps(), c.SrcIP) &&
		includeIP(m.GetDestinationIps(), c.DstIP) && !excludeIP(m.GetNotDestinationIps(), c.DstIP) &&
		includePort(m.GetDestinationPorts(), c.DstPort) && !excludePort(m.GetNotDestinationPorts(), c.DstPort)
}

// include: an empty list holds; otherwise the value must exist and match one.
func include(ms []*security.StringMatch, v string, has bool) bool {
	if len(ms) == 0 {
		return true
	}
	return has && anyString(ms, v)
}

// exclude: true when the value exists and matches one entry. Without an
// identity nothing is excluded, so "not_principals: [presence]" (Istio's
// STRICT conversion) holds for plaintext.
func exclude(ms []*security.StringMatch, v string, has bool) bool {
	return len(ms) > 0 && has && anyString(ms, v)
}

func anyString(ms []*security.StringMatch, v string) bool {
	for _, m := range ms {
		if StringMatches(m, v) {
			return true
		}
	}
	return false
}

// StringMatches applies one StringMatch. Istio spells "*" wildcards as
// prefix/suffix matches; an exact "*" also matches anything non-empty.
func StringMatches(m *security.StringMatch, v string) bool {
	switch t := m.GetMatchType().(type) {
	case *security.StringMatch_Exact:
		return t.Exact == v || (t.Exact == "*" && v != "")
	case *security.StringMatch_Prefix:
		return strings.HasPrefix(v, t.Prefix)
	case *security.StringMatch_Suffix:
		return strings.HasSuffix(v, t.Suffix)
	case *security.StringMatch_Presence:
		return v != ""
	}
	return false // unknown match type never matches (fails closed for ALLOW)
}

func includeIP(as []*security.Address, ip netip.Addr) bool {
	return len(as) == 0 || anyIP(as, ip)
}

func excludeIP(as []*security.Address, ip netip.Addr) bool {
	return len(as) > 0 && anyIP(as, ip)
}

func anyIP(as []*security.Address, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	ip = ip.Unmap()
	for _, a := range as {
		if p, ok := Prefix(a); ok && p.Contains(ip) {
			return true
		}
	}
	return false
}

// Prefix converts a policy address (bytes + prefix length) to a CIDR. A
// malformed address is reported as not ok and never matches.
func Prefix(a *security.Address) (netip.Prefix, bool) {
	ip, ok := netip.AddrFromSlice(a.GetAddress())
	if !ok {
		return netip.Prefix{}, false
	}
	ip = ip.Unmap()
	p, err := ip.Prefix(int(a.GetLength()))
	if err != nil || int(a.GetLength()) > ip.BitLen() {
		return netip.Prefix{}, false
	}
	return p, true
}

func includePort(ps []uint32, port uint16) bool { return len(ps) == 0 || anyPort(ps, port) }
func excludePort(ps []uint32, port uint16) bool { return len(ps) > 0 && anyPort(ps, port) }

func anyPort(ps []uint32, port uint16) bool {
	for _, p := range ps {
		if p == uint32(port) {
			return true
		}
	}
	return false
}
