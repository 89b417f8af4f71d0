// Package controllers holds the operator's reconcilers and admission
// webhooks: AmbientMesh turns into the mesh's node components, CA and trust
// bundle; WaypointPolicy turns into waypoint proxies.
package controllers

// FieldOwner is the server-side-apply field manager of every object the
// operator owns. It never changes, so re-applies stay no-ops.
const FieldOwner = "ambient-operator"

// Well-known object names (docs/interfaces.md).
const (
	ZtunnelName          = "ztunnel"
	NodeAgentName        = "ambient-node-agent"
	ControlPlaneService  = "ambient-controlplane"
	CASecretName         = "ambient-ca"
	RootCertConfigMap    = "ambient-root-cert"
	RootCertKey          = "root-cert.pem"
	MeshFinalizer        = "mesh.ambient.dev/cleanup"
	TokenAudience        = "ambient-mesh"
	ZDSSocketDir         = "/var/run/ambient"
	tokenMountDir        = "/var/run/secrets/tokens"
	rootCertMountDir     = "/var/run/secrets/ambient"
	tokenFile            = "ambient-token"
	tokenExpirySeconds   = 43200
	nodeAgentHealthPort  = 15022
	proxyReadinessPort   = 15021
	proxyMetricsPort     = 15020
	hbonePort            = 15008
	xdsPort              = 15010
	caPort               = 15012
	debugPort            = 15014
	meshRedirectionLabel = "ambient.istio.io/redirection"
)

// CA Secret keys: ca.crt is the signing CA followed by any intermediates up
// to (excluding) the root; root.crt is the trust bundle; root.key exists only
// for a self-signed mesh, to re-issue the intermediate.
const (
	CASecretRootCert = "root.crt"
	CASecretRootKey  = "root.key"
	CASecretCert     = "ca.crt"
	CASecretKey      = "ca.key"
)

// Labels put on every object the operator creates.
const (
	LabelManagedBy = "app.kubernetes.io/managed-by"
	LabelPartOf    = "app.kubernetes.io/part-of"
	LabelComponent = "app.kubernetes.io/component"
	LabelMesh      = "mesh.ambient.dev/mesh"
	ManagedByValue = "ambient-operator"
	// LabelCreatedNamespace marks a mesh namespace the operator created (and
	// may therefore delete).
	LabelCreatedNamespace = "mesh.ambient.dev/created-by"
)

func meshLabels(mesh, component string) map[string]string {
	l := map[string]string{
		LabelManagedBy: ManagedByValue,
		LabelPartOf:    "ambient",
		LabelMesh:      mesh,
	}
	if component != "" {
		l[LabelComponent] = component
		l["app"] = component
	}
	return l
}

func mergeLabels(maps ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range maps {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}
