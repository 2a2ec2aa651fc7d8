//! Masked softmax attention on CubeCL runtimes (CUDA; wgpu in tests), FlashAttention-style: linear memory in the
//! sequence length, forward and backward.
//!
//! q `[b, nh, s, hd]`, k / v `[b, nkv, s, hd]` (RoPE already applied), contiguous, in the model's float type;
//! GQA reads the shared k / v of a query head's group without copies. The mask is computed on the fly from
//! per-token data (key validity, packed-sample ids) and the sliding window — never an `[s, s]` tensor. Gemma 2's
//! tanh soft-capping of the scores is supported.
//!
//! - forward: one unit per query row streams over its open keys with the online softmax (running max and sum,
//!   rescaled accumulator, all in f32) and writes the output row and the row's log-sum-exp (f32);
//! - backward: `delta = rowsum(dO ∘ O)` (one unit per query row); dq (one unit per query row, over its keys) and
//!   dk / dv (one unit per key row, over the query rows of its group that see it), each recomputing the
//!   probabilities `p = exp(score − lse)` — nothing quadratic is stored, and no atomics are needed.
//!
//! These are the unit-tile kernels: they run everywhere CubeCL does (lavapipe in CI included). Tensor-core tiles
//! are the next step on the GPU; these stay as their fallback and reference.
//!
//! A query row with no open key (only possible for a padding row whose own key is padding) gets a zero output;
//! such rows carry no gradient (padding positions never reach the loss).

use cubecl::prelude::*;

/// Whether key j is open to query i of the same batch row (causality is the caller's loop bound).
#[cube]
fn open_key(valid: &Tensor<i32>, seg: &Tensor<i32>, row0: usize, i: usize, j: usize) -> bool {
    valid[row0 + j] != 0 && seg[row0 + j] == seg[row0 + i]
}

/// The first key a query at position i may see under the window (0 without one).
#[cube]
fn first_key(i: u32, window: u32) -> u32 {
    let mut lo = 0u32;
    if window > 0 && i + 1 > window {
        lo = i + 1 - window;
    }
    lo
}

/// Query row r of `[b, nh, s, hd]`: its position i, where its kv head's k / v rows start, and the first token of
/// its batch row (for the per-token masking data).
#[cube]
fn query_row(
    r: usize,
    seq: u32,
    heads: u32,
    kv_heads: u32,
    #[comptime] hd: usize,
) -> (usize, usize, usize) {
    let s = seq as usize;
    let nh = heads as usize;
    let h = (r / s) % nh;
    let bi = r / (s * nh);
    let kvh = h / (nh / kv_heads as usize);
    (r % s, (bi * kv_heads as usize + kvh) * s * hd, bi * s)
}

/// The score of one (query, key) pair: scale·q·k, soft-capped; also returns tanh's value for the backward
/// (0 without capping).
#[cube]
fn score<F: Float>(
    q: &Array<f32>,
    k: &Tensor<F>,
    k0: usize,
    scale: f32,
    softcap: f32,
    #[comptime] hd: usize,
) -> (f32, f32) {
    let mut dot = 0.0f32;
    for d in 0..hd {
        dot += q[d] * f32::cast_from(k[k0 + d]);
    }
    let mut sc = dot * scale;
    let mut t = 0.0f32;
    if softcap > 0.0 {
        t = f32::tanh(sc / softcap);
        sc = softcap * t;
    }
    (sc, t)
}

#[cube(launch)]
pub fn attn_fwd<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    valid: &Tensor<i32>,
    seg: &Tensor<i32>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    heads: u32,
    kv_heads: u32,
    seq: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    #[comptime] hd: usize,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    let (i, kbase, row0) = query_row(r, seq, heads, kv_heads, hd);
    let mut qr = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    for d in 0..hd {
        qr[d] = f32::cast_from(q[r * hd + d]);
        acc[d] = 0.0f32;
    }
    // The running maximum starts at "minus infinity" (-3e38: WGSL has no infinity literals).
    let mut m = f32::new(-3.0e38);
    let mut l = 0.0f32;
    let lo = first_key(i as u32, window) as usize;
    for j in lo..i + 1 {
        if open_key(valid, seg, row0, i, j) {
            let (sc, _t) = score::<F>(&qr, k, kbase + j * hd, scale, softcap, hd);
            let m_new = select(sc > m, sc, m);
            let corr = f32::exp(m - m_new);
            let p = f32::exp(sc - m_new);
            l = l * corr + p;
            for d in 0..hd {
                acc[d] = acc[d] * corr + p * f32::cast_from(v[kbase + j * hd + d]);
            }
            m = m_new;
        }
    }
    let mut inv = 0.0f32;
    let mut row_lse = 0.0f32;
    if l > 0.0 {
        inv = f32::new(1.0) / l;
        row_lse = m + f32::ln(l);
    }
    for d in 0..hd {
        o[r * hd + d] = F::cast_from(acc[d] * inv);
    }
    lse[r] = row_lse;
}

/// delta = rowsum(dO ∘ O), f32.
#[cube(launch)]
pub fn attn_bwd_delta<F: Float>(
    d_o: &Tensor<F>,
    o: &Tensor<F>,
    delta: &mut Tensor<f32>,
    #[comptime] hd: usize,
) {
    let r = ABSOLUTE_POS;
    if r >= delta.len() {
        terminate!();
    }
    let mut acc = 0.0f32;
    for d in 0..hd {
        acc += f32::cast_from(d_o[r * hd + d]) * f32::cast_from(o[r * hd + d]);
    }
    delta[r] = acc;
}

/// dq, one unit per query row.
#[cube(launch)]
pub fn attn_bwd_dq<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    valid: &Tensor<i32>,
    seg: &Tensor<i32>,
    dq: &mut Tensor<F>,
    heads: u32,
    kv_heads: u32,
    seq: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    #[comptime] hd: usize,
) {
    let r = ABSOLUTE_POS;
    if r >= lse.len() {
        terminate!();
    }
    let (i, kbase, row0) = query_row(r, seq, heads, kv_heads, hd);
    let mut qr = Array::<f32>::new(hd);
    let mut dor = Array::<f32>::new(hd);
    let mut acc = Array::<f32>::new(hd);
    for d in 0..hd {
        qr[d] = f32::cast_from(q[r * hd + d]);
        dor[d] = f32::cast_from(d_o[r * hd + d]);
        acc[d] = 0.0f32;
    }
    let row_lse = lse[r];
    let dl = delta[r];
    let lo = first_key(i as u32, window) as usize;
    for j in lo..i + 1 {
        if open_key(valid, seg, row0, i, j) {
            let (sc, t) = score::<F>(&qr, k, kbase + j * hd, scale, softcap, hd);
            let p = f32::exp(sc - row_lse);
            let mut dp = 0.0f32;
            for d in 0..hd {
                dp += dor[d] * f32::cast_from(v[kbase + j * hd + d]);
            }
            let mut ds = p * (dp - dl);
            if softcap > 0.0 {
                ds *= f32::new(1.0) - t * t;
            }
            ds *= scale;
            for d in 0..hd {
                acc[d] += ds * f32::cast_from(k[kbase + j * hd + d]);
            }
        }
    }
    for d in 0..hd {
        dq[r * hd + d] = F::cast_from(acc[d]);
    }
}

/// dk and dv, one unit per key row: over the query heads of its group and the query positions that see it.
#[cube(launch)]
pub fn attn_bwd_dkdv<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    valid: &Tensor<i32>,
    seg: &Tensor<i32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    heads: u32,
    kv_heads: u32,
    seq: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    #[comptime] hd: usize,
) {
    let kr = ABSOLUTE_POS;
    let s = seq as usize;
    let nkv = kv_heads as usize;
    if kr >= dk.len() / hd {
        terminate!();
    }
    let nh = heads as usize;
    let g = nh / nkv;
    let t = kr % s;
    let kvh = (kr / s) % nkv;
    let bi = kr / (s * nkv);
    let row0 = bi * s;
    let mut kk = Array::<f32>::new(hd);
    let mut vv = Array::<f32>::new(hd);
    let mut dka = Array::<f32>::new(hd);
    let mut dva = Array::<f32>::new(hd);
    for d in 0..hd {
        kk[d] = f32::cast_from(k[kr * hd + d]);
        vv[d] = f32::cast_from(v[kr * hd + d]);
        dka[d] = 0.0f32;
        dva[d] = 0.0f32;
    }
    let mut hi = s;
    if window > 0 && t + (window as usize) < s {
        hi = t + window as usize;
    }
    for hh in 0..g {
        let h = kvh * g + hh;
        let qbase = (bi * nh + h) * s;
        for i in t..hi {
            if open_key(valid, seg, row0, i, t) {
                let qr = (qbase + i) * hd;
                let mut dot = 0.0f32;
                let mut dp = 0.0f32;
                for d in 0..hd {
                    dot += f32::cast_from(q[qr + d]) * kk[d];
                    dp += f32::cast_from(d_o[qr + d]) * vv[d];
                }
                let mut sc = dot * scale;
                let mut th = 0.0f32;
                if softcap > 0.0 {
                    th = f32::tanh(sc / softcap);
                    sc = softcap * th;
                }
                let p = f32::exp(sc - lse[qbase + i]);
                let mut ds = p * (dp - delta[qbase + i]);
                if softcap > 0.0 {
                    ds *= f32::new(1.0) - th * th;
                }
                ds *= scale;
                for d in 0..hd {
                    dva[d] += p * f32::cast_from(d_o[qr + d]);
                    dka[d] += ds * f32::cast_from(q[qr + d]);
                }
            }
        }
    }
    for d in 0..hd {
        dk[kr * hd + d] = F::cast_from(dka[d]);
        dv[kr * hd + d] = F::cast_from(dva[d]);
    }
}
