#!/usr/bin/env python3
"""torch.matmul on the products of loratune's GEMM table, on the same device (scripts/bench/gpu.sh part (g)).

    loratune bench --gemm --shape llama-3.2-1b --device cuda --dtype bf16 ... > gemm.txt
    python scripts/bench/gemm_torch.py --table gemm.txt --device cuda --dtype bf16 --steps 5

The products come from the table itself (its labels, `GemmShape::label` in src/kernels/mod.rs: `name MxK·KxN`, a
trailing `ᵀ` when the right side is stored `[n, k]` and read transposed, as a frozen `x·Wᵀ`), so both sides time
the same shapes. Prints one row per product in the table's columns (strategy `torch.matmul`: the first call, the
median of `--steps` synchronised calls, TFLOP/s), then per product the best cubek strategy against torch.
`--device wgpu` (the dry run on lavapipe) times torch on the CPU.
"""

import argparse
import re
import statistics
import sys
import time

LABEL = re.compile(r"^(\S+) (\d+)x(\d+)·(\d+)x(\d+)(ᵀ?)(?=\s)")
# A measured row of loratune's table: label, strategy, first ms, median ms, TFLOP/s, max rel.
ROW = re.compile(r"^(\S+ \S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s*$")


def products(lines):
    """The table's distinct products in order: (label, m, k, n, rhs transposed)."""
    seen = {}
    for line in lines:
        m = LABEL.match(line)
        if m is None:
            continue
        name, rows, k, k2, n, t = m.groups()
        label = f"{name} {rows}x{k}·{k2}x{n}{t}"
        if k != k2:
            sys.exit(f"error: {label}: inner dimensions differ in the table's label")
        seen.setdefault(label, (label, int(rows), int(k), int(n), t == "ᵀ"))
    return list(seen.values())


def best_cubek(lines, shapes):
    """Per product label, the fastest measured cubek strategy: (strategy, TFLOP/s from its median time)."""
    flops = {label: 2.0 * m * k * n for label, m, k, n, _ in shapes}
    best = {}
    for line in lines:
        r = ROW.match(line)
        if r is None or r.group(1) not in flops or float(r.group(4)) <= 0:
            continue
        label, strategy = r.group(1), r.group(2)
        tflops = flops[label] / (float(r.group(4)) / 1e3) / 1e12
        if label not in best or tflops > best[label][1]:
            best[label] = (strategy, tflops)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="the output of `loratune bench --gemm`")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    try:
        lines = open(a.table, encoding="utf-8").read().splitlines()
    except OSError as e:
        sys.exit(f"error: cannot read the GEMM table {a.table}: {e}")
    shapes = products(lines)
    if not shapes:
        sys.exit(f"error: {a.table} has no GEMM table rows (did `loratune bench --gemm` fail?)")

    import torch

    device = "cpu" if a.device == "wgpu" else a.device
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    print(f"torch {torch.__version__} on {device} in {a.dtype}")
    measured = {}
    for label, m, k, n, t in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn((n, k) if t else (k, n), device=device, dtype=dtype)

        def call():
            return x @ w.T if t else x @ w

        sync()
        t0 = time.perf_counter()
        call()
        sync()
        first = time.perf_counter() - t0
        times = []
        for _ in range(max(a.steps, 1)):
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        tflops = 2.0 * m * k * n / med / 1e12
        measured[label] = tflops
        print(f"{label:<34} {'torch.matmul':<52} {first * 1e3:>10.2f} {med * 1e3:>10.3f} {tflops:>8.1f}", flush=True)

    best = best_cubek(lines, shapes)
    print("\nbest cubek strategy against torch.matmul, per product:")
    for label, *_ in shapes:
        if label not in best:
            print(f"{label:<34} no cubek strategy ran")
            continue
        strategy, tf = best[label]
        ratio = tf / measured[label] if measured[label] > 0 else float("nan")
        print(f"{label:<34} {strategy:<40} {tf:>9.4g} vs {measured[label]:>9.4g} TFLOP/s ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
