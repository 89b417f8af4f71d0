package lb

import (
	"slices"

	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
)

// Locality-aware choice, as Istio's ztunnel applies a Service's
// LoadBalancing (the control plane sends it for trafficDistribution
// PreferSameZone/PreferClose/PreferSameNode, the
// networking.istio.io/traffic-distribution annotation and
// internalTrafficPolicy: Local): an endpoint's rank is the number of the
// routing preference's scopes, in order, it shares with the client; scopes
// after the first it does not share do not count. FAILOVER uses the
// highest rank present (so the closest endpoints while any is healthy, the
// next ring when they are gone); STRICT only endpoints sharing every scope.

// Rank is ep's rank for a client src under lb, and whether ep may be used
// at all. A nil src (unknown client) shares nothing.
func Rank(lb *workloadapi.LoadBalancing, src, ep *workloadapi.Workload) (int, bool) {
	prefs := lb.GetRoutingPreference()
	rank := 0
	for _, scope := range prefs {
		if src == nil || !sameScope(scope, src, ep) {
			break
		}
		rank++
	}
	if lb.GetMode() == workloadapi.LoadBalancing_STRICT && rank < len(prefs) {
		return rank, false
	}
	return rank, true
}

func sameScope(scope workloadapi.LoadBalancing_Scope, a, b *workloadapi.Workload) bool {
	switch scope {
	case workloadapi.LoadBalancing_NETWORK:
		return a.GetNetwork() == b.GetNetwork()
	case workloadapi.LoadBalancing_REGION:
		return a.GetLocality().GetRegion() == b.GetLocality().GetRegion()
	case workloadapi.LoadBalancing_ZONE:
		return a.GetLocality().GetZone() == b.GetLocality().GetZone()
	case workloadapi.LoadBalancing_SUBZONE:
		return a.GetLocality().GetSubzone() == b.GetLocality().GetSubzone()
	case workloadapi.LoadBalancing_NODE:
		return a.GetNode() == b.GetNode()
	case workloadapi.LoadBalancing_CLUSTER:
		return a.GetClusterId() == b.GetClusterId()
	}
	return false // a scope we do not know: not shared
}

// localityAware reports whether lb asks for locality-aware choice.
func localityAware(lb *workloadapi.LoadBalancing) bool {
	m := lb.GetMode()
	return len(lb.GetRoutingPreference()) > 0 && (m == workloadapi.LoadBalancing_FAILOVER || m == workloadapi.LoadBalancing_STRICT)
}

// Tiers groups the (healthy) endpoints eps by rank for client src, closest
// first, leaving out those STRICT forbids. wl gives an endpoint's workload.
// Without a locality preference it is one tier of every endpoint.
func Tiers[T any](lb *workloadapi.LoadBalancing, src *workloadapi.Workload, eps []T, wl func(T) *workloadapi.Workload) [][]T {
	if len(eps) == 0 {
		return nil
	}
	if !localityAware(lb) {
		return [][]T{eps}
	}
	byRank := map[int][]T{}
	for _, ep := range eps {
		if r, ok := Rank(lb, src, wl(ep)); ok {
			byRank[r] = append(byRank[r], ep)
		}
	}
	ranks := make([]int, 0, len(byRank))
	for r := range byRank {
		ranks = append(ranks, r)
	}
	slices.Sort(ranks)
	slices.Reverse(ranks)
	out := make([][]T, 0, len(ranks))
	for _, r := range ranks {
		out = append(out, byRank[r])
	}
	return out
}

// Closest is the first tier of Tiers: the endpoints a client uses (what
// Istio's ztunnel picks among). Empty when STRICT leaves none.
func Closest[T any](lb *workloadapi.LoadBalancing, src *workloadapi.Workload, eps []T, wl func(T) *workloadapi.Workload) []T {
	if t := Tiers(lb, src, eps, wl); len(t) > 0 {
		return t[0]
	}
	return nil
}
