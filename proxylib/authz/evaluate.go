package authz

import (
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"github.com/ambientmesh/ambient/proxylib/identity"
)

// Request is everything a policy can look at.
type Request struct {
	// Peer is the verified identity of the caller; zero for plaintext.
	Peer identity.Identity
	// SourceIP is source.ip; RemoteIP is remote.ip (we never trust
	// X-Forwarded-For, so it is the same address).
	SourceIP netip.Addr
	RemoteIP netip.Addr
	DestIP   netip.Addr
	DestPort uint16
	// HTTP is false for opaque TCP: L7 attributes cannot be evaluated and the
	// rules that need them fail closed.
	HTTP   bool
	Method string
	Path   string // without the query string
	Host   string
	Header http.Header
}

// Decision is the outcome of an evaluation.
type Decision struct {
	Allowed bool
	// Policy is "namespace/name" of the deciding policy ("" when the default
	// decided), Reason a short explanation for logs.
	Policy string
	Reason string
}

// Evaluate applies Istio's order: CUSTOM (no external authorizer here:
// a matching CUSTOM policy denies), then DENY, then ALLOW (when any ALLOW
// policy applies, one must match). AUDIT policies do not affect the outcome.
func Evaluate(policies []*Policy, req *Request) Decision {
	for _, p := range policies {
		if p.Spec.Action == Custom && p.matches(req) {
			return Decision{Policy: p.key(), Reason: "CUSTOM policy matched and no external authorizer is available"}
		}
	}
	for _, p := range policies {
		if p.Spec.Action == Deny && p.matches(req) {
			return Decision{Policy: p.key(), Reason: "denied by DENY policy"}
		}
	}
	haveAllow := false
	for _, p := range policies {
		if p.Spec.Action != Allow {
			continue
		}
		haveAllow = true
		if p.matches(req) {
			return Decision{Allowed: true, Policy: p.key(), Reason: "allowed by ALLOW policy"}
		}
	}
	if haveAllow {
		return Decision{Reason: "no ALLOW policy matched"}
	}
	return Decision{Allowed: true, Reason: "no policy applies"}
}

func (p *Policy) key() string { return p.Namespace + "/" + p.Name }

// matches: a policy matches when any rule matches; no rules never match
// (an ALLOW policy without rules allows nothing; `rules: [{}]` allows all).
func (p *Policy) matches(req *Request) bool {
	e := evaluator{req: req, failClosed: p.Spec.Action != Allow}
	if len(p.Unknown) > 0 {
		return e.failClosed
	}
	for _, r := range p.Spec.Rules {
		if e.rule(r) {
			return true
		}
	}
	return false
}

// evaluator carries the request and the value an attribute we cannot
// evaluate takes: false in ALLOW policies, true in DENY/CUSTOM ones, so that
// what we do not understand never grants access.
type evaluator struct {
	req        *Request
	failClosed bool
}

func (e evaluator) rule(r *Rule) bool {
	if r == nil {
		return true
	}
	if r.unsupported != "" {
		return e.failClosed
	}
	if len(r.From) > 0 && !anyOf(r.From, func(f *From) bool { return f == nil || e.source(f.Source) }) {
		return false
	}
	if len(r.To) > 0 && !anyOf(r.To, func(t *To) bool { return t == nil || e.operation(t.Operation) }) {
		return false
	}
	for _, c := range r.When {
		if c != nil && !e.condition(c) {
			return false
		}
	}
	return true
}

func anyOf[T any](xs []T, f func(T) bool) bool {
	for _, x := range xs {
		if f(x) {
			return true
		}
	}
	return false
}

// field evaluates "values match and notValues do not". An empty list is no
// constraint.
func field(values, notValues []string, match func(string) bool) bool {
	if len(values) > 0 && !anyOf(values, match) {
		return false
	}
	return !anyOf(notValues, match)
}

func (e evaluator) source(s *Source) bool {
	if s == nil {
		return true
	}
	req := e.req
	principal := ""
	if !req.Peer.IsZero() {
		principal = req.Peer.Principal()
	}
	ok := field(s.Principals, s.NotPrincipals, func(pat string) bool {
		return matchString(strings.TrimPrefix(pat, "spiffe://"), principal)
	})
	ok = ok && field(s.Namespaces, s.NotNamespaces, func(pat string) bool {
		return matchString(pat, req.Peer.Namespace)
	})
	ok = ok && field(s.ServiceAccounts, s.NotServiceAccounts, func(pat string) bool {
		if req.Peer.IsZero() {
			return false
		}
		ns, sa, found := strings.Cut(pat, "/")
		if !found {
			return false
		}
		return ns == req.Peer.Namespace && sa == req.Peer.ServiceAccount
	})
	ok = ok && field(s.IPBlocks, s.NotIPBlocks, func(b string) bool { return ipIn(b, req.SourceIP) })
	ok = ok && field(s.RemoteIPBlocks, s.NotRemoteIPBlocks, func(b string) bool { return ipIn(b, req.RemoteIP) })
	if !ok {
		return false
	}
	if len(s.RequestPrincipals) > 0 || len(s.NotRequestPrincipals) > 0 {
		return e.failClosed // JWT is not implemented
	}
	return true
}

func (e evaluator) operation(o *Operation) bool {
	if o == nil {
		return true
	}
	req := e.req
	ok := field(o.Ports, o.NotPorts, func(p string) bool { return p == strconv.Itoa(int(req.DestPort)) })
	if !ok {
		return false
	}
	l7 := len(o.Hosts)+len(o.NotHosts)+len(o.Methods)+len(o.NotMethods)+len(o.Paths)+len(o.NotPaths) > 0
	if !l7 {
		return true
	}
	if !req.HTTP {
		return e.failClosed
	}
	ok = field(o.Methods, o.NotMethods, func(m string) bool { return matchString(m, req.Method) })
	ok = ok && field(o.Hosts, o.NotHosts, func(h string) bool { return hostMatch(h, req.Host) })
	if !ok {
		return false
	}
	templated := false
	ok = field(o.Paths, o.NotPaths, func(p string) bool {
		if strings.ContainsAny(p, "{}") {
			templated = true
			return false
		}
		return matchString(p, req.Path)
	})
	if templated {
		return e.failClosed // path templates are not implemented
	}
	return ok
}

func (e evaluator) condition(c *Condition) bool {
	req := e.req
	var get func() ([]string, bool) // values of the attribute; false: unsupported
	key := c.Key
	switch {
	case strings.HasPrefix(key, "request.headers[") && strings.HasSuffix(key, "]"):
		name := key[len("request.headers[") : len(key)-1]
		get = func() ([]string, bool) {
			if !req.HTTP {
				return nil, false
			}
			return req.Header.Values(name), true
		}
	case key == "source.ip":
		return field(c.Values, c.NotValues, func(b string) bool { return ipIn(b, req.SourceIP) })
	case key == "remote.ip":
		return field(c.Values, c.NotValues, func(b string) bool { return ipIn(b, req.RemoteIP) })
	case key == "destination.ip":
		return field(c.Values, c.NotValues, func(b string) bool { return ipIn(b, req.DestIP) })
	case key == "source.namespace":
		get = func() ([]string, bool) { return []string{req.Peer.Namespace}, true }
	case key == "source.principal":
		get = func() ([]string, bool) {
			if req.Peer.IsZero() {
				return []string{""}, true
			}
			return []string{req.Peer.Principal()}, true
		}
	case key == "source.serviceAccount":
		get = func() ([]string, bool) {
			if req.Peer.IsZero() {
				return []string{""}, true
			}
			return []string{req.Peer.Namespace + "/" + req.Peer.ServiceAccount}, true
		}
	case key == "destination.port":
		get = func() ([]string, bool) { return []string{strconv.Itoa(int(req.DestPort))}, true }
	case key == "connection.sni":
		// The waypoint sees the inner request, not a TLS SNI.
		get = func() ([]string, bool) { return []string{""}, true }
	default:
		// request.auth.* (JWT), experimental.*, and anything unknown.
		return e.failClosed
	}
	vals, supported := get()
	if !supported {
		return e.failClosed
	}
	match := func(pat string) bool {
		return anyOf(vals, func(v string) bool { return matchString(pat, v) })
	}
	return field(c.Values, c.NotValues, match)
}

// matchString is Istio's string match: "*" (present, non-empty), "abc*"
// prefix, "*abc" suffix, otherwise exact.
func matchString(pattern, value string) bool {
	switch {
	case pattern == "*":
		return value != ""
	case strings.HasSuffix(pattern, "*"):
		return strings.HasPrefix(value, pattern[:len(pattern)-1])
	case strings.HasPrefix(pattern, "*"):
		return strings.HasSuffix(value, pattern[1:])
	default:
		return value == pattern
	}
}

// hostMatch compares case-insensitively, with and without the port.
func hostMatch(pattern, host string) bool {
	pattern, host = strings.ToLower(pattern), strings.ToLower(host)
	if matchString(pattern, host) {
		return true
	}
	if i := strings.LastIndexByte(host, ':'); i > 0 && !strings.HasSuffix(host, "]") {
		return matchString(pattern, host[:i])
	}
	return false
}

// ipIn matches an address against "a.b.c.d" or a CIDR.
func ipIn(block string, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	ip = ip.Unmap()
	if strings.Contains(block, "/") {
		p, err := netip.ParsePrefix(block)
		return err == nil && p.Masked().Contains(ip)
	}
	a, err := netip.ParseAddr(block)
	return err == nil && a.Unmap() == ip
}
