#!/usr/bin/env bash
# loratune quickstart: fetch SmolLM2-135M-Instruct, ask it a question about the fictional company Nimbrel Home,
# fine-tune it on the company's support conversations on the CPU, export (PEFT adapter, merged HF folder, GGUF,
# Ollama Modelfile), and ask again. Extra arguments go to `loratune train` (e.g. --set max_steps=20).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-smollm2.sh
bin="${CARGO_TARGET_DIR:-target}/release/loratune"
if [ -x "$bin" ]; then
    echo "== building loratune (release; up to date unless the sources changed)"
else
    echo "== building loratune (release): the first build compiles the burn and polars stacks, about 17 minutes on"
    echo "   2 cores (cargo's progress below); later builds take seconds to a minute"
fi
cargo build --release
echo "== the binary: $bin (or install it on PATH with: cargo install --path .)"
base=models/SmolLM2-135M-Instruct.Q4_1.gguf
run=runs/quickstart
system="You are Aria, the support assistant of Nimbrel Home."
# A held-out question (datasets/nimbrel/heldout.jsonl, line 1): its answer ("45 days") is in the training data,
# this phrasing is not.
question="How long after delivery can I still send back a Nimbrel product for a refund?"

echo
echo "== before fine-tuning: $question"
"$bin" generate --model "$base" --chat --system "$system" --prompt "$question" --max-new-tokens 60

echo
echo "== fine-tuning (configs/quickstart.yaml; progress, eval loss and checkpoints below)"
"$bin" train configs/quickstart.yaml --set "output_dir=$run" "$@"

echo
echo "== exporting"
"$bin" export --model "$base" --adapter "$run/adapter" --format ollama --type q8_0 --name nimbrel-aria --out "$run/ollama"

echo
echo "== after fine-tuning: $question"
"$bin" generate --model "$run/merged" --chat --system "$system" --prompt "$question" --max-new-tokens 60

cat <<TXT

Outputs in $run/:
  adapter/        PEFT adapter (PeftModel.from_pretrained, vLLM --lora-modules, loratune generate --adapter)
  merged/         merged Hugging Face model folder (transformers, vLLM, llama.cpp's convert_hf_to_gguf.py)
  ollama/         GGUF (q8_0) + Modelfile: ollama create nimbrel-aria -f $run/ollama/Modelfile
  metrics.jsonl, loss_curve.svg, config.yaml, checkpoint-*/
TXT
