#!/usr/bin/env bash
# The README's test command: installs what is missing, builds once (release profile), builds the
# images the end-to-end tests release, runs every test of the workspace.
# Fails (never skips) without Docker or PostgreSQL. Ends with a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
HADDOCK_NEED_POSTGRES=1 source ci/setup.sh
haddock_require_docker
haddock_require_postgres

cargo build --release --workspace --all-targets
# Test images: a build with failpoints (the failure cases pick theirs with FAILPOINTS), then the
# two good versions: 1.0.0 writes the previous on-disk format (1), 1.1.0 the current one (2), so
# every release of 1.1.0 crosses a format change. The default build goes last, so the binary
# left in the target dir is the default one.
bash ci/build-images.sh --failpoints 9.9.9-faulty
bash ci/build-images.sh --format 1 1.0.0
bash ci/build-images.sh 1.1.0
# The DNS cache accessory (Debian's dnsmasq, no cargo build).
bash ci/build-images.sh --component dnsmasq 1
# The Compose stack: up, healthy, a haddock release into it, traffic through its proxy, down.
bash ci/compose-check.sh --build
cargo test --release --workspace --no-fail-fast "$@"
# Every fuzz target briefly (its kept crash inputs, then ~5 s of fuzzing each); the full
# campaign is `bash ci/fuzz.sh` (docs/security.md).
bash ci/fuzz.sh --smoke
