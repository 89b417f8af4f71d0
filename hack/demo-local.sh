#!/usr/bin/env bash
# make demo-local: the operator against a local kube-apiserver + etcd (the
# envtest binaries), no cluster needed. Builds the manager, then runs
# hack/demolocal, which applies the samples and shows what the operator did.
# DEMO_KEEP=1 keeps the control plane up afterwards; DEMO_CONTROLPLANE=1 also
# starts the discovery/CA servers.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=${K8S_VERSION:-1.36.3}
export KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS:-$PWD/bin/k8s/$K8S_VERSION}
[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] || hack/build-envtest.sh kube-apiserver etcd
command -v kubectl >/dev/null || { echo "demo-local needs kubectl on PATH" >&2; exit 1; }
echo "building bin/manager..."
CGO_ENABLED=0 go build -trimpath -o bin/manager ./cmd/manager
go run ./hack/demolocal
