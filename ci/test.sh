#!/usr/bin/env bash
# The README's test command: installs what is missing, builds once (release profile), builds the
# test images, runs every test of the workspace. Fails (never skips) without Docker or PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
HADDOCK_NEED_POSTGRES=1 source ci/setup.sh
haddock_require_docker
haddock_require_postgres

cargo build --release --workspace --all-targets
if [ -f ci/build-images.sh ]; then
  bash ci/build-images.sh --test
fi
cargo test --release --workspace --no-fail-fast "$@"
