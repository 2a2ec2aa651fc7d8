//! Dequantisation of ggml blocks to f32.
//!
//! Block layouts follow ggml (`ggml-common.h` / `ggml-quants.c`) and gguf-py's `quants.py` (0.19.0); the
//! arithmetic is done in the same order as gguf-py's numpy code (f32 products, no fused multiply-add), so
//! results match it bit for bit:
//!
//! | type | block | bytes | layout |
//! |------|-------|-------|--------|
//! | Q8_0 | 32  | 34  | `d: f16`, `qs: [i8; 32]`; `x = d·q` |
//! | Q4_0 | 32  | 18  | `d: f16`, `qs: [u8; 16]` (element j: low nibble of qs[j], element 16+j: high nibble); `x = d·(q−8)` |
//! | Q4_1 | 32  | 20  | `d: f16`, `m: f16`, `qs` as Q4_0; `x = d·q + m` |
//! | Q4_K | 256 | 144 | `d, dmin: f16`, `scales: [u8; 12]` (8 six-bit scale/min pairs), `qs: [u8; 128]`; sub-block j (32 elements) uses nibble j%2 of bytes 32·(j/2)..; `x = (d·sc_j)·q − dmin·m_j` |
//! | Q5_K | 256 | 176 | as Q4_K plus `qh: [u8; 32]` before `qs`: bit j of qh[l] is bit 4 of element l of sub-block j |
//! | Q6_K | 256 | 210 | `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`; `x = (d·sc)·(q−32)` per 16 elements |

use half::f16;
use rayon::prelude::*;

use super::types::GgmlType;

/// Elements produced by one rayon task (keeps task overhead negligible).
const ELEMENTS_PER_TASK: usize = 1 << 16;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantise `src` (a whole number of blocks of `ty`) into `dst`, which must hold exactly the elements
/// those blocks encode. Errors (as a message without file context) for types we do not implement or
/// mismatched lengths.
pub fn dequantize_into(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !src.len().is_multiple_of(ts) || src.len() / ts * bs != dst.len() {
        return Err(format!(
            "{} bytes of {ty} do not decode to {} elements",
            src.len(),
            dst.len()
        ));
    }
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => block_f32,
        GgmlType::F16 => block_f16,
        GgmlType::BF16 => block_bf16,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q4_K => block_q4_k,
        GgmlType::Q5_K => block_q5_k,
        GgmlType::Q6_K => block_q6_k,
        other => {
            return Err(format!(
                "ggml type {other} cannot be dequantised by loratune (supported: {}); re-quantise the model to one of those (e.g. with llama.cpp's llama-quantize)",
                GgmlType::dequantisable_names()
            ))
        }
    };
    let blocks_per_task = (ELEMENTS_PER_TASK / bs).max(1);
    let (chunk_src, chunk_dst) = (ts * blocks_per_task, bs * blocks_per_task);
    let run = |(s, d): (&[u8], &mut [f32])| {
        for (sb, db) in s.chunks_exact(ts).zip(d.chunks_exact_mut(bs)) {
            kernel(sb, db);
        }
    };
    if dst.len() <= chunk_dst {
        run((src, dst));
    } else {
        src.par_chunks(chunk_src)
            .zip(dst.par_chunks_mut(chunk_dst))
            .for_each(run);
    }
    Ok(())
}

/// Dequantise into a new vector of `n_elements` floats.
pub fn dequantize(ty: GgmlType, src: &[u8], n_elements: usize) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, src, &mut out)?;
    Ok(out)
}

fn block_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn block_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn block_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
}

fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y[..32].iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = y[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        hi[j] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    let (lo, hi) = y[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = d * (qs[j] & 0x0F) as f32 + m;
        hi[j] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (j, out) in y[..256].chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (o, &byte) in out.iter_mut().zip(q) {
            *o = d1 * ((byte >> shift) & 0x0F) as f32 - m1;
        }
    }
}

fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (j, out) in y[..256].chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let v = ((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            out[l] = d1 * v as f32 - m1;
        }
    }
}

fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql[64 * half..64 * half + 64];
        let qh = &qh[32 * half..32 * half + 32];
        let out = &mut y[128 * half..128 * half + 128];
        for e in 0..128 {
            let low = if e < 64 {
                ql[e] & 0x0F
            } else {
                ql[e - 64] >> 4
            };
            let high = (qh[e % 32] >> (2 * (e / 32))) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let s = sc[(128 * half + e) / 16] as i8;
            out[e] = (d * s as f32) * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_by_hand() {
        let mut b = vec![];
        b.extend_from_slice(&h(0.5));
        for i in 0..32 {
            b.push((i as i8 - 16) as u8);
        }
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0_and_q4_1_nibble_order() {
        // qs[j] = j | (15-j)<<4: element j = j, element 16+j = 15-j.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut b0 = h(2.0).to_vec();
        b0.extend_from_slice(&qs);
        let y = dequantize(GgmlType::Q4_0, &b0, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(y[16 + j], 2.0 * ((15 - j) as f32 - 8.0));
        }
        let mut b1 = h(0.25).to_vec();
        b1.extend_from_slice(&h(-1.0));
        b1.extend_from_slice(&qs);
        let y = dequantize(GgmlType::Q4_1, &b1, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], 0.25 * j as f32 - 1.0);
            assert_eq!(y[16 + j], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q4_k_scale_unpacking_by_hand() {
        // Sub-block 5 (j >= 4): scale = low nibble of s[9] | top 2 bits of s[1] << 4; min = high nibble of
        // s[9] | top 2 bits of s[5] << 4.
        let mut s = [0u8; 12];
        s[9] = 0x3A; // scale low 0xA, min low 0x3
        s[1] = 0b10_000001; // scale high bits 0b10 (sub-block 1 scale = 1)
        s[5] = 0b01_000010; // min high bits 0b01 (sub-block 1 min = 2)
        assert_eq!(scale_min_k4(5, &s), (0xA | (0b10 << 4), 0x3 | (0b01 << 4)));
        assert_eq!(scale_min_k4(1, &s), (1, 2));
    }

    #[test]
    fn unsupported_type_and_bad_lengths_are_errors() {
        let e = dequantize(GgmlType::Q5_0, &[0u8; 22], 32).unwrap_err();
        assert!(e.contains("Q5_0") && e.contains("Q4_K"), "{e}");
        let e = dequantize(GgmlType::Q8_0, &[0u8; 33], 32).unwrap_err();
        assert!(e.contains("33 bytes"), "{e}");
    }

    #[test]
    fn parallel_path_matches_serial() {
        // Several tasks' worth of blocks so rayon splits the work.
        let n_blocks = ELEMENTS_PER_TASK / 32 * 3 + 7;
        let mut src = Vec::with_capacity(n_blocks * 34);
        for i in 0..n_blocks {
            src.extend_from_slice(&h(1.0 / (1 + i % 7) as f32));
            src.extend((0..32).map(|j| ((i * 31 + j * 7) % 256) as u8));
        }
        let par = dequantize(GgmlType::Q8_0, &src, n_blocks * 32).unwrap();
        let mut ser = vec![0f32; n_blocks * 32];
        for (s, d) in src.chunks_exact(34).zip(ser.chunks_exact_mut(32)) {
            block_q8_0(s, d);
        }
        assert_eq!(par, ser);
    }
}
