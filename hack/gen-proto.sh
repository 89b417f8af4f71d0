#!/usr/bin/env bash
# Generates Go code for the discovery and CA protos. Idempotent; the output is
# checked in. No gRPC stubs: the proxies speak gRPC through proxylib/grpcwire
# (grpc-go stays out of their binaries); the CA service's grpc-go
# registration for servers is proxylib/caclient/capb/caservice. Needs protoc
# (apt) and the pinned plugins in bin/ (make tools).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PATH="$root/bin:$PATH"
module=github.com/ambientmesh/ambient
src=proxylib/discovery/proto
protoc -I "$src" \
  --go_out=. --go_opt=module="$module" \
  "$src"/workload.proto "$src"/authorization.proto "$src"/l7resource.proto "$src"/ca.proto "$src"/xds.proto
