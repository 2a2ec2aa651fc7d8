#!/usr/bin/env bash
# External check of loratune's GGUF exports with llama.cpp (not part of CI; see check_gguf_llamacpp.py).
# Builds loratune, creates a venv with llama-cpp-python 0.3.36 (compiles llama.cpp from source: ~10-20 min on
# 2 cores, done once), gguf 0.19.0 and safetensors, fetches SmolLM2 and runs the comparison.
#   VENV=/path/to/venv scripts/check_gguf_llamacpp.sh        (default venv: ~/.cache/loratune/llamacpp-venv)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="${VENV:-$HOME/.cache/loratune/llamacpp-venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import llama_cpp, gguf, safetensors" 2>/dev/null; then
  "$venv/bin/pip" install --upgrade pip
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF}" \
    "$venv/bin/pip" install "llama-cpp-python==0.3.36" "gguf==0.19.0" safetensors numpy
fi
scripts/fetch-smollm2.sh
cargo build --release
target="${CARGO_TARGET_DIR:-$root/target}"
LORATUNE_BIN="${LORATUNE_BIN:-$target/release/loratune}" "$venv/bin/python" scripts/check_gguf_llamacpp.py
