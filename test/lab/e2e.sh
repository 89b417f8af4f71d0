#!/usr/bin/env bash
# `make e2e`: builds what it needs, brings the lab up, installs the mesh and
# runs the end-to-end suite (go test -tags e2e ./test/lab/e2e). Scenarios
# whose components do not exist yet are skipped with the reason printed
# (E2E_REQUIRE_MESH=1 turns those skips into failures). On failure, logs of
# every component go to _artifacts/e2e-<time>/.
#
# The full run (no E2E_RUN) then runs the Gateway API conformance suite's
# MESH-HTTP profile on the same lab (conformance-mesh-run.sh, ~2 min; the
# report goes to the logs, `make conformance-mesh` writes docs/conformance/).
#
# Env: E2E_RUN (go test -run pattern), E2E_DOWN=1 (tear the lab down after),
#      E2E_REQUIRE_MESH=1, E2E_TIMEOUT (default 60m),
#      E2E_CONFORMANCE_MESH=1|0 (default 1 without E2E_RUN, else 0),
#      E2E_TAGS (build tags, default e2e; make e2e-flannel adds flannel).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
export KUBECONFIG=$KUBECONFIG_FILE PATH=$ROOT/bin:$PATH
E2E_T0=$SECONDS
ART=$ROOT/_artifacts/e2e-$(date +%Y%m%dT%H%M%S)
export E2E_ARTIFACTS=$ART

# collect_artifacts: cluster state, every pod's logs (current and previous),
# and the logs of every lab process.
collect_artifacts() {
  mkdir -p "$ART/pods" "$ART/lab"
  say "collecting logs into $ART"
  kc get nodes -o wide >"$ART/nodes.txt" 2>&1
  kc get all,ambientmeshes,waypointpolicies,authorizationpolicies,peerauthentications,serviceentries,workloadentries -A -o wide >"$ART/objects.txt" 2>&1
  kc get events -A --sort-by=.lastTimestamp >"$ART/events.txt" 2>&1
  kc describe pods -A >"$ART/pods-describe.txt" 2>&1
  kc get ambientmeshes -o yaml >"$ART/ambientmeshes.yaml" 2>&1
  local ns pod c
  kc get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name} {range .spec.containers[*]}{.name},{end}{"\n"}{end}' 2>/dev/null |
    while read -r ns pod cs; do
      for c in ${cs//,/ }; do
        kc logs -n "$ns" "$pod" -c "$c" >"$ART/pods/$ns.$pod.$c.log" 2>&1
        kc logs -n "$ns" "$pod" -c "$c" --previous >"$ART/pods/$ns.$pod.$c.previous.log" 2>/dev/null || rm -f "$ART/pods/$ns.$pod.$c.previous.log"
      done
    done
  cp "$LOGS"/*.log "$ART/lab/" 2>/dev/null || true
  [ -f "$STATE/mesh.env" ] && cp "$STATE/mesh.env" "$ART/"
}

mesh_conformance=${E2E_CONFORMANCE_MESH:-$([ -z "${E2E_RUN:-}" ] && echo 1 || echo 0)}
conformance_builds=()
[ "$mesh_conformance" = 1 ] && conformance_builds=(conformance echo-advanced)
say "e2e: build"
"$ROOT/test/lab/build.sh" k8s coredns fortio metallb prometheus "${conformance_builds[@]}" images ambientctl || die "build failed"
# down_if_asked: E2E_DOWN leaves nothing behind, also when the lab or the
# install failed half way (only a lab this checkout brought up).
down_if_asked() { [ -n "${E2E_DOWN:-}" ] && [ -f "$STATE/.up" ] && "$ROOT/test/lab/lab.sh" down; }
"$ROOT/test/lab/lab.sh" up || { collect_artifacts; down_if_asked; die "the lab did not come up"; }
"$ROOT/test/lab/install.sh" || { collect_artifacts; down_if_asked; die "install failed"; }
cat "$STATE/mesh.env"

say "e2e: go test -tags e2e ./test/lab/e2e"
mkdir -p "$ART"
(cd "$ROOT" && go test -tags "${E2E_TAGS:-e2e}" -count=1 -v -timeout "${E2E_TIMEOUT:-60m}" ${E2E_RUN:+-run "$E2E_RUN"} ./test/lab/e2e) 2>&1 | tee "$ART/go-test.log"
rc=${PIPESTATUS[0]}
if [ "$mesh_conformance" = 1 ]; then
  CONFORMANCE_REPORT=$LOGS/mesh-report.yaml "$ROOT/test/lab/conformance-mesh-run.sh" 2>&1 | tee "$ART/conformance-mesh.log"
  crc=${PIPESTATUS[0]}
  cp "$LOGS/mesh-report.yaml" "$ART/" 2>/dev/null
  echo "--- $([ "$crc" = 0 ] && echo PASS || echo FAIL): MeshConformance (Gateway API MESH-HTTP profile)" >>"$ART/go-test.log"
  [ "$crc" = 0 ] || rc=$crc
fi

echo
echo "=== e2e summary (wall time $((SECONDS - E2E_T0))s)"
grep -E '^\s*--- (PASS|FAIL|SKIP)' "$ART/go-test.log" | sed 's/^ *//'
# A skipped test prints its reason on the line before its "--- SKIP".
awk '/^[[:space:]]*--- SKIP/ { sub(/^[[:space:]]*[^ ]*_test\.go:[0-9]+: /, "", prev); printf "    %s: %s\n", $3, prev } { prev = $0 }' "$ART/go-test.log"
if [ "$rc" != 0 ]; then
  collect_artifacts
  echo "e2e FAILED (artifacts in $ART)"
else
  echo "e2e passed (skipped scenarios are listed above with their reasons)"
  ls "$ART"/*.json >/dev/null 2>&1 || rm -rf "$ART"
fi
[ -n "${E2E_DOWN:-}" ] && "$ROOT/test/lab/lab.sh" down
exit "$rc"
