#!/usr/bin/env python3
"""Run `loratune bench` and its PyTorch + PEFT counterpart alternately in one invocation and print the ratio.

Each run is a fresh process: load the model, 1 warm-up step, --steps timed steps; its score is the median step
time. Runs alternate (loratune, torch, torch, loratune, ...: ABBA order, so a slow drift of the machine's load
hits both sides alike). The summary reports, per side, the median over runs of tokens/s, the min/max run, and
the peak RSS (the kernel's high-water mark of each child, via os.wait4; the largest over runs), then the tokens/s ratio.

    /work/venv/bin/python scripts/bench/compare.py --model /tmp/smollm2-hf --runs 5
    /work/venv/bin/python scripts/bench/compare.py --shape llama-3.2-1b --device cuda --dtype bf16 \
        --seq 2048 --batch 1 --rank 16 --targets all-linear --runs 3

Needs: a release build of loratune (default: target/release/loratune; --loratune PATH), and Python with
torch 2.15 / transformers 5.24 / peft 0.21 (the one running this script, or --python).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def gpu_sampler(device):
    """Start nvidia-smi sampling the used memory of the GPU every 100 ms (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    idx = device.split(":")[1] if ":" in device else "0"
    return subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                             "-i", idx, "-lms", "100"], stdout=subprocess.PIPE, text=True)


def gpu_peak(sampler):
    if sampler is None:
        return None
    sampler.terminate()
    out, _ = sampler.communicate()
    vals = [float(x) for x in out.split() if x.strip().replace(".", "", 1).isdigit()]
    return max(vals) if vals else None


def run(cmd, env=None, device="cpu", timeout=None):
    """Run one side in a fresh process; return (json result, peak RSS MB, wall seconds). The peak RSS is the
    kernel's high-water mark of that child alone (os.wait4's ru_maxrss, what `/usr/bin/time -v` prints). On CUDA
    the result also gets `peak_gpu_used_mb`: the most GPU memory nvidia-smi saw in use during the run."""
    sampler = gpu_sampler(device)
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        killer = threading.Timer(timeout, p.kill) if timeout else None
        if killer:
            killer.start()
        _, status, usage = os.wait4(p.pid, 0)
        if killer:
            killer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = gpu_peak(sampler)
    if p.returncode != 0:
        sys.stdout.write(stdout[-3000:] + stderr[-5000:])
        print(f"command failed ({p.returncode}): {' '.join(cmd)}", flush=True)
        return None
    res = None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            res = json.loads(line)
    if res is None:
        print(f"no JSON result from: {' '.join(cmd)}\n{stdout[-2000:]}{stderr[-3000:]}", flush=True)
        return None
    rss = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    if peak is not None:
        res["peak_gpu_used_mb"] = peak
    return res, rss, wall


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model folder (both sides load it)")
    src.add_argument("--shape", help="random-weight model of a named shape (llama-3.2-1b, smollm2-135m)")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (≥ 5 for a recorded result)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU, both sides (default: each side's own "
                    "default: 330e9 CPU, 989e12 CUDA)")
    ap.add_argument("--loratune", default=os.path.join(ROOT, "target", "release", "loratune"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--run-timeout", type=float, help="kill a run after this many seconds (counts as failed)")
    ap.add_argument("--out", help="also write the summary as JSON here")
    a = ap.parse_args()

    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--rank", str(a.rank), "--targets", a.targets,
              "--warmup", str(a.warmup), "--steps", str(a.steps), "--dtype", a.dtype]
    if a.peak_flops:
        common += ["--peak-flops", str(a.peak_flops)]
    which = ["--model", a.model] if a.model else ["--shape", a.shape]
    # `wgpu` (gpu.sh's dry run on lavapipe) is loratune's test device; torch has none: it runs on the CPU then.
    torch_device = "cpu" if a.device == "wgpu" else a.device
    ours = [a.loratune, "bench", "--json"] + which + common + ["--device", a.device]
    theirs = [a.python, os.path.join(HERE, "torch_bench.py"), "--threads", str(a.threads)] + which + common \
        + ["--device", torch_device]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")

    results = {"loratune": [], "torch+peft": []}
    order = []
    for i in range(a.runs):
        order += [("loratune", ours), ("torch+peft", theirs)] if i % 2 == 0 else \
                 [("torch+peft", theirs), ("loratune", ours)]
    failed = set()
    for side, cmd in order:
        if side in failed:
            continue
        got = run(cmd, env, a.device, a.run_timeout)
        if got is None:
            # One side failing must not cost the other side's numbers: skip its later runs, go on.
            failed.add(side)
            print(f"{side}: run failed; its remaining runs are skipped", flush=True)
            continue
        res, rss, wall = got
        res["peak_rss_mb_time_v"] = rss
        results[side].append(res)
        extra = f" peak GPU used {res['peak_gpu_used_mb']:.0f} MB" if "peak_gpu_used_mb" in res else ""
        if "peak_gpu_mem_mb" in res:
            extra += f" (torch allocator peak {res['peak_gpu_mem_mb']:.0f} MB)"
        print(f"{side:<11} {res['step_seconds_median']:.3f} s/step  {res['tokens_per_second']:8.1f} tok/s  "
              f"MFU {100 * res['mfu']:5.1f}%  peak RSS {rss:7.0f} MB{extra}  ({wall:.0f} s)", flush=True)

    def summary(side):
        rs = results[side]
        tps = [r["tokens_per_second"] for r in rs]
        return {
            "runs": len(rs),
            "tokens_per_second_median": statistics.median(tps),
            "tokens_per_second_min": min(tps),
            "tokens_per_second_max": max(tps),
            "step_seconds_median": statistics.median(r["step_seconds_median"] for r in rs),
            "mfu_median": statistics.median(r["mfu"] for r in rs),
            "peak_rss_mb_max": max(r["peak_rss_mb_time_v"] for r in rs),
            **({"peak_gpu_used_mb_max": max(r["peak_gpu_used_mb"] for r in rs)}
               if all("peak_gpu_used_mb" in r for r in rs) else {}),
        }

    s = {side: summary(side) for side in ("loratune", "torch+peft") if results[side]}
    ratio = None
    if len(s) == 2:
        ratio = s["loratune"]["tokens_per_second_median"] / s["torch+peft"]["tokens_per_second_median"]
    s["ratio_tokens_per_second"] = ratio
    s["failed"] = sorted(failed)
    s["config"] = {k: v for k, v in vars(a).items() if k not in ("out",)}
    print()
    for side in ("loratune", "torch+peft"):
        if side not in s:
            print(f"{side:<11} no successful run")
            continue
        x = s[side]
        print(f"{side:<11} median {x['tokens_per_second_median']:8.1f} tok/s "
              f"(runs {x['tokens_per_second_min']:.1f}–{x['tokens_per_second_max']:.1f}, n={x['runs']}), "
              f"{x['step_seconds_median']:.3f} s/step, MFU {100 * x['mfu_median']:.1f}%, "
              f"peak RSS {x['peak_rss_mb_max']:.0f} MB"
              + (f", peak GPU used {x['peak_gpu_used_mb_max']:.0f} MB" if "peak_gpu_used_mb_max" in x else ""))
    if ratio is not None:
        print(f"ratio loratune / torch+peft: {ratio:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(s, f, indent=2)
    if failed:
        raise SystemExit(f"failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
