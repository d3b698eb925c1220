#!/usr/bin/env bash
# Builds haddock/optimizer:<version> for every VERSION given, from ONE release build of the
# binary (the version lives in the image's ENV, not in the binary).
#
#   ci/build-images.sh [--failpoints] VERSION...
#
# --failpoints builds the binary with the `failpoints` cargo feature, for failure tests: such an
# image reads FAILPOINTS, e.g. FAILPOINTS='http::request=return' (every request but the health probes answers 500)
# or FAILPOINTS='http::readyz=return' (never turns healthy). Images get the label
# haddock.failpoints=true|false. Uses the legacy builder (no buildx, nothing is pulled).
set -euo pipefail

usage() {
  echo "usage: $0 [--failpoints] VERSION..." >&2
  exit 2
}

features=()
failpoints=false
versions=()
for arg in "$@"; do
  case "$arg" in
    --failpoints) features=(--features failpoints); failpoints=true ;;
    -h|--help) usage ;;
    -*) echo "unknown option $arg" >&2; usage ;;
    *) versions+=("$arg") ;;
  esac
done
[ "${#versions[@]}" -gt 0 ] || usage
for v in "${versions[@]}"; do
  # Docker tag grammar.
  [[ "$v" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "invalid version tag: $v" >&2; exit 2; }
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haddock/target}"
cargo build --release -p optimizer "${features[@]}" --manifest-path "$root/Cargo.toml"
bin="$CARGO_TARGET_DIR/release/optimizer"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs" "$ctx/cache"
cp "$bin" "$ctx/rootfs/optimizer"
# Every library the binary loads, including the dynamic loader, at its own absolute path.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  cp --parents -L "$lib" "$ctx/rootfs/"
done
cp "$root/ci/images/optimizer.Dockerfile" "$ctx/Dockerfile"

for v in "${versions[@]}"; do
  DOCKER_BUILDKIT=0 docker build --quiet \
    --build-arg "VERSION=$v" \
    --label "haddock.component=optimizer" \
    --label "haddock.failpoints=$failpoints" \
    -t "haddock/optimizer:$v" "$ctx" >/dev/null
  size=$(docker image inspect -f '{{.Size}}' "haddock/optimizer:$v")
  echo "built haddock/optimizer:$v ($((size / 1024 / 1024)) MiB, failpoints=$failpoints)"
done
