# Sourced by the proxy's benchmarks: the setup they share. From the repository's root, builds
# the workspace (unless SKIP_BUILD is set), then sets BIN (the release binaries), WORK (a
# scratch directory) and `pids` (processes to kill), and on exit kills every process in `pids`
# (KILL: on TERM pingora keeps its listener open through its grace period, and the next run
# would find the ports taken), sends TERM to every one in `term_pids` (nginx, whose master then
# stops its workers; killed outright, it would leave them running), and removes WORK. `bench_cert` makes the self-signed certificate
# for bench.test in $WORK/certs.
# A failure inside $(…) fails the script too, not only the substitution.
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/root/.cache/haddock/target}
# One package selection: see ci/build-images.sh.
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --workspace --all-targets >&2
BIN=$CARGO_TARGET_DIR/release
WORK=$(mktemp -d)
pids=()
term_pids=()
bench_cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${term_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap bench_cleanup EXIT

bench_cert() {
  mkdir -p "$WORK/certs"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
    -keyout "$WORK/certs/bench.key" -out "$WORK/certs/bench.crt" 2>/dev/null
}
