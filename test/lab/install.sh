#!/usr/bin/env bash
# Installs the mesh into the running lab the way a user does: images onto the
# nodes, the operator with `kubectl apply` of its kustomize output, then the
# sample AmbientMesh. Reports plainly which component is not available yet.
#
# Usage: test/lab/install.sh [--no-build] [--uninstall]   (env LAB_NO_BUILD=1 = --no-build)
# Writes $STATE/mesh.env: OPERATOR, ZTUNNEL, NODE_AGENT, WAYPOINT_IMAGE, METALLB, PROMETHEUS = ready|<reason>
set -euo pipefail
source "$(dirname "$0")/lib.sh"

IMG=${IMG:-docker.io/ambient/manager:dev}
COMPONENTS=(manager ztunnel ambient-cni waypoint)
MESH_NS=ambient-system
# LAB_NO_BUILD=1: reuse the image tarballs already built (quick lab iterations).
build=1
[ "${LAB_NO_BUILD:-0}" = 1 ] && build=0
for a in "$@"; do
  case $a in
    --no-build) build=0 ;;
    --uninstall) uninstall=1 ;;
    *) die "unknown argument $a" ;;
  esac
done

[ -f "$STATE/.up" ] || die "the lab is not up: run test/lab/lab.sh up"
ENV_FILE=$STATE/mesh.env
: >"$ENV_FILE"
record() { echo "$1=\"$2\"" >>"$ENV_FILE"; }

# build_images: the project's `make images` when it exists, else the lab's
# stand-in packaging each cmd/<component> that builds today.
build_images() {
  if [ -d "$ROOT/hack/images" ]; then
    say "building mesh images with 'make images'"
    if (cd "$ROOT" && make images TAG=dev PLATFORMS=host) >"$LOGS/images.log" 2>&1; then
      rm -f "$IMAGES"/component-*.tar
      return 0
    fi
    say "'make images' failed (see $LOGS/images.log); falling back to the lab's image builder"
  fi
  say "building mesh images (lab image builder: ${COMPONENTS[*]})"
  (cd "$ROOT" && CGO_ENABLED=0 go run ./test/lab/imagebuild -out "$IMAGES" -components-only \
    -components "$(IFS=,; echo "${COMPONENTS[*]}")") >"$LOGS/images.log" 2>&1 || true
  grep -E "component .*(NOT BUILT|does not exist)" "$LOGS/images.log" | sed 's/^[0-9/ :]*/  /' || true
}

# image_on_nodes <ref>: true when every node has the image.
image_on_nodes() {
  local short list
  for short in $(workers | awk '{print $1}'); do
    # Not "ctr | grep -q": grep exits at the first match, ctr then dies of
    # SIGPIPE and pipefail turns a found image into "not built".
    list=$(in_node "$short" ctr -a /run/containerd/containerd.sock -n k8s.io images ls -q 2>/dev/null) || return 1
    grep -qx "$1" <<<"$list" || return 1
  done
}

render_operator() {
  local tmp; tmp=$(mktemp -d)
  cp -r "$ROOT/config" "$tmp/"
  [ -x "$ROOT/bin/kustomize" ] || (cd "$ROOT" && make tools >/dev/null)
  (cd "$tmp/config/manager" && "$ROOT/bin/kustomize" edit set image "controller=$IMG")
  "$ROOT/bin/kustomize" build "$tmp/config/default" >"$LAB/install.yaml"
  rm -rf "$tmp"
}

# Prerequisite CRDs a user installs before the mesh (as for Istio ambient):
# Gateway API (Gateway, HTTPRoute, GRPCRoute, TLSRoute, TCPRoute,
# ReferenceGrant; each one missing) and Istio's security API
# (AuthorizationPolicy, PeerAuthentication), from the module cache.
install_prereq_crds() {
  local gw istio
  gw=$(cd "$ROOT" && go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api 2>/dev/null || true)
  if [ -d "$gw/config/crd/standard" ]; then
    local added=""
    for f in gatewayclasses gateways httproutes grpcroutes tlsroutes tcproutes referencegrants; do
      kc get crd "$f.gateway.networking.k8s.io" >/dev/null 2>&1 && continue
      kc apply --server-side -f "$gw/config/crd/standard/gateway.networking.k8s.io_$f.yaml" >/dev/null
      added="$added $f"
    done
    [ -z "$added" ] || say "Gateway API CRDs installed ($(basename "$gw")):$added"
  fi
  istio=$(cd "$ROOT" && go list -m -f '{{.Dir}}' istio.io/api 2>/dev/null || true)
  if { ! kc get crd authorizationpolicies.security.istio.io >/dev/null 2>&1 || ! kc get crd serviceentries.networking.istio.io >/dev/null 2>&1; } && [ -f "$istio/kubernetes/customresourcedefinitions.gen.yaml" ]; then
    awk -v want="authorizationpolicies.security.istio.io peerauthentications.security.istio.io requestauthentications.security.istio.io serviceentries.networking.istio.io workloadentries.networking.istio.io" '
      BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) keep[w[i]] = 1 }
      /^---/ { if (doc != "" && name in keep) printf "%s---\n", doc; doc = ""; name = ""; next }
      { doc = doc $0 "\n" }
      /^  name: / && name == "" { name = $2 }
      END { if (doc != "" && name in keep) printf "%s", doc }' \
      "$istio/kubernetes/customresourcedefinitions.gen.yaml" | kc apply --server-side -f - >/dev/null
    say "Istio CRDs installed (AuthorizationPolicy, PeerAuthentication, RequestAuthentication, ServiceEntry, WorkloadEntry)"
  fi
}

# The cluster's LoadBalancer implementation, as a user's cluster has one:
# MetalLB in L2 mode (its own manifest; controller and speaker built from
# the module proxy by build.sh) with an address pool on the lab bridge.
METALLB_DIR=$ROOT/bin/metallb/${METALLB_VERSION:-v0.15.2}
build_metallb() {
  [ -f "$IMAGES/metallb-speaker.tar" ] && [ -f "$METALLB_DIR/metallb-native.yaml" ] && return 0
  "$ROOT/test/lab/build.sh" metallb images >"$LOGS/metallb-build.log" 2>&1 ||
    say "MetalLB build failed (see $LOGS/metallb-build.log)"
}

install_metallb() {
  if [ ! -f "$METALLB_DIR/metallb-native.yaml" ]; then
    record METALLB "MetalLB not built (test/lab/build.sh metallb)"; say "MetalLB: NOT AVAILABLE (not built)"; return 0
  fi
  kc apply --server-side -f "$METALLB_DIR/metallb-native.yaml" >"$LOGS/metallb.log" 2>&1 ||
    { record METALLB "kubectl apply of MetalLB failed (see $LOGS/metallb.log)"; say "MetalLB: apply failed"; return 0; }
  if ! kc -n metallb-system rollout status deploy/controller --timeout=120s >/dev/null 2>&1 ||
    ! kc -n metallb-system rollout status daemonset/speaker --timeout=120s >/dev/null 2>&1; then
    record METALLB "MetalLB not ready (kubectl -n metallb-system get pods)"; say "MetalLB: NOT READY"; return 0
  fi
  # An address of each family the lab has: dual-stack LoadBalancer
  # Services (the ingress gateways' PreferDualStack) get both.
  local pool=$LB_POOL
  if lab_dual_stack; then pool+=", $LB_POOL6"; fi
  cat >"$LAB/metallb-pool.yaml" <<EOF
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab, namespace: metallb-system}
spec:
  addresses: [$pool]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab, namespace: metallb-system}
spec:
  ipAddressPools: [lab]
EOF
  # MetalLB's webhook admits the pool once its certificate is in place.
  wait_for 90 "MetalLB address pool accepted" kc apply -f "$LAB/metallb-pool.yaml" ||
    { record METALLB "MetalLB refused the address pool (see kubectl -n metallb-system logs deploy/controller)"; say "MetalLB: pool refused"; return 0; }
  record METALLB ready; say "MetalLB ready: LoadBalancer addresses $pool on $BRIDGE"
}

# rollout_state <kind/name>: "ready" or why not.
rollout_state() {
  local obj=$1 why
  # The operator creates it a moment after the AmbientMesh is applied.
  if ! wait_for 60 "$obj" kc -n "$MESH_NS" get "$obj" >/dev/null 2>&1; then echo "$obj was not created by the operator"; return; fi
  if kc -n "$MESH_NS" rollout status "$obj" --timeout=90s >/dev/null 2>&1; then echo ready; return; fi
  why=$(kc -n "$MESH_NS" get pods -l "app=${obj#*/}" -o jsonpath='{range .items[*]}{.status.containerStatuses[0].state.waiting.reason}{" "}{.status.containerStatuses[0].lastState.terminated.reason}{" "}{end}' 2>/dev/null | xargs)
  echo "$obj not ready (${why:-pods not ready})"
}

# Prometheus (test/lab/manifests/prometheus): built once from the module
# proxy (test/lab/build.sh prometheus, cached in bin/prometheus), its image
# beside the others in bin/lab/images.
PROMETHEUS_BIN=$ROOT/bin/prometheus/${PROMETHEUS_VERSION:-v0.316.0}/prometheus
build_prometheus() {
  [ -f "$IMAGES/prometheus.tar" ] && [ -x "$PROMETHEUS_BIN" ] && return 0
  "$ROOT/test/lab/build.sh" prometheus images >"$LOGS/prometheus-build.log" 2>&1 ||
    say "Prometheus build failed (see $LOGS/prometheus-build.log)"
}

install_prometheus() {
  if ! image_on_nodes docker.io/ambient-lab/prometheus:dev; then
    record PROMETHEUS "Prometheus image not built (test/lab/build.sh prometheus images; see $LOGS/prometheus-build.log)"
    say "Prometheus: NOT AVAILABLE (not built)"; return 0
  fi
  kc apply --server-side --force-conflicts -f "$ROOT/test/lab/manifests/prometheus/prometheus.yaml" >"$LOGS/prometheus.log" 2>&1 ||
    { record PROMETHEUS "kubectl apply of Prometheus failed (see $LOGS/prometheus.log)"; say "Prometheus: apply failed"; return 0; }
  if kc -n ambient-monitoring rollout status deploy/prometheus --timeout=120s >/dev/null 2>&1; then
    record PROMETHEUS ready; say "Prometheus running (ambient-monitoring/prometheus:9090, scraping every 2s)"
  else
    record PROMETHEUS "Prometheus not ready (kubectl -n ambient-monitoring logs deploy/prometheus)"; say "Prometheus: NOT READY"
  fi
}

uninstall() {
  kc delete --ignore-not-found -f "$ROOT/test/lab/manifests/prometheus/prometheus.yaml" --timeout=60s >/dev/null 2>&1 || true
  kc delete ambientmesh --all --timeout=120s >/dev/null 2>&1 || true
  [ -f "$LAB/install.yaml" ] && kc delete --ignore-not-found -f "$LAB/install.yaml" --timeout=120s >/dev/null 2>&1 || true
  say "mesh uninstalled"
}

main() {
  if [ -n "${uninstall:-}" ]; then uninstall; return; fi
  [ $build = 1 ] && build_images
  build_metallb
  build_prometheus
  "$ROOT/test/lab/lab.sh" images
  install_prereq_crds
  install_metallb
  local img_state
  if image_on_nodes "$IMG"; then
    render_operator
    kc apply --server-side --force-conflicts -f "$LAB/install.yaml" >"$LOGS/install.log" 2>&1 ||
      { record OPERATOR "kubectl apply of the operator failed (see $LOGS/install.log)"; say "operator: NOT AVAILABLE: apply failed"; return 0; }
    if kc -n "$MESH_NS" rollout status deploy/ambient-controller-manager --timeout=120s >/dev/null 2>&1; then
      record OPERATOR ready; say "operator running (installed from $LAB/install.yaml)"
    else
      local why
      why=$(kc -n "$MESH_NS" logs deploy/ambient-controller-manager --tail=20 2>/dev/null | grep -o '"error":"[^"]*' | tail -1 | cut -c10-220 | tr -d '\\\\')
      record OPERATOR "operator Deployment not ready: ${why:-see kubectl -n $MESH_NS logs deploy/ambient-controller-manager}"
      say "operator: NOT READY: ${why:-see kubectl -n $MESH_NS logs deploy/ambient-controller-manager}"
      return 0
    fi
  else
    record OPERATOR "operator image $IMG not built (cmd/manager does not build yet; see $LOGS/images.log)"
    say "operator: NOT AVAILABLE YET: image $IMG could not be built"
    return 0
  fi
  # The operator's webhook may need a moment after the Deployment is Ready.
  wait_for 60 "AmbientMesh accepted" kc apply -f "$ROOT/config/samples/mesh_v1alpha1_ambientmesh.yaml" ||
    { record ZTUNNEL "AmbientMesh sample rejected"; say "AmbientMesh: NOT ACCEPTED"; return 0; }
  say "AmbientMesh 'default' applied; waiting for ztunnel and node agent"
  img_state=ready; image_on_nodes docker.io/ambient/ztunnel:dev || img_state="ztunnel image not built"
  local st; st=$(rollout_state daemonset/ztunnel)
  [ "$img_state" = ready ] || st="$img_state; $st"
  record ZTUNNEL "$st"; say "ztunnel: $st"
  st=$(rollout_state daemonset/ambient-node-agent)
  record NODE_AGENT "$st"; say "node agent: $st"
  if image_on_nodes docker.io/ambient/waypoint:dev; then record WAYPOINT_IMAGE ready; else record WAYPOINT_IMAGE "waypoint image not built (cmd/waypoint does not exist yet)"; fi
  install_prometheus
}
main
