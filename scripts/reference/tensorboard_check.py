"""Check a loratune run's TensorBoard event files with TensorBoard's own reader.

    python scripts/reference/tensorboard_check.py RUN_DIR   # needs `pip install tensorboard`

Loads RUN_DIR/runs with EventAccumulator (purge_orphaned_data on, as `tensorboard --logdir` does), prints each tag's
points, and checks that train/loss holds every step of RUN_DIR/metrics.jsonl exactly once with its value (f32).
Exits non-zero on any difference.
"""
import json
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(os.path.join(run, "runs"), purge_orphaned_data=True)
acc.Reload()
tags = acc.Tags()["scalars"]
for tag in tags:
    pts = acc.Scalars(tag)
    print(f"{tag}: {len(pts)} points, steps {[p.step for p in pts]}")
metrics = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
want = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
got = [(p.step, p.value) for p in acc.Scalars("train/loss")]
ok = len(got) == len(want) and all(
    gs == ws and math.isclose(gv, ws_v, rel_tol=1e-6) for (gs, gv), (ws, ws_v) in zip(got, want)
)
print(f"train/loss vs metrics.jsonl: {len(got)} vs {len(want)} points, {'equal' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
