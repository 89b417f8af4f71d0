#!/usr/bin/env bash
# HBONE benchmark: raw TCP, a plain TLS 1.3 relay, HBONE over HTTP/2 and over
# HTTP/3, measured in one run with client, proxies and sink in separate
# processes on loopback. Results (markdown + JSON) and proxy CPU profiles go
# to $OUT (default bin/bench). Extra arguments go to `hbone-load bench`, e.g.
#   hack/bench.sh -bytes 536870912 -tunnels 1000
# Then: go tool pprof -top bin/hbone-load bin/bench/profiles/h2-client.pprof
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bin/bench}
mkdir -p "$OUT/profiles"
CGO_ENABLED=0 go build -trimpath -o bin/hbone-load ./cmd/hbone-load
# Go benchmarks of the transports (in-process, for regressions).
go test -run '^$' -bench . -benchtime 2000x ./proxylib/hbone/h3/ | tee "$OUT/gobench.txt"
bin/hbone-load bench -out "$OUT/results.md" -json "$OUT/results.json" \
	-profile-dir "$OUT/profiles" "$@" 2> >(grep --line-buffered -v '^{"level"' >&2)
echo "results: $OUT/results.md" >&2
