package authz

// Target says what a request is addressed to, for choosing the policies
// that apply to it at the waypoint.
type Target struct {
	// Namespace of the destination (service or workload).
	Namespace string
	// ServiceName is set when the client addressed a Service (or a
	// ServiceEntry host: ServiceEntry is true).
	ServiceName  string
	ServiceEntry bool
	// WaypointName/WaypointNamespace name this waypoint's Gateway (or
	// WaypointPolicy): policies with targetRef kind Gateway bind to it.
	WaypointName      string
	WaypointNamespace string
	// SelectedBy holds "ns/name" of the selector-based policies that select
	// the destination workload(s), as published by discovery
	// (Workload.authorization_policies).
	SelectedBy map[string]bool
	// RootNamespace is the mesh root namespace: its selector-less policies
	// apply everywhere.
	RootNamespace string
	// Sidecar: the destination is a sidecar's own pod. Policies with
	// targetRefs (gateways, waypoints, services) do not bind to it, as
	// Istio's sidecars do not enforce them.
	Sidecar bool
}

const (
	gatewayGroup    = "gateway.networking.k8s.io"
	networkingGroup = "networking.istio.io"
)

// Applies reports whether policy p binds to the target:
//   - targetRef(s): kind Gateway naming this waypoint, kind Service naming
//     the addressed Service, kind ServiceEntry naming the addressed
//     ServiceEntry, or kind GatewayClass istio-waypoint (root ns);
//   - selector: the destination workload is selected (per discovery);
//   - neither: the policy's namespace is the destination's or the root.
func Applies(p *Policy, t Target) bool {
	refs := p.Spec.TargetRefs
	if p.Spec.TargetRef != nil {
		refs = append([]TargetRef{*p.Spec.TargetRef}, refs...)
	}
	if len(refs) > 0 {
		if t.Sidecar {
			return false
		}
		for _, r := range refs {
			ns := r.Namespace
			if ns == "" {
				ns = p.Namespace
			}
			switch {
			case r.Kind == "Gateway" && r.Group == gatewayGroup:
				if r.Name == t.WaypointName && ns == t.WaypointNamespace {
					return true
				}
			case r.Kind == "Service" && (r.Group == "" || r.Group == "core"):
				if t.ServiceName != "" && !t.ServiceEntry && r.Name == t.ServiceName && ns == t.Namespace {
					return true
				}
			case r.Kind == "ServiceEntry" && r.Group == networkingGroup:
				if t.ServiceName != "" && t.ServiceEntry && r.Name == t.ServiceName && ns == t.Namespace {
					return true
				}
			case r.Kind == "GatewayClass" && r.Group == gatewayGroup:
				if r.Name == "istio-waypoint" && p.Namespace == t.RootNamespace {
					return true
				}
			}
		}
		return false
	}
	if p.Spec.Selector != nil && len(p.Spec.Selector.MatchLabels) > 0 {
		return t.SelectedBy[p.Namespace+"/"+p.Name]
	}
	return p.Namespace == t.Namespace || (t.RootNamespace != "" && p.Namespace == t.RootNamespace)
}

// Select returns the policies of all that apply to t.
func Select(all []*Policy, t Target) []*Policy {
	var out []*Policy
	for _, p := range all {
		if Applies(p, t) {
			out = append(out, p)
		}
	}
	return out
}
