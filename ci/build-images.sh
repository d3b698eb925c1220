#!/usr/bin/env bash
# Builds haddock/<component>:<version> for every VERSION given, from ONE release build of the
# binary (the version lives in the image's ENV/labels, not in the binary).
#
#   ci/build-images.sh [--failpoints] [--format 1] VERSION...    # haddock/optimizer
#   ci/build-images.sh --component locator|proxy|optimizer VERSION...
#   ci/build-images.sh --component dnsmasq VERSION...             # the DNS cache accessory
#
# Each component has its Dockerfile in ci/images/<component>.Dockerfile: FROM scratch, the
# release binary and the shared libraries `ldd` lists, a non-root user (65532). dnsmasq is
# Debian's binary (package dnsmasq-base), not ours: no cargo build for it.
#
# --failpoints builds the binary with the `failpoints` cargo feature, for failure tests: such an
# image reads FAILPOINTS, e.g. FAILPOINTS='http::request=return' (every request but the health probes answers 500)
# or FAILPOINTS='http::readyz=return' (never turns healthy). Images get the label
# haddock.failpoints=true|false. --failpoints is for the optimizer only. Uses the legacy builder (no buildx, nothing is pulled).
#
# --format 1 builds the optimizer that writes the previous on-disk format (cargo feature
# `format-v1`, see optimizer/src/format.rs): the tests build 1.0.0 so, and every release of 1.1.0
# then crosses a real format change. Images get the label haddock.optimizer-format=1|2.
set -euo pipefail

usage() {
  echo "usage: $0 [--component locator|proxy|optimizer|dnsmasq] [--failpoints] [--format 1|2] VERSION..." >&2
  exit 2
}

features=()
failpoints=false
format=2
versions=()
component=optimizer
while [ "$#" -gt 0 ]; do
  case "$1" in
    --failpoints) failpoints=true ;;
    --format)
      [ "$#" -ge 2 ] || usage
      format="$2"; shift ;;
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
  optimizer|locator|proxy|dnsmasq) ;;
  *) echo "unknown component: $component (locator, proxy, optimizer or dnsmasq)" >&2; exit 2 ;;
esac
if { $failpoints || [ "$format" != 2 ]; } && [ "$component" != optimizer ]; then
  echo "--failpoints and --format only exist for the optimizer" >&2; exit 2
fi
case "$format" in
  1) features+=(optimizer/format-v1) ;;
  2) ;;
  *) echo "unknown optimizer format: $format (1 or 2)" >&2; exit 2 ;;
esac
$failpoints && features+=(optimizer/failpoints)
if [ "${#features[@]}" -gt 0 ]; then
  features=(--features "$(IFS=,; echo "${features[*]}")")
fi
for v in "${versions[@]}"; do
  # Docker tag grammar.
  [[ "$v" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || { echo "invalid version tag: $v" >&2; exit 2; }
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haddock/target}"
build_args=()
if [ "$component" = dnsmasq ]; then
  bin=/usr/sbin/dnsmasq
  [ -x "$bin" ] || { echo "error: $bin not found (apt-get install dnsmasq-base)" >&2; exit 1; }
  upstream="$("$bin" --version | head -n1 | awk '{print $3}')"
  build_args=(--build-arg "UPSTREAM=$upstream")
else
  # The whole workspace with every target, as ci/test.sh and clippy build it: `-p` or `--bins`
  # select other package sets, cargo then unifies dependency features differently and RocksDB's
  # C++ (~9 minutes on 2 cores) is compiled once more. Only the changed crates rebuild.
  cargo build --release --workspace --all-targets "${features[@]}" --manifest-path "$root/Cargo.toml"
  bin="$CARGO_TARGET_DIR/release/$component"
fi

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
if [ "$component" = dnsmasq ]; then
  # The user dnsmasq drops to after binding port 53, found without any NSS module but files.
  mkdir -p "$ctx/rootfs/etc"
  printf 'root:x:0:0::/:/nonexistent\nnobody:x:65534:65534::/nonexistent:/nonexistent\n' >"$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
fi

labels=(--label "haddock.component=$component" --label "haddock.failpoints=$failpoints")
what="failpoints=$failpoints"
if [ "$component" = optimizer ]; then
  labels+=(--label "haddock.optimizer-format=$format")
  what="$what, format=$format"
fi
for v in "${versions[@]}"; do
  DOCKER_BUILDKIT=0 docker build --quiet \
    --build-arg "VERSION=$v" "${build_args[@]}" \
    "${labels[@]}" \
    -t "haddock/$component:$v" "$ctx" >/dev/null
  size=$(docker image inspect -f '{{.Size}}' "haddock/$component:$v")
  echo "built haddock/$component:$v ($((size / 1024 / 1024)) MiB, $what)"
done
