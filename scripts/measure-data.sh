#!/usr/bin/env bash
# Throughput and peak memory of the data pipeline: `loratune data stats` (read → render → tokenize → token cache,
# then split/pack/plan) on the shipped company chat dataset replicated to N records, with a cold cache and again
# with the cache warm.
#
#   scripts/measure-data.sh TOKENIZER [N=100000] [extra `data stats` flags...]
#
# TOKENIZER: a .gguf file or a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json),
# e.g. models/SmolLM2-135M-Instruct.Q4_1.gguf. Prints records/s, tokens/s (over the wall time of the whole command), CPU time
# and peak RSS (/usr/bin/time -v).
set -euo pipefail
cd "$(dirname "$0")/.."
tok=${1:?usage: scripts/measure-data.sh TOKENIZER [N] [flags...]}
n=${2:-100000}
shift $(( $# >= 2 ? 2 : 1 ))

cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/loratune"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/loratune"

src=datasets/nimbrel/support_chat.jsonl
lines=$(wc -l < "$src")
reps=$(( (n + lines - 1) / lines ))
for ((i = 0; i < reps; i++)); do cat "$src"; done > "$work/chat.jsonl"
echo "dataset: $src x $reps = $(wc -l < "$work/chat.jsonl") records, $(du -h "$work/chat.jsonl" | cut -f1)"

for run in cold warm; do
    /usr/bin/time -v "$work/loratune" data stats --dataset "$work/chat.jsonl" --tokenizer "$tok" \
        --cache-dir "$work/cache" "$@" > "$work/$run.out" 2> "$work/$run.time"
    records=$(awk '/records read/ {print $3; exit}' "$work/$run.out")
    tokens=$(awk '$1 == "tokens" {print $2; exit}' "$work/$run.out")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s}' "$work/$run.time")
    user=$(awk -F': ' '/User time/ {print $2}' "$work/$run.time")
    sys=$(awk -F': ' '/System time/ {print $2}' "$work/$run.time")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/$run.time")
    awk -v r="$run" -v rec="$records" -v tok="$tokens" -v w="$wall" -v u="$user" -v s="$sys" -v rss="$rss" 'BEGIN {
        printf "%s cache: %d records, %d tokens in %.2f s wall (%.2f s CPU): %.0f records/s, %.0f tokens/s; peak RSS %.1f MiB\n",
            r, rec, tok, w, u + s, rec / w, tok / w, rss / 1024 }'
done
echo "--- data stats output:"
cat "$work/cold.out"
