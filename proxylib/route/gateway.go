package route

import (
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"

	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Routes attached to an ingress Gateway (parentRef kind Gateway) are keyed
// by the listener port they were accepted on, with the hostname they match:
// one table serves one Gateway.

// gatewayParent is one listener a route is attached to, with the hostnames
// the route answers there (the intersection of the route's and the
// listener's; empty: any host).
type gatewayParent struct {
	port  uint16
	hosts []string
}

// L4Routes are the TLSRoutes and TCPRoutes an ingress gateway receives.
type L4Routes struct {
	TLS []*gwv1.TLSRoute
	TCP []*gwv1.TCPRoute
}

// BuildGateway compiles the routes attached to gw's listeners: parentRefs
// naming gw (optionally narrowed by sectionName or port), accepted by the
// listener's allowedRoutes (namespaces Same or All; kinds, which must suit
// the listener's protocol) and sharing a hostname with it. Routes attached
// to Services are ignored here. A backendRef to another namespace is
// served only when one of grants permits it; otherwise requests (or
// connections) picking it fail.
func BuildGateway(gw *gwv1.Gateway, grants *Grants, httpRoutes []*gwv1.HTTPRoute, grpcRoutes []*gwv1.GRPCRoute, l4 L4Routes) (*Table, []error) {
	return build(gw, grants, httpRoutes, grpcRoutes, l4)
}

// listenerKey is the table key of a Gateway listener port.
func listenerKey(port uint16) ServiceKey {
	return ServiceKey{Name: ":" + strconv.Itoa(int(port))}
}

// gatewayParents lists the listeners of t.gateway a route attaches to.
func (t *Table) gatewayParents(routeNS, kind string, refs []gwv1.ParentReference, hostnames []gwv1.Hostname) []gatewayParent {
	gw := t.gateway
	if gw == nil {
		return nil
	}
	var out []gatewayParent
	for _, p := range refs {
		if p.Kind != nil && string(*p.Kind) != "Gateway" || p.Group != nil && string(*p.Group) != gwv1.GroupName {
			continue
		}
		ns := routeNS
		if p.Namespace != nil && *p.Namespace != "" {
			ns = string(*p.Namespace)
		}
		if ns != gw.Namespace || string(p.Name) != gw.Name {
			continue
		}
		for _, l := range gw.Spec.Listeners {
			if p.SectionName != nil && *p.SectionName != l.Name || p.Port != nil && *p.Port != l.Port {
				continue
			}
			if !ListenerAllows(gw, l, routeNS, kind) {
				continue
			}
			hosts, ok := IntersectHostnames(l.Hostname, hostnames)
			if !ok {
				continue
			}
			out = append(out, gatewayParent{port: uint16(l.Port), hosts: hosts})
		}
	}
	return out
}

// ListenerAllows applies a listener's allowedRoutes to a route of kind in
// routeNS; a listener the gateway cannot serve admits nothing (one whose
// references do not resolve still counts its routes, as the API asks). Namespace
// selectors are answered from what the control plane resolved
// (ResolveSelectors): unresolved, they admit nothing.
func ListenerAllows(gw *gwv1.Gateway, l gwv1.Listener, routeNS, kind string) bool {
	if r := unservable(gw, l, nil); r.Message != "" && !r.Refs {
		return false
	}
	if !slices.Contains(RouteKinds(l.Protocol), gwv1.Kind(kind)) {
		return false
	}
	from := gwv1.NamespacesFromSame
	if ar := l.AllowedRoutes; ar != nil {
		if ar.Namespaces != nil && ar.Namespaces.From != nil {
			from = *ar.Namespaces.From
		}
		if len(ar.Kinds) > 0 {
			found := false
			for _, k := range ar.Kinds {
				if string(k.Kind) == kind && (k.Group == nil || string(*k.Group) == gwv1.GroupName) {
					found = true
				}
			}
			if !found {
				return false
			}
		}
	}
	switch from {
	case gwv1.NamespacesFromAll:
		return true
	case gwv1.NamespacesFromSame:
		return routeNS == gw.Namespace
	case gwv1.NamespacesFromSelector:
		return selectedBy(gw, l, routeNS)
	}
	return false
}

// IntersectHostnames is the set of hostnames a route answers on a listener:
// nil (any) when neither names one; ok is false when they share none.
func IntersectHostnames(listener *gwv1.Hostname, route []gwv1.Hostname) ([]string, bool) {
	if len(route) == 0 {
		if listener == nil {
			return nil, true
		}
		return []string{strings.ToLower(string(*listener))}, true
	}
	var out []string
	for _, h := range route {
		rh := strings.ToLower(string(h))
		if listener == nil {
			out = append(out, rh)
			continue
		}
		lh := strings.ToLower(string(*listener))
		switch {
		case hostMatches(lh, rh):
			out = append(out, rh) // the route's is the narrower (or equal)
		case hostMatches(rh, lh):
			out = append(out, lh)
		}
	}
	return out, len(out) > 0
}

// hostMatches reports whether host is covered by pattern ("*.example.com"
// covers any subdomain depth, not the apex).
func hostMatches(pattern, host string) bool {
	if suffix, ok := strings.CutPrefix(pattern, "*"); ok {
		return strings.HasSuffix(host, suffix) && len(host) > len(suffix)
	}
	return pattern == host
}

// requestHost is the request's host, lower case, without port.
func requestHost(req *http.Request) string {
	h := req.Host
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return strings.ToLower(strings.TrimSuffix(h, "."))
}

// hostRank orders hostnames by Gateway API precedence: the longest exact
// hostname first, then the longest wildcard, then routes with no hostname.
func hostRank(h string) (exact bool, length int) {
	if h == "" {
		return false, -1
	}
	return !strings.HasPrefix(h, "*"), len(h)
}

// sortByHost orders a listener's matchers by hostname precedence, keeping
// the match precedence within one hostname (a stable sort).
func sortByHost(ms []*matcher) {
	sort.SliceStable(ms, func(i, j int) bool {
		ei, li := hostRank(ms[i].host)
		ej, lj := hostRank(ms[j].host)
		if ei != ej {
			return ei
		}
		return li > lj
	})
}

// LookupGateway finds the rule for a request that arrived on the Gateway
// listener port. Routes with a hostname answer only requests for it.
func (t *Table) LookupGateway(port uint16, req *http.Request) (Match, bool) {
	if t == nil {
		return Match{}, false
	}
	key := listenerKey(port)
	host := requestHost(req)
	if IsGRPC(req) {
		if m, ok := lookupHost(t.grpc[key], host, req); ok {
			return m, true
		}
	}
	return lookupHost(t.http[key], host, req)
}

func lookupHost(ms []*matcher, host string, req *http.Request) (Match, bool) {
	for _, m := range ms {
		if m.host != "" && !hostMatches(m.host, host) {
			continue
		}
		if m.matches(req) {
			return Match{Rule: m.rule, prefix: m.prefixValue()}, true
		}
	}
	return Match{}, false
}
