#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes outside bytes (targets in fuzz/).
#
#   bash ci/fuzz.sh                 # the campaign: 10 000 000 executions per target
#   bash ci/fuzz.sh --smoke         # what CI runs: every regression input, then ~5 s per target
#   RUNS=N bash ci/fuzz.sh [TARGET…] # N executions per target, or only the targets named
#
# Prints one line per target: executions, executions per second, coverage (edges and
# features libFuzzer found) and crashes. Exits 1 if any target crashed; the crashing input is
# left in fuzz/artifacts/<target>/ — move it to fuzz/regressions/<target>/ once fixed, so every
# later run replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh

smoke=""
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
runs="${RUNS:-10000000}"

# cargo-fuzz drives libFuzzer; it asks for nightly only to pass -Z flags, which the stable
# toolchain accepts with RUSTC_BOOTSTRAP=1 (the machine has no other toolchain).
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "ci/fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >/dev/null
fi
# Its own target dir: instrumented builds never touch the main build's one profile. Kept
# beside it so RocksDB's C++ compiles once per machine for the fuzzers too.
export CARGO_TARGET_DIR="$HOME/.cache/haddock/fuzz-target"
# No sanitizer: the workspace forbids unsafe code, so what fuzzing can find is panics,
# overflows (checked in the fuzz profile) and runaway allocation (-rss_limit_mb).
build_flags=(--fuzz-dir fuzz --sanitizer none --debug-assertions)

mapfile -t known < <(cargo fuzz list --fuzz-dir fuzz)
if [ "${#known[@]}" -eq 0 ]; then
  echo "ci/fuzz.sh: no fuzz targets found in fuzz/" >&2
  exit 1
fi
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${known[@]}")
for t in "${targets[@]}"; do
  if ! printf '%s\n' "${known[@]}" | grep -qx -- "$t"; then
    echo "ci/fuzz.sh: no fuzz target named '$t' (there are: ${known[*]})" >&2
    exit 2
  fi
done
cargo fuzz build "${build_flags[@]}" >&2

bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release"
failed=0
printf '%-16s %12s %10s %8s %8s %8s\n' target executions exec/s edges features crashes
for t in "${targets[@]}"; do
  # Every kept crash input first: a regression fails the run at once.
  if [ -d "fuzz/regressions/$t" ] && [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
    if ! "$bin/$t" -rss_limit_mb=2048 "fuzz/regressions/$t"/* >"${TMPDIR:-/tmp}/fuzz-$t-regressions.$$.log" 2>&1; then
      echo "$t: a regression input fails again:" >&2
      tail -30 "${TMPDIR:-/tmp}/fuzz-$t-regressions.$$.log" >&2
      failed=1
      continue
    fi
  fi
  corpus="$HOME/.cache/haddock/fuzz-corpus/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  limit=(-runs="$runs")
  [ -n "$smoke" ] && limit=(-max_total_time=5)
  log="${TMPDIR:-/tmp}/fuzz-$t.$$.log"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  marker=$(mktemp)
  t0=$(date +%s.%N)
  set +e
  "$bin/$t" "$corpus" "${seeds[@]}" "${limit[@]}" -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  t1=$(date +%s.%N)
  execs=$(awk '/stat::number_of_executed_units/ {print $NF}' "$log")
  # Our own rate over the wall time: libFuzzer's rounds down to whole seconds.
  rate=$(awk -v n="${execs:-0}" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
  last=$(grep -aE '^#[0-9]+' "$log" | tail -1 || true)
  edges=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  feats=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  # This run's findings only (earlier ones stay until moved to regressions/); slow units
  # are not failures.
  crashes=$(find "fuzz/artifacts/$t" -type f -newer "$marker" \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
  rm -f "$marker"
  printf '%-16s %12s %10s %8s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "${edges:-?}" "${feats:-?}" "$crashes"
  if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    echo "$t: crashed (exit $rc); input in fuzz/artifacts/$t/, log $log:" >&2
    grep -a -A25 -E 'panicked|ERROR: libFuzzer' "$log" | head -40 >&2
    failed=1
  fi
done
exit "$failed"
