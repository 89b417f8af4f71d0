#!/usr/bin/env bash
# Runs every Go fuzz target in the repository briefly.
#   hack/fuzz.sh [duration]        e.g. hack/fuzz.sh 30s   (default 10s per target)
# Packages are found by grepping for "func Fuzz" in _test.go files, then each
# package's targets are listed with `go test -list`, so only packages that have
# fuzz targets are compiled. Seed corpora live in each package's testdata/fuzz.
# New crashers are written to testdata/fuzz/<Target>/ by `go test` itself.
# FUZZ_PARALLEL=N limits the fuzzing workers per target (default: all cores).
set -euo pipefail

duration="${1:-10s}"
cd "$(dirname "$0")/.."

mapfile -t dirs < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' . \
	| grep -vE '^\./(bin|test/interop|vendor)/' | xargs -r -n1 dirname | sort -u)

if [ "${#dirs[@]}" -eq 0 ]; then
	echo "no fuzz targets found"
	exit 0
fi

failed=()
total=0
for dir in "${dirs[@]}"; do
	pkg="./${dir#./}"
	mapfile -t targets < <(go test -list '^Fuzz' "$pkg" | grep -E '^Fuzz' || true)
	for target in "${targets[@]}"; do
		total=$((total + 1))
		echo "=== fuzz $pkg $target ($duration)"
		if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$duration" ${FUZZ_PARALLEL:+-parallel "$FUZZ_PARALLEL"} "$pkg"; then
			failed+=("$pkg $target")
		fi
	done
done

echo "ran $total fuzz targets for $duration each"
if [ "${#failed[@]}" -gt 0 ]; then
	printf 'FAILED: %s\n' "${failed[@]}"
	exit 1
fi
