#!/usr/bin/env bash
# Memory and speed of the training step against sequence length (issue: linear-memory attention, layer
# recompute). For each binary in BINS, each sequence length in SEQS and each gradient_checkpointing mode in
# CKPTS, one `loratune bench --profile --json` process (peak RSS is per process), then a fit of
# peak RSS = a + b·s + c·s² through the points of each (binary, mode) and the quadratic term's share at the
# longest length.
#
#   scripts/bench/long-context.sh                       # target/release/loratune, SmolLM2, batch 1
#   BINS="/tmp/loratune-old target/release/loratune" SEQS="1024 2048 4096" CKPTS="false true" \
#     BATCH=1 STEPS=2 scripts/bench/long-context.sh
#   BENCH_ARGS="--base dequantize" scripts/bench/long-context.sh   # the GGUF's blocks dequantised to f32
#
# Needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-smollm2.sh) and python3 for the fit.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
BINS=${BINS:-${CARGO_TARGET_DIR:-target}/release/loratune}
SEQS=${SEQS:-1024 2048 4096}
CKPTS=${CKPTS:-false true}
BATCH=${BATCH:-1}
STEPS=${STEPS:-2}
read -r -a bench_args <<<"${BENCH_ARGS:-}"
OUT=${OUT:-$(mktemp -d)/long-context.jsonl}
: >"$OUT"
for bin in $BINS; do
  for ck in $CKPTS; do
    for s in $SEQS; do
      extra=()
      if "$bin" bench --help | grep -q -- --gradient-checkpointing; then
        extra=(--gradient-checkpointing "$ck")
      elif [ "$ck" != false ]; then
        continue
      fi
      "$bin" bench --model "$MODEL" --batch "$BATCH" --seq "$s" --warmup 1 --steps "$STEPS" --profile --json \
        "${extra[@]}" "${bench_args[@]}" 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin); r["bin"]=sys.argv[1]; r["seq"]=int(sys.argv[2]); r["ckpt"]=sys.argv[3]; print(json.dumps(r))' \
          "$bin" "$s" "$ck" >>"$OUT"
      tail -n1 "$OUT" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["bin"], "seq", r["seq"], "ckpt", r["ckpt"], "tok/s %.1f" % r["tokens_per_second"], "peak RSS %.0f MB" % r["peak_rss_mb"], flush=True)'
    done
  done
done
python3 - "$OUT" "$BATCH" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
batch = int(sys.argv[2])
def attn(r, name):
    for k in r.get("profile", []):
        if k["kernel"] == name:
            return k["gflops"], k["seconds_per_step"]
    return float("nan"), float("nan")
print(f"\nbatch {batch}; medians of the timed steps; attention GFLOP/s from bench --profile")
print(f"{'binary':<34} {'ckpt':<8} {'seq':>6} {'tok/s':>8} {'peak RSS MB':>12} {'peak heap MB':>13} {'attn fwd GF/s':>14} {'attn bwd GF/s':>14}")
for r in rows:
    f, _ = attn(r, "attention+RoPE fwd"); b, _ = attn(r, "attention+RoPE bwd")
    print(f"{r['bin']:<34} {r['ckpt']:<8} {r['seq']:>6} {r['tokens_per_second']:>8.1f} {r['peak_rss_mb']:>12.0f} {r.get('peak_heap_mb', float('nan')):>13.0f} {f:>14.1f} {b:>14.1f}")
groups = {}
for r in rows:
    groups.setdefault((r["bin"], r["ckpt"]), []).append(r)
print("\nfit peak = a + b·s + c·s² (exact through three lengths): peak RSS, and the live heap bytes' peak (what the")
print("program holds; RSS minus it is what the allocator keeps mapped after frees)")
for (b, ck), g in groups.items():
  g.sort(key=lambda r: r["seq"])
  if len(g) < 3:
      continue
  for what in ("peak_rss_mb", "peak_heap_mb"):
    if any(what not in r for r in g[-3:]):
        continue
    pts = [(r["seq"], r[what]) for r in g[-3:]]
    (s1, y1), (s2, y2), (s3, y3) = pts
    # Solve the 3x3 Vandermonde system.
    import itertools
    d1 = (y2 - y1) / (s2 - s1); d2 = (y3 - y2) / (s3 - s2)
    c = (d2 - d1) / (s3 - s1)
    bb = d1 - c * (s1 + s2)
    a = y1 - bb * s1 - c * s1 * s1
    share = c * s3 * s3 / y3
    print(f"{b:<34} ckpt {ck:<6} {what[5:9]:<5} a {a:8.0f} MB  b {bb*1024:8.1f} MB per 1k tokens  c·s² at {s3}: {c*s3*s3:8.0f} MB = {100*share:5.1f} % of {y3:.0f} MB; ({s3})/({s1}) = {y3/y1:.2f}")
PY
echo "rows: $OUT"
