//go:build conformance

// Package conformance runs the upstream Gateway API conformance suite
// (sigs.k8s.io/gateway-api/conformance, the version of the product's API
// module) against the lab: the GatewayHTTP profile on GatewayClass istio.
// Its own module keeps the suite's dependencies out of the product.
package conformance

import (
	"os"
	"testing"
	"time"

	"sigs.k8s.io/gateway-api/conformance"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
)

func TestGatewayHTTPConformance(t *testing.T) {
	opts := conformance.DefaultOptions(t)
	opts.GatewayClassName = "istio"
	// TLS passthrough (TLSRoute) and TCPRoute listeners are served: their
	// profiles run beside GatewayHTTP. TLSRoute termination (an extended
	// feature) is not declared; its tests are skipped.
	opts.ConformanceProfiles = []suite.ConformanceProfileName{suite.GatewayHTTPConformanceProfileName,
		suite.GatewayTLSConformanceProfileName, suite.GatewayTCPConformanceProfileName}
	opts.SupportedFeatures = []features.FeatureName{features.SupportGateway, features.SupportHTTPRoute,
		features.SupportReferenceGrant, features.SupportTLSRoute, features.SupportTCPRoute}
	describe(&opts)
	// The lab is one machine: a minute is ample for a status or a route to
	// converge, and a failing test then costs a minute, not three.
	tc := &opts.TimeoutConfig
	for _, d := range []*time.Duration{&tc.GatewayMustHaveCondition, &tc.GatewayStatusMustHaveListeners,
		&tc.GatewayListenersMustHaveConditions, &tc.HTTPRouteMustHaveCondition, &tc.HTTPRouteMustNotHaveParents,
		&tc.RouteMustHaveParents, &tc.MaxTimeToConsistency, &tc.GatewayMustHaveAddress} {
		*d = min(*d, time.Minute)
	}
	conformance.RunConformanceWithOptions(t, opts)
}

// TestMeshConformance runs the MESH-HTTP profile (GAMMA: HTTPRoutes
// attached to Services) against the ambient mesh. The suite's namespaces
// are enrolled by label; test/lab/conformance-mesh.sh gives them a
// namespace waypoint (WaypointPolicy) before the suite starts, since the
// suite itself creates none.
func TestMeshConformance(t *testing.T) {
	opts := conformance.DefaultOptions(t)
	opts.GatewayClassName = "istio"
	opts.ConformanceProfiles = []suite.ConformanceProfileName{suite.MeshHTTPConformanceProfileName}
	// Mesh extended features the waypoint serves; the ones left out are
	// listed with their reasons in docs/conformance/README.md.
	opts.SupportedFeatures = []features.FeatureName{features.SupportMesh, features.SupportHTTPRoute,
		features.SupportHTTPRouteResponseHeaderModification,
		features.SupportMeshConsumerRoute, features.SupportHTTPRouteParentRefPort,
		features.SupportHTTPRoute303RedirectStatusCode, features.SupportHTTPRoute307RedirectStatusCode,
		features.SupportHTTPRoute308RedirectStatusCode, features.SupportGRPCRoute,
		features.SupportMeshClusterIPMatching, features.SupportMeshHTTPRouteRewritePath,
		features.SupportMeshHTTPRouteSchemeRedirect, features.SupportMeshHTTPRouteRedirectPort, features.SupportMeshHTTPRouteRedirectPath,
		features.SupportMeshHTTPRouteBackendRequestHeaderModification, features.SupportMeshHTTPRouteQueryParamMatching,
		features.SupportMeshHTTPRouteNamedRouteRule}
	opts.NamespaceLabels = map[string]string{"istio.io/dataplane-mode": "ambient"}
	describe(&opts)
	tc := &opts.TimeoutConfig
	for _, d := range []*time.Duration{&tc.HTTPRouteMustHaveCondition, &tc.HTTPRouteMustNotHaveParents,
		&tc.RouteMustHaveParents, &tc.MaxTimeToConsistency} {
		*d = min(*d, time.Minute)
	}
	conformance.RunConformanceWithOptions(t, opts)
}

// describe names the implementation in the report and where it is written.
func describe(opts *suite.ConformanceOptions) {
	opts.ReportOutputPath = os.Getenv("CONFORMANCE_REPORT")
	opts.Implementation.Organization = "ambientmesh"
	opts.Implementation.Project = "ambient"
	opts.Implementation.URL = "https://github.com/ambientmesh/ambient"
	opts.Implementation.Version = "dev"
	opts.Implementation.Contact = []string{"@ambientmesh/maintainers"}
}
