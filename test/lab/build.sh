#!/usr/bin/env bash
# Builds everything the lab needs into bin/ once and caches it:
#   bin/k8s/<ver>/{kube-apiserver,etcd,kubelet,kube-proxy,kube-controller-manager,kube-scheduler}
#   bin/coredns/<ver>/coredns          (only the plugins a lab cluster needs)
#   bin/lab/images/*.tar               (pause, coredns, httpbin, sleep; test/lab/imagebuild)
#   bin/ambientctl
#   bin/fortio/fortio                  (load tool and echo server of make bench-mesh; test/bench/fortio)
#   bin/metallb/<ver>/{controller,speaker,metallb-native.yaml}  (the lab's LoadBalancer, from the module proxy)
#   bin/prometheus/<ver>/prometheus    (the lab's metrics server, from the module proxy)
#   bin/flannel/<ver>/{flanneld,flannel}  (the flannel worker's pod network, from the module proxy)
# Usage: test/lab/build.sh [k8s|coredns|fortio|metallb|prometheus|flannel|conformance|echo-advanced|images|ambientctl ...]   (default: all but conformance and flannel)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$ROOT/bin
K8S_VERSION=${K8S_VERSION:-1.36.3}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.4}
METALLB_VERSION=${METALLB_VERSION:-v0.15.2}
# The Go module version of Prometheus v3.x (the module proxy serves the
# server's tags as v0.3xx.y); test/observability depends on the same module.
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}
# flanneld (github.com/flannel-io/flannel) and its CNI plugin. The plugin's
# own module (github.com/flannel-io/cni-plugin) is not served by the module
# proxy (403 for every version); before it moved there it was
# plugins/meta/flannel of github.com/containernetworking/plugins, last in
# v0.9.1, which the proxy serves.
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.28.10}
FLANNEL_CNI_VERSION=${FLANNEL_CNI_VERSION:-v0.9.1}
export K8S_VERSION

ts() { date +%H:%M:%S; }
step() { echo "[$(ts)] build: $*"; }

build_k8s() {
  "$ROOT/hack/build-envtest.sh" kube-apiserver etcd kubelet kube-proxy kube-controller-manager kube-scheduler
}

# COREDNS_PLUGINS names the build (a stamp beside the binary): a cached
# binary with another plugin set is rebuilt.
COREDNS_PLUGINS="cache errors forward health hosts kubernetes loadbalance log loop ready reload whoami"
build_coredns() {
  local out=$BIN/coredns/$COREDNS_VERSION/coredns
  if [ -x "$out" ] && [ "$(cat "$out.plugins" 2>/dev/null)" = "$COREDNS_PLUGINS" ]; then step "cached: $out"; return; fi
  local dir=$BIN/.build/coredns-$COREDNS_VERSION start=$SECONDS
  step "building CoreDNS $COREDNS_VERSION (first time only, a few minutes)"
  mkdir -p "$dir" "$(dirname "$out")"
  cat >"$dir/go.mod" <<MOD
module corednsbuild
go 1.24
require github.com/coredns/coredns $COREDNS_VERSION
MOD
  # A lab cluster needs only cluster DNS: leave out the cloud and exotic
  # plugins, which are most of CoreDNS's build time. forward is there for
  # the Gateway API conformance suite's DNS workload (the lab's own Corefile
  # does not forward, and the lab's guard keeps pods off the uplink).
  cat >"$dir/main.go" <<'GO'
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/whoami"
)

func main() { coremain.Run() }
GO
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go mod tidy -e)
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
  echo "$COREDNS_PLUGINS" >"$out.plugins"
  step "built $out in $((SECONDS - start))s"
}

# fortio (load generator and echo server of `make bench-mesh`): its own
# module under test/bench/fortio, so the product never depends on it.
build_fortio() {
  local start=$SECONDS
  mkdir -p "$BIN/fortio"
  (cd "$ROOT/test/bench/fortio" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/fortio/fortio.tmp" .)
  mv "$BIN/fortio/fortio.tmp" "$BIN/fortio/fortio"
  step "built bin/fortio/fortio in $((SECONDS - start))s"
}

# MetalLB (L2 mode gives the lab's LoadBalancer Services an address on the
# lab bridge): its controller and speaker built from the module proxy, and
# its own manifest taken from the same module.
build_metallb() {
  local dir=$BIN/metallb/$METALLB_VERSION start=$SECONDS
  if [ -x "$dir/controller" ] && [ -x "$dir/speaker" ] && [ -f "$dir/metallb-native.yaml" ]; then step "cached: $dir"; return; fi
  step "building MetalLB $METALLB_VERSION (first time only, a few minutes)"
  mkdir -p "$dir"
  CGO_ENABLED=0 GOBIN="$dir" go install -trimpath -ldflags "-s -w" \
    "go.universe.tf/metallb/controller@$METALLB_VERSION" "go.universe.tf/metallb/speaker@$METALLB_VERSION"
  cp "$(go env GOMODCACHE)/go.universe.tf/metallb@$METALLB_VERSION/config/manifests/metallb-native.yaml" "$dir/metallb-native.yaml"
  chmod u+w "$dir/metallb-native.yaml"
  step "built MetalLB in $((SECONDS - start))s"
}

# Prometheus (scrapes the lab's ztunnels, waypoints and manager; the e2e
# TestPrometheusScrapesMesh queries it): the server alone, built from the
# module proxy. The web UI's compiled assets are not in the module, so the
# binary serves the HTTP API only, which is all the lab needs.
build_prometheus() {
  local out=$BIN/prometheus/$PROMETHEUS_VERSION/prometheus start=$SECONDS
  # Also kept in ${AMBIENT_CACHE:-~/.cache/ambient} (as hack/build-envtest.sh
  # keeps envtest's binaries): a fresh clone on the same machine, such as
  # CI's, copies it instead of building for a quarter of an hour.
  local cache=${AMBIENT_CACHE:-$HOME/.cache/ambient}/prometheus/$PROMETHEUS_VERSION/prometheus
  if [ -x "$out" ]; then step "cached: $out"; return; fi
  mkdir -p "$(dirname "$out")"
  if [ -x "$cache" ]; then cp "$cache" "$out.tmp" && mv "$out.tmp" "$out"; step "cached: $out (from $cache)"; return; fi
  step "building Prometheus $PROMETHEUS_VERSION (first time only; ~15 min on 2 busy cores)"
  local gobin=$BIN/.build/prometheus-$PROMETHEUS_VERSION
  mkdir -p "$gobin"
  # Only the Kubernetes service discovery the lab uses: leaving out the
  # cloud providers' SDKs (Prometheus' own build tags) cuts the build.
  CGO_ENABLED=0 GOBIN="$gobin" go install -trimpath -ldflags "-s -w" -tags remove_all_sd,enable_kubernetes_sd \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  mv "$gobin/prometheus" "$out"
  mkdir -p "$(dirname "$cache")" && cp "$out" "$cache.tmp" && mv "$cache.tmp" "$cache" || true
  step "built $out in $((SECONDS - start))s"
}

# flannel for the lab's flannel worker shape (LAB_FLANNEL_NODES, lab.sh):
# flanneld is flannel's own main package from the module, less the two
# backends that cannot build here (tencentvpc: its SDK module is not served
# by the proxy; udp: needs cgo). The lab uses vxlan. Cached like Prometheus.
build_flannel() {
  local out=$BIN/flannel/$FLANNEL_VERSION start=$SECONDS
  local cache=${AMBIENT_CACHE:-$HOME/.cache/ambient}/flannel/$FLANNEL_VERSION
  if [ -x "$out/flanneld" ] && [ -x "$out/flannel" ]; then step "cached: $out"; return; fi
  mkdir -p "$out"
  if [ -x "$cache/flanneld" ] && [ -x "$cache/flannel" ]; then
    cp "$cache/flanneld" "$cache/flannel" "$out/"; step "cached: $out (from $cache)"; return
  fi
  step "building flannel $FLANNEL_VERSION (first time only, a few minutes)"
  local dir=$BIN/.build/flannel-$FLANNEL_VERSION
  mkdir -p "$dir"
  printf 'module flannelbuild\n\ngo 1.26.0\n\nrequire github.com/flannel-io/flannel %s\n' "$FLANNEL_VERSION" >"$dir/go.mod"
  (cd "$dir" && GOFLAGS=-mod=mod go mod download github.com/flannel-io/flannel)
  sed -e '/pkg\/backend\/tencentvpc"/d' -e '/pkg\/backend\/udp"/d' \
    "$(go env GOMODCACHE)/github.com/flannel-io/flannel@$FLANNEL_VERSION/main.go" >"$dir/main.go"
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out/flanneld.tmp" .)
  mv "$out/flanneld.tmp" "$out/flanneld"
  CGO_ENABLED=0 GOBIN="$dir" go install -trimpath -ldflags "-s -w" \
    "github.com/containernetworking/plugins/plugins/meta/flannel@$FLANNEL_CNI_VERSION"
  mv "$dir/flannel" "$out/flannel"
  mkdir -p "$cache" && cp "$out/flanneld" "$out/flannel" "$cache/" || true
  step "built $out/{flanneld,flannel} in $((SECONDS - start))s"
}

# The Gateway API conformance suite's echo server (make conformance), from
# the suite's module at the product's Gateway API version (test/conformance).
build_conformance() {
  local start=$SECONDS
  mkdir -p "$BIN/conformance"
  (cd "$ROOT/test/conformance" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/conformance/echo-basic.tmp" sigs.k8s.io/gateway-api/conformance/echo-basic)
  mv "$BIN/conformance/echo-basic.tmp" "$BIN/conformance/echo-basic"
  step "built bin/conformance/echo-basic in $((SECONDS - start))s"
}

# The mesh conformance suite's echo-advanced: Istio's echo server and client,
# from the istio.io/istio module at ISTIO_ECHO_VERSION (make conformance-mesh).
ISTIO_ECHO_VERSION=${ISTIO_ECHO_VERSION:-v0.0.0-20260827124520-eed52ebb66ad}
build_echo_advanced() {
  local dir=$BIN/.build/echo-advanced out=$BIN/conformance/echo-advanced start=$SECONDS
  if [ -x "$out/server" ] && [ -x "$out/client" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$ISTIO_ECHO_VERSION" ]; then
    step "cached: $out"; return
  fi
  step "building Istio's echo server and client $ISTIO_ECHO_VERSION (first time only, several minutes)"
  mkdir -p "$dir" "$out"
  printf 'module echoadvanced\n\ngo 1.26.0\n\nrequire istio.io/istio %s\n' "$ISTIO_ECHO_VERSION" >"$dir/go.mod"
  printf '//go:build tools\n\npackage echoadvanced\n\nimport (\n\t_ "istio.io/istio/pkg/test/echo/cmd/client"\n\t_ "istio.io/istio/pkg/test/echo/cmd/server"\n)\n' >"$dir/tools.go"
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy -e && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$out/" \
    istio.io/istio/pkg/test/echo/cmd/server istio.io/istio/pkg/test/echo/cmd/client)
  echo "$ISTIO_ECHO_VERSION" >"$out/version"
  step "built $out/{server,client} in $((SECONDS - start))s"
}

build_images() {
  local start=$SECONDS
  step "building lab images (pause, coredns, httpbin, sleep, fortio when built) into bin/lab/images"
  (cd "$ROOT" && CGO_ENABLED=0 go run ./test/lab/imagebuild \
     -out "$BIN/lab/images" -coredns "$BIN/coredns/$COREDNS_VERSION/coredns" -fortio "$BIN/fortio/fortio" \
     -metallb "$BIN/metallb/$METALLB_VERSION" -metallb-version "$METALLB_VERSION" \
     -prometheus "$BIN/prometheus/$PROMETHEUS_VERSION/prometheus" -echo-basic "$BIN/conformance/echo-basic" \
     -echo-advanced "$BIN/conformance/echo-advanced")
  step "images ready in $((SECONDS - start))s"
}

build_ambientctl() {
  (cd "$ROOT" && CGO_ENABLED=0 go build -trimpath -o "$BIN/ambientctl" ./cmd/ambientctl)
  ln -sf ambientctl "$BIN/kubectl-ambient"
  step "built bin/ambientctl (kubectl plugin: bin/kubectl-ambient)"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(k8s coredns fortio metallb prometheus images ambientctl)
for t in "${targets[@]}"; do
  case $t in
    k8s) build_k8s ;;
    coredns) build_coredns ;;
    images) build_images ;;
    fortio) build_fortio ;;
    echo-advanced) build_echo_advanced ;;
    metallb) build_metallb ;;
    prometheus) build_prometheus ;;
    flannel) build_flannel ;;
    conformance) build_conformance ;;
    ambientctl) build_ambientctl ;;
    *) echo "unknown build target $t" >&2; exit 2 ;;
  esac
done
