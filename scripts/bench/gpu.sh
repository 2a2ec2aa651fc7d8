#!/usr/bin/env bash
# One prepared GPU check for loratune's CUDA path (issue 7, Deliver 3). Run it on a machine with an NVIDIA GPU
# (H100/H200, driver 580 / CUDA 13) from the repository root:
#
#   scripts/bench/gpu.sh [LORATUNE_BINARY] [OUT_DIR]
#
# LORATUNE_BINARY: a loratune built with CUDA, on any machine (no CUDA toolkit needed to build):
#   CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda
# (default: target/release/loratune). OUT_DIR (default gpu-results/) receives every log and a summary.
#
# Environment: PYTHON (default python3) must have torch 2.15, transformers 5.24, peft 0.21 with CUDA for the
# torch side; BATCH (default 1), SEQ (2048), RANK (16), RUNS (3), STEPS (5), DEVICE (cuda:0).
#
# What it does:
#   (a) runs every parity fixture's forward (tests/fixtures/models/*) on the GPU, f32 then bf16, and compares
#       the logits with the CPU f32 forward and the stored transformers logits (`loratune bench
#       --check-fixtures`); f32 must agree with the CPU to 1e-3;
#   (b) benchmarks a Llama-3.2-1B-shaped random-weight model at seq 2048, bf16 base + f32 LoRA r=16 on every
#       linear layer (all-linear), loratune vs torch + PEFT on the same GPU, alternating runs
#       (scripts/bench/compare.py): tokens/s, MFU against 989 TFLOP/s (H100 SXM dense bf16 spec; the summary
#       also gives it against ~790 TFLOP/s, what dense bf16 GEMMs measure on an H100), peak GPU memory
#       (nvidia-smi, both sides alike) and the ratio.
set -uo pipefail

LORATUNE=${1:-target/release/loratune}
OUT=${2:-gpu-results}
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-1}
SEQ=${SEQ:-2048}
RANK=${RANK:-16}
RUNS=${RUNS:-3}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cuda:0}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

mkdir -p "$OUT"
status=0
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if [ ! -x "$LORATUNE" ]; then
  echo "no loratune binary at $LORATUNE (build with: CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda)" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null; then
  echo "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver" >&2
  exit 2
fi

: > "$OUT/summary.txt"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "${DEVICE#cuda:}" 2>/dev/null)"
say "loratune: $LORATUNE ($("$LORATUNE" --version 2>/dev/null))"
say "python: $PYTHON ($("$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1))"

# (a) parity fixtures on the GPU against the CPU
for dt in f32 bf16; do
  say "(a) fixtures forward on $DEVICE, $dt, vs CPU f32 and transformers"
  if "$LORATUNE" bench --check-fixtures "$ROOT/tests/fixtures/models" --device "$DEVICE" --dtype "$dt" \
      > "$OUT/fixtures-$dt.txt" 2>&1; then
    tail -n 1 "$OUT/fixtures-$dt.txt" | tee -a "$OUT/summary.txt"
  else
    status=1
    tail -n 20 "$OUT/fixtures-$dt.txt" | tee -a "$OUT/summary.txt"
  fi
done

# (b) Llama-3.2-1B shape, seq 2048, bf16 + LoRA r16 all-linear: loratune vs torch + PEFT, alternating
say "(b) llama-3.2-1b random weights, batch $BATCH x seq $SEQ, bf16 base, LoRA r=$RANK all-linear, $RUNS runs x $STEPS steps each side"
if "$PYTHON" "$HERE/compare.py" --shape llama-3.2-1b --device "$DEVICE" --dtype bf16 --batch "$BATCH" \
    --seq "$SEQ" --rank "$RANK" --targets all-linear --runs "$RUNS" --steps "$STEPS" --peak-flops 989e12 \
    --loratune "$LORATUNE" --python "$PYTHON" --out "$OUT/compare.json" > "$OUT/compare.txt" 2>&1; then
  tail -n 3 "$OUT/compare.txt" | tee -a "$OUT/summary.txt"
  "$PYTHON" - "$OUT/compare.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))
for side in ("loratune", "torch+peft"):
    x = s[side]
    print(f"{side:<11} MFU {100 * x['mfu_median']:.1f}% of 989 TFLOP/s = {100 * x['mfu_median'] * 989 / 790:.1f}% of "
          f"790 measured; peak GPU used {x.get('peak_gpu_used_mb_max', float('nan')):.0f} MB")
print(f"ratio {s['ratio_tokens_per_second']:.2f}x (target >= 1.0x, MFU >= 40%)")
PY
else
  status=1
  tail -n 30 "$OUT/compare.txt" | tee -a "$OUT/summary.txt"
fi
say "logs in $OUT/ (exit status $status)"
exit $status
