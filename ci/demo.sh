#!/usr/bin/env bash
# The README's main command: builds everything and the optimizer images 1.0.0 and 1.1.0 locally,
# then runs the demo — a canary release of 1.1.0 under the load of many users, on the embedded
# defaults — and cleans up. Options go to the demo (`bash ci/demo.sh --help`), e.g.
#   bash ci/demo.sh --users 100 --step-pause 60s --session-ttl 30s
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
haddock_require_docker
cargo build --release --workspace --all-targets  # one feature set for every script: see ci/build-images.sh
# 1.0.0 writes the previous on-disk format, 1.1.0 the current one (docs/optimizer.md, "Formats").
bash ci/build-images.sh --format 1 1.0.0
bash ci/build-images.sh 1.1.0
exec "$CARGO_TARGET_DIR/release/haddock-demo" "$@"
