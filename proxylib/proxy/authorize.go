package proxy

import (
	"net/netip"

	"github.com/ambientmesh/ambient/proxylib/discovery"
	"github.com/ambientmesh/ambient/proxylib/discovery/workloadapi"
	"github.com/ambientmesh/ambient/proxylib/identity"
	"github.com/ambientmesh/ambient/proxylib/rbac"
)

// Authorize applies dst's policies to c. When the verified peer is dst's
// own waypoint, the L7-derived policies (which the waypoint enforced whole)
// are skipped; whether the peer is that waypoint is decided here from
// discovery, never taken from c.
func (r *Router) Authorize(dst *workloadapi.Workload, c rbac.Conn) rbac.Decision {
	c.FromDestinationWaypoint = false
	if wp := dst.GetWaypoint(); wp != nil && c.Source != nil {
		c.FromDestinationWaypoint = r.isWaypointIdentity(wp, *c.Source)
	}
	return rbac.Evaluate(r.State.PoliciesFor(dst), c)
}

// isWaypointIdentity reports whether peer is the identity of waypoint wp
// (of any of its replicas). An unresolvable waypoint matches nobody (fail
// closed). It runs on every inbound tunnel, so it must not pick an
// endpoint: that would advance the round robin of outbound traffic.
func (r *Router) isWaypointIdentity(wp *workloadapi.GatewayAddress, peer identity.Identity) bool {
	for _, w := range r.waypointWorkloads(wp) {
		if r.WorkloadIdentity(w) == peer {
			return true
		}
	}
	return false
}

// waypointWorkloads lists the workloads serving waypoint wp.
func (r *Router) waypointWorkloads(wp *workloadapi.GatewayAddress) []*workloadapi.Workload {
	var svc *workloadapi.Service
	switch d := wp.GetDestination().(type) {
	case *workloadapi.GatewayAddress_Address:
		ip, ok := netip.AddrFromSlice(d.Address.GetAddress())
		if !ok {
			return nil
		}
		if w := r.State.WorkloadByAddr(ip); w != nil {
			return []*workloadapi.Workload{w}
		}
		svc = r.State.ServiceByVIP(ip)
	case *workloadapi.GatewayAddress_Hostname:
		svc = r.State.ServiceByKey(discovery.ServiceKey(d.Hostname.GetNamespace(), d.Hostname.GetHostname()))
	}
	if svc == nil {
		return nil
	}
	var out []*workloadapi.Workload
	for _, ep := range r.State.Endpoints(discovery.ServiceKey(svc.GetNamespace(), svc.GetHostname())) {
		if ep != nil {
			out = append(out, ep)
		}
	}
	return out
}
