//go:build conformance

// Package conformance runs the upstream Gateway API conformance suite
// (sigs.k8s.io/gateway-api/conformance, the version of the product's API
// module) against the lab: the GatewayHTTP profile on GatewayClass istio.
// Its own module keeps the suite's dependencies out of the product.
package conformance

import (
	"os"
	"testing"

	"sigs.k8s.io/gateway-api/conformance"
	"sigs.k8s.io/gateway-api/conformance/utils/suite"
	"sigs.k8s.io/gateway-api/pkg/features"
)

func TestGatewayHTTPConformance(t *testing.T) {
	opts := conformance.DefaultOptions(t)
	opts.GatewayClassName = "istio"
	opts.ConformanceProfiles = []suite.ConformanceProfileName{suite.GatewayHTTPConformanceProfileName}
	opts.SupportedFeatures = []features.FeatureName{features.SupportGateway, features.SupportHTTPRoute, features.SupportReferenceGrant}
	opts.ReportOutputPath = os.Getenv("CONFORMANCE_REPORT")
	opts.Implementation.Organization = "ambientmesh"
	opts.Implementation.Project = "ambient"
	opts.Implementation.URL = "https://github.com/ambientmesh/ambient"
	opts.Implementation.Version = "dev"
	opts.Implementation.Contact = []string{"@ambientmesh/maintainers"}
	conformance.RunConformanceWithOptions(t, opts)
}
