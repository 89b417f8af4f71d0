package meshgraph

import "sort"

// Policy is the part of an AuthorizationPolicy that says whom it applies to.
type Policy struct {
	Namespace string
	Name      string
	Action    string            // ALLOW (default), DENY, AUDIT, CUSTOM
	Selector  map[string]string // spec.selector.matchLabels; empty: every workload of the namespace
	// TargetRefs are spec.targetRef(s) as kind/name (Service, Gateway,
	// ServiceEntry): the policy applies at the waypoint of those targets.
	TargetRefs []Ref
}

// Ref is a targetRef.
type Ref struct{ Kind, Name string }

// Workload is a destination workload's pod labels (any of its pods), keyed
// by namespace and workload name as the metrics name it.
type Workload struct {
	Namespace, Name string
	Labels          map[string]string
}

// LinkPolicies attaches to every edge the policies that select its
// destination: the root namespace's and the destination namespace's
// policies without selector, those whose selector matches the destination
// workload's labels, and those whose targetRefs name the destination Service
// or a waypoint (Gateway) the edge went through.
func (g *Graph) LinkPolicies(rootNamespace string, policies []Policy, workloads []Workload) {
	labels := map[string]map[string]string{}
	for _, w := range workloads {
		labels[w.Namespace+"/"+w.Name] = w.Labels
	}
	// A request refused before routing names only the service: its
	// workloads are those other edges reached through the same service.
	behind := map[string][]string{}
	for _, e := range g.Edges {
		if e.Service != "" && e.dstWorkload != "" && !contains(behind[e.Service], e.dstWorkload) {
			behind[e.Service] = append(behind[e.Service], e.dstWorkload)
		}
	}
	for i := range g.Edges {
		e := &g.Edges[i]
		e.Policies = nil
		dst := []string{e.dstWorkload}
		if e.dstWorkload == "" {
			dst = behind[e.Service]
		}
		for _, p := range policies {
			if appliesToAny(p, e, rootNamespace, dst, labels) {
				action := p.Action
				if action == "" {
					action = "ALLOW"
				}
				e.Policies = append(e.Policies, PolicyRef{Namespace: p.Namespace, Name: p.Name, Action: action})
			}
		}
		sort.Slice(e.Policies, func(a, b int) bool {
			if e.Policies[a].Namespace != e.Policies[b].Namespace {
				return e.Policies[a].Namespace < e.Policies[b].Namespace
			}
			return e.Policies[a].Name < e.Policies[b].Name
		})
	}
}

func appliesToAny(p Policy, e *Edge, rootNamespace string, workloads []string, labels map[string]map[string]string) bool {
	if len(workloads) == 0 {
		return applies(p, e, rootNamespace, nil)
	}
	for _, w := range workloads {
		if applies(p, e, rootNamespace, labels[e.dstNamespace+"/"+w]) {
			return true
		}
	}
	return false
}

func applies(p Policy, e *Edge, rootNamespace string, wlLabels map[string]string) bool {
	if e.dstNamespace == "" {
		return false
	}
	if len(p.TargetRefs) > 0 {
		if p.Namespace != e.dstNamespace {
			return false
		}
		for _, r := range p.TargetRefs {
			switch r.Kind {
			case "Service", "ServiceEntry":
				if r.Name != "" && r.Name == e.dstServiceName {
					return true
				}
			case "Gateway":
				if contains(e.Via, workloadID(p.Namespace, r.Name)) {
					return true
				}
			}
		}
		return false
	}
	if p.Namespace != e.dstNamespace && p.Namespace != rootNamespace {
		return false
	}
	if len(p.Selector) == 0 {
		return true
	}
	if wlLabels == nil {
		return false
	}
	for k, v := range p.Selector {
		if got, ok := wlLabels[k]; !ok || got != v {
			return false
		}
	}
	return true
}
