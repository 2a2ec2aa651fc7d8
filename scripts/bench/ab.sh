#!/usr/bin/env bash
# Compare two loratune binaries on the same `loratune bench` workload, interleaved A B A B … so that machine noise
# hits both alike; prints each run and the medians of tokens/s, step seconds and peak RSS, and the ratio B/A.
#   scripts/bench/ab.sh BIN_A BIN_B [RUNS=5] [-- extra bench args]
# Default workload: SmolLM2-135M (the quickstart GGUF), 4 × 256 tokens, LoRA r=8 on every projection, CPU.
set -euo pipefail
a="$1"; b="$2"; shift 2
runs=5
if [ $# -gt 0 ] && [ "$1" != "--" ]; then runs="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--model "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" --batch 4 --seq 256 --rank 8)
fi
out="$(mktemp)"
for i in $(seq 1 "$runs"); do
  for side in A B; do
    bin="$a"; [ "$side" = B ] && bin="$b"
    "$bin" bench "${args[@]}" --json 2>/dev/null | tail -1 | sed "s/^/$side /" >> "$out"
    tail -1 "$out" | python3 -c "import json,sys; s,j=sys.stdin.read().split(' ',1); v=json.loads(j); print(f'run $i {s}: {v[\"tokens_per_second\"]:.1f} tok/s, step {v[\"step_seconds_median\"]:.3f} s, RSS {v[\"peak_rss_mb\"]:.0f} MB')"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {"A": [], "B": []}
for line in open(sys.argv[1]):
    side, js = line.split(" ", 1)
    rows[side].append(json.loads(js))
med = {s: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_second", "step_seconds_median", "peak_rss_mb")} for s, rs in rows.items()}
for s in "AB":
    m = med[s]
    print(f"{s}: median {m['tokens_per_second']:.1f} tok/s, step {m['step_seconds_median']:.3f} s, RSS {m['peak_rss_mb']:.0f} MB ({len(rows[s])} runs)")
print(f"B/A tokens/s: {med['B']['tokens_per_second'] / med['A']['tokens_per_second']:.3f}")
PY
rm -f "$out"
