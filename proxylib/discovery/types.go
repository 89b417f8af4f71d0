// Package discovery is the proxy side of workload discovery: a delta xDS
// client (Client) that keeps a State of workloads, services, authorization
// policies and waypoint L7 resources pushed by the control plane.
//
// Resources use Istio's workload API (proto packages istio.workload and
// istio.security), so names and type URLs match Istio's:
//
//	Workload       <cluster>//Pod/<namespace>/<name>   (Address type)
//	               <cluster>/networking.istio.io/WorkloadEntry/<namespace>/<name>
//	               <cluster>/networking.istio.io/ServiceEntry/<namespace>/<name>/<address>
//	Service        <namespace>/<hostname>                (Address type)
//	Authorization  <namespace>/<name>
//	L7Resource     <group>/<kind>/<namespace>/<name>
package discovery

import (
	"net/netip"
	"strings"
)

// Type URLs of the resources the control plane serves.
const (
	AddressType       = "type.googleapis.com/istio.workload.Address"
	AuthorizationType = "type.googleapis.com/istio.security.Authorization"
	L7ResourceType    = "type.googleapis.com/ambient.mesh.v1.L7Resource"
)

// SidecarTypes are what a sidecar subscribes to: addresses and
// authorizations as ztunnel, and the L7 resources its L7 engine enforces
// on its own pod (AuthorizationPolicies with L7 rules).
var SidecarTypes = []string{AddressType, AuthorizationType, L7ResourceType}

// Roles a proxy announces in its node metadata.
const (
	RoleZtunnel  = "ztunnel"
	RoleWaypoint = "waypoint"
	// RoleSidecar serves its own pod from inside it (cmd/sidecar).
	RoleSidecar = "sidecar"
)

// Node metadata keys sent by clients (docs/interfaces.md).
const (
	MetaNodeName     = "NODE_NAME"
	MetaPodName      = "POD_NAME"
	MetaPodNamespace = "POD_NAMESPACE"
	MetaRole         = "ROLE"
)

// NodeScopeName is the Address resource name a ztunnel subscribes to
// instead of the wildcard to receive only what its node needs: every
// service, the workloads on its node and the workloads of waypoints. It
// looks up other workloads on demand, subscribing to "<network>/<ip>"
// (AddressAlias) or to a service key (which brings its endpoints).
const NodeScopeName = "ambient.mesh/node-scope"

// AddressAlias is the on-demand name of ip on network, as Istio spells it.
func AddressAlias(network string, ip netip.Addr) string { return network + "/" + ip.Unmap().String() }

// TokenAudience is the audience of the projected service-account token proxies
// present to the discovery and CA servers.
const TokenAudience = "ambient-mesh"

// ServiceKey is the resource name of a service and its key in Workload.services.
func ServiceKey(namespace, hostname string) string { return namespace + "/" + hostname }

// PolicyKey is the resource name of an authorization policy.
func PolicyKey(namespace, name string) string { return namespace + "/" + name }

// PodUID is the workload uid of a Kubernetes pod, as Istio spells it.
func PodUID(cluster, namespace, name string) string {
	return cluster + "//Pod/" + namespace + "/" + name
}

// L7Key is the resource name of an L7Resource.
func L7Key(group, kind, namespace, name string) string {
	return group + "/" + kind + "/" + namespace + "/" + name
}

// WorkloadEntryUID is the workload uid of a WorkloadEntry, as Istio spells it.
func WorkloadEntryUID(cluster, namespace, name string) string {
	return cluster + "/networking.istio.io/WorkloadEntry/" + namespace + "/" + name
}

// ServiceEntryUID is the workload uid of one endpoint of a ServiceEntry
// (inline endpoint or, for DNS resolution without endpoints, one host),
// keyed by its address as Istio does.
func ServiceEntryUID(cluster, namespace, name, address string) string {
	return cluster + "/networking.istio.io/ServiceEntry/" + namespace + "/" + name + "/" + address
}

// IsKubernetesServiceHost reports whether hostname is a Kubernetes
// Service's (<name>.<namespace>.svc.<domain>), as opposed to a
// ServiceEntry host.
func IsKubernetesServiceHost(name, namespace, hostname string) bool {
	return strings.HasPrefix(hostname, name+"."+namespace+".svc.")
}
