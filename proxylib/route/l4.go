package route

import (
	"fmt"
	"sort"
	"strings"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// TLSRoutes and TCPRoutes attached to an ingress Gateway's TLS
// (Passthrough) and TCP listeners: the gateway reads no request, so a
// listener port and, for TLS, the ClientHello's server name pick the rule;
// its backendRefs are resolved as for HTTP (compileBackends: weights,
// ReferenceGrants).

// l4Matcher is one TLSRoute or TCPRoute rule on a listener port, for one
// hostname ("" for any) of the route there.
type l4Matcher struct {
	rule      *Rule
	host      string
	created   time.Time
	routeName string
}

// addL4Route compiles a TLSRoute's or TCPRoute's rules onto the listeners
// it attaches to. A route has one rule (the API allows no more); rules
// beyond the first are reported and ignored.
func (t *Table) addL4Route(kind string, r metaRoute, refs []gwv1.ParentReference, hostnames []gwv1.Hostname, rules [][]gwv1.BackendRef) []error {
	parents := t.attachments(r.ns, kind, refs, hostnames)
	if len(parents) == 0 || len(rules) == 0 {
		return nil
	}
	name := r.ns + "/" + r.name
	cr := &Rule{Route: name}
	var errs []error
	cr.Backends, cr.total, errs = compileBackends(r.ns, t.backendPermit(kind, r.ns), rules[0], nil)
	if len(rules[0]) == 0 {
		cr.Invalid = "rule has no backendRefs"
		errs = append(errs, fmt.Errorf("%s: %s", name, cr.Invalid))
	}
	if len(rules) > 1 {
		errs = append(errs, fmt.Errorf("%s: %d rules, only the first is served", name, len(rules)))
	}
	for _, p := range parents {
		t.l4[p.key] = append(t.l4[p.key], &l4Matcher{rule: cr, host: p.host, created: r.created, routeName: name})
	}
	return errs
}

// metaRoute is what ordering needs of a route's metadata.
type metaRoute struct {
	ns, name string
	created  time.Time
}

func (t *Table) addTLSRoute(r *gwv1.TLSRoute) []error {
	rules := make([][]gwv1.BackendRef, len(r.Spec.Rules))
	for i, rule := range r.Spec.Rules {
		rules[i] = rule.BackendRefs
	}
	return t.addL4Route("TLSRoute", metaRoute{r.Namespace, r.Name, r.CreationTimestamp.Time}, r.Spec.ParentRefs, r.Spec.Hostnames, rules)
}

func (t *Table) addTCPRoute(r *gwv1.TCPRoute) []error {
	rules := make([][]gwv1.BackendRef, len(r.Spec.Rules))
	for i, rule := range r.Spec.Rules {
		rules[i] = rule.BackendRefs
	}
	return t.addL4Route("TCPRoute", metaRoute{r.Namespace, r.Name, r.CreationTimestamp.Time}, r.Spec.ParentRefs, nil, rules)
}

// sortL4 orders a port's rules: the most specific hostname first (as for
// HTTP), then the oldest route, then by name (Gateway API conflict
// resolution), so two routes claiming one name resolve the same way in
// every replica.
func sortL4(ms []*l4Matcher) {
	sort.SliceStable(ms, func(i, j int) bool {
		ei, li := hostRank(ms[i].host)
		ej, lj := hostRank(ms[j].host)
		if ei != ej {
			return ei
		}
		if li != lj {
			return li > lj
		}
		if !ms[i].created.Equal(ms[j].created) {
			return ms[i].created.Before(ms[j].created)
		}
		return ms[i].routeName < ms[j].routeName
	})
}

// LookupL4 finds the rule for a connection on a TLS passthrough or TCP
// listener port; serverName is the ClientHello's SNI ("" for TCP, or a
// client that sent none: only routes for any host match it).
func (t *Table) LookupL4(port uint16, serverName string) (*Rule, bool) {
	if t == nil {
		return nil, false
	}
	sni := strings.ToLower(strings.TrimSuffix(serverName, "."))
	for _, m := range t.l4[listenerKey(port)] {
		if m.host == "" || sni != "" && hostMatches(m.host, sni) {
			return m.rule, true
		}
	}
	return nil, false
}
