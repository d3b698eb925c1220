#!/usr/bin/env bash
# The proof benchmark of issue 7: the same load through a naive redeploy (stop the old
# container, start the new one on the same address) and through `haddock release`, printed in
# one run (failed requests, longest gap, latency of each; last line one JSON object).
# Builds everything and the optimizer images 1.0.0 and 1.1.0 first; options go to the benchmark
# (`bash ci/proof.sh --help`), e.g.
#   bash ci/proof.sh           # short mode: a couple of minutes
#   bash ci/proof.sh --long    # (b) until >= 1 000 000 requests at half the saturating rate
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
haddock_require_docker
# The whole workspace, as every other script builds it (one feature set, no rebuilds).
cargo build --release --workspace --all-targets
bash ci/build-images.sh --format 1 1.0.0
bash ci/build-images.sh 1.1.0
exec "$CARGO_TARGET_DIR/release/haddock-proof" "$@"
