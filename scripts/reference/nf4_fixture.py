#!/usr/bin/env python3
"""Reference bytes for loratune's NF4 quantiser (`src/quant/nf4.rs`, its `#[cfg(test)]` tests).

bitsandbytes itself is run (on the CPU; no GPU is touched). Generated with
    torch 2.15.0+cu132 (default PyPI wheel; the CPU index download.pytorch.org/whl/cpu was unreachable)
    bitsandbytes 0.50.2
    safetensors 0.7.0, numpy 2.x
on an x86-64 host whose torch CPU capability is AVX2 (it matters: see "offset" below).

Environment (this script installs nothing):
    python3 -m venv /tmp/bnbenv
    /tmp/bnbenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu   # smaller; if unreachable:
    /tmp/bnbenv/bin/pip install torch                                                     # the default PyPI wheel
    /tmp/bnbenv/bin/pip install bitsandbytes safetensors numpy
    /tmp/bnbenv/bin/python scripts/reference/nf4_fixture.py

Writes (both small, committed; metadata {"format": "pt"}; byte-identical on re-run):

tests/fixtures/nf4/nf4.safetensors
  x                      F32 [67, 131]  the weight: normals (σ 0.02) with outliers, exact zeros, a block holding
                                        ±absmax and every NF4 midpoint exactly (ties), an all-zero block, values
                                        that tell x·(1/absmax) from x/absmax; numel 8777 is odd (a pad nibble)
                                        and leaves a 9-element last block
  dynamic_map            F32 [256]      bitsandbytes.functional.create_dynamic_map() (signed)
  {case}.packed          U8  [N/2, 1]   quantize_4bit(x, blocksize, compress_statistics, quant_type="nf4")
  {case}.absmax          F32 / U8       the state's absmax (F32; U8 codes when double)
  {case}.offset          F32 [1]        double only: the absmax mean subtracted before the 8-bit quantisation
  {case}.nested_absmax   F32            double only: state2.absmax (one per 256 absmax values)
  {case}.code            F32 [256]      double only: state2.code
  {case}.dequant         F32            dequantize_4bit(packed, state) (f32 output), where stored
    case ∈ plain64 (blocksize 64, no DQ; with dequant), double64 (64, DQ; 138 blocks → one partial nested block),
           double32 (32, DQ; 275 blocks → a full and a partial nested block; with dequant),
           zplain / zdouble (the 160-element tensor `z`: block 1 all zero → absmax 0, the 32-element last block
           all zero → absmax clamped to 1e-38; with dequant)
  z                      F32 [160]
  bw.input               F32 [1000]     input of quantize_blockwise(y, blocksize=256) (the DQ step on its own)
  bw.q, bw.absmax        U8 [1000], F32 [4]  its codes and block absmax
  mean.len               I32 [L]        lengths n of prefixes of the deterministic sequence
                                        v[i] = ((i·2654435761 mod 2^32) >> 8) · 2^-24 (exact in f32)
  mean.value             F32 [L]        torch.mean(v[:n]) in float32 (what quantize_4bit uses for the DQ offset),
                                        with torch.set_num_threads(1) (from 32768 values on, more threads split
                                        the sum differently)
  linear.input           BF16 [16, 200] the weight Linear4bit quantised into bnb_linear.safetensors
  linear.expected        F32 [16, 200]  dequantize_4bit of bnb_linear.safetensors' weight with an f32 output
  linear.expected_bf16   BF16 [16, 200] the same with the checkpoint's own dtype (bfloat16), what bnb returns

tests/fixtures/nf4/bnb_linear.safetensors
  model.layers.0.mlp.down_proj.weight{,.absmax,.quant_map,.nested_absmax,.nested_quant_map,
                                      .quant_state.bitsandbytes__nf4}
  exactly `bnb.nn.Linear4bit(200, 16, bias=False, compress_statistics=True, quant_type="nf4").state_dict()`
  after `.to("cpu")` quantised a bfloat16 weight (the layout transformers saves for a pre-quantised checkpoint).

What bitsandbytes 0.50.2 does on the CPU (read from its source; `src/quant/nf4.rs` documents the port):
  - quantize_4bit has no CPU kernel: backends/default/ops.py runs (torch ops): absmax = max|x| per block;
    scaled = clamp(x · (1/max(absmax, 1e-38)), -1, 1) for full blocks but clamp(x / max(absmax, 1e-38), -1, 1)
    for the last partial block, whose stored absmax is the clamped value; code = bucketize(scaled, midpoints)
    (a value on a midpoint takes the lower code); a zero pads an odd count; element 2i → high nibble.
  - compress_statistics: offset = absmax.mean() (torch's float32 cascade sum, then / n: its order depends on
    the CPU capability, AVX2 here, and on the thread count past 32768 values), then
    quantize_blockwise(absmax - offset, blocksize=256) runs the native cquantize_blockwise_cpu_fp32: nearest
    code through a 65536-entry lookup table (not an exact nearest search), index = (int)fma((v+1)/2, 65535, 0.5).
  - dequantize_4bit (native, scalar path on AVX2): NF4[nibble] · absmax; nested absmax = code[q] · nested + offset.
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "nf4")
PREFIX = "model.layers.0.mlp.down_proj."

torch.set_num_threads(1)
torch.manual_seed(20_240_521)
rng = np.random.default_rng(20_240_521)


def weight():
    x = rng.normal(0.0, 0.02, size=(67, 131)).astype(np.float32).reshape(-1)
    n = x.size
    x[rng.choice(n, 12, replace=False)] *= 40.0  # outliers
    x[rng.choice(n, 40, replace=False)] = 0.0  # scattered exact zeros
    x[64 * 3 : 64 * 4] = 0.0  # an all-zero block (blocksize 64; two at blocksize 32)
    # Block 5 (blocksize 64): absmax exactly 1, so scaled == x: ±1 and every NF4 midpoint, ties included.
    code = F.get_4bit_type("nf4", device="cpu")
    mids = ((code[:-1] + code[1:]) / 2).numpy()
    b5 = np.zeros(64, np.float32)
    b5[0], b5[1] = 1.0, -1.0
    b5[2 : 2 + 15] = mids
    b5[17 : 17 + 15] = -mids
    b5[32 : 32 + 15] = np.nextafter(mids, np.float32(2))
    b5[47 : 47 + 15] = np.nextafter(mids, np.float32(-2))
    x[64 * 5 : 64 * 6] = b5
    # Block 6 (both 32-halves) and the 9-element last block: absmax RECIP_ABSMAX and values whose code differs
    # between x·(1/absmax) (full blocks) and x/absmax (the partial last block), so both roundings are checked.
    half = np.zeros(32, np.float32)
    half[0] = RECIP_ABSMAX
    half[1 : 1 + len(RECIP_SPLIT)] = RECIP_SPLIT
    x[64 * 6 : 64 * 7] = np.tile(half, 2)
    x[-9:] = half[:9]
    return x.reshape(67, 131)


# Found by a search (numpy): for absmax a below, each value v has bucketize(v·f32(1/a)) != bucketize(v/a).
RECIP_ABSMAX = np.float32(0.1206107884645462)
RECIP_SPLIT = np.array([-0.055480390787124634, -0.016633642837405205, -0.00549080828204751, 0.014504080638289452,
                        0.02454685978591442, 0.04695529490709305, 0.10390359908342361], dtype=np.float32)


def blockwise_input():
    """Input of the 8-bit blockwise quantiser on its own (blocks of 256): scales where the lookup table is
    coarser than the dynamic map, an all-zero block, a partial last block."""
    y = np.concatenate([
        rng.normal(0.0, 1.0, 256) * np.repeat([1.0, 1e-2, 1e-4, 1e-6], 64),
        rng.normal(0.0, 1.0, 256) ** 3,
        np.zeros(256),
        rng.uniform(-1.0, 1.0, 232) * 1e-3,
    ]).astype(np.float32)
    y[256 * 3 + 5] = 1.0
    return y


def mean_sequence(n):
    i = np.arange(n, dtype=np.uint64)
    h = (i * np.uint64(2654435761)) % np.uint64(1 << 32)
    return ((h >> np.uint64(8)).astype(np.float64) * 2.0**-24).astype(np.float32)


def quantize_case(t, blocksize, double, with_dequant):
    packed, qs = F.quantize_4bit(t, blocksize=blocksize, compress_statistics=double, quant_type="nf4")
    out = {"packed": packed, "absmax": qs.absmax}
    if double:
        out["offset"] = qs.offset.reshape(1).float()
        out["nested_absmax"] = qs.state2.absmax
        out["code"] = qs.state2.code
        assert qs.state2.blocksize == 256
    if with_dequant:
        dq = F.dequantize_4bit(packed, qs)
        # bnb's CPU kernel returns a 1-D input as [1, n].
        assert dq.dtype == torch.float32 and dq.numel() == t.numel()
        dq = dq.reshape(t.shape)
        out["dequant"] = dq
    return out


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    tensors = {}

    x = torch.from_numpy(weight())
    z = np.zeros(160, np.float32)
    z[:64] = rng.normal(0.0, 0.5, 64)
    z = torch.from_numpy(z)
    tensors["x"] = x
    tensors["z"] = z
    tensors["dynamic_map"] = F.create_dynamic_map()
    cases = {
        "plain64": (x, 64, False, True),
        "double64": (x, 64, True, False),
        "double32": (x, 32, True, True),
        "zplain": (z, 64, False, True),
        "zdouble": (z, 64, True, True),
    }
    for name, args in cases.items():
        for k, v in quantize_case(*args).items():
            tensors[f"{name}.{k}"] = v
    assert tensors["zplain.absmax"][1].item() == 0.0
    assert tensors["zplain.absmax"][2].item() == torch.tensor(1e-38).item()  # the clamped last block

    y = torch.from_numpy(blockwise_input())
    qy, sy = F.quantize_blockwise(y, blocksize=256)
    tensors["bw.input"] = y
    tensors["bw.q"] = qy
    tensors["bw.absmax"] = sy.absmax

    lens = list(range(1, 41)) + [63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 2047, 2048,
                                 2049, 4095, 4096, 4097, 8191, 8192, 8193, 8200, 16383, 16384, 16385, 20000,
                                 32767, 32768, 40000, 131072, 262144, 300001]
    seq = torch.from_numpy(mean_sequence(max(lens)))
    tensors["mean.len"] = torch.tensor(lens, dtype=torch.int32)
    tensors["mean.value"] = torch.stack([seq[:n].mean() for n in lens])

    # A pre-quantised checkpoint: Linear4bit quantises its bf16 weight when moved to the CPU.
    w = (torch.randn(16, 200, generator=torch.Generator().manual_seed(7)) * 0.05).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(200, 16, bias=False, compress_statistics=True, quant_type="nf4",
                            compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin = lin.to("cpu")
    assert lin.weight.bnb_quantized
    tensors["linear.input"] = w
    sd = {PREFIX + k: v.contiguous() for k, v in lin.state_dict().items()}
    qs = lin.weight.quant_state
    tensors["linear.expected_bf16"] = F.dequantize_4bit(lin.weight.data, qs)
    assert tensors["linear.expected_bf16"].dtype == torch.bfloat16
    qs32 = F.QuantState.from_dict({k[len(PREFIX) + len("weight."):]: v for k, v in sd.items()
                                   if k != PREFIX + "weight"}, device="cpu")
    qs32.dtype = torch.float32
    tensors["linear.expected"] = F.dequantize_4bit(sd[PREFIX + "weight"], qs32)
    assert tensors["linear.expected"].dtype == torch.float32

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT_DIR, "nf4.safetensors"), metadata={"format": "pt"})
    save_file(sd, os.path.join(OUT_DIR, "bnb_linear.safetensors"), metadata={"format": "pt"})

    print(f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}), "
          f"bitsandbytes {bnb.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    meta = json.loads(bytes(sd[PREFIX + "weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    print("checkpoint quant_state:", meta)
    h = hashlib.sha256()
    total = 0
    for name in ("nf4.safetensors", "bnb_linear.safetensors"):
        data = open(os.path.join(OUT_DIR, name), "rb").read()
        total += len(data)
        h.update(data)
        print(f"{name}: {len(data)} bytes")
    print(f"total {total} bytes, sha256 {h.hexdigest()}")


if __name__ == "__main__":
    main()
