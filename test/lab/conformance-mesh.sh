#!/usr/bin/env bash
# `make conformance-mesh`: the upstream Gateway API conformance suite's
# MESH-HTTP profile (GAMMA: HTTPRoutes attached to Services) against the
# ambient mesh in the lab. The suite's mesh workloads run its echo-advanced
# image: Istio's echo server and client, built from the istio.io/istio
# module (test/lab/build.sh echo-advanced) and imported under the name the
# suite's manifests use. Its two namespaces are enrolled by label (the
# suite's NamespaceLabels) and each gets a namespace waypoint here, before
# the suite applies its manifests into them.
# Writes docs/conformance/mesh-report.yaml and bin/lab/logs/conformance-mesh.log.
# Env: CONFORMANCE_RUN (default TestMeshConformance), CONFORMANCE_TIMEOUT (default 30m).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE PATH=$ROOT/bin:$PATH

"$ROOT/test/lab/build.sh" k8s coredns metallb conformance echo-advanced images ambientctl || die "build failed"
"$ROOT/test/lab/lab.sh" up || die "the lab did not come up"
"$ROOT/test/lab/install.sh" || die "install failed"
# shellcheck disable=SC1091
source "$STATE/mesh.env"
[ "$OPERATOR" = ready ] && [ "${WAYPOINT_IMAGE:-}" = ready ] || die "mesh not ready: operator $OPERATOR, waypoint image ${WAYPOINT_IMAGE:-?}"
kc -n ambient-system rollout restart deploy/ambient-controller-manager >/dev/null &&
  kc -n ambient-system rollout status deploy/ambient-controller-manager --timeout=120s >/dev/null ||
  die "operator did not restart"
for ns in gateway-conformance-mesh gateway-conformance-mesh-consumer; do
  kc create namespace "$ns" 2>/dev/null
  kc label --overwrite namespace "$ns" istio.io/dataplane-mode=ambient >/dev/null || die "labelling $ns"
  ambientctl waypoint apply -n "$ns" --wait || die "no waypoint in $ns"
done
mkdir -p "$ROOT/docs/conformance"
report=$ROOT/docs/conformance/mesh-report.yaml
say "conformance: MESH-HTTP profile"
(cd "$ROOT/test/conformance" && CONFORMANCE_REPORT=$report go test -tags conformance -count=1 -v \
  -timeout "${CONFORMANCE_TIMEOUT:-30m}" -run "${CONFORMANCE_RUN:-^TestMeshConformance\$}" .) 2>&1 | tee "$LOGS/conformance-mesh.log"
rc=${PIPESTATUS[0]}
echo
echo "=== mesh conformance summary"
grep -E '^\s+--- (PASS|FAIL|SKIP)' "$LOGS/conformance-mesh.log" | sed 's/^ *//' | sort | uniq -c | sort -rn | head -100
[ -f "$report" ] && say "report: $report"
exit "$rc"
