#!/usr/bin/env bash
# The `loratune report` page in a real browser (headless Chromium, Debian's `chromium` package, installed here when
# missing): a 4-trial sweep on the tiny test model with held-out questions, its report page loaded from disk with
# no network, and checked after the page's script ran — the page is ready, every curve the report drew was laid out,
# the table has one row per trial, one trial's answers are shown, no script error — and a screenshot is written
# (REPORT_SCREENSHOT, default runs/report-screenshot.png). Run by .ci/run; not part of scripts/test.sh (the browser
# is a 100 MB install).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
shot="${REPORT_SCREENSHOT:-runs/report-screenshot.png}"

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing Chromium (Debian: chromium) for the report-page check"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  browser="$(command -v chromium)"
fi
"$browser" --version

cargo build --release
bin="$CARGO_TARGET_DIR/release/loratune"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fixtures="$PWD/tests/fixtures"
cat > "$work/sweep.yaml" <<YAML
base_model: $fixtures/models/llama
datasets:
  - path: $fixtures/train/facts_chat.jsonl
    type: chat_template
dataset_prepared_path: $work/cache
sequence_len: 128
micro_batch_size: 4
lora_target_linear: true
lr_scheduler: cosine
val_set_size: 8
max_steps: 8
eval_steps: 2
logging_steps: 1
output_dir: $work/sweep
eval_generate:
  path: $PWD/datasets/nimbrel/heldout.jsonl
  max_new_tokens: 6
  batch_size: 9
sweep:
  method: halving
  eta: 2
  parameters:
    lora_r: [4, 8]
    learning_rate: [1.0e-3, 2.0e-2]
YAML
"$bin" sweep "$work/sweep.yaml" --plain > "$work/sweep.log" 2>&1 || { cat "$work/sweep.log"; exit 1; }
tail -8 "$work/sweep.log"
report="$("$bin" report "$work/sweep")"
echo "$report"
curves="$(echo "$report" | sed -n 's/.*runs, \([0-9]*\) curves.*/\1/p')"
page="file://$work/sweep/report.html"

flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions)
"$browser" "${flags[@]}" --enable-logging=stderr --v=0 --virtual-time-budget=3000 --dump-dom "$page" \
  > "$work/dom.html" 2> "$work/browser.log" || { cat "$work/browser.log"; exit 1; }
attr() { sed -n "s/.*<body[^>]* $1=\"\([^\"]*\)\".*/\1/p" "$work/dom.html" | head -1; }
fail() { echo "report page check failed: $*" >&2; exit 1; }
[ "$(attr data-ready)" = "1" ] || fail "the page's script did not finish (no data-ready on <body>)"
if grep -q "Uncaught" "$work/browser.log"; then grep "Uncaught" "$work/browser.log"; fail "script error"; fi
[ "$(attr data-curves-drawn)" = "$curves" ] || fail "curves laid out: $(attr data-curves-drawn), drawn by the report: $curves"
[ "$(attr data-rows)" = "4" ] || fail "table rows: $(attr data-rows), trials: 4"
[ "$(attr data-answers-shown)" = "1" ] || fail "answer tables shown: $(attr data-answers-shown) (want the best trial's only)"
mkdir -p "$(dirname "$shot")"
"$browser" "${flags[@]}" --window-size=1400,2400 --virtual-time-budget=3000 --screenshot="$PWD/$shot" "$page" \
  2> "$work/shot.log" || { cat "$work/shot.log"; exit 1; }
size="$(stat -c %s "$shot")"
[ "$(head -c 8 "$shot" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "$shot is not a PNG"
[ "$size" -gt 40000 ] || fail "$shot is only $size bytes (a blank page?)"
echo "report page OK in $("$browser" --version): $curves curves laid out, 4 rows, 1 answer table; screenshot $shot ($size bytes)"
