#!/usr/bin/env bash
# Builds kube-apiserver (and other Kubernetes binaries) and etcd from the Go
# module proxy into $BIN_DIR/k8s/<version>/. setup-envtest cannot download
# release tarballs here, so we compile them once and cache them.
#
# Built binaries are also kept in ${AMBIENT_CACHE:-$HOME/.cache/ambient}/k8s/<version>/
# (outside the clone), so a fresh clone on the same machine (CI) copies them
# instead of compiling again.
#
# Usage: hack/build-envtest.sh [component ...]   (default: kube-apiserver etcd)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/bin}
OUT=$BIN_DIR/k8s/$K8S_VERSION
WORK=$BIN_DIR/.build
CACHE=${AMBIENT_CACHE:-$HOME/.cache/ambient}/k8s/$K8S_VERSION
mkdir -p "$OUT" "$WORK"
mkdir -p "$CACHE" 2>/dev/null || CACHE=""
components=("$@")
[ ${#components[@]} -gt 0 ] || components=(kube-apiserver etcd)

minor=${K8S_VERSION#*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

k8s_module() {
  local dir=$WORK/kubernetes-$K8S_VERSION
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  rm -rf "$dir"; mkdir -p "$dir"
  local gomod
  gomod=$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module envtestbuild"
    echo "go 1.26"
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    # Every staging module that k8s.io/kubernetes replaces with ./staging/... is
    # published at v0.<minor>.<patch>; pin them to that release.
    grep -oE '^\s*k8s\.io/[a-z0-9./-]+ => \./staging' "$gomod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m v0.${K8S_VERSION#*.}"; done
  } >"$dir/go.mod"
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
GO
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true)
  touch "$dir/.ready"
  echo "$dir"
}

etcd_module() {
  local dir=$WORK/etcd-$ETCD_VERSION
  [ -f "$dir/.ready" ] && { echo "$dir"; return; }
  rm -rf "$dir"; mkdir -p "$dir"
  cat >"$dir/go.mod" <<MOD
module etcdbuild
go 1.26
require (
	go.etcd.io/etcd/server/v3 v$ETCD_VERSION
	go.etcd.io/etcd/api/v3 v$ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 v$ETCD_VERSION
	go.etcd.io/etcd/client/v3 v$ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 v$ETCD_VERSION
)
MOD
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true)
  touch "$dir/.ready"
  echo "$dir"
}

# save_to_cache <component>: copy a built binary out of the clone (atomic).
save_to_cache() {
  [ -n "$CACHE" ] || return 0
  cp "$OUT/$1" "$CACHE/.$1.tmp.$$" && mv "$CACHE/.$1.tmp.$$" "$CACHE/$1" || rm -f "$CACHE/.$1.tmp.$$"
}

for c in "${components[@]}"; do
  if [ -x "$OUT/$c" ]; then
    echo "cached: $OUT/$c"
    [ -z "$CACHE" ] || [ -x "$CACHE/$c" ] || save_to_cache "$c"
    continue
  fi
  if [ -n "$CACHE" ] && [ -x "$CACHE/$c" ]; then
    cp "$CACHE/$c" "$OUT/$c.tmp" && mv "$OUT/$c.tmp" "$OUT/$c"
    echo "copied from cache: $CACHE/$c"
    continue
  fi
  start=$(date +%s)
  echo "building $c (first time only; kube-apiserver takes ~5 min cold on 2 cores)..."
  case $c in
    etcd)
      dir=$(etcd_module)
      (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3) ;;
    kube-*|kubelet)
      dir=$(k8s_module)
      (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT/$c.tmp" "k8s.io/kubernetes/cmd/$c") ;;
    *) echo "unknown component $c" >&2; exit 2 ;;
  esac
  mv "$OUT/$c.tmp" "$OUT/$c"
  save_to_cache "$c"
  echo "built $OUT/$c in $(( $(date +%s) - start ))s"
done
