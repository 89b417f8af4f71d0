package proxy

import (
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

// isWaypointIdentity reports whether peer is the identity of waypoint wp.
// An unresolvable waypoint matches nobody (fail closed).
func (r *Router) isWaypointIdentity(wp *workloadapi.GatewayAddress, peer identity.Identity) bool {
	w := r.waypointWorkload(wp)
	return w != nil && r.WorkloadIdentity(w) == peer
}
