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
# A lab that was already up keeps running the operator of its first image
# (same tag): restart it so the run tests the code of this checkout.
kc -n ambient-system rollout restart deploy/ambient-controller-manager >/dev/null &&
  kc -n ambient-system rollout status deploy/ambient-controller-manager --timeout=120s >/dev/null ||
  die "operator did not restart"
# The suite's DNS test workload names upstream CoreDNS; the lab's is the same program.
"$ROOT/test/lab/lab.sh" tag docker.io/ambient-lab/coredns:v1.12.4 registry.k8s.io/coredns/coredns:v1.12.2 >/dev/null
mkdir -p "$ROOT/docs/conformance"
report=$ROOT/docs/conformance/gateway-http-report.yaml
say "conformance: GatewayHTTP profile against GatewayClass istio"
(cd "$ROOT/test/conformance" && CONFORMANCE_REPORT=$report go test -tags conformance -count=1 -v \
  -timeout "${CONFORMANCE_TIMEOUT:-40m}" -run "${CONFORMANCE_RUN:-^TestGatewayHTTPConformance\$}" .) 2>&1 | tee "$LOGS/conformance.log"
rc=${PIPESTATUS[0]}
echo
echo "=== conformance summary"
grep -E '^\s+--- (PASS|FAIL|SKIP)' "$LOGS/conformance.log" | sed 's/^ *//' | sort | uniq -c | sort -rn | head -100
[ -f "$report" ] && say "report: $report"
exit "$rc"
