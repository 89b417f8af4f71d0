package route

import (
	"fmt"
	"net/http"
	"regexp"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

func (t *Table) addHTTPRoute(r *gwv1.HTTPRoute) []error {
	parents := t.attachments(r.Namespace, "HTTPRoute", r.Spec.ParentRefs, r.Spec.Hostnames)
	if len(parents) == 0 {
		return nil // attached to nothing this table serves
	}
	name := r.Namespace + "/" + r.Name
	var errs []error
	for ri, rule := range r.Spec.Rules {
		cr, err := compileHTTPRule(name, ri, r.Namespace, t.backendPermit("HTTPRoute", r.Namespace), rule)
		errs = append(errs, err...)
		matches := rule.Matches
		if len(matches) == 0 {
			matches = []gwv1.HTTPRouteMatch{{}} // default: PathPrefix "/"
		}
		for mi, hm := range matches {
			m, err := compileHTTPMatch(hm)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s rule %d match %d: %w", name, ri, mi, err))
				continue // an invalid match never matches
			}
			for _, p := range parents {
				mm := *m
				mm.rule, mm.port, mm.host, mm.routeNS, mm.routeName = cr, p.port, p.host, r.Namespace, name
				mm.created, mm.ruleIdx, mm.matchIdx = r.CreationTimestamp.Time, ri, mi
				t.http[p.key] = append(t.http[p.key], &mm)
			}
		}
	}
	return errs
}

func compileHTTPRule(name string, idx int, ns string, permit func(ns, name string) bool, rule gwv1.HTTPRouteRule) (*Rule, []error) {
	cr := &Rule{Route: name, Index: idx}
	var errs []error
	refs := make([]gwv1.BackendRef, len(rule.BackendRefs))
	perBackend := make([][]gwv1.HTTPRouteFilter, len(rule.BackendRefs))
	for i, b := range rule.BackendRefs {
		refs[i], perBackend[i] = b.BackendRef, b.Filters
	}
	var berrs []error
	cr.Backends, cr.total, berrs = compileBackends(ns, permit, refs, perBackend)
	errs = append(errs, berrs...)
	fs, err := compileFilters(rule.Filters)
	if err != nil {
		cr.Invalid = err.Error()
	}
	cr.filters = fs
	if len(rule.BackendRefs) == 0 && fs.redirect == nil && cr.Invalid == "" {
		cr.Invalid = "rule has no backendRefs"
	}
	if rule.Timeouts != nil {
		var e1, e2 error
		cr.Timeout, e1 = parseDuration(rule.Timeouts.Request)
		cr.BackendTimeout, e2 = parseDuration(rule.Timeouts.BackendRequest)
		if e1 != nil || e2 != nil {
			cr.Invalid = fmt.Sprint("timeouts: ", e1, e2)
		}
	}
	if rule.Retry != nil {
		rt := &Retry{Attempts: 1, Codes: map[int]bool{}}
		if rule.Retry.Attempts != nil {
			rt.Attempts = *rule.Retry.Attempts
		}
		for _, c := range rule.Retry.Codes {
			rt.Codes[int(c)] = true
		}
		b, err := parseDuration(rule.Retry.Backoff)
		if err != nil {
			cr.Invalid = "retry: " + err.Error()
		}
		rt.Backoff = b
		cr.Retry = rt
	}
	if cr.Invalid != "" {
		errs = append(errs, fmt.Errorf("%s rule %d: %s", name, idx, cr.Invalid))
	}
	return cr, errs
}

func compileHTTPMatch(hm gwv1.HTTPRouteMatch) (*matcher, error) {
	m := &matcher{pathKind: pathPrefix, path: "/"}
	if hm.Path != nil {
		typ := gwv1.PathMatchPathPrefix
		if hm.Path.Type != nil {
			typ = *hm.Path.Type
		}
		val := "/"
		if hm.Path.Value != nil {
			val = *hm.Path.Value
		}
		m.path = val
		switch typ {
		case gwv1.PathMatchExact:
			m.pathKind = pathExact
		case gwv1.PathMatchPathPrefix:
			m.pathKind = pathPrefix
		case gwv1.PathMatchRegularExpression:
			re, err := regexp.Compile("^(?:" + val + ")$")
			if err != nil {
				return nil, fmt.Errorf("path regex: %w", err)
			}
			m.pathKind, m.pathRe = pathRegex, re
		default:
			return nil, fmt.Errorf("unknown path match type %q", typ)
		}
	}
	if hm.Method != nil {
		m.method = string(*hm.Method)
	}
	seen := map[string]bool{}
	for _, h := range hm.Headers {
		name := http.CanonicalHeaderKey(string(h.Name))
		if seen[name] {
			continue // the first match for a name wins (spec)
		}
		seen[name] = true
		vm, err := valueMatcher(name, h.Value, h.Type != nil && *h.Type == gwv1.HeaderMatchRegularExpression)
		if err != nil {
			return nil, err
		}
		m.headers = append(m.headers, vm)
	}
	seenQ := map[string]bool{}
	for _, q := range hm.QueryParams {
		name := string(q.Name)
		if seenQ[name] {
			continue
		}
		seenQ[name] = true
		vm, err := valueMatcher(name, q.Value, q.Type != nil && *q.Type == gwv1.QueryParamMatchRegularExpression)
		if err != nil {
			return nil, err
		}
		m.queries = append(m.queries, vm)
	}
	return m, nil
}

func valueMatcher(name, value string, isRegex bool) (valueMatch, error) {
	vm := valueMatch{name: name, value: value}
	if isRegex {
		re, err := regexp.Compile("^(?:" + value + ")$")
		if err != nil {
			return vm, fmt.Errorf("%s regex: %w", name, err)
		}
		vm.re = re
	}
	return vm, nil
}

func (t *Table) addGRPCRoute(r *gwv1.GRPCRoute) []error {
	parents := t.attachments(r.Namespace, "GRPCRoute", r.Spec.ParentRefs, r.Spec.Hostnames)
	if len(parents) == 0 {
		return nil
	}
	name := r.Namespace + "/" + r.Name
	var errs []error
	for ri, rule := range r.Spec.Rules {
		cr := &Rule{Route: name, Index: ri, GRPC: true}
		refs := make([]gwv1.BackendRef, len(rule.BackendRefs))
		perBackend := make([][]gwv1.HTTPRouteFilter, len(rule.BackendRefs))
		for i, b := range rule.BackendRefs {
			refs[i] = b.BackendRef
			perBackend[i] = grpcFilters(b.Filters)
		}
		var berrs []error
		cr.Backends, cr.total, berrs = compileBackends(r.Namespace, t.backendPermit("GRPCRoute", r.Namespace), refs, perBackend)
		errs = append(errs, berrs...)
		fs, err := compileFilters(grpcFilters(rule.Filters))
		if err != nil {
			cr.Invalid = err.Error()
		}
		cr.filters = fs
		if len(rule.BackendRefs) == 0 && cr.Invalid == "" {
			cr.Invalid = "rule has no backendRefs"
		}
		if cr.Invalid != "" {
			errs = append(errs, fmt.Errorf("%s rule %d: %s", name, ri, cr.Invalid))
		}
		matches := rule.Matches
		if len(matches) == 0 {
			matches = []gwv1.GRPCRouteMatch{{}}
		}
		for mi, gm := range matches {
			m, err := compileGRPCMatch(gm)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s rule %d match %d: %w", name, ri, mi, err))
				continue
			}
			for _, p := range parents {
				mm := *m
				mm.rule, mm.port, mm.host, mm.routeNS, mm.routeName = cr, p.port, p.host, r.Namespace, name
				mm.created, mm.ruleIdx, mm.matchIdx = r.CreationTimestamp.Time, ri, mi
				t.grpc[p.key] = append(t.grpc[p.key], &mm)
			}
		}
	}
	return errs
}

// grpcFilters converts GRPCRoute filters to the HTTPRoute filter shape (the
// header modifier types are shared).
func grpcFilters(in []gwv1.GRPCRouteFilter) []gwv1.HTTPRouteFilter {
	out := make([]gwv1.HTTPRouteFilter, 0, len(in))
	for _, f := range in {
		out = append(out, gwv1.HTTPRouteFilter{
			Type:                   gwv1.HTTPRouteFilterType(f.Type),
			RequestHeaderModifier:  f.RequestHeaderModifier,
			ResponseHeaderModifier: f.ResponseHeaderModifier,
			RequestMirror:          f.RequestMirror,
			ExtensionRef:           f.ExtensionRef,
		})
	}
	return out
}

func compileGRPCMatch(gm gwv1.GRPCRouteMatch) (*matcher, error) {
	m := &matcher{pathKind: pathPrefix, path: "/"}
	if gm.Method != nil {
		regex := gm.Method.Type != nil && *gm.Method.Type == gwv1.GRPCMethodMatchRegularExpression
		if gm.Method.Service != nil {
			m.grpcSvc = *gm.Method.Service
		}
		if gm.Method.Method != nil {
			m.grpcMeth = *gm.Method.Method
		}
		if regex {
			var err error
			if m.grpcSvc != "" {
				if m.grpcSvcRe, err = regexp.Compile("^(?:" + m.grpcSvc + ")$"); err != nil {
					return nil, fmt.Errorf("service regex: %w", err)
				}
			}
			if m.grpcMeth != "" {
				if m.grpcMeRe, err = regexp.Compile("^(?:" + m.grpcMeth + ")$"); err != nil {
					return nil, fmt.Errorf("method regex: %w", err)
				}
			}
		}
	}
	seen := map[string]bool{}
	for _, h := range gm.Headers {
		name := http.CanonicalHeaderKey(string(h.Name))
		if seen[name] {
			continue
		}
		seen[name] = true
		vm, err := valueMatcher(name, h.Value, h.Type != nil && *h.Type == gwv1.GRPCHeaderMatchRegularExpression)
		if err != nil {
			return nil, err
		}
		m.headers = append(m.headers, vm)
	}
	return m, nil
}
