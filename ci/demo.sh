#!/usr/bin/env bash
# The README's main command. Until the end-to-end demo lands (issue "end-to-end"), it builds
# haddock and validates the example deploy spec.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
cargo build --release -p haddock
"$CARGO_TARGET_DIR/release/haddock" check deploy-specs/optimizer.toml
