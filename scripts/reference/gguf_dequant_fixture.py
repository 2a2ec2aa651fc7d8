#!/usr/bin/env python3
"""Build the GGUF dequantisation / metadata fixture used by `src/gguf/tests.rs`.

Writes (small, committed):
  tests/fixtures/gguf/dequant.gguf                  GGUF v3 written by gguf-py's GGUFWriter, alignment 64, with
                                                    one tensor per ggml type loratune dequantises plus metadata
                                                    of every value type (nested arrays included)
  tests/fixtures/gguf/dequant_expected.safetensors  the f32 values gguf-py's `gguf.quants.dequantize` gives for
                                                    each tensor (same names, torch-order shapes)

Tensors: for Q8_0 / Q4_0 / Q4_1 / BF16 both `<type>_quant` (random normal data quantised by gguf-py's
reference quantiser) and `<type>_raw` (uniformly random block bytes with finite f16 scales, so every bit
pattern of the quants is exercised); Q4_K / Q5_K / Q6_K have no quantiser in gguf-py, so only `_raw`.
F32 / F16 are plain random values.

Pinned versions: gguf 0.19.0, numpy (any recent), safetensors 0.8.0 — run with /work/venv/bin/python:
  /work/venv/bin/python scripts/reference/gguf_dequant_fixture.py
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
rng = np.random.default_rng(20240611)


def random_f16(n, lo=-2.0, hi=2.0):
    """n finite f16 values (as raw bytes), magnitudes that keep the products well inside f32 range."""
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def raw_blocks(qtype, rows, cols):
    """Random block bytes for `rows x cols` elements of qtype, with the f16 scale fields overwritten by finite
    values (random bytes there could be NaN/inf)."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // bs
    b = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if qtype in (T.Q8_0, T.Q4_0):
        b[:, 0:2] = random_f16(n_blocks)
    elif qtype == T.Q4_1:
        b[:, 0:2] = random_f16(n_blocks)
        b[:, 2:4] = random_f16(n_blocks)
    elif qtype in (T.Q4_K, T.Q5_K):
        b[:, 0:2] = random_f16(n_blocks, -0.1, 0.1)  # d
        b[:, 2:4] = random_f16(n_blocks, -0.1, 0.1)  # dmin
    elif qtype == T.Q6_K:
        b[:, 208:210] = random_f16(n_blocks, -0.1, 0.1)  # d is last
    else:
        raise ValueError(qtype)
    return b.reshape(rows, cols // bs * ts)


def main():
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "dequant.gguf")
    w = gguf.GGUFWriter(path, arch="dequant-test")
    w.add_custom_alignment(64)

    # Metadata of every value type (the Rust test asserts these exact values).
    w.add_key_value("test.u8", 200, V.UINT8)
    w.add_key_value("test.i8", -100, V.INT8)
    w.add_key_value("test.u16", 60000, V.UINT16)
    w.add_key_value("test.i16", -30000, V.INT16)
    w.add_key_value("test.u32", 4000000000, V.UINT32)
    w.add_key_value("test.i32", -2000000000, V.INT32)
    w.add_key_value("test.u64", 2**63 + 5, V.UINT64)
    w.add_key_value("test.i64", -(2**62), V.INT64)
    w.add_key_value("test.f32", 0.1, V.FLOAT32)
    w.add_key_value("test.f64", 0.1, V.FLOAT64)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.string", "héllo ✓", V.STRING)
    w.add_key_value("test.array_i32", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.array_str", ["a", "", "ü"], V.ARRAY, sub_type=V.STRING)
    w.add_key_value("test.nested", [["x", "y"], ["z"]], V.ARRAY)
    w.add_key_value("test.nested_f32", [[0.5], [1.5, -2.0]], V.ARRAY)

    expected = {}

    def put(name, qtype, data_bytes_or_array):
        if qtype in (T.F32, T.F16):
            arr = data_bytes_or_array
            w.add_tensor(name, arr)
            expected[name] = arr.astype(np.float32)
        else:
            b = data_bytes_or_array
            w.add_tensor(name, b, raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(b, qtype).astype(np.float32)

    rows = 3
    put("f32", T.F32, rng.standard_normal((rows, 40)).astype(np.float32))
    put("f16", T.F16, rng.standard_normal((rows, 40)).astype(np.float16))
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    put("bf16_quant", T.BF16, gguf.quants.quantize(x, T.BF16))
    put("bf16_raw", T.BF16, rng.integers(0, 256, size=(rows, 96 * 2), dtype=np.uint8) & np.tile(np.array([0xFF, 0xBF], dtype=np.uint8), (rows, 96)))
    for qt in (T.Q8_0, T.Q4_0, T.Q4_1):
        put(f"{qt.name.lower()}_quant", qt, gguf.quants.quantize(rng.standard_normal((rows, 96)).astype(np.float32), qt))
        put(f"{qt.name.lower()}_raw", qt, raw_blocks(qt, rows, 96))
    for qt in (T.Q4_K, T.Q5_K, T.Q6_K):
        put(f"{qt.name.lower()}_raw", qt, raw_blocks(qt, rows, 512))
    # A 1-D tensor and a 3-D one, to check the dims order (torch shape = reversed GGUF dims).
    put("q8_0_1d", T.Q8_0, gguf.quants.quantize(rng.standard_normal((64,)).astype(np.float32), T.Q8_0))
    put("f32_3d", T.F32, rng.standard_normal((2, 3, 4)).astype(np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    for k, v in expected.items():
        assert np.all(np.isfinite(v)), k
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, os.path.join(OUT, "dequant_expected.safetensors"))

    # Cross-check with gguf-py's own reader: what it reads back is what we expect.
    r = gguf.GGUFReader(path)
    for t in r.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(got.reshape(expected[t.name].shape), expected[t.name])
    print(f"wrote {path} ({os.path.getsize(path)} bytes) with {len(expected)} tensors")


if __name__ == "__main__":
    sys.exit(main())
