package route

import (
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// Ref names one end of a reference: an object's group ("" for the core
// group), kind, namespace and name (the name is not needed for the "from"
// end).
type Ref struct {
	Group, Kind, Namespace, Name string
}

// Grant is one ReferenceGrant: the namespace it lives in (the namespace of
// the objects it opens) and its spec.
type Grant struct {
	Namespace string
	Spec      gwv1.ReferenceGrantSpec
}

// Grants answers, from the ReferenceGrants of the cluster, whether a
// reference may cross namespaces (Gateway API ReferenceGrant). The zero or
// nil Grants permits same-namespace references only.
type Grants struct {
	byNS map[string][]gwv1.ReferenceGrantSpec
}

// NewGrants indexes ReferenceGrants by namespace.
func NewGrants(gs []Grant) *Grants {
	g := &Grants{byNS: map[string][]gwv1.ReferenceGrantSpec{}}
	for _, x := range gs {
		g.byNS[x.Namespace] = append(g.byNS[x.Namespace], x.Spec)
	}
	return g
}

// Permits reports whether from may refer to to: always within one
// namespace; across namespaces only when a ReferenceGrant in to's
// namespace lists from's group, kind and namespace among its "from" and
// to's group and kind (and, when it names one, to's name) among its "to".
func (g *Grants) Permits(from, to Ref) bool {
	if from.Namespace == to.Namespace {
		return true
	}
	if g == nil {
		return false
	}
	for _, spec := range g.byNS[to.Namespace] {
		if grantsFrom(spec.From, from) && grantsTo(spec.To, to) {
			return true
		}
	}
	return false
}

func grantsFrom(list []gwv1.ReferenceGrantFrom, from Ref) bool {
	for _, f := range list {
		if coreGroup(string(f.Group)) == coreGroup(from.Group) && string(f.Kind) == from.Kind && string(f.Namespace) == from.Namespace {
			return true
		}
	}
	return false
}

func grantsTo(list []gwv1.ReferenceGrantTo, to Ref) bool {
	for _, t := range list {
		if coreGroup(string(t.Group)) != coreGroup(to.Group) || string(t.Kind) != to.Kind {
			continue
		}
		if t.Name == nil || *t.Name == "" || string(*t.Name) == to.Name {
			return true
		}
	}
	return false
}

// coreGroup spells the core group "" ("core" is accepted as an alias).
func coreGroup(g string) string {
	if g == "core" {
		return ""
	}
	return g
}

// RouteBackend is the reference from a route of kind in routeNS to the
// Service ns/name, as a ReferenceGrant names it.
func RouteBackend(kind, routeNS, ns, name string) (from, to Ref) {
	return Ref{Group: gwv1.GroupName, Kind: kind, Namespace: routeNS}, Ref{Kind: "Service", Namespace: ns, Name: name}
}
