#!/usr/bin/env bash
# Runs the upstream Gateway API conformance suite's MESH-HTTP profile against
# a lab that is up with the mesh installed (called by conformance-mesh.sh,
# and by e2e.sh as part of `make test`). The suite's two namespaces are
# enrolled by label (the suite's NamespaceLabels too) and each gets a
# namespace waypoint before the suite applies its manifests into them.
# Writes CONFORMANCE_REPORT (default docs/conformance/mesh-report.yaml) and
# bin/lab/logs/conformance-mesh.log.
# Env: CONFORMANCE_RUN (default TestMeshConformance), CONFORMANCE_TIMEOUT (default 30m).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE PATH=$ROOT/bin:$PATH

for ns in gateway-conformance-mesh gateway-conformance-mesh-consumer; do
  kc create namespace "$ns" 2>/dev/null
  kc label --overwrite namespace "$ns" istio.io/dataplane-mode=ambient >/dev/null || die "labelling $ns"
  ambientctl waypoint apply -n "$ns" --wait || die "no waypoint in $ns"
done
conformance_suite "MESH-HTTP profile" "${CONFORMANCE_REPORT:-$ROOT/docs/conformance/mesh-report.yaml}" \
  "${CONFORMANCE_RUN:-^TestMeshConformance\$}" "${CONFORMANCE_TIMEOUT:-30m}" "$LOGS/conformance-mesh.log"
