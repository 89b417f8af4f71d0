// Package policy translates Istio security policies (AuthorizationPolicy,
// PeerAuthentication) into the L4 Authorization resources ztunnel enforces,
// following Istio's ambient semantics:
//
//   - one Group per policy rule (groups are ORed); inside a group the to,
//     from and each when condition are separate Rules (ANDed); the entries
//     of one from/to list are Matches (ORed).
//   - ALLOW rules that need L7 attributes are dropped for ztunnel: such a
//     rule can never match, so its targets are denied unless another rule
//     allows (fail closed). An ALLOW policy whose rules are all L7 denies
//     everything for its targets.
//   - DENY rules ignore their L7 attributes and keep their L4 part, which
//     denies more than intended, never less.
//   - a policy with any L7 attribute is marked AmbientL7Derived: ztunnel
//     skips it for connections from the destination's own waypoint, which
//     enforces it whole, and applies it to every other peer.
//
// Waypoints receive policies with L7 attributes whole (see NeedsWaypoint).
package policy

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi/security"
)

// l4ConditionKeys are the `when` keys ztunnel can evaluate.
var l4ConditionKeys = map[string]bool{
	"source.ip":        true,
	"source.namespace": true,
	"source.principal": true,
	"destination.ip":   true,
	"destination.port": true,
}

// TranslateAuthorizationPolicy returns the L4 Authorization for ztunnel, or
// nil when the policy does not apply at L4: it targets a Gateway, Service or
// other object through targetRef(s) (waypoint-only), or its action is
// CUSTOM/AUDIT. rootNamespace is the mesh root namespace.
func TranslateAuthorizationPolicy(rootNamespace string, ap *securityv1.AuthorizationPolicy) *security.Authorization {
	spec := &ap.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return nil
	}
	var action security.Action
	switch spec.GetAction() {
	case apisecurity.AuthorizationPolicy_ALLOW:
		action = security.Action_ALLOW
	case apisecurity.AuthorizationPolicy_DENY:
		action = security.Action_DENY
	default:
		return nil
	}
	out := &security.Authorization{
		Name:      ap.Name,
		Namespace: ap.Namespace,
		Scope:     scopeOf(rootNamespace, ap.Namespace, len(spec.GetSelector().GetMatchLabels()) > 0),
		Action:    action,
		// Lossy L4 form; the waypoint enforces the whole policy.
		AmbientL7Derived: hasL7Attributes(spec),
	}
	for _, rule := range spec.GetRules() {
		if rules, ok := translateRule(action, ap.Namespace, rule); ok {
			out.Groups = append(out.Groups, &security.Group{Rules: rules})
		}
	}
	return out
}

func scopeOf(rootNamespace, namespace string, hasSelector bool) security.Scope {
	switch {
	case hasSelector:
		return security.Scope_WORKLOAD_SELECTOR
	case namespace == rootNamespace:
		return security.Scope_GLOBAL
	}
	return security.Scope_NAMESPACE
}

// translateRule returns the rules of one group, or ok=false when the rule
// must be dropped: an ALLOW rule needing L7, or an ALLOW rule with a value
// that does not parse (dropping only the value would widen the allow).
func translateRule(action security.Action, policyNamespace string, rule *apisecurity.Rule) (rules []*security.Rules, ok bool) {
	allow := action == security.Action_ALLOW
	var p parser
	var to, from []*security.Match
	for _, t := range rule.GetTo() {
		op := t.GetOperation()
		if allow && operationNeedsL7(op) {
			return nil, false
		}
		to = append(to, &security.Match{
			DestinationPorts:    p.ports(op.GetPorts()),
			NotDestinationPorts: p.ports(op.GetNotPorts()),
		})
	}
	for _, f := range rule.GetFrom() {
		src := f.GetSource()
		if allow && sourceNeedsL7(src) {
			return nil, false
		}
		from = append(from, &security.Match{
			Namespaces:    stringMatches(src.GetNamespaces()),
			NotNamespaces: stringMatches(src.GetNotNamespaces()),
			Principals:    append(stringMatches(src.GetPrincipals()), p.serviceAccounts(policyNamespace, src.GetServiceAccounts())...),
			NotPrincipals: append(stringMatches(src.GetNotPrincipals()), p.serviceAccounts(policyNamespace, src.GetNotServiceAccounts())...),
			SourceIps:     p.cidrs(src.GetIpBlocks()),
			NotSourceIps:  p.cidrs(src.GetNotIpBlocks()),
		})
	}
	rules = []*security.Rules{}
	if len(to) > 0 {
		rules = append(rules, &security.Rules{Matches: to})
	}
	if len(from) > 0 {
		rules = append(rules, &security.Rules{Matches: from})
	}
	for _, cond := range rule.GetWhen() {
		if allow && !l4ConditionKeys[cond.GetKey()] {
			return nil, false
		}
		// Unknown keys under DENY leave an empty match: it matches everything.
		rules = append(rules, &security.Rules{Matches: []*security.Match{p.condition(cond)}})
	}
	if allow && p.invalid {
		return nil, false
	}
	return rules, true
}

func (p *parser) condition(c *apisecurity.Condition) *security.Match {
	m := &security.Match{}
	v, nv := c.GetValues(), c.GetNotValues()
	switch c.GetKey() {
	case "source.ip":
		m.SourceIps, m.NotSourceIps = p.cidrs(v), p.cidrs(nv)
	case "source.namespace":
		m.Namespaces, m.NotNamespaces = stringMatches(v), stringMatches(nv)
	case "source.principal":
		m.Principals, m.NotPrincipals = stringMatches(v), stringMatches(nv)
	case "destination.ip":
		m.DestinationIps, m.NotDestinationIps = p.cidrs(v), p.cidrs(nv)
	case "destination.port":
		m.DestinationPorts, m.NotDestinationPorts = p.ports(v), p.ports(nv)
	}
	return m
}

func operationNeedsL7(op *apisecurity.Operation) bool {
	return len(op.GetHosts())+len(op.GetNotHosts())+len(op.GetMethods())+len(op.GetNotMethods())+
		len(op.GetPaths())+len(op.GetNotPaths()) > 0
}

// sourceNeedsL7: request principals come from JWTs and remote IPs from
// X-Forwarded-For, both HTTP-level.
func sourceNeedsL7(src *apisecurity.Source) bool {
	return len(src.GetRequestPrincipals())+len(src.GetNotRequestPrincipals())+
		len(src.GetRemoteIpBlocks())+len(src.GetNotRemoteIpBlocks()) > 0
}

// NeedsWaypoint reports whether a policy carries anything only a waypoint can
// enforce: L7 attributes, or targetRef(s) (which only waypoints honour in
// ambient mode). Such policies are sent to waypoints whole.
func NeedsWaypoint(ap *securityv1.AuthorizationPolicy) bool {
	spec := &ap.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return true
	}
	return hasL7Attributes(spec)
}

// hasL7Attributes reports whether any rule uses an attribute ztunnel cannot
// evaluate, i.e. whether the L4 translation of the policy is lossy.
func hasL7Attributes(spec *apisecurity.AuthorizationPolicy) bool {
	for _, rule := range spec.GetRules() {
		if len(l7Attributes(rule)) > 0 {
			return true
		}
	}
	return false
}

// DroppedRule is an ALLOW rule left out of the L4 translation because it
// needs L7 attributes: Index in spec.rules and the attributes it uses.
type DroppedRule struct {
	Index      int
	Attributes []string
}

// DroppedL7Rules lists the rules the L4 translation drops for their L7
// attributes (ALLOW policies applied at L4 only): ztunnel denies what only
// they would allow. Nil for policies without an L4 form and DENY policies
// (which keep their L4 part).
func DroppedL7Rules(rootNamespace string, ap *securityv1.AuthorizationPolicy) []DroppedRule {
	out := TranslateAuthorizationPolicy(rootNamespace, ap)
	if out == nil || out.Action != security.Action_ALLOW {
		return nil
	}
	var dropped []DroppedRule
	for i, rule := range ap.Spec.GetRules() {
		if attrs := l7Attributes(rule); len(attrs) > 0 {
			dropped = append(dropped, DroppedRule{Index: i, Attributes: attrs})
		}
	}
	return dropped
}

// l7Attributes names the attributes of rule ztunnel cannot evaluate, in
// Istio's spelling (to.operation.paths, when request.headers[x], ...).
func l7Attributes(rule *apisecurity.Rule) []string {
	var out []string
	add := func(name string, n int) {
		if n > 0 && !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	for _, t := range rule.GetTo() {
		op := t.GetOperation()
		add("hosts", len(op.GetHosts())+len(op.GetNotHosts()))
		add("methods", len(op.GetMethods())+len(op.GetNotMethods()))
		add("paths", len(op.GetPaths())+len(op.GetNotPaths()))
	}
	for _, f := range rule.GetFrom() {
		src := f.GetSource()
		add("requestPrincipals", len(src.GetRequestPrincipals())+len(src.GetNotRequestPrincipals()))
		add("remoteIpBlocks", len(src.GetRemoteIpBlocks())+len(src.GetNotRemoteIpBlocks()))
	}
	for _, c := range rule.GetWhen() {
		if !l4ConditionKeys[c.GetKey()] {
			add("when "+c.GetKey(), 1)
		}
	}
	return out
}

// stringMatches converts Istio's glob spelling: "*" any non-empty value,
// "*x" suffix, "x*" prefix, otherwise exact.
func stringMatches(values []string) []*security.StringMatch {
	out := make([]*security.StringMatch, 0, len(values))
	for _, v := range values {
		var m *security.StringMatch
		switch {
		case v == "*":
			m = &security.StringMatch{MatchType: &security.StringMatch_Presence{}}
		case strings.HasPrefix(v, "*"):
			m = &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: v[1:]}}
		case strings.HasSuffix(v, "*"):
			m = &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: v[:len(v)-1]}}
		default:
			m = &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: v}}
		}
		out = append(out, m)
	}
	return out
}

// serviceAccountMatches turns "sa" or "ns/sa" into a principal suffix match
// "/ns/<ns>/sa/<sa>": service accounts match in any trust domain.
func (p *parser) serviceAccounts(policyNamespace string, values []string) []*security.StringMatch {
	out := make([]*security.StringMatch, 0, len(values))
	for _, v := range values {
		ns, sa, found := strings.Cut(v, "/")
		if !found {
			ns, sa = policyNamespace, v
		}
		if ns == "" || sa == "" || strings.Contains(sa, "/") {
			p.invalid = true
			continue
		}
		out = append(out, &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: "/ns/" + ns + "/sa/" + sa}})
	}
	return out
}

// parser converts values and remembers whether any was invalid. Invalid
// values are skipped (as Istio does); the caller decides whether that is safe.
type parser struct{ invalid bool }

func (p *parser) ports(values []string) []uint32 {
	out := make([]uint32, 0, len(values))
	for _, v := range values {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil {
			p.invalid = true
			continue
		}
		out = append(out, uint32(n))
	}
	return out
}

func (p *parser) cidrs(values []string) []*security.Address {
	out := make([]*security.Address, 0, len(values))
	for _, v := range values {
		var pfx netip.Prefix
		if strings.Contains(v, "/") {
			pp, err := netip.ParsePrefix(v)
			if err != nil {
				p.invalid = true
				continue
			}
			pfx = pp
		} else {
			a, err := netip.ParseAddr(v)
			if err != nil {
				p.invalid = true
				continue
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		addr := pfx.Addr()
		bits := pfx.Bits()
		if addr.Is4In6() && bits >= 96 {
			addr, bits = addr.Unmap(), bits-96
		}
		if addr.Zone() != "" || bits < 0 {
			p.invalid = true
			continue
		}
		out = append(out, &security.Address{Address: addr.AsSlice(), Length: uint32(bits)})
	}
	return out
}
