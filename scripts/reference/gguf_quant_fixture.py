#!/usr/bin/env python3
"""Reference bytes for loratune's GGUF quantisers (`src/gguf/quant.rs`, test
`quantisers_match_gguf_py_bit_for_bit`).

Writes tests/fixtures/gguf/quant_reference.safetensors (small, committed):
  input   F32 [R, 256]   rows of test data (random normals at several scales plus hand-made edge cases:
                         all-zero blocks, a lone non-zero, exact .5 ties after scaling, equal magnitudes of
                         opposite sign, f16 subnormals and overflow, bf16 rounding ties)
  f16     U8  [R, 512]   numpy `astype(np.float16)` bytes (what gguf-py's `quantize(.., F16)` does)
  bf16    U8  [R, 512]   gguf-py `gguf.quants.quantize(.., BF16)`
  q8_0    U8  [R, 272]   gguf-py `gguf.quants.quantize(.., Q8_0)`  (bit-exact with ggml's quantize_row_q8_0_ref)
  q4_0    U8  [R, 144]   gguf-py `gguf.quants.quantize(.., Q4_0)`  (bit-exact with ggml's quantize_row_q4_0_ref)

Pinned: gguf 0.19.0 (the venv's; the same quants.py is vendored in llama-cpp-python 0.3.36), numpy, safetensors.
  /work/venv/bin/python scripts/reference/gguf_quant_fixture.py
"""
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "quant_reference.safetensors")
COLS = 256
rng = np.random.default_rng(8_2024)


def rows():
    out = []
    for scale in (1e-3, 0.02, 1.0, 30.0):
        out.extend(rng.normal(0.0, scale, size=(3, COLS)))
    # Edge cases, one row each (8 blocks of 32 per row).
    r = np.zeros(COLS)
    r[32 + 7] = -0.75  # block 1: a lone negative value
    r[64:96] = 1.0  # block 2: all equal
    r[96:128] = np.linspace(-1.0, 1.0, 32)  # block 3: symmetric, equal |min| = |max| (first one wins in Q4_0)
    r[128:160] = np.arange(-15.5, 16.5, 1.0)  # block 4: max 16.5 → Q8_0 ties after scaling
    r[160:192] = np.arange(32) - 16  # block 5: integers, max |x| = 16
    r[192:224] = rng.normal(0, 1, 32) * 1e-9  # block 6: tiny (d underflows f16)
    r[224:256] = rng.normal(0, 1, 32) * 1e7  # block 7: huge (d overflows f16)
    out.append(r)
    # Q8_0: max 127 → d = 1, id = 1: exact .5 ties round away from zero.
    t = np.tile(np.concatenate([[127.0], np.arange(-14.5, 16.5, 1.0)]), COLS // 32)
    out.append(t)
    # F16 / BF16 rounding: subnormals, overflow, halfway cases.
    h = np.concatenate([
        rng.uniform(-1, 1, 64) * 6e-5,  # f16 subnormal range
        np.array([65504.0, 65520.0, -65519.9, 7e4] * 4),  # f16 max, ties to inf, overflow
        1.0 + np.arange(48) / 256.0,  # bf16 halfway cases (1 + k·2^-8)
        rng.normal(0, 1, COLS - 64 - 16 - 48),
    ])
    out.append(h)
    return np.array(out, dtype=np.float32)


def main():
    x = rows()
    with np.errstate(over="ignore"):
        tensors = {
            "input": x,
            "f16": x.astype(np.float16).view(np.uint8),
            "bf16": gguf.quants.quantize(x, T.BF16),
            "q8_0": gguf.quants.quantize(x, T.Q8_0),
            "q4_0": gguf.quants.quantize(x, T.Q4_0),
        }
    for k, v in tensors.items():
        tensors[k] = np.ascontiguousarray(v)
        print(k, v.dtype, v.shape)
    save_file(tensors, OUT, metadata={"gguf": "0.19.0"})
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
