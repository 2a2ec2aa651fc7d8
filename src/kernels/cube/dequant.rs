//! Dequantization of GGUF blocks on CubeCL runtimes: rows of a quantized matrix whose blocks are resident on the
//! device as a little-endian `u32` buffer, one unit per element, into a dense tensor of the compute dtype.
//!
//! The arithmetic is the host reference's (`src/gguf/dequant.rs`), in the same order and in f32: the f16 scales are
//! widened exactly from their bits ([`f16_at`]), then the same products and sums, so the f32 result equals
//! `QMatrix::dequant_rows` bit for bit; the store into f16 / bf16 is one rounding cast.
//!
//! NF4 (bitsandbytes, [`dequant_nf4`]): the packed codes as the same `u32` buffer, and a second, f32 buffer holding
//! the 16 code values followed by each block's absmax (resolved on the host at upload); the value is the single
//! f32 product `NF4_CODE[code] · absmax[block]`, exactly the host's `c · scale`.
//!
//! FMA contraction: NVRTC contracts `a·b + c` into a fused multiply-add by default, which rounds once where the
//! host rounds twice. Products that are then added to pass through [`opaque`] (an integer OR with a run-time zero
//! that no compiler can see through), so each is rounded on its own as on the host.

use cubecl::prelude::*;

use crate::gguf::GgmlType;

/// The kernel's compile-time type codes.
pub const Q8_0: u32 = 0;
pub const Q4_0: u32 = 1;
pub const Q4_1: u32 = 2;
pub const Q4_K: u32 = 3;
pub const Q5_K: u32 = 4;
pub const Q6_K: u32 = 5;

/// The kernel's code of a GGUF type (`None`: not dequantized on the device).
pub fn type_code(ty: GgmlType) -> Option<u32> {
    match ty {
        GgmlType::Q8_0 => Some(Q8_0),
        GgmlType::Q4_0 => Some(Q4_0),
        GgmlType::Q4_1 => Some(Q4_1),
        GgmlType::Q4_K => Some(Q4_K),
        GgmlType::Q5_K => Some(Q5_K),
        GgmlType::Q6_K => Some(Q6_K),
        _ => None,
    }
}

/// Byte `off` of the little-endian `u32` buffer.
#[cube]
fn byte_at(w: &Tensor<u32>, off: usize) -> u32 {
    (w[off / 4] >> (u32::cast_from(off % 4) * 8)) & 0xFF
}

/// The little-endian f16 at byte `off`, widened to f32 exactly (subnormals, signed zeros and infinities included).
#[cube]
fn f16_at(w: &Tensor<u32>, off: usize) -> f32 {
    let h = byte_at(w, off) | (byte_at(w, off + 1) << 8);
    let sign = (h >> 15) << 31;
    let e = (h >> 10) & 0x1F;
    let m = h & 0x3FF;
    let mut bits = sign | ((e + 112) << 23) | (m << 13);
    if e == 0 {
        bits = sign;
        if m != 0 {
            // m·2^-24: m is exact in f32; lowering the exponent field by 24 divides by 2^24 (still normal).
            bits = sign | (u32::reinterpret(f32::cast_from(m)) - 0x0C00_0000);
        }
    } else if e == 31 {
        bits = sign | 0x7F80_0000 | (m << 13);
    }
    f32::reinterpret(bits)
}

/// `x` unchanged, behind an integer operation with a run-time zero: a product passed through here is rounded on
/// its own, never contracted with the following addition into a fused multiply-add.
#[cube]
fn opaque(x: f32, zero: u32) -> f32 {
    f32::reinterpret(u32::reinterpret(x) | zero)
}

/// A signed byte.
#[cube]
fn signed(b: u32) -> i32 {
    let mut v = i32::cast_from(b);
    if v >= 128 {
        v -= 256;
    }
    v
}

/// The 6-bit scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes at `s`.
#[cube]
fn scale_min_k4(w: &Tensor<u32>, s: usize, j: usize) -> (u32, u32) {
    let mut sc = byte_at(w, s + j) & 63;
    let mut mn = byte_at(w, s + j + 4) & 63;
    if j >= 4 {
        sc = (byte_at(w, s + j + 4) & 0x0F) | ((byte_at(w, s + j - 4) >> 6) << 4);
        mn = (byte_at(w, s + j + 4) >> 4) | ((byte_at(w, s + j) >> 6) << 4);
    }
    (sc, mn)
}

/// Nibble `half` (0: low, 1: high) of `byte`.
#[cube]
fn nibble(byte: u32, half: usize) -> u32 {
    (byte >> (u32::cast_from(half) * 4)) & 0x0F
}

/// Element `i` of the block at byte `base`, as the host reference computes it.
#[cube]
fn decode(w: &Tensor<u32>, base: usize, i: usize, zero: u32, #[comptime] ty: u32) -> f32 {
    if comptime!(ty == Q8_0) {
        // x = q·d
        let d = f16_at(w, base);
        f32::cast_from(signed(byte_at(w, base + 2 + i))) * d
    } else if comptime!(ty == Q4_0) {
        // x = d·(q − 8); element j: low nibble of qs[j], element 16 + j: high nibble.
        let d = f16_at(w, base);
        let q = nibble(byte_at(w, base + 2 + i % 16), i / 16);
        d * f32::cast_from(i32::cast_from(q) - 8)
    } else if comptime!(ty == Q4_1) {
        // x = d·q + m
        let d = f16_at(w, base);
        let m = f16_at(w, base + 2);
        let q = nibble(byte_at(w, base + 4 + i % 16), i / 16);
        opaque(d * f32::cast_from(q), zero) + m
    } else if comptime!(ty == Q4_K || ty == Q5_K) {
        // x = (d·sc_j)·q − dmin·m_j over sub-blocks j of 32; Q5_K adds bit j of qh[l] as bit 4 of q.
        let d = f16_at(w, base);
        let dmin = f16_at(w, base + 2);
        let j = i / 32;
        let l = i % 32;
        let (sc, mn) = scale_min_k4(w, base + 4, j);
        let d1 = d * f32::cast_from(sc);
        let m1 = dmin * f32::cast_from(mn);
        // qs after the scales (Q4_K) or after the scales and qh (Q5_K).
        let qs = comptime!(if ty == Q4_K { 16usize } else { 48usize });
        let mut q = nibble(byte_at(w, base + qs + 32 * (j / 2) + l), j % 2);
        if comptime!(ty == Q5_K) {
            q |= ((byte_at(w, base + 16 + l) >> u32::cast_from(j)) & 1) << 4;
        }
        opaque(d1 * f32::cast_from(q), zero) - opaque(m1, zero)
    } else {
        // Q6_K: x = (d·sc)·(q − 32), ql / qh / scales / d, per 16 elements one signed scale.
        let h = i / 128;
        let e = i % 128;
        // Elements 0..64 of a half: low nibbles of ql[e]; 64..128: high nibbles of ql[e − 64].
        let low = nibble(byte_at(w, base + 64 * h + e % 64), e / 64);
        let high = (byte_at(w, base + 128 + 32 * h + e % 32) >> (u32::cast_from(e / 32) * 2)) & 3;
        let q = i32::cast_from(low | (high << 4)) - 32;
        let s = signed(byte_at(w, base + 192 + i / 16));
        let d = f16_at(w, base + 208);
        (d * f32::cast_from(s)) * f32::cast_from(q)
    }
}

/// `out[p]` = element p of the rows starting at block `block0` (rows are whole numbers of blocks, so the rows'
/// elements are consecutive blocks' elements). `zero` must be 0 (see [`opaque`]).
#[cube(launch)]
pub fn dequant_rows<F: Float>(
    words: &Tensor<u32>,
    out: &mut Tensor<F>,
    block0: u32,
    zero: u32,
    #[comptime] ty: u32,
    #[comptime] block: usize,
    #[comptime] bytes: usize,
) {
    let p = ABSOLUTE_POS;
    if p >= out.len() {
        terminate!();
    }
    let base = (block0 as usize + p / block) * bytes;
    out[p] = F::cast_from(decode(words, base, p % block, zero, ty));
}

/// The entries before the per-block absmax values in an NF4 matrix's f32 buffer: the 16 code values.
pub const NF4_TABLE: usize = 16;

/// NF4: `out[p]` = element `start + p` of the flattened matrix (any start: rows need not begin on a block or a
/// byte). `packed` holds two 4-bit codes per byte, element `2i` in the high nibble of byte `i`; `table` holds the
/// 16 code values (`NF4_CODE`), then the absmax of each block of `block` elements. The value is
/// `NF4_CODE[code] · absmax[block]`, one f32 rounding as on the host, then one rounding cast to `F`.
#[cube(launch)]
pub fn dequant_nf4<F: Float>(
    packed: &Tensor<u32>,
    table: &Tensor<f32>,
    out: &mut Tensor<F>,
    start: u32,
    #[comptime] block: usize,
) {
    let p = ABSOLUTE_POS;
    if p >= out.len() {
        terminate!();
    }
    let e = start as usize + p;
    // Even elements in the high nibble (half 1), odd ones in the low nibble (half 0).
    let code = nibble(byte_at(packed, e / 2), 1 - e % 2);
    let c = table[code as usize];
    let scale = table[16 + e / block]; // NF4_TABLE + block
    out[p] = F::cast_from(c * scale);
}
