#!/usr/bin/env bash
# Whole `loratune train` runs on the GPU against the same run on the CPU (issue 6's CUDA path), on the tiny llama
# fixture (tests/fixtures/models/llama) and the small chat set the tests use. Run from the repository root on a
# machine with an NVIDIA GPU:
#
#   scripts/bench/gpu-train.sh [LORATUNE_BINARY] [OUT_DIR]
#
# LORATUNE_BINARY: built with `CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda`.
# It runs 30 steps (eval + checkpoint every 10, merged export) three times — CPU f32, CUDA f32 (TF32 GEMMs),
# CUDA with a bf16 base — then resumes the CUDA f32 run from its step-20 checkpoint, and prints the per-step losses
# side by side: the CUDA f32 curve must follow the CPU one (max |Δloss| ≤ 0.05), the bf16 one must fall as well,
# and the resumed steps 21–30 must equal the uninterrupted CUDA run's (≤ 1e-3; GPU reductions are not ordered).
set -uo pipefail

BIN=${1:-target/release/loratune}
OUT=${2:-gpu-train-results}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
T=$(mktemp -d)
cat > "$T/cfg.yaml" <<EOF
base_model: $ROOT/tests/fixtures/models/llama
datasets:
  - path: $ROOT/tests/fixtures/train/facts_chat.jsonl
    type: chat_template
dataset_prepared_path: $T/cache
sequence_len: 256
micro_batch_size: 4
gradient_accumulation_steps: 2
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_linear: true
learning_rate: 0.01
lr_scheduler: cosine
warmup_steps: 2
seed: 7
max_steps: 30
val_set_size: 8
eval_steps: 10
save_steps: 10
save_total_limit: 3
logging_steps: 1
merge_lora: true
bf16: false
output_dir: $T/unset
EOF
status=0
run() { # name, extra --set args...
  local name=$1; shift
  echo "== $name"
  if timeout "${RUN_TIMEOUT:-120}" "$BIN" train "$T/cfg.yaml" --set "output_dir=$T/$name" "$@" > "$OUT/$name.log" 2>&1; then
    grep -E "finished|train loss|best eval" "$OUT/$name.log"
    cp "$T/$name/metrics.jsonl" "$OUT/$name-metrics.jsonl"
  else
    status=1
    tail -n 15 "$OUT/$name.log"
  fi
}
run cpu --set device=cpu
run cuda-f32 --set device=cuda
run cuda-bf16 --set device=cuda --set bf16=true
# Resume: a copy of the CUDA f32 run cut back to its step-20 checkpoint, then trained to the end again.
if [ -d "$T/cuda-f32/checkpoint-20" ]; then
  mkdir -p "$T/cuda-resume"
  cp -r "$T/cuda-f32/checkpoint-20" "$T/cuda-resume/"
  run cuda-resume --set device=cuda --set "resume_from_checkpoint=$T/cuda-resume/checkpoint-20"
else
  echo "no checkpoint-20 in the CUDA run"; status=1
fi
test -f "$T/cuda-f32/merged/model.safetensors" && echo "merged export written on the GPU run" || { echo "no merged export"; status=1; }

python3 - "$OUT" <<'PY' || status=1
import json, os, sys
out = sys.argv[1]
def losses(name):
    p = os.path.join(out, f"{name}-metrics.jsonl")
    if not os.path.exists(p):
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
cpu, f32, bf16, res = (losses(n) for n in ("cpu", "cuda-f32", "cuda-bf16", "cuda-resume"))
print("step   cpu f32   cuda f32  cuda bf16  cuda resumed")
for s in sorted(cpu):
    f = lambda d: f"{d[s]:9.4f}" if s in d else "        -"
    print(f"{s:4d} {f(cpu)} {f(f32)} {f(bf16)} {f(res)}")
ok = True
if cpu and f32:
    d = max(abs(cpu[s] - f32[s]) for s in cpu if s in f32)
    print(f"max |loss cuda f32 - cpu f32| = {d:.2e} (allowed 5e-2)"); ok &= d <= 5e-2
else:
    ok = False
if bf16:
    first, last = bf16[min(bf16)], sum(bf16[s] for s in sorted(bf16)[-5:]) / 5
    print(f"cuda bf16 loss {first:.3f} -> {last:.3f} (mean of last 5)"); ok &= last < 0.5 * first
else:
    ok = False
if res:
    d = max(abs(res[s] - f32[s]) for s in res if s in f32)
    print(f"resumed steps {min(res)}-{max(res)} vs uninterrupted: max |Δloss| = {d:.2e} (allowed 1e-3)"); ok &= d <= 1e-3
else:
    ok = False
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
echo "exit status $status"
exit $status
