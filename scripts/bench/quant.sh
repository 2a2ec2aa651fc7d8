#!/usr/bin/env bash
# The quantized base on the CPU against the dense one, interleaved runs, medians (issue: quantized step ≥ 0.7× the
# f32 step at the SmolLM2 shape). From the repository root:
#
#   scripts/bench/quant.sh [LORATUNE_BINARY] [OUT_DIR]
#
# Pairs (each run alternates with its reference, RUNS times; BATCH × SEQ tokens, LoRA r=16 all-linear):
#   gguf:  SmolLM2-135M-Instruct's real Q4_1 GGUF kept in its blocks vs dequantized to f32 (same weights);
#   nf4:   the SmolLM2 shape with random weights quantized to NF4 + double quant at load vs dense f32;
#   8b:    (BIG=1 only; ~10 min a step here) a Llama-3.1-8B shape in Q4_K blocks at 1 × 1024 with recompute: peak RSS.
set -euo pipefail
LORATUNE=${1:-target/release/loratune}
OUT=${2:-quant-results}
RUNS=${RUNS:-3}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
STEPS=${STEPS:-3}
GGUF=${GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT"
run() { # name, then bench arguments
  local name=$1; shift
  "$LORATUNE" bench "$@" --batch "$BATCH" --seq "$SEQ" --rank 16 --targets all-linear --warmup 1 --steps "$STEPS" \
    --json > "$OUT/$name.json" 2> "$OUT/$name.log"
}
for i in $(seq 1 "$RUNS"); do
  run "gguf-keep-$i" --model "$GGUF" --base keep
  run "gguf-dense-$i" --model "$GGUF" --base dequantize
  run "nf4-$i" --shape smollm2-135m --base nf4
  run "nf4-dense-$i" --shape smollm2-135m --base dequantize
done
if [ "${BIG:-0}" = 1 ]; then
  "$LORATUNE" bench --shape llama-3.1-8b --base Q4_K --batch 1 --seq 1024 --rank 16 --targets all-linear \
    --gradient-checkpointing true --warmup 0 --steps 1 --json > "$OUT/8b-q4k.json" 2> "$OUT/8b-q4k.log"
fi
python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys, os
out, runs = sys.argv[1], int(sys.argv[2])
def med(prefix, key):
    v = [json.load(open(f"{out}/{prefix}-{i}.json"))[key] for i in range(1, runs + 1)]
    return statistics.median(v)
for q, d, label in [("gguf-keep", "gguf-dense", "SmolLM2 Q4_1 GGUF kept vs dequantized"),
                    ("nf4", "nf4-dense", "SmolLM2 shape NF4+DQ vs f32")]:
    tq, td = med(q, "tokens_per_second"), med(d, "tokens_per_second")
    mq = json.load(open(f"{out}/{q}-1.json"))["memory"]
    md = json.load(open(f"{out}/{d}-1.json"))["memory"]
    print(f"{label}: {tq:.1f} vs {td:.1f} tok/s (median of {runs}) = {tq / td:.2f}x; "
          f"peak RSS {med(q, 'peak_rss_mb'):.0f} vs {med(d, 'peak_rss_mb'):.0f} MB; "
          f"base {mq['base_bytes'] / 2**20:.1f} vs {md['base_bytes'] / 2**20:.1f} MB "
          f"({mq['base_bytes'] / mq['base_f32_bytes']:.2f}x f32)")
p = f"{out}/8b-q4k.json"
if os.path.exists(p):
    r = json.load(open(p))
    print(f"llama-3.1-8b Q4_K 1x1024 recompute: peak RSS {r['peak_rss_mb']:.0f} MB, "
          f"base {r['memory']['base_bytes'] / 2**30:.2f} GiB, {r['tokens_per_second']:.2f} tok/s")
PY
