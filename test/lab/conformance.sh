#!/usr/bin/env bash
# `make conformance`: the upstream Gateway API conformance suite
# (sigs.k8s.io/gateway-api/conformance at the product's Gateway API version,
# module test/conformance) against GatewayClass istio in the lab, GatewayHTTP
# profile. Its test workloads run the suite's own echo-basic, built from the
# same module and imported under the image names its manifests use.
# Writes the suite's report to docs/conformance/gateway-http-report.yaml and
# the test log to bin/lab/logs/conformance.log.
#
# Env: CONFORMANCE_RUN (go test -run pattern inside the suite, e.g.
#      'TestGatewayHTTPConformance/HTTPRouteSimpleSameNamespace'; default the
#      GatewayHTTP/TLS/TCP run; make conformance-mesh runs TestMeshConformance),
#      CONFORMANCE_TIMEOUT (default 40m).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE PATH=$ROOT/bin:$PATH

"$ROOT/test/lab/build.sh" k8s coredns metallb conformance images ambientctl || die "build failed"
"$ROOT/test/lab/lab.sh" up || die "the lab did not come up"
"$ROOT/test/lab/install.sh" || die "install failed"
# shellcheck disable=SC1091
source "$STATE/mesh.env"
[ "$OPERATOR" = ready ] && [ "${WAYPOINT_IMAGE:-}" = ready ] && [ "${METALLB:-}" = ready ] ||
  die "mesh not ready: operator $OPERATOR, gateway image ${WAYPOINT_IMAGE:-?}, MetalLB ${METALLB:-?}"
restart_operator
# The suite's DNS test workload names upstream CoreDNS; the lab's is the same program.
"$ROOT/test/lab/lab.sh" tag docker.io/ambient-lab/coredns:v1.12.4 registry.k8s.io/coredns/coredns:v1.12.2 >/dev/null
conformance_suite "GatewayHTTP profile against GatewayClass istio" "$ROOT/docs/conformance/gateway-http-report.yaml" \
  "${CONFORMANCE_RUN:-^TestGatewayHTTPConformance\$}" "${CONFORMANCE_TIMEOUT:-40m}" "$LOGS/conformance.log"
