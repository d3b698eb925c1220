#!/usr/bin/env bash
# Builds haddock/<component>:<version> for every VERSION given, from ONE release build of the
# binary (the version lives in the image's ENV/labels, not in the binary).
#
#   ci/build-images.sh [--failpoints] VERSION...                 # haddock/optimizer
#   ci/build-images.sh --component locator|proxy|optimizer VERSION...
#
# Each component has its Dockerfile in ci/images/<component>.Dockerfile: FROM scratch, the
# release binary and the shared libraries `ldd` lists, a non-root user (65532).
#
# --failpoints builds the binary with the `failpoints` cargo feature, for failure tests: such an
# image reads FAILPOINTS, e.g. FAILPOINTS='http::request=return' (every request but the health probes answers 500)
# or FAILPOINTS='http::readyz=return' (never turns healthy). Images get the label
# haddock.failpoints=true|false. --failpoints is for the optimizer only. Uses the legacy builder (no buildx, nothing is pulled).
set -euo pipefail

usage() {
  echo "usage: $0 [--component locator|proxy|optimizer] [--failpoints] VERSION..." >&2
  exit 2
}

features=()
failpoints=false
versions=()
component=optimizer
while [ "$#" -gt 0 ]; do
  case "$1" in
    --failpoints) features=(--features optimizer/failpoints); failpoints=true ;;
    --component)
      [ "$#" -ge 2 ] || usage
      component="$2"; shift ;;
    --component=*) component="${1#--component=}" ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) versions+=("$1") ;;
  esac
  shift
done
[ "${#versions[@]}" -gt 0 ] || usage
case "$component" in
  optimizer|locator|proxy) ;;
  *) echo "unknown component: $component (locator, proxy or optimizer)" >&2; exit 2 ;;
esac
if $failpoints && [ "$component" != optimizer ]; then
  echo "--failpoints only exists for the optimizer" >&2; exit 2
fi
for v in "${versions[@]}"; do
  # Docker tag grammar.
  [[ "$v" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "invalid version tag: $v" >&2; exit 2; }
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haddock/target}"
# The whole workspace with every target, as ci/test.sh and clippy build it: `-p` or `--bins`
# select other package sets, cargo then unifies dependency features differently and RocksDB's
# C++ (~9 minutes on 2 cores) is compiled once more. Only the changed crates rebuild.
cargo build --release --workspace --all-targets "${features[@]}" --manifest-path "$root/Cargo.toml"
bin="$CARGO_TARGET_DIR/release/$component"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
# Empty directories the Dockerfiles copy with owner 65532, so that a fresh named volume mounted
# there is writable by the non-root user: /cache (optimizer), /data (locator), /state (proxy).
mkdir -p "$ctx/rootfs" "$ctx/cache" "$ctx/data" "$ctx/state"
# The proxy refuses a state dir its group or everyone may write to (it holds the upgrade
# socket): private whatever this machine's umask.
chmod 0700 "$ctx/state"
cp "$bin" "$ctx/rootfs/$component"
# Every library the binary loads, including the dynamic loader, at its own absolute path.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  cp --parents -L "$lib" "$ctx/rootfs/"
done
cp "$root/ci/images/$component.Dockerfile" "$ctx/Dockerfile"

for v in "${versions[@]}"; do
  DOCKER_BUILDKIT=0 docker build --quiet \
    --build-arg "VERSION=$v" \
    --label "haddock.component=$component" \
    --label "haddock.failpoints=$failpoints" \
    -t "haddock/$component:$v" "$ctx" >/dev/null
  size=$(docker image inspect -f '{{.Size}}' "haddock/$component:$v")
  echo "built haddock/$component:$v ($((size / 1024 / 1024)) MiB, failpoints=$failpoints)"
done
