#!/usr/bin/env bash
# `make conformance-mesh`: the upstream Gateway API conformance suite's
# MESH-HTTP profile (GAMMA: HTTPRoutes attached to Services) against the
# ambient mesh in the lab. The suite's mesh workloads run its echo-advanced
# image: Istio's echo server and client, built from the istio.io/istio
# module (test/lab/build.sh echo-advanced) and imported under the name the
# suite's manifests use. The run itself (namespaces enrolled, a namespace
# waypoint each, the suite) is conformance-mesh-run.sh, which `make test`'s
# e2e stage also runs.
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
restart_operator
CONFORMANCE_REPORT=$ROOT/docs/conformance/mesh-report.yaml exec "$ROOT/test/lab/conformance-mesh-run.sh"
