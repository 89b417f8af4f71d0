package discovery

import (
	"encoding/json"
	"errors"

	"github.com/ambientmesh/ambient/proxylib/discovery/meshapi"
)

// The mesh's own settings that the L7 engines need travel as one
// L7Resource of kind Mesh, from the control plane's mesh configuration:
// the root namespace (whose policies are mesh-wide) is then the one the
// control plane translated the L4 policies with, and a proxy needs no
// environment variable of its own for it (a sidecar injected before one
// existed still learns it).
const (
	MeshGroup = "ambient.mesh"
	MeshKind  = "Mesh"
	meshName  = "mesh"
)

// MeshSettings is the body of the Mesh resource.
type MeshSettings struct {
	RootNamespace string `json:"rootNamespace"`
}

// MeshResource is the Mesh resource carrying s, under MeshKey(s).
func MeshResource(s MeshSettings) (*meshapi.L7Resource, error) {
	if s.RootNamespace == "" {
		return nil, errors.New("mesh settings without a root namespace")
	}
	js, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	return &meshapi.L7Resource{Group: MeshGroup, Kind: MeshKind, Namespace: s.RootNamespace, Name: meshName, Json: js}, nil
}

// MeshKey is the resource name of the Mesh resource carrying s.
func MeshKey(s MeshSettings) string { return L7Key(MeshGroup, MeshKind, s.RootNamespace, meshName) }

// DecodeMesh reads a Mesh resource; a resource without a root namespace is
// an error (the caller fails closed).
func DecodeMesh(r *meshapi.L7Resource) (MeshSettings, error) {
	var s MeshSettings
	if err := json.Unmarshal(r.GetJson(), &s); err != nil {
		return s, err
	}
	if s.RootNamespace == "" {
		return s, errors.New("mesh resource without a root namespace")
	}
	return s, nil
}

// IngressUseWaypointKind is the kind of the L7Resource (group MeshGroup)
// the control plane sends for each Service whose traffic from ingress
// gateways goes through its waypoint (Istio's istio.io/ingress-use-waypoint
// on the Service or its namespace). Only ingress gateways read it: without
// one, a gateway sends straight to the Service's endpoints, as Istio's do.
// Its namespace and name are the Service's; the body is empty.
const IngressUseWaypointKind = "IngressUseWaypoint"

// IngressUseWaypointResource is the resource for Service namespace/name.
func IngressUseWaypointResource(namespace, name string) *meshapi.L7Resource {
	return &meshapi.L7Resource{Group: MeshGroup, Kind: IngressUseWaypointKind, Namespace: namespace, Name: name, Json: []byte("{}")}
}

// IngressUseWaypointKey is the resource name of IngressUseWaypointResource.
func IngressUseWaypointKey(namespace, name string) string {
	return L7Key(MeshGroup, IngressUseWaypointKind, namespace, name)
}
