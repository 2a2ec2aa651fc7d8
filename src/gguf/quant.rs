//! Quantisation of f32 rows to the ggml types loratune writes: F32, F16, BF16, Q8_0, Q4_0.
//!
//! Every kernel reproduces the reference arithmetic bit for bit (checked against gguf-py 0.19.0's `quants.py`,
//! itself bit-exact with ggml's `quantize_row_*_ref`, by `tests::quantisers_match_gguf_py_bit_for_bit` on the
//! committed fixture from `scripts/reference/gguf_quant_fixture.py`):
//!
//! | type | per block of 32 | encoding |
//! |------|-----------------|----------|
//! | F16  | — | IEEE binary16, round to nearest even (numpy `astype(float16)`) |
//! | BF16 | — | top 16 bits of the f32 rounded to nearest even; NaN forced quiet (`ggml_compute_fp32_to_bf16`) |
//! | Q8_0 | `d = max|x| / 127`, `q = round_half_away(x · (1/d))` | `d: f16`, `qs: [i8; 32]` |
//! | Q4_0 | `m` = the element of largest magnitude (first one on ties), `d = m / −8`, `q = min(15, trunc(x · (1/d) + 8.5))` | `d: f16`, `qs: [u8; 16]`: element j in the low nibble of byte j, element 16 + j in the high nibble |
//!
//! All arithmetic is f32, in the reference's order (`1/d` once per block, then one product per element).

use half::f16;
use rayon::prelude::*;

use super::types::GgmlType;

/// The types [`quantize`] produces.
pub const QUANTISABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

/// Elements handled per rayon task.
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// f32 → bf16 bits as ggml does it: quiet NaNs, round to nearest even.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 0x40) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1) as u64)) >> 16) as u16
}

/// f32 → f16 bits, round to nearest even (IEEE; numpy's `astype(np.float16)`).
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

fn block_f32(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

fn block_f16(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16_bits(*x).to_le_bytes());
    }
}

fn block_bf16(src: &[f32], out: &mut [u8]) {
    for (x, o) in src.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
    }
}

fn block_q8_0(src: &[f32], out: &mut [u8]) {
    let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    for (x, o) in src.iter().zip(out[2..].iter_mut()) {
        // f32::round rounds half away from zero, like C's roundf and gguf-py's np_roundf.
        *o = ((x * id).round() as i8) as u8;
    }
}

fn block_q4_0(src: &[f32], out: &mut [u8]) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &x in src {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    let d = max / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
    let q = |x: f32| -> u8 {
        // trunc(x·id + 8.5) lies in [0, 16.5]; the reference clamps to 15. NaN → 0 (as the u8 cast of numpy).
        let v = (x * id + 8.5).trunc();
        if v.is_nan() || v <= 0.0 {
            0
        } else {
            (v as u32).min(15) as u8
        }
    };
    let half = src.len() / 2;
    for j in 0..half {
        out[2 + j] = q(src[j]) | (q(src[half + j]) << 4);
    }
}

/// Quantise `data` (whole rows of `row_len` elements, row-major) to `ty`.
///
/// Errors (as a message without file context) when `ty` is not in [`QUANTISABLE`] or the row length is not a
/// multiple of the type's block size.
pub fn quantize(ty: GgmlType, data: &[f32], row_len: usize) -> Result<Vec<u8>, String> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let kernel: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => block_f32,
        GgmlType::F16 => block_f16,
        GgmlType::BF16 => block_bf16,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4_0 => block_q4_0,
        other => {
            return Err(format!(
                "loratune cannot write ggml type {other} (it writes {})",
                QUANTISABLE
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    if row_len == 0 || !row_len.is_multiple_of(bs) || !data.len().is_multiple_of(row_len) {
        return Err(format!(
            "{} values in rows of {row_len} cannot be stored as {ty} (blocks of {bs} elements)",
            data.len()
        ));
    }
    let n_blocks = data.len() / bs;
    let mut out = vec![0u8; n_blocks * ts];
    let blocks_per_task = (ELEMENTS_PER_TASK / bs).max(1);
    let run = |(s, o): (&[f32], &mut [u8])| {
        for (sb, ob) in s.chunks_exact(bs).zip(o.chunks_exact_mut(ts)) {
            kernel(sb, ob);
        }
    };
    if n_blocks <= blocks_per_task {
        run((data, &mut out));
    } else {
        data.par_chunks(blocks_per_task * bs)
            .zip(out.par_chunks_mut(blocks_per_task * ts))
            .for_each(run);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequant::dequantize;

    /// Hand-computed Q8_0 block: max |x| = 2.54 → d = 0.02, q = x / 0.02 rounded half away from zero.
    #[test]
    fn q8_0_by_hand() {
        let mut x = vec![0f32; 32];
        x[0] = 2.54; // → 127
        x[1] = -1.27; // ≈ −63.5 after the f32 product: the reference formula decides the tie
        x[2] = 0.01; // ≈ 0.5
        x[3] = -0.004; // ≈ −0.2 → 0
        let q = quantize(GgmlType::Q8_0, &x, 32).unwrap();
        assert_eq!(q.len(), 34);
        let d = f16::from_bits(u16::from_le_bytes([q[0], q[1]])).to_f32();
        assert_eq!(d, f16::from_f32(2.54f32 / 127.0).to_f32());
        let id = 1.0 / (2.54f32 / 127.0);
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, (-1.27f32 * id).round() as i8);
        assert_eq!(q[4] as i8, (0.01f32 * id).round() as i8);
        assert_eq!(q[5] as i8, 0);
        // All-zero block: d = 0, q = 0.
        let z = quantize(GgmlType::Q8_0, &[0f32; 32], 32).unwrap();
        assert!(z.iter().all(|&b| b == 0));
    }

    /// Q4_0: the signed element of largest magnitude maps to q = 0 (d = m/−8), zero to 8.
    #[test]
    fn q4_0_by_hand() {
        let mut x = vec![0f32; 32];
        x[5] = -4.0; // largest magnitude → d = 0.5, q = trunc(−4/0.5 + 8.5) = trunc(0.5) = 0
        x[17] = 3.0; // d = −4/−8 = 0.5, id = 2: 3·2 + 8.5 = 14.5 → 14
        x[20] = -3.9; // −7.8 + 8.5 = 0.7 → 0
        let q = quantize(GgmlType::Q4_0, &x, 32).unwrap();
        assert_eq!(
            f16::from_bits(u16::from_le_bytes([q[0], q[1]])).to_f32(),
            0.5
        );
        let nib = |i: usize| {
            if i < 16 {
                q[2 + i] & 15
            } else {
                q[2 + i - 16] >> 4
            }
        };
        assert_eq!(nib(5), 0);
        assert_eq!(nib(17), 14);
        assert_eq!(nib(20), 0);
        assert_eq!(nib(0), 8);
        // A positive maximum gives a negative d.
        let mut y = vec![0f32; 32];
        y[0] = 8.0;
        let qy = quantize(GgmlType::Q4_0, &y, 32).unwrap();
        assert_eq!(
            f16::from_bits(u16::from_le_bytes([qy[0], qy[1]])).to_f32(),
            -1.0
        );
        assert_eq!(qy[2] & 15, 0); // 8·(−1) + 8.5 = 0.5 → 0
    }

    #[test]
    fn bf16_rounding_and_nan() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is exactly half-way between two bf16 values: ties to even (down).
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is half-way too: ties to even (up).
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
    }

    /// Quantise → dequantise stays within the type's step: Q8_0 error ≤ d/2, Q4_0 ≤ |d| (its range is
    /// asymmetric), each plus the effect of storing d as f16 (relative 2^-11, times the largest |q|).
    #[test]
    fn round_trip_error_bounds() {
        let x: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        for (ty, slack) in [
            (GgmlType::Q8_0, 0.5f32 + 127.0 / 2048.0),
            (GgmlType::Q4_0, 1.0 + 16.0 / 2048.0),
        ] {
            let q = quantize(ty, &x, 256).unwrap();
            let back = dequantize(ty, &q, x.len()).unwrap();
            for (b, (xs, bs)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let ts = ty.type_size();
                let d = f16::from_bits(u16::from_le_bytes([q[b * ts], q[b * ts + 1]]))
                    .to_f32()
                    .abs();
                for (a, c) in xs.iter().zip(bs) {
                    assert!(
                        (a - c).abs() <= d * slack * 1.001 + 1e-6,
                        "{ty} {a} {c} d={d}"
                    );
                }
            }
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let q = quantize(ty, &x, 256).unwrap();
            let back = dequantize(ty, &q, x.len()).unwrap();
            let rel = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 1.0 / 2048.0,
                _ => 1.0 / 256.0,
            };
            for (a, c) in x.iter().zip(&back) {
                assert!((a - c).abs() <= a.abs() * rel, "{ty} {a} {c}");
            }
        }
    }

    /// Bit-exact against gguf-py 0.19.0 (`scripts/reference/gguf_quant_fixture.py`): random rows at four scales
    /// and edge cases (zero blocks, .5 ties, equal magnitudes of opposite sign, f16 subnormals and overflow,
    /// bf16 halfway values).
    #[test]
    fn quantisers_match_gguf_py_bit_for_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf/quant_reference.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let input = st.tensor("input").unwrap();
        let cols = input.shape()[1];
        let x: Vec<f32> = input
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (name, ty) in [
            ("f16", GgmlType::F16),
            ("bf16", GgmlType::BF16),
            ("q8_0", GgmlType::Q8_0),
            ("q4_0", GgmlType::Q4_0),
        ] {
            let expect = st.tensor(name).unwrap();
            let got = quantize(ty, &x, cols).unwrap();
            assert_eq!(got.len(), expect.data().len(), "{name}");
            let row_bytes = expect.shape()[1];
            for (r, (g, e)) in got
                .chunks(row_bytes)
                .zip(expect.data().chunks(row_bytes))
                .enumerate()
            {
                if let Some(i) = g.iter().zip(e).position(|(a, b)| a != b) {
                    panic!(
                        "{name}: row {r} differs from gguf-py at byte {i}: {} vs {}",
                        g[i], e[i]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_and_types_are_errors() {
        assert!(quantize(GgmlType::Q8_0, &[0.0; 48], 48)
            .unwrap_err()
            .contains("blocks of 32"));
        assert!(quantize(GgmlType::Q4_K, &[0.0; 256], 256)
            .unwrap_err()
            .contains("cannot write"));
        assert!(quantize(GgmlType::F32, &[0.0; 5], 2).is_err());
    }
}
