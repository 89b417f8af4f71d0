package main

import (
	"os/exec"
	"strings"
	"testing"
)

// heavyForProxies are modules whose init-time registrations and pages cost
// every proxy resident memory it does not need (Envoy's config tree: +3 MB
// of binary, +2.7 MB resident; grpc-go: a program importing only it is
// 8.9 MB resident against 2.2 MB empty). The proxies speak delta xDS
// through proxylib/discovery/xdsapi, and gRPC (ADS, the CA, health probes)
// through proxylib/grpcwire on x/net/http2. Not even grpc-go's codes
// package: it pulls grpc's internal and grpclog packages.
var heavyForProxies = []string{"github.com/envoyproxy/go-control-plane", "google.golang.org/grpc"}

func TestProxiesDoNotLinkEnvoyTypes(t *testing.T) {
	for _, cmd := range []string{".", "../waypoint", "../sidecar"} {
		out, err := exec.Command("go", "list", "-deps", cmd).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", cmd, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, heavy := range heavyForProxies {
				if strings.HasPrefix(dep, heavy) {
					t.Errorf("%s links %s", cmd, dep)
				}
			}
		}
	}
}
