// Package route compiles Gateway API HTTPRoutes and GRPCRoutes attached to
// Services (the GAMMA mesh profile) into a lookup table, and applies the
// matched rule's filters. It is pure: no I/O, no discovery; the waypoint
// resolves the chosen backend Service to endpoints.
package route

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"time"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// ServiceKey names a Kubernetes Service.
type ServiceKey struct{ Namespace, Name string }

func (k ServiceKey) String() string { return k.Namespace + "/" + k.Name }

// Backend is one weighted backendRef of a rule, resolved to a Service port.
// Invalid is set (with a reason) when the reference cannot be served; a
// request that picks it gets 500, as the Gateway API requires.
type Backend struct {
	Service ServiceKey
	Port    uint16
	Weight  int32
	Invalid string
	filters filterSet
}

// Retry is a rule's retry policy (Gateway API HTTPRouteRetry).
type Retry struct {
	Attempts int
	Codes    map[int]bool
	Backoff  time.Duration
}

// Rule is one compiled route rule with everything needed after matching.
type Rule struct {
	Route    string // namespace/name of the route, for logs and metrics
	Index    int    // rule index within the route
	GRPC     bool
	Backends []Backend
	// Timeout bounds the whole request including retries; BackendTimeout
	// bounds each attempt. Zero means none.
	Timeout        time.Duration
	BackendTimeout time.Duration
	Retry          *Retry
	filters        filterSet
	// Invalid is set when the rule uses something we do not implement; the
	// request is answered 500 rather than routed with the feature ignored.
	Invalid string
	total   int64
}

// Match is the result of a lookup: the rule and what matched.
type Match struct {
	Rule *Rule
	// prefix is the matched PathPrefix value, for ReplacePrefixMatch.
	prefix string
}

type pathKind int

// Precedence order: Exact, then RegularExpression (implementation-specific
// in the spec; Istio ranks it above prefixes), then PathPrefix.
const (
	pathPrefix pathKind = iota
	pathRegex
	pathExact
)

// matcher is one HTTPRouteMatch / GRPCRouteMatch of a rule.
type matcher struct {
	rule      *Rule
	port      uint16 // parentRef port; 0 for every port
	host      string // Gateway listener hostname it answers; "" for any
	routeNS   string
	created   time.Time
	routeName string
	ruleIdx   int
	matchIdx  int

	pathKind  pathKind
	path      string
	pathRe    *regexp.Regexp
	method    string
	headers   []valueMatch
	queries   []valueMatch
	grpcSvc   string
	grpcMeth  string
	grpcSvcRe *regexp.Regexp
	grpcMeRe  *regexp.Regexp
}

type valueMatch struct {
	name  string
	value string
	re    *regexp.Regexp
}

func (v valueMatch) matches(got string, present bool) bool {
	if !present {
		return false
	}
	if v.re != nil {
		return v.re.MatchString(got)
	}
	return got == v.value
}

// parentKey says which Service (and optionally port) a route attaches to.
type parentKey struct {
	svc  ServiceKey
	port uint16 // 0: every port
}

// Table is an immutable set of compiled routes, indexed by parent Service.
type Table struct {
	http map[ServiceKey][]*matcher
	grpc map[ServiceKey][]*matcher
	// l4 holds TLSRoute/TCPRoute rules by Gateway listener port.
	l4 map[ServiceKey][]*l4Matcher
	// gateway is set for the table of an ingress Gateway (BuildGateway):
	// then only routes attached to its listeners are compiled, and
	// cross-namespace backendRefs need one of grants.
	gateway *gwv1.Gateway
	grants  *Grants
}

// BackendPermitted reports whether a route of kind in routeNS may send to
// the Service ns/name. Attached to a Gateway (north-south), a backend in
// another namespace needs a ReferenceGrant there. Attached to a Service
// (GAMMA), it does not: mesh routes augment Services their clients reach
// anyway, and GEP-1294 (with the MeshConsumerRoute conformance test)
// allows cross-namespace backendRefs without a grant; the destination's
// AuthorizationPolicy still decides, against the waypoint's identity.
func BackendPermitted(grants *Grants, gatewayParent bool, kind, routeNS, ns, name string) bool {
	if !gatewayParent || ns == routeNS {
		return true
	}
	return grants.Permits(RouteBackend(kind, routeNS, ns, name))
}

// backendPermit is the rule of this table for routes of kind in routeNS.
func (t *Table) backendPermit(kind, routeNS string) func(ns, name string) bool {
	return func(ns, name string) bool {
		return BackendPermitted(t.grants, t.gateway != nil, kind, routeNS, ns, name)
	}
}

// attachment is one place a route serves: a Service (and optionally one of
// its ports), or a Gateway listener port with one of its hostnames.
type attachment struct {
	key  ServiceKey
	port uint16 // Service port; 0 for every port (and for listeners)
	host string // listener hostname the matchers answer; "" for any
}

// attachments lists where a route applies in this table.
func (t *Table) attachments(routeNS, kind string, refs []gwv1.ParentReference, hostnames []gwv1.Hostname) []attachment {
	var out []attachment
	if t.gateway == nil {
		for _, p := range serviceParents(routeNS, refs) {
			out = append(out, attachment{key: p.svc, port: p.port})
		}
		return out
	}
	for _, p := range t.gatewayParents(routeNS, kind, refs, hostnames) {
		if len(p.hosts) == 0 {
			out = append(out, attachment{key: listenerKey(p.port)})
		}
		for _, h := range p.hosts {
			out = append(out, attachment{key: listenerKey(p.port), host: h})
		}
	}
	return out
}

// Build compiles the routes. Routes that are not attached to a Service are
// ignored; problems that make a whole rule unusable are returned as errors
// and the rule answers 500 (fail closed, never silently widened).
func Build(httpRoutes []*gwv1.HTTPRoute, grpcRoutes []*gwv1.GRPCRoute) (*Table, []error) {
	return build(nil, nil, httpRoutes, grpcRoutes, L4Routes{})
}

// build compiles routes into a table for the Services (gw nil) or for
// Gateway gw's listeners, in precedence order.
func build(gw *gwv1.Gateway, grants *Grants, httpRoutes []*gwv1.HTTPRoute, grpcRoutes []*gwv1.GRPCRoute, l4 L4Routes) (*Table, []error) {
	t := &Table{http: map[ServiceKey][]*matcher{}, grpc: map[ServiceKey][]*matcher{}, l4: map[ServiceKey][]*l4Matcher{}, gateway: gw, grants: grants}
	var errs []error
	if gw != nil {
		for _, r := range l4.TLS {
			errs = append(errs, t.addTLSRoute(r)...)
		}
		for _, r := range l4.TCP {
			errs = append(errs, t.addTCPRoute(r)...)
		}
		for k := range t.l4 {
			sortL4(t.l4[k])
		}
	}
	for _, r := range httpRoutes {
		errs = append(errs, t.addHTTPRoute(r)...)
	}
	for _, r := range grpcRoutes {
		errs = append(errs, t.addGRPCRoute(r)...)
	}
	for k := range t.http {
		sortMatchers(t.http[k], false)
		if gw != nil {
			sortByHost(t.http[k])
		}
	}
	for k := range t.grpc {
		sortMatchers(t.grpc[k], true)
		if gw != nil {
			sortByHost(t.grpc[k])
		}
	}
	return t, errs
}

// serviceParents returns the Services a route attaches to.
func serviceParents(routeNS string, refs []gwv1.ParentReference) []parentKey {
	var out []parentKey
	for _, p := range refs {
		if p.Kind == nil || string(*p.Kind) != "Service" {
			continue
		}
		if p.Group != nil && *p.Group != "" && *p.Group != "core" {
			continue
		}
		ns := routeNS
		if p.Namespace != nil && *p.Namespace != "" {
			ns = string(*p.Namespace)
		}
		var port uint16
		if p.Port != nil {
			port = uint16(*p.Port)
		}
		out = append(out, parentKey{svc: ServiceKey{ns, string(p.Name)}, port: port})
	}
	return out
}

// Lookup finds the rule for a request to svc:port from a client in
// sourceNamespace. GRPC routes are consulted first for gRPC requests.
// Consumer routes (in the client's namespace, for a Service elsewhere) win
// over producer routes, as in the GAMMA profile.
func (t *Table) Lookup(svc ServiceKey, port uint16, sourceNamespace string, req *http.Request) (Match, bool) {
	if t == nil {
		return Match{}, false
	}
	if IsGRPC(req) {
		if m, ok := lookupIn(t.grpc[svc], svc, port, sourceNamespace, req); ok {
			return m, true
		}
	}
	return lookupIn(t.http[svc], svc, port, sourceNamespace, req)
}

// HasRoutes reports whether any route attaches to svc, for any port or
// client.
func (t *Table) HasRoutes(svc ServiceKey) bool {
	return t != nil && (len(t.http[svc]) > 0 || len(t.grpc[svc]) > 0)
}

// HasRoutesFor reports whether a route applies to requests for svc:port
// from clients in sourceNamespace, so that a request matching none of them
// gets 404 rather than the default route. A route scoped to another port
// (parentRef port) or another namespace's consumer route does not apply:
// those requests go to the Service as if it had no routes (GEP-1426).
func (t *Table) HasRoutesFor(svc ServiceKey, port uint16, sourceNamespace string) bool {
	if t == nil {
		return false
	}
	return len(applicable(t.http[svc], svc, port, sourceNamespace)) > 0 ||
		len(applicable(t.grpc[svc], svc, port, sourceNamespace)) > 0
}

func lookupIn(ms []*matcher, svc ServiceKey, port uint16, srcNS string, req *http.Request) (Match, bool) {
	for _, m := range applicable(ms, svc, port, srcNS) {
		if m.matches(req) {
			return Match{Rule: m.rule, prefix: m.prefixValue()}, true
		}
	}
	return Match{}, false
}

// applicable filters svc's matchers (in precedence order) to those serving
// svc:port for a client in srcNS: routes without a parentRef port or with
// this port; the client namespace's consumer routes if it has any for this
// port, else the producer routes (the Service's own namespace). Other
// namespaces' consumer routes never apply.
func applicable(ms []*matcher, svc ServiceKey, port uint16, srcNS string) []*matcher {
	var producer, consumer []*matcher
	for _, m := range ms {
		switch {
		case m.port != 0 && m.port != port:
		case m.routeNS == svc.Namespace:
			producer = append(producer, m)
		case m.routeNS == srcNS:
			consumer = append(consumer, m)
		}
	}
	if len(consumer) > 0 {
		return consumer
	}
	return producer
}

// IsGRPC reports whether a request is gRPC (HTTP/2 with application/grpc).
func IsGRPC(req *http.Request) bool {
	return req.ProtoMajor == 2 && strings.HasPrefix(req.Header.Get("Content-Type"), "application/grpc")
}

func (m *matcher) prefixValue() string {
	if m.pathKind == pathPrefix {
		return m.path
	}
	return ""
}

func (m *matcher) matches(req *http.Request) bool {
	if m.grpcSvc != "" || m.grpcMeth != "" || m.grpcSvcRe != nil || m.grpcMeRe != nil {
		if !m.matchGRPCMethod(req.URL.Path) {
			return false
		}
	} else if !m.matchPath(req.URL.Path) {
		return false
	}
	if m.method != "" && req.Method != m.method {
		return false
	}
	for _, h := range m.headers {
		vals, ok := req.Header[h.name]
		if !ok && h.name == "Host" {
			vals, ok = []string{req.Host}, req.Host != ""
		}
		if !h.matches(strings.Join(vals, ","), ok) {
			return false
		}
	}
	if len(m.queries) > 0 {
		q := req.URL.Query()
		for _, qm := range m.queries {
			vals, ok := q[qm.name]
			got := ""
			if ok {
				got = vals[0]
			}
			if !qm.matches(got, ok) {
				return false
			}
		}
	}
	return true
}

func (m *matcher) matchPath(p string) bool {
	switch m.pathKind {
	case pathExact:
		return p == m.path
	case pathPrefix:
		return prefixMatch(m.path, p)
	default:
		return m.pathRe.MatchString(p)
	}
}

// prefixMatch is element-wise: "/foo" matches "/foo" and "/foo/bar" but not
// "/foobar"; a trailing slash in the prefix is ignored.
func prefixMatch(prefix, p string) bool {
	prefix = strings.TrimSuffix(prefix, "/")
	if prefix == "" {
		return strings.HasPrefix(p, "/")
	}
	if !strings.HasPrefix(p, prefix) {
		return false
	}
	return len(p) == len(prefix) || p[len(prefix)] == '/'
}

// matchGRPCMethod matches "/<service>/<method>".
func (m *matcher) matchGRPCMethod(p string) bool {
	rest, ok := strings.CutPrefix(p, "/")
	if !ok {
		return false
	}
	svc, meth, ok := strings.Cut(rest, "/")
	if !ok || strings.Contains(meth, "/") {
		return false
	}
	if m.grpcSvcRe != nil && !m.grpcSvcRe.MatchString(svc) {
		return false
	}
	if m.grpcMeRe != nil && !m.grpcMeRe.MatchString(meth) {
		return false
	}
	if m.grpcSvc != "" && m.grpcSvcRe == nil && svc != m.grpcSvc {
		return false
	}
	if m.grpcMeth != "" && m.grpcMeRe == nil && meth != m.grpcMeth {
		return false
	}
	return true
}

// sortMatchers orders matchers by Gateway API precedence.
func sortMatchers(ms []*matcher, grpc bool) {
	sort.SliceStable(ms, func(i, j int) bool {
		a, b := ms[i], ms[j]
		if grpc {
			if la, lb := len(a.grpcSvc), len(b.grpcSvc); la != lb {
				return la > lb
			}
			if la, lb := len(a.grpcMeth), len(b.grpcMeth); la != lb {
				return la > lb
			}
		} else {
			if a.pathKind != b.pathKind {
				return a.pathKind > b.pathKind
			}
			if la, lb := len(a.path), len(b.path); la != lb {
				return la > lb
			}
			if (a.method != "") != (b.method != "") {
				return a.method != ""
			}
		}
		if la, lb := len(a.headers), len(b.headers); la != lb {
			return la > lb
		}
		if la, lb := len(a.queries), len(b.queries); la != lb {
			return la > lb
		}
		if !a.created.Equal(b.created) {
			return a.created.Before(b.created)
		}
		if a.routeName != b.routeName {
			return a.routeName < b.routeName
		}
		if a.ruleIdx != b.ruleIdx {
			return a.ruleIdx < b.ruleIdx
		}
		return a.matchIdx < b.matchIdx
	})
}

// PickBackend chooses a backend by weight. ok is false when every weight is
// zero or there are no backends (the request must get 500).
func (r *Rule) PickBackend(rng *rand.Rand) (Backend, bool) {
	if r.total <= 0 {
		return Backend{}, false
	}
	var n int64
	if rng != nil {
		n = rng.Int64N(r.total)
	} else {
		n = rand.Int64N(r.total)
	}
	for _, b := range r.Backends {
		if n < int64(b.Weight) {
			return b, true
		}
		n -= int64(b.Weight)
	}
	return Backend{}, false
}

// compileBackends resolves a rule's backendRefs; permit says whether a
// Service may be referred to (cross-namespace rules).
func compileBackends(routeNS string, permit func(ns, name string) bool, refs []gwv1.BackendRef, filters [][]gwv1.HTTPRouteFilter) ([]Backend, int64, []error) {
	var out []Backend
	var total int64
	var errs []error
	for i, ref := range refs {
		b := Backend{Weight: 1}
		if ref.Weight != nil {
			b.Weight = *ref.Weight
		}
		if b.Weight < 0 {
			b.Weight = 0
		}
		ns := routeNS
		if ref.Namespace != nil && *ref.Namespace != "" {
			ns = string(*ref.Namespace)
		}
		b.Service = ServiceKey{ns, string(ref.Name)}
		switch {
		case ref.Kind != nil && *ref.Kind != "Service" || ref.Group != nil && *ref.Group != "" && *ref.Group != "core":
			b.Invalid = "backendRef kind is not a core Service"
		case !permit(ns, string(ref.Name)):
			b.Invalid = fmt.Sprintf("no ReferenceGrant in namespace %s permits routes of namespace %s to use this Service", ns, routeNS)
		case ref.Port == nil:
			b.Invalid = "backendRef to a Service needs a port"
		default:
			b.Port = uint16(*ref.Port)
		}
		if i < len(filters) && len(filters[i]) > 0 {
			fs, err := compileFilters(filters[i])
			if err != nil {
				b.Invalid = err.Error()
			}
			b.filters = fs
		}
		if b.Invalid != "" {
			errs = append(errs, fmt.Errorf("backendRef %s: %s", b.Service, b.Invalid))
		}
		total += int64(b.Weight)
		out = append(out, b)
	}
	return out, total, errs
}

func parseDuration(d *gwv1.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil || v < 0 {
		return 0, fmt.Errorf("invalid duration %q", *d)
	}
	return v, nil
}
