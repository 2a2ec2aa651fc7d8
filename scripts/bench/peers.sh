#!/usr/bin/env bash
# Data-parallel training (issue 19): the same run on one peer and on two, with the same global batch, through
# `loratune train` (the data-parallel loop lives in the trainer, not in `loratune bench`). From the repository
# root:
#
#   scripts/bench/peers.sh [LORATUNE_BINARY] [OUT_DIR]
#
# LORATUNE_BINARY: default target/release/loratune (build with `--features cuda` for the GPU; CPU peers work in
# any build). OUT_DIR: default peers-results/.
#
# Environment: DEVICE (default cuda:0; `cpu` runs the CPU variant), MODEL (default
# models/SmolLM2-135M-Instruct.Q4_1.gguf, from scripts/fetch-smollm2.sh), DATA (the shipped
# datasets/nimbrel/support_chat.jsonl), SEQ (512), MICRO (4), ACCUM (4: the single peer's accumulation; two peers
# take ACCUM/2 each), STEPS (12), RANK (16).
#
# Runs, each a full `loratune train` in OUT_DIR/<name>:
#   one      DEVICE alone, MICRO × ACCUM per step;
#   shared   two peers on DEVICE (two peers may share a device), MICRO × ACCUM/2 each;
#   two      (only when the machine has ≥ 2 CUDA devices) cuda:0 and cuda:1, MICRO × ACCUM/2 each.
# For each: median aggregate tokens/s over the logged steps after the first two (metrics.jsonl
# `tokens_per_second`, which counts every peer's tokens), the peers' memory (`memory_mb`: the device pools on a
# GPU, the process's peak RSS on the CPU), and the largest per-step loss difference from `one` (the runs are the
# same computation: expect 0, or ~1e-7 on a backend without f64 accumulation). Summary in OUT_DIR/summary.txt.
set -uo pipefail

LORATUNE=${1:-target/release/loratune}
OUT=${2:-peers-results}
DEVICE=${DEVICE:-cuda:0}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-datasets/nimbrel/support_chat.jsonl}
SEQ=${SEQ:-512}
MICRO=${MICRO:-4}
ACCUM=${ACCUM:-4}
STEPS=${STEPS:-12}
RANK=${RANK:-16}
PYTHON=${PYTHON:-python3}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -x "$LORATUNE" ] || { echo "error: $LORATUNE is not an executable loratune" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "error: $MODEL is missing: run scripts/fetch-smollm2.sh or set MODEL" >&2; exit 2; }
[ $((ACCUM % 2)) -eq 0 ] || { echo "error: ACCUM=$ACCUM must be even (two peers take half each)" >&2; exit 2; }

config() { # name, accumulation, device line
  cat > "$OUT/$1.yaml" <<EOF
base_model: $(realpath "$MODEL")
datasets:
  - path: $(realpath "$DATA")
    type: chat_template
dataset_prepared_path: $OUT/cache
sequence_len: $SEQ
sample_packing: true
micro_batch_size: $MICRO
gradient_accumulation_steps: $2
lora_r: $RANK
lora_alpha: $((2 * RANK))
lora_dropout: 0.05
lora_target_linear: true
learning_rate: 0.0002
max_steps: $STEPS
save_steps: $STEPS
logging_steps: 1
seed: 1
output_dir: $OUT/$1
$3
EOF
}

run() { # name
  rm -rf "${OUT:?}/$1"
  local t0=$SECONDS
  if "$LORATUNE" train "$OUT/$1.yaml" --plain > "$OUT/$1.log" 2>&1; then
    echo "$1: done in $((SECONDS - t0)) s"
  else
    echo "$1: FAILED (see $OUT/$1.log)"; tail -5 "$OUT/$1.log"
  fi
}

if [ "$DEVICE" = cpu ]; then
  config one "$ACCUM" "device: cpu"
  config shared $((ACCUM / 2)) "devices: [cpu, cpu]"
else
  config one "$ACCUM" "device: $DEVICE"
  config shared $((ACCUM / 2)) "devices: [$DEVICE, $DEVICE]"
fi
RUNS="one shared"
GPUS=$(ls /proc/driver/nvidia/gpus 2>/dev/null | wc -l)
if [ "$DEVICE" != cpu ] && [ "$GPUS" -ge 2 ]; then
  config two $((ACCUM / 2)) "devices: [cuda:0, cuda:1]"
  RUNS="$RUNS two"
fi
for r in $RUNS; do run "$r"; done

"$PYTHON" - "$OUT" $RUNS <<'EOF' | tee "$OUT/summary.txt"
import json, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
def lines(r):
    try:
        return [json.loads(l) for l in open(f"{out}/{r}/metrics.jsonl") if l.strip()]
    except OSError:
        return []
base = {l["step"]: l["loss"] for l in lines("one") if "loss" in l}
ref = None
for r in runs:
    m = [l for l in lines(r) if "loss" in l]
    if not m:
        print(f"{r:7s} no metrics"); continue
    tps = statistics.median(l["tokens_per_second"] for l in m[2:] or m)
    mem = m[-1].get("memory_mb") or [0]  # peaks: the last line holds the largest
    diff = max((abs(l["loss"] - base[l["step"]]) for l in m if l["step"] in base), default=float("nan"))
    ref = ref or tps
    print(f"{r:7s} {tps:9.0f} tok/s (×{tps / ref:.2f} vs one)  memory per peer {', '.join(f'{x:.0f}' for x in mem)} MB  "
          f"max |loss − one| {diff:.1e}")
EOF
