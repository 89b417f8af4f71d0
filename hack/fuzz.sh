#!/usr/bin/env bash
# Runs every Go fuzz target in the repository for a time budget each.
#   hack/fuzz.sh [duration]        e.g. hack/fuzz.sh 30s   (default 10s per target)
# Packages are found by grepping for "func Fuzz" in _test.go files, then each
# package's targets are listed with `go test -list`, so only packages that have
# fuzz targets are compiled. Seed corpora live in each package's testdata/fuzz.
# New crashers are written to testdata/fuzz/<Target>/ by `go test` itself.
# FUZZ_PARALLEL=N limits the fuzzing workers per target (default: all cores).
# FUZZ_JOBS=N fuzzes N targets at once (default 1), each for the full
# duration: a long budget over many targets then fits in fewer wall hours.
# Each target's output goes to $FUZZ_LOGS (default bin/fuzz/logs)/
# <package>.<target>.log and is printed when it ends.
set -euo pipefail

duration="${1:-10s}"
jobs="${FUZZ_JOBS:-1}"
cd "$(dirname "$0")/.."

mapfile -t dirs < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' . \
	| grep -vE '^\./(bin|test/interop|vendor)/' | xargs -r -n1 dirname | sort -u)

if [ "${#dirs[@]}" -eq 0 ]; then
	echo "no fuzz targets found"
	exit 0
fi

# fuzz_one <package> <target>: one target for the budget; its output is
# logged and printed when it ends (under a lock: targets may run in
# parallel). A failure that is only Go's fuzz-coordinator race at the
# -fuzztime deadline is run once more; see coordinator_race.
fuzz_one() {
	local pkg=$1 target=$2 log rc=0
	local cmd=(go test -run '^$' -fuzz "^${target}\$" -fuzztime "$duration" ${FUZZ_PARALLEL:+-parallel "$FUZZ_PARALLEL"} "$pkg")
	log="$FUZZ_LOGS/$(echo "${pkg#./}" | tr / _).$target.log"
	"${cmd[@]}" >"$log" 2>&1 || rc=$?
	if [ "$rc" -ne 0 ] && coordinator_race "$target" "$log"; then
		echo "(go1.26 fuzz coordinator race at the deadline, golang/go#75804: no failing input; running $target once more)" >>"$log"
		rc=0
		"${cmd[@]}" >>"$log" 2>&1 || rc=$?
	fi
	{ echo "=== fuzz $pkg $target ($duration)"; cat "$log"; } | flock "$FUZZ_LOGS/.print" cat
	[ "$rc" -eq 0 ] || echo "$pkg $target" >>"$FUZZ_FAILED"
	return 0
}

# coordinator_race <target> <log>: true when the run failed only with the
# bare "context deadline exceeded" Go 1.26's fuzz coordinator reports when
# a worker is still busy as -fuzztime ends (fixed in Go 1.27). A real
# finding looks different: it names a file:line or writes a failing input.
coordinator_race() {
	local target=$1 log=$2
	! grep -q 'Failing input written to' "$log" &&
		grep -A1 -E "^--- FAIL: ${target} \(" "$log" | tail -n1 | grep -qx '    context deadline exceeded' &&
		[ "$(grep -c -E '^\s+--- FAIL|^--- FAIL' "$log")" -eq 1 ]
}
export -f fuzz_one coordinator_race
export duration jobs
export FUZZ_LOGS=${FUZZ_LOGS:-$PWD/bin/fuzz/logs}
FUZZ_FAILED=$(mktemp)
export FUZZ_FAILED
trap 'rm -f "$FUZZ_FAILED"' EXIT
mkdir -p "$FUZZ_LOGS"

# A package whose test binary cannot list its targets (e.g. envtest
# binaries missing) fails the run: it must not drop out silently.
for dir in "${dirs[@]}"; do
	pkg="./${dir#./}"
	if ! list=$(go test -list '^Fuzz' "$pkg" 2>&1); then
		printf '%s\n' "$list" >&2
		echo "$pkg (listing its fuzz targets failed)" >>"$FUZZ_FAILED"
		continue
	fi
	grep -E '^Fuzz' <<<"$list" | sed "s|^|$pkg |" || true
done >"$FUZZ_LOGS/targets"
total=$(wc -l <"$FUZZ_LOGS/targets")

xargs -a "$FUZZ_LOGS/targets" -L1 -P "$jobs" bash -c 'fuzz_one "$@"' _

echo "ran $total fuzz targets for $duration each ($jobs at a time)"
if [ -s "$FUZZ_FAILED" ]; then
	sed 's/^/FAILED: /' "$FUZZ_FAILED"
	exit 1
fi
