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
# torch side; BATCH (default 1), SEQ (2048), RANK (16), RUNS (3), STEPS (5), WARMUP (2: the first steps compile
# kernels and autotune), DEVICE (cuda:0), DTYPE (bf16), SHAPE (llama-3.2-1b), BIG_SHAPE (llama-3.1-8b), BIG_SEQ
# (4096), PARTS (b e d g c k a q: which parts, in that order — the ones a short lease needs first), DEADLINE
# (seconds: parts that would start with fewer than MIN_PART=45 s left are skipped; a lent GPU's 15 minutes
# include its start, so DEADLINE=480 with the run's timeout at ~540 s), FUSION_LORATUNE (unset: a second binary
# built with `--features cuda,fusion`, timed in part (d) and checked in part (a)).
#
# Dry run without a GPU: DRY_RUN=1 scripts/bench/gpu.sh BINARY OUT, with BINARY built with `--features wgpu`,
# runs every part on burn's wgpu backend over Mesa's lavapipe (scripts/test-gpu-kernels.sh installs it) in f32
# with small shapes (smollm2-135m at 128 / 256 tokens, 1 step): the same commands, kernels and parsing, so a
# prepared GPU session spends its minutes measuring. Part (b) needs torch; without it the part says so.
#
# What it does:
#   (k) every fused kernel against the reference implementation on the device (`loratune bench
#       --check-kernels`: values and gradients, all mask variants, head dims 64-256), in f32 and in DTYPE;
#   (a) runs every parity fixture's forward (tests/fixtures/models/*) on the GPU, f32 then bf16, and compares
#       the logits with the CPU f32 forward and the stored transformers logits (`loratune bench
#       --check-fixtures`); f32 must agree with the CPU to 1e-4 of the largest logit, bf16 to 1e-1;
#   (b) benchmarks a Llama-3.2-1B-shaped random-weight model at seq 2048, bf16 base + f32 LoRA r=16 on every
#       linear layer (all-linear), loratune vs torch + PEFT on the same GPU, alternating runs
#       (scripts/bench/compare.py): tokens/s, MFU against 989 TFLOP/s (H100 SXM dense bf16 spec; the summary
#       also gives it against ~790 TFLOP/s, what dense bf16 GEMMs measure on an H100), peak GPU memory
#       (nvidia-smi, both sides alike) and the ratio;
#   (c) the per-kernel profile of loratune's step;
#   (d) the same step with the blockwise GEMM attention (default), the unit-per-row CubeCL attention kernels
#       (LORATUNE_ATTENTION=tile) and burn's decomposed ops everywhere (LORATUNE_FUSED=0); with FUSION_LORATUNE (a
#       loratune built with `--features cuda,fusion`) also burn's operation fusion, and the per-step losses of each
#       variant (same weights and tokens: they must agree); part (a) then checks the fusion build's forward too;
#   (g) the GEMM table: every cubek matmul strategy on the step's products (`loratune bench --gemm`), then the
#       same products through torch.matmul on the same device and the best cubek strategy against it
#       (scripts/bench/gemm_torch.py);
#   (e) a Llama-3.1-8B-shaped step at 1 x 4096 with gradient_checkpointing: true (peak GPU memory);
#   (q) a quantized frozen base (QLoRA): SHAPE with its matrices in QBASE blocks (default Q4_K) against the same
#       shape dense (tokens/s, peak GPU memory), and BIG_SHAPE at 1 x 1024 in QBASE with recompute (peak GPU
#       memory: the 8B-on-a-24-GB-GPU case). Part (k) already checks the quantized products (a quantized linear
#       group and a quantized lm_head loss per kept GGUF type) against the reference on the device.
set -uo pipefail

LORATUNE=${1:-target/release/loratune}
OUT=${2:-gpu-results}
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-1}
SEQ=${SEQ:-2048}
RANK=${RANK:-16}
RUNS=${RUNS:-3}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
DEVICE=${DEVICE:-cuda:0}
DTYPE=${DTYPE:-bf16}
SHAPE=${SHAPE:-llama-3.2-1b}
BIG_SHAPE=${BIG_SHAPE:-llama-3.1-8b}
BIG_SEQ=${BIG_SEQ:-4096}
QBASE=${QBASE:-Q4_K}
PARTS=${PARTS:-b e d g c k a q}
if [ "${DRY_RUN:-0}" = 1 ]; then
  # SmolLM2's 576-wide rows are not whole 256-element K blocks: Q4_0 there.
  DEVICE=wgpu DTYPE=f32 SHAPE=smollm2-135m SEQ=128 BIG_SHAPE=smollm2-135m BIG_SEQ=256 RUNS=1 STEPS=1 WARMUP=1 QBASE=Q4_0
  RUN_TIMEOUT=${RUN_TIMEOUT:-900}
  if [ -z "${VK_ICD_FILENAMES:-}" ]; then
    VK_ICD_FILENAMES=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n1)
    export VK_ICD_FILENAMES
  fi
  export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
fi
DTYPES="f32 $DTYPE"
[ "$DTYPE" = f32 ] && DTYPES=f32
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

mkdir -p "$OUT"
status=0
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
# One summary line from a `loratune bench --json` report: bench_line LABEL FILE.
bench_line() {
  "$PYTHON" - "$1" "$2" <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
label, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"{label}: no report ({e})")
    sys.exit(0)
print(f"{label}: {r['tokens_per_second']:.1f} tok/s, MFU {100 * r['mfu']:.1f}%, "
      f"peak GPU {r.get('peak_gpu_used_mb', float('nan')):.0f} MB (nvidia-smi), "
      f"{r.get('device_reserved_mb', float('nan')):.0f} MB held by the allocator's pools")
PY
}

if [ ! -x "$LORATUNE" ]; then
  echo "no loratune binary at $LORATUNE (build with: CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda)" >&2
  exit 2
fi
if [ "$DEVICE" != wgpu ] && ! command -v nvidia-smi >/dev/null; then
  echo "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver (or DRY_RUN=1)" >&2
  exit 2
fi

: > "$OUT/summary.txt"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ "$DEVICE" = wgpu ]; then
  say "gpu: none (dry run on wgpu, VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-unset})"
else
  say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader -i "${DEVICE#cuda:}" 2>/dev/null)"
fi
say "loratune: $LORATUNE ($("$LORATUNE" --version 2>/dev/null))"
[ -n "${FUSION_LORATUNE:-}" ] && say "loratune with burn fusion: $FUSION_LORATUNE ($("$FUSION_LORATUNE" --version 2>/dev/null))"
say "python: $PYTHON ($("$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1))"

part_k() {
# (k) every fused kernel against the reference on the device
for dt in $DTYPES; do
  say "(k) fused kernels vs reference on $DEVICE, $dt"
  if timeout "${KERNEL_TIMEOUT:-180}" "$LORATUNE" bench --check-kernels --device "$DEVICE" --dtype "$dt" \
      > "$OUT/kernels-$dt.txt" 2>&1; then
    tail -n 1 "$OUT/kernels-$dt.txt" | tee -a "$OUT/summary.txt"
  else
    status=1
    grep -E "FAIL|error" "$OUT/kernels-$dt.txt" | head -n 20 | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/kernels-$dt.txt" | tee -a "$OUT/summary.txt"
  fi
done
}
part_a() {
# (a) parity fixtures on the GPU against the CPU (and with the fusion build, when given: does fusion stay correct?)
for bin in "$LORATUNE" ${FUSION_LORATUNE:+"$FUSION_LORATUNE"}; do
  tag=; [ "$bin" = "${FUSION_LORATUNE:-}" ] && tag=-fusion
  for dt in $DTYPES; do
    say "(a) fixtures forward on $DEVICE, $dt${tag:+, burn fusion}, vs CPU f32 and transformers"
    if timeout "${FIXTURE_TIMEOUT:-120}" "$bin" bench --check-fixtures "$ROOT/tests/fixtures/models" --device "$DEVICE" --dtype "$dt" \
        > "$OUT/fixtures-$dt$tag.txt" 2>&1; then
      tail -n 1 "$OUT/fixtures-$dt$tag.txt" | tee -a "$OUT/summary.txt"
    else
      status=1
      tail -n 20 "$OUT/fixtures-$dt$tag.txt" | tee -a "$OUT/summary.txt"
    fi
  done
done
}
part_b() {
# (b) Llama-3.2-1B shape, seq 2048, bf16 + LoRA r16 all-linear: loratune vs torch + PEFT, alternating
say "(b) $SHAPE random weights, batch $BATCH x seq $SEQ, $DTYPE base, LoRA r=$RANK all-linear, $RUNS runs x $STEPS steps each side"
if ! "$PYTHON" -c 'import torch, transformers, peft' 2>/dev/null; then
  say "(b) skipped: $PYTHON has no torch + transformers + peft"
  [ "$DEVICE" = wgpu ] || status=1
else
"$PYTHON" "$HERE/compare.py" --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" \
    --seq "$SEQ" --rank "$RANK" --targets all-linear --runs "$RUNS" --steps "$STEPS" --warmup "$WARMUP" \
    --peak-flops 989e12 --run-timeout "${RUN_TIMEOUT:-240}" --loratune "$LORATUNE" --python "$PYTHON" --out "$OUT/compare.json" > "$OUT/compare.txt" 2>&1 \
  || status=1
tail -n 4 "$OUT/compare.txt" | tee -a "$OUT/summary.txt"
fi
if [ -f "$OUT/compare.json" ]; then
  "$PYTHON" - "$OUT/compare.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
s = json.load(open(sys.argv[1]))
for side in ("loratune", "torch+peft"):
    x = s.get(side)
    if x is None:
        print(f"{side:<11} no successful run")
        continue
    print(f"{side:<11} {x['tokens_per_second_median']:.0f} tok/s, MFU {100 * x['mfu_median']:.1f}% of 989 TFLOP/s "
          f"= {100 * x['mfu_median'] * 989 / 790:.1f}% of 790 measured; peak GPU used "
          f"{x.get('peak_gpu_used_mb_max', float('nan')):.0f} MB")
if s.get("ratio_tokens_per_second") is not None:
    print(f"ratio {s['ratio_tokens_per_second']:.2f}x (target >= 1.0x, MFU >= 40%)")
PY
fi
}
part_c() {
# (c) where loratune's GPU step goes: one step with CubeCL's per-kernel profiling (each kernel timed on the
# device; the timing syncs after every kernel, so only the shares matter, not the step time it prints).
say "(c) loratune per-kernel GPU time, profiled steps (same shape)"
PROF_DIR=$(mktemp -d)
printf '[profiling]\nlogger = { level = "basic", file = "%s/cubecl-profile.log" }\n' "$PROF_DIR" > "$PROF_DIR/cubecl.toml"
( cd "$PROF_DIR" && timeout "${RUN_TIMEOUT:-240}" "$(cd "$ROOT" && realpath "$LORATUNE")" bench --shape "$SHAPE" \
    --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --targets all-linear --warmup "$WARMUP" \
    --steps "$(( STEPS < 2 ? STEPS : 2 ))" ) > "$OUT/profile-run.txt" 2>&1 || status=1
if [ -f "$PROF_DIR/cubecl-profile.log" ]; then
  # The log ends with the summary table of the last step's kernels (name, calls, total time, share).
  # (steps 2: the last table written for a whole step is kept even if the final one is cut off at exit)
  awk '/\| *Name *\|/ {cur=""; open=1} open {cur = cur $0 "\n"} /\| *Total *\|/ && open {last=cur; open=0}
       END {printf "%s", last}' "$PROF_DIR/cubecl-profile.log" > "$OUT/profile-kernels.txt"
  grep -c . "$PROF_DIR/cubecl-profile.log" | sed 's/^/lines in the profile log: /' | tee -a "$OUT/summary.txt"
  # (the table pads every name to the longest one: squeeze the padding, drop the rule lines;
  # (each row: | name parts ... | duration | calls | share |; names can run to hundreds of parts: keep two)
  grep -v '⎼' "$OUT/profile-kernels.txt" | tr -s ' ' | awk -F'|' 'NF >= 6 {
      printf "%-48s %16s %8s %6s\n", substr($2 "|" $3, 1, 48), $(NF-3), $(NF-2), $(NF-1) }' \
    | head -n 30 | tee -a "$OUT/summary.txt"
fi
}
part_d() {
# (d) the attentions against each other, same shape, same invocation: the blockwise GEMM attention (default),
# the same with the frozen products and loss GEMMs on cubek's specialized_tma_mma (LORATUNE_GEMM, the GEMM
# table's fastest on 2026-12-04), the unit-per-row CubeCL kernels (LORATUNE_ATTENTION=tile) and burn's
# decomposed attention with every other op on the reference too (LORATUNE_FUSED=0).
say "(d) $SHAPE: blockwise vs blockwise+tma GEMMs vs tile attention vs LORATUNE_FUSED=0${FUSION_LORATUNE:+ vs burn fusion} (tokens/s, peak GPU memory, losses)"
variants="blockwise blockwise-tma tile reference"
[ -n "${FUSION_LORATUNE:-}" ] && variants="$variants fusion"
for variant in $variants; do
  attn=blockwise; fused=1; gemm=; bin=$LORATUNE
  [ "$variant" = tile ] && attn=tile
  [ "$variant" = reference ] && fused=0
  [ "$variant" = blockwise-tma ] && gemm=specialized_tma_mma
  [ "$variant" = fusion ] && bin=$FUSION_LORATUNE
  LORATUNE_FUSED=$fused LORATUNE_ATTENTION=$attn LORATUNE_GEMM=$gemm timeout "${RUN_TIMEOUT:-240}" "$bin" bench --shape "$SHAPE" \
    --device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --targets all-linear \
    --warmup "$WARMUP" --steps "$STEPS" --json > "$OUT/attn-$variant.json" 2> "$OUT/attn-$variant.log" || status=1
  bench_line "$variant" "$OUT/attn-$variant.json"
  # Same weights, tokens and seed in every variant: the per-step losses must agree (fusion diverging shows here).
  echo "   losses: $(grep -o 'loss [^ ]*' "$OUT/attn-$variant.log" | awk '{print $2}' | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
done
}
part_g() {
# (g) the GEMM table: each cubek strategy on the products of one SHAPE step (first call with NVRTC compilation,
# median of STEPS calls, TFLOP/s), rows printed as measured.
say "(g) $SHAPE GEMM strategies, $DTYPE, m = $BATCH x $SEQ, rank $RANK"
timeout "${RUN_TIMEOUT:-240}" "$LORATUNE" bench --gemm --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --steps "$STEPS" > "$OUT/gemm.txt" 2>&1 || status=1
cat "$OUT/gemm.txt" | tee -a "$OUT/summary.txt"
# The same products through torch.matmul (cuBLAS on CUDA), on the same device, and the best cubek strategy
# against it per product.
if "$PYTHON" -c 'import torch' 2>/dev/null; then
  timeout "${RUN_TIMEOUT:-240}" "$PYTHON" "$HERE/gemm_torch.py" --table "$OUT/gemm.txt" --device "$DEVICE" \
    --dtype "$DTYPE" --steps "$STEPS" > "$OUT/gemm-torch.txt" 2>&1 || status=1
  cat "$OUT/gemm-torch.txt" | tee -a "$OUT/summary.txt"
else
  say "(g) torch.matmul column skipped: $PYTHON has no torch"
  [ "$DEVICE" = wgpu ] || status=1
fi
}
part_e() {
# (e) an 8B shape at 4096 tokens with layer recompute: does it fit a 24 GB GPU (target: peak <= 22 GB)?
say "(e) $BIG_SHAPE, 1 x $BIG_SEQ, $DTYPE base, LoRA r=$RANK all-linear, gradient_checkpointing true"
timeout "${RUN_TIMEOUT:-240}" "$LORATUNE" bench --shape "$BIG_SHAPE" --device "$DEVICE" --dtype "$DTYPE" --batch 1 \
  --seq "$BIG_SEQ" --rank "$RANK" --targets all-linear --gradient-checkpointing true --warmup 1 --steps "$(( STEPS < 2 ? STEPS : 2 ))" --json \
  > "$OUT/8b-recompute.json" 2> "$OUT/8b-recompute.log" || status=1
bench_line "$BIG_SHAPE recompute" "$OUT/8b-recompute.json"
}
part_q() {
# (q) a quantized frozen base: QBASE blocks decoded on the device where the products read them.
say "(q) $SHAPE: base in $QBASE blocks vs dense $DTYPE (tokens/s, peak GPU memory)"
for base in "$QBASE" dequantize; do
  timeout "${RUN_TIMEOUT:-240}" "$LORATUNE" bench --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --base "$base" \
    --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --targets all-linear --warmup "$WARMUP" --steps "$STEPS" --json \
    > "$OUT/quant-$base.json" 2> "$OUT/quant-$base.log" || status=1
  bench_line "base $base" "$OUT/quant-$base.json"
done
say "(q) $BIG_SHAPE, 1 x 1024, base in $QBASE blocks, LoRA r=$RANK all-linear, gradient_checkpointing true"
timeout "${RUN_TIMEOUT:-240}" "$LORATUNE" bench --shape "$BIG_SHAPE" --device "$DEVICE" --dtype "$DTYPE" --base "$QBASE" \
  --batch 1 --seq "$(( BIG_SEQ < 1024 ? BIG_SEQ : 1024 ))" --rank "$RANK" --targets all-linear --gradient-checkpointing true \
  --warmup 1 --steps "$(( STEPS < 2 ? STEPS : 2 ))" --json > "$OUT/8b-quant.json" 2> "$OUT/8b-quant.log" || status=1
bench_line "$BIG_SHAPE $QBASE recompute" "$OUT/8b-quant.json"
}

# Run the parts in PARTS' order (default b e d g c k a q); with DEADLINE (seconds from the start) a part with fewer
# than MIN_PART (45) seconds left is skipped and says so: a lent GPU's minutes are few, so the parts that matter
# most go first and whatever ran is kept.
for part in $PARTS; do
  if ! declare -F "part_$part" >/dev/null; then
    echo "unknown part '$part' in PARTS (a b c d e g k q)" >&2; status=1; continue
  fi
  if [ -n "${DEADLINE:-}" ] && [ $(( DEADLINE - SECONDS )) -lt "${MIN_PART:-45}" ]; then
    say "($part) skipped: $(( DEADLINE - SECONDS )) s left of DEADLINE=$DEADLINE"
    continue
  fi
  t0=$SECONDS
  "part_$part"
  echo "   ($part took $(( SECONDS - t0 )) s)" | tee -a "$OUT/summary.txt"
done
say "logs in $OUT/ (exit status $status)"
exit $status
