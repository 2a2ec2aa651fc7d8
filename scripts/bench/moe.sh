#!/usr/bin/env bash
# A sparse mixture of experts against the dense model with the same active parameters, interleaved runs, medians
# (issue: the MoE step within 1.5× of the dense step). From the repository root:
#
#   scripts/bench/moe.sh [LORATUNE_BINARY] [OUT_DIR]
#
# smollm2-135m (dense SwiGLU MLP of 1536) against smollm2-moe-8x2 (8 experts of 768, 2 per token: the same
# parameters per token, plus the routers), random weights, BATCH × SEQ tokens, LoRA r=16 on
#   attn:    q/k/v/o on both;
#   mlp:     q/k/v/o plus the MLP (gate/up/down, or every expert's w1/w3/w2: 8× the MLP adapters).
set -euo pipefail
LORATUNE=${1:-target/release/loratune}
OUT=${2:-moe-results}
RUNS=${RUNS:-3}
BATCH=${BATCH:-2}
SEQ=${SEQ:-256}
STEPS=${STEPS:-3}
mkdir -p "$OUT"
run() { # name, shape, targets
  "$LORATUNE" bench --shape "$2" --targets "$3" --batch "$BATCH" --seq "$SEQ" --rank 16 --warmup 1 \
    --steps "$STEPS" --json > "$OUT/$1.json" 2> "$OUT/$1.log"
}
ATTN=q_proj,k_proj,v_proj,o_proj
for i in $(seq 1 "$RUNS"); do
  run "attn-dense-$i" smollm2-135m "$ATTN"
  run "attn-moe-$i" smollm2-moe-8x2 "$ATTN"
  run "mlp-dense-$i" smollm2-135m "$ATTN,gate_proj,up_proj,down_proj"
  run "mlp-moe-$i" smollm2-moe-8x2 "$ATTN,w1,w3,w2"
done
python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def med(name, key):
    return statistics.median(json.load(open(f"{out}/{name}-{i}.json"))[key] for i in range(1, runs + 1))
print(f"{'targets':<6} {'dense tok/s':>12} {'MoE tok/s':>10} {'MoE step / dense step':>22} {'dense RSS MB':>13} {'MoE RSS MB':>11}")
for t in ("attn", "mlp"):
    d, m = med(f"{t}-dense", "tokens_per_second"), med(f"{t}-moe", "tokens_per_second")
    rd, rm = med(f"{t}-dense", "peak_rss_mb"), med(f"{t}-moe", "peak_rss_mb")
    print(f"{t:<6} {d:>12.1f} {m:>10.1f} {d / m:>22.2f} {rd:>13.0f} {rm:>11.0f}")
PY
