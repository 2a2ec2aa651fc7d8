#!/usr/bin/env bash
# The project's test command (what CI runs): fetch the real SmolLM2 GGUF the tests use, then run every test
# in the release profile (the same profile the binary is built in, so the burn/polars stack compiles once).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
echo "== cargo test --release: a cold build (the release build alone is about 17 minutes on 2 cores, the test binaries come on top; progress below)"
cargo test --release "$@"
