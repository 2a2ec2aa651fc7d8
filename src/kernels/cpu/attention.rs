//! Attention with RoPE as one autodiff node, in memory linear in the sequence length.
//!
//! Reads q `[b·s, nh·hd]` and k / v `[b·s, nkv·hd]` exactly as the projections produce them (column slices of a
//! fused projection too), applies rotate-half RoPE, computes `softmax(q·kᵀ·scale + mask)·v` per (batch, kv head)
//! pair — the g = nh/nkv query heads of a group share their k/v without copies — and writes `[b·s, nh·hd]`, the
//! layout o_proj reads. Queries go in blocks of [`BLOCK`] rows, in parallel; a block only multiplies against keys
//! up to its last row (the mask is causal), which skips most of the upper triangle, and holds its `[rows, keys]`
//! scores only while it runs. What is saved for the backward is linear in s: the rotated q / k, v, and per query
//! row the softmax's maximum and inverse sum (FlashAttention's log-sum-exp, split in two so that the backward
//! rebuilds the forward's probabilities bit for bit). The backward recomputes each block's probabilities, then
//! dv = Pᵀ·dO, dS = P ∘ (dO·vᵀ − rowsum(P ∘ dO·vᵀ)), dq = scale·dS·k, dk = scale·dSᵀ·q, and applies the transposed
//! rotation to dq / dk.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::Flex;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::simd::{self, simd_fn};
use super::{flex_f32, Cpu, Rows};
use crate::kernels::{prof, AttnSpec, Masking, Qkv};

/// Query rows per block.
pub const BLOCK: usize = 64;

thread_local! {
    /// A block's scores, per thread (the forward).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

simd_fn! {
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
        let half = cos.len();
        for c in 0..half {
            let (x1, x2) = (x[c], x[c + half]);
            y[c] = x1 * cos[c] - x2 * sin[c];
            y[c + half] = x2 * cos[c] + x1 * sin[c];
        }
        let rot = 2 * half;
        y[rot..].copy_from_slice(&x[rot..]);
    }
}

simd_fn! {
    fn unrope_row(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
        let half = cos.len();
        for c in 0..half {
            let (d1, d2) = (dy[c], dy[c + half]);
            dx[c] = d1 * cos[c] + d2 * sin[c];
            dx[c + half] = d2 * cos[c] - d1 * sin[c];
        }
        let rot = 2 * half;
        dx[rot..].copy_from_slice(&dy[rot..]);
    }
}

simd_fn! {
    /// Masked softmax in place; returns the row's maximum and inverse sum for [`replay_softmax_row`].
    fn softmax_row(row: &mut [f32], blocked: &[bool]) -> RowStat {
        for (v, &b) in row.iter_mut().zip(blocked) {
            if b {
                *v = f32::NEG_INFINITY;
            }
        }
        let m = simd::max(row);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            return RowStat { max: m, inv_sum: 0.0 };
        }
        let s = simd::exp_shift_sum(row, m);
        let inv = 1.0 / s;
        for v in row.iter_mut() {
            *v *= inv;
        }
        RowStat { max: m, inv_sum: inv }
    }
}

simd_fn! {
    /// [`softmax_row`] with the recorded maximum and inverse sum: the same probabilities, bit for bit.
    fn replay_softmax_row(row: &mut [f32], blocked: &[bool], st: RowStat) {
        if st.max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        for (v, &b) in row.iter_mut().zip(blocked) {
            if b {
                *v = f32::NEG_INFINITY;
            }
        }
        simd::exp_shift_sum(row, st.max);
        for v in row.iter_mut() {
            *v *= st.inv_sum;
        }
    }
}

simd_fn! {
    fn dsoftmax_row(p: &[f32], dp: &mut [f32]) {
        let d = simd::dot(p, dp);
        for (x, &pv) in dp.iter_mut().zip(p) {
            *x = pv * (*x - d);
        }
    }
}

/// Everything the backward needs, per (batch, kv head) task; the task's g query heads are interleaved
/// token-major (`[s, g, hd]`), so a block of query rows of all g heads is one matrix. Linear in the sequence
/// length: the probabilities are recomputed block by block from the row maxima and inverse sums.
#[derive(Debug)]
struct Saved {
    spec: AttnSpec,
    /// Rotated q `[b, nkv, s, g, hd]`.
    qr: Vec<f32>,
    /// Rotated k `[b, nkv, s, hd]`.
    kr: Vec<f32>,
    /// v `[b, nkv, s, hd]`.
    v: Vec<f32>,
    /// Per query row (`[b, nkv, s·g]`, row i·g + t: token i, head t of the group): the softmax's maximum score
    /// (−∞ for a row with nothing to attend to) and the inverse of its sum of exponentials.
    stats: Vec<RowStat>,
}

/// What the forward's softmax used on one row; with the row's scores it reproduces the probabilities bit for bit.
#[derive(Debug, Clone, Copy, Default)]
struct RowStat {
    max: f32,
    inv_sum: f32,
}

fn blocks(s: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(s)))
}

/// Copy task buffers `[s, w]` (task = b·nkv + j) into columns `col0 + j·w ..` of `out` rows `[b·s, width]`.
fn scatter_tasks(
    out: &mut [f32],
    width: usize,
    col0: usize,
    x: &[f32],
    s: usize,
    nkv: usize,
    w: usize,
) {
    if out.is_empty() || width == 0 || w == 0 {
        return;
    }
    out.par_chunks_mut(width)
        .enumerate()
        .for_each(|(tok, row)| {
            let (bi, i) = (tok / s, tok % s);
            for j in 0..nkv {
                let src = ((bi * nkv + j) * s + i) * w;
                row[col0 + j * w..col0 + (j + 1) * w].copy_from_slice(&x[src..src + w]);
            }
        });
}

/// Scores of query rows `r0..r1` (all g heads) against keys `0..r1` into `sc` (`[(r1 − r0)·g, r1]`, packed),
/// masked; `softmax` then turns each row into probabilities, recording (`Some`) or replaying (`None` → the
/// recorded `stats`) its maximum and inverse sum. The forward and the backward call this with the same inputs,
/// so the backward's probabilities are the forward's, bit for bit.
#[allow(clippy::too_many_arguments)]
fn block_probs(
    sc: &mut [f32],
    qt: &[f32],
    kt: &[f32],
    (masking, bi): (&Masking, usize),
    (r0, r1): (usize, usize),
    (s, g, hd): (usize, usize, usize),
    scale: f32,
    stats: &mut [RowStat],
    record: bool,
) {
    let (rows, kb) = ((r1 - r0) * g, r1);
    gemm(
        MatMut::rows(sc, 0, rows, kb, kb),
        MatRef::packed(qt, s * g, hd).row_range(r0 * g, r1 * g),
        MatRef::packed(kt, s, hd).row_range(0, kb).t(),
        scale,
        false,
        false,
    );
    // One mask row at a time, built on the fly (kb ≥ i + 1 keys: the whole row's answer).
    let mut mask = vec![false; kb];
    for i in r0..r1 {
        masking.row_into(bi, i, s, &mut mask);
        for t in 0..g {
            let rr = (i - r0) * g + t;
            let row = &mut sc[rr * kb..(rr + 1) * kb];
            let st = &mut stats[rr];
            if record {
                *st = softmax_row(row, &mask);
            } else {
                replay_softmax_row(row, &mask, *st);
            }
        }
    }
}

/// Forward on host rows; returns (out `[b·s, nh·hd]`, saved state). Query blocks of every (batch, kv head)
/// pair run in parallel; each keeps only its block's scores.
fn forward_host(q: &Rows, k: &Rows, v: &Rows, spec: &AttnSpec) -> (Vec<f32>, Saved) {
    let (b, s, nh, nkv, hd) = spec.dims();
    let g = nh / nkv;
    let gw = g * hd;
    let rope = &spec.rope;
    let mut qr = vec![0f32; b * nh * s * hd];
    let mut kr = vec![0f32; b * nkv * s * hd];
    let mut vv = vec![0f32; b * nkv * s * hd];
    let mut stats = vec![RowStat::default(); b * nh * s];
    let mut o = vec![0f32; b * nh * s * hd];
    // RoPE on q / k and v into task-major buffers.
    qr.par_chunks_mut(s * gw)
        .zip(kr.par_chunks_mut(s * hd))
        .zip(vv.par_chunks_mut(s * hd))
        .enumerate()
        .for_each(|(task, ((qt, kt), vt))| {
            let (bi, j) = (task / nkv, task % nkv);
            for i in 0..s {
                let tok = bi * s + i;
                let (c, sn) = rope.row(tok);
                rope_row(
                    &k.row(tok)[j * hd..(j + 1) * hd],
                    c,
                    sn,
                    &mut kt[i * hd..(i + 1) * hd],
                );
                vt[i * hd..(i + 1) * hd].copy_from_slice(&v.row(tok)[j * hd..(j + 1) * hd]);
                let qrow = &q.row(tok)[j * gw..(j + 1) * gw];
                for t in 0..g {
                    rope_row(
                        &qrow[t * hd..(t + 1) * hd],
                        c,
                        sn,
                        &mut qt[(i * g + t) * hd..(i * g + t + 1) * hd],
                    );
                }
            }
        });
    o.par_chunks_mut(s * gw)
        .zip(stats.par_chunks_mut(s * g))
        .enumerate()
        .for_each(|(task, (ot, stt))| {
            let bi = task / nkv;
            let qt = &qr[task * s * gw..(task + 1) * s * gw];
            let kt = &kr[task * s * hd..(task + 1) * s * hd];
            let vt = &vv[task * s * hd..(task + 1) * s * hd];
            let masking = (spec.masking.as_ref(), bi);
            ot.par_chunks_mut(BLOCK * gw)
                .zip(stt.par_chunks_mut(BLOCK * g))
                .enumerate()
                .for_each(|(blk, (ob, sb))| {
                    let r0 = blk * BLOCK;
                    let r1 = (r0 + BLOCK).min(s);
                    let (rows, kb) = ((r1 - r0) * g, r1);
                    // One buffer per thread, sized for the longest block: blocks of growing length would otherwise
                    // leave a trail of ever larger freed buffers in the heap (measured: a quadratic term in RSS).
                    // Nothing inside the block calls into rayon, so the borrow cannot be re-entered.
                    SCRATCH.with_borrow_mut(|sc| {
                        if sc.len() < BLOCK * g * s {
                            sc.resize(BLOCK * g * s, 0.0);
                        }
                        let sc = &mut sc[..rows * kb];
                        block_probs(
                            sc,
                            qt,
                            kt,
                            masking,
                            (r0, r1),
                            (s, g, hd),
                            spec.scale,
                            sb,
                            true,
                        );
                        gemm(
                            MatMut::rows(ob, 0, rows, hd, hd),
                            MatRef::rows(sc, 0, rows, kb, kb),
                            MatRef::packed(vt, s, hd).row_range(0, kb),
                            1.0,
                            false,
                            false,
                        );
                    });
                });
        });
    let mut out = vec![0f32; b * s * nh * hd];
    scatter_tasks(&mut out, nh * hd, 0, &o, s, nkv, gw);
    (
        out,
        Saved {
            spec: spec.clone(),
            qr,
            kr,
            v: vv,
            stats,
        },
    )
}

/// GEMM FLOPs of the forward (q·kᵀ and P·v over each block's causal prefix).
fn attn_flops(spec: &AttnSpec) -> f64 {
    let per_head: usize = blocks(spec.seq).map(|(r0, r1)| (r1 - r0) * r1).sum();
    4.0 * (spec.batch * spec.heads * per_head * spec.head_dim) as f64
}

/// Backward on host rows: task-major (dq `[b, nkv, s, g·hd]`, dk, dv `[b, nkv, s, hd]`). Per query block: the
/// probabilities again (q·kᵀ, then the forward's row maxima and sums), dv += Pᵀ·dO, dS = P ∘ (dO·vᵀ −
/// rowsum(P ∘ dO·vᵀ)), dq = scale·dS·k, dk += scale·dSᵀ·q.
fn backward_host(dout: &Rows, st: &Saved) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let spec = &st.spec;
    let (b, s, nh, nkv, hd) = spec.dims();
    let g = nh / nkv;
    let gw = g * hd;
    let rope = &spec.rope;
    let mut dq = vec![0f32; b * nh * s * hd];
    let mut dk = vec![0f32; b * nkv * s * hd];
    let mut dv = vec![0f32; b * nkv * s * hd];
    dq.par_chunks_mut(s * gw)
        .zip(dk.par_chunks_mut(s * hd))
        .zip(dv.par_chunks_mut(s * hd))
        .enumerate()
        .for_each(|(task, ((dqt, dkt), dvt))| {
            let bi = task / nkv;
            let j = task % nkv;
            let kt = &st.kr[task * s * hd..(task + 1) * s * hd];
            let vt = &st.v[task * s * hd..(task + 1) * s * hd];
            let qt = &st.qr[task * s * gw..(task + 1) * s * gw];
            let mut stt = st.stats[task * s * g..(task + 1) * s * g].to_vec();
            let masking = (spec.masking.as_ref(), bi);
            // dO of the group's heads, token-major [s·g, hd].
            let mut d_o = vec![0f32; s * gw];
            for i in 0..s {
                d_o[i * gw..(i + 1) * gw]
                    .copy_from_slice(&dout.row(bi * s + i)[j * gw..(j + 1) * gw]);
            }
            let dom = MatRef::packed(&d_o, s * g, hd);
            let qm = MatRef::packed(qt, s * g, hd);
            let mut dkr = vec![0f32; s * hd];
            let mut dqr = vec![0f32; s * gw];
            let cap = BLOCK.min(s) * g * s;
            let (mut p, mut ds) = (vec![0f32; cap], vec![0f32; cap]);
            for (r0, r1) in blocks(s) {
                let (rows, kb) = ((r1 - r0) * g, r1);
                block_probs(
                    &mut p,
                    qt,
                    kt,
                    masking,
                    (r0, r1),
                    (s, g, hd),
                    spec.scale,
                    &mut stt[r0 * g..r1 * g],
                    false,
                );
                let p_blk = MatRef::rows(&p, 0, rows, kb, kb);
                let do_blk = dom.row_range(r0 * g, r1 * g);
                // dv[0..kb] += Pᵀ·dO
                gemm(
                    MatMut::rows(dvt, 0, kb, hd, hd),
                    p_blk.t(),
                    do_blk,
                    1.0,
                    true,
                    false,
                );
                // dP = dO·vᵀ, then dS = P ∘ (dP − rowsum(P ∘ dP))
                gemm(
                    MatMut::rows(&mut ds, 0, rows, kb, kb),
                    do_blk,
                    MatRef::packed(vt, s, hd).row_range(0, kb).t(),
                    1.0,
                    false,
                    false,
                );
                for rr in 0..rows {
                    dsoftmax_row(&p[rr * kb..(rr + 1) * kb], &mut ds[rr * kb..(rr + 1) * kb]);
                }
                let ds_blk = MatRef::rows(&ds, 0, rows, kb, kb);
                // dq = scale·dS·k
                gemm(
                    MatMut::rows(&mut dqr, r0 * gw, rows, hd, hd),
                    ds_blk,
                    MatRef::packed(kt, s, hd).row_range(0, kb),
                    spec.scale,
                    false,
                    false,
                );
                // dk[0..kb] += scale·dSᵀ·q
                gemm(
                    MatMut::rows(&mut dkr, 0, kb, hd, hd),
                    ds_blk.t(),
                    qm.row_range(r0 * g, r1 * g),
                    spec.scale,
                    true,
                    false,
                );
            }
            for i in 0..s {
                let (c, sn) = rope.row(bi * s + i);
                for t in 0..g {
                    let r = (i * g + t) * hd;
                    unrope_row(&dqr[r..r + hd], c, sn, &mut dqt[r..r + hd]);
                }
                unrope_row(
                    &dkr[i * hd..(i + 1) * hd],
                    c,
                    sn,
                    &mut dkt[i * hd..(i + 1) * hd],
                );
            }
        });
    (dq, dk, dv)
}

#[derive(Debug, Clone)]
struct BackState {
    saved: Arc<Saved>,
    /// One parent holding q|k|v side by side (instead of three).
    packed: bool,
}

#[derive(Debug)]
struct AttentionBackward;

impl<const N: usize> Backward<Flex, N> for AttentionBackward {
    type State = BackState;

    fn backward(self, ops: Ops<BackState, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let st = &ops.state.saved;
        let spec = &st.spec;
        let (b, s, nh, nkv, hd) = spec.dims();
        let n = b * s;
        let timer = prof::time(prof::Cat::AttnBwd, 2.5 * attn_flops(spec));
        let (dq, dk, dv) = backward_host(&Rows::of(&grad), st);
        let (qo, ko) = (nh * hd, nkv * hd);
        let gw = (nh / nkv) * hd;
        if ops.state.packed {
            let width = qo + 2 * ko;
            let mut d = vec![0f32; n * width];
            scatter_tasks(&mut d, width, 0, &dq, s, nkv, gw);
            scatter_tasks(&mut d, width, qo, &dk, s, nkv, hd);
            scatter_tasks(&mut d, width, qo + ko, &dv, s, nkv, hd);
            drop(timer);
            if let Some(p) = &ops.parents[0] {
                grads.register::<Flex>(p.id, flex_f32(d, &[n, width]));
            }
            return;
        }
        let mut outs = Vec::new();
        for (buf, w, width) in [(&dq, gw, qo), (&dk, hd, ko), (&dv, hd, ko)] {
            let mut d = vec![0f32; n * width];
            scatter_tasks(&mut d, width, 0, buf, s, nkv, w);
            outs.push((d, width));
        }
        drop(timer);
        for (p, (v, w)) in ops.parents.iter().zip(outs) {
            if let Some(p) = p {
                grads.register::<Flex>(p.id, flex_f32(v, &[n, w]));
            }
        }
    }
}

/// What the kernel covers: no KV cache (keys = queries), no soft-capping, grouped heads, a rotary width within
/// the head.
fn check_spec(spec: &AttnSpec) -> bool {
    spec.keys == spec.seq
        && spec.softcap.is_none()
        && spec.kv_heads > 0
        && spec.heads.is_multiple_of(spec.kv_heads)
        && 2 * spec.rope.half <= spec.head_dim
        && spec.rope.cos.len() == spec.batch * spec.seq * spec.rope.half
        && spec.masking.key_valid.len() == spec.batch * spec.seq
        && spec
            .masking
            .segments
            .as_ref()
            .is_none_or(|g| g.len() == spec.batch * spec.seq)
}

/// RoPE + attention for f32 q/k/v (packed side by side, or three tensors); `None` when the inputs are outside
/// what the kernel covers.
pub fn attention<B: Cpu>(qkv: &Qkv<B>, spec: &AttnSpec) -> Option<Tensor<B, 2>> {
    if !check_spec(spec) {
        return None;
    }
    let n = spec.batch * spec.seq;
    let (qo, ko) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
    match qkv {
        Qkv::Packed(t) => {
            let i = B::input(t);
            let f = B::flex(&i);
            if !super::all_f32(&[f]) || f.layout().shape().dims::<2>() != [n, qo + 2 * ko] {
                return None;
            }
            let rows = Rows::of(f);
            let timer = prof::time(prof::Cat::AttnFwd, attn_flops(spec));
            let (out, saved) = forward_host(
                &rows.col_range(0, qo),
                &rows.col_range(qo, qo + ko),
                &rows.col_range(qo + ko, qo + 2 * ko),
                spec,
            );
            drop(timer);
            let state = BackState {
                saved: Arc::new(saved),
                packed: true,
            };
            Some(B::output(
                AttentionBackward,
                [i],
                state,
                flex_f32(out, &[n, qo]),
            ))
        }
        Qkv::Split(q, k, v) => {
            let (qi, ki, vi) = (B::input(q), B::input(k), B::input(v));
            let (qf, kf, vf) = (B::flex(&qi), B::flex(&ki), B::flex(&vi));
            let ok = super::all_f32(&[qf, kf, vf])
                && qf.layout().shape().dims::<2>() == [n, qo]
                && kf.layout().shape().dims::<2>() == [n, ko]
                && vf.layout().shape().dims::<2>() == [n, ko];
            if !ok {
                return None;
            }
            let timer = prof::time(prof::Cat::AttnFwd, attn_flops(spec));
            let (out, saved) = forward_host(&Rows::of(qf), &Rows::of(kf), &Rows::of(vf), spec);
            drop(timer);
            let state = BackState {
                saved: Arc::new(saved),
                packed: false,
            };
            Some(B::output(
                AttentionBackward,
                [qi, ki, vi],
                state,
                flex_f32(out, &[n, qo]),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests_util::*;
    use crate::kernels::{reference, Attention, Masking, Rope};
    use burn::tensor::DType;

    /// The fused attention (RoPE, GQA, causal + padding + packing + sliding-window masks, a partial rotary
    /// width, a sequence longer than one query block) against the burn implementation: values and the
    /// gradients of q, k and v.
    fn check(window: Option<usize>, packed: bool) {
        check_with(window, packed, false);
        check_with(window, packed, true);
    }

    /// `one_input`: q|k|v side by side in one tensor.
    fn check_with(window: Option<usize>, packed: bool, one_input: bool) {
        let (b, s, nh, nkv, hd) = (2, 70, 4, 2, 8);
        let n = b * s;
        let inv_freq = vec![1.0f32, 0.1, 0.01]; // rot = 6 < hd
        let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
        let mut key_valid = vec![vec![true; s]; b];
        for v in key_valid[1][60..].iter_mut() {
            v.clone_from(&false);
        }
        let segments: Option<Vec<u32>> =
            packed.then(|| (0..n).map(|p| if p % s < 30 { 0 } else { 1 }).collect());
        let masking = Masking {
            key_valid: key_valid.concat(),
            segments,
            window,
        };
        let q = rand_vec(n * nh * hd, 41);
        let k = rand_vec(n * nkv * hd, 42);
        let v = rand_vec(n * nkv * hd, 43);
        let dy = rand_vec(n * nh * hd, 44);
        let scale = 1.0 / (hd as f64).sqrt();
        let run = |fused: bool| {
            let dev = Default::default();
            let spec = AttnSpec {
                batch: b,
                seq: s,
                keys: s,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: scale as f32,
                softcap: None,
                rope: Arc::new(Rope::new(&inv_freq, &positions)),
                masking: Arc::new(masking.clone()),
            };
            let att = Attention::<AD>::new(
                spec.clone(),
                DType::F32,
                &dev,
                Attention::<AD>::shared_tables(),
            );
            let qt = ad_param::<2>(&q, [n, nh * hd], &dev);
            let kt = ad_param::<2>(&k, [n, nkv * hd], &dev);
            let vt = ad_param::<2>(&v, [n, nkv * hd], &dev);
            let packed_t = one_input.then(|| {
                let t = Tensor::cat(
                    vec![
                        plain::<2>(&q, [n, nh * hd], &dev),
                        plain::<2>(&k, [n, nkv * hd], &dev),
                        plain::<2>(&v, [n, nkv * hd], &dev),
                    ],
                    1,
                );
                Tensor::<AD, 2>::from_data(t.into_data(), &dev).require_grad()
            });
            let qkv = match &packed_t {
                Some(t) => Qkv::Packed(t.clone()),
                None => Qkv::Split(qt.clone(), kt.clone(), vt.clone()),
            };
            let y = if fused {
                attention(&qkv, &spec).expect("fused path applies")
            } else {
                reference::attention(qkv, &att)
            };
            let g = backward_with(y.clone(), &dy, [n, nh * hd]);
            match &packed_t {
                // One leaf: its gradient holds dq | dk | dv per row.
                Some(t) => (to_vec(y), to_vec(t.grad(&g).expect("dqkv")), vec![], vec![]),
                None => (
                    to_vec(y),
                    to_vec(qt.grad(&g).expect("dq")),
                    to_vec(kt.grad(&g).expect("dk")),
                    to_vec(vt.grad(&g).expect("dv")),
                ),
            }
        };
        let f = run(true);
        let p = run(false);
        // Padded query rows are unused; compare real rows only.
        let real = |x: &[f32], w: usize| -> Vec<f32> {
            x.chunks(w)
                .enumerate()
                .filter(|(t, _)| key_valid[t / s][t % s])
                .flat_map(|(_, r)| r.to_vec())
                .collect()
        };
        assert_close(
            &real(&f.0, nh * hd),
            &real(&p.0, nh * hd),
            1e-5,
            "attention out",
        );
        assert_close(&f.1, &p.1, 1e-5, "dq");
        assert_close(&f.2, &p.2, 1e-5, "dk");
        assert_close(&f.3, &p.3, 1e-5, "dv");
    }

    #[test]
    fn fused_attention_matches_plain() {
        check(None, false);
    }

    #[test]
    fn fused_attention_with_window_and_packing_matches_plain() {
        check(Some(20), true);
    }

    /// What the forward keeps for the backward grows linearly with the sequence (no `[s, s]` probabilities).
    #[test]
    fn saved_state_is_linear_in_sequence_length() {
        let (nh, nkv, hd) = (4, 2, 16);
        let saved_floats = |s: usize| {
            let n = s;
            let positions: Vec<u32> = (0..s as u32).collect();
            let masking = Masking {
                key_valid: vec![true; s],
                segments: None,
                window: None,
            };
            let spec = AttnSpec {
                batch: 1,
                seq: s,
                keys: s,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale: 0.25,
                softcap: None,
                rope: Arc::new(Rope::new(&[1.0, 0.5], &positions)),
                masking: Arc::new(masking),
            };
            let q = flex_f32(rand_vec(n * nh * hd, 1), &[n, nh * hd]);
            let k = flex_f32(rand_vec(n * nkv * hd, 2), &[n, nkv * hd]);
            let v = flex_f32(rand_vec(n * nkv * hd, 3), &[n, nkv * hd]);
            let (_, st) = forward_host(&Rows::of(&q), &Rows::of(&k), &Rows::of(&v), &spec);
            st.qr.len() + st.kr.len() + st.v.len() + 2 * st.stats.len()
        };
        let (a, b) = (saved_floats(256), saved_floats(512));
        assert_eq!(b, 2 * a, "saved state at s=512 is {b} floats, at s=256 {a}");
        // Per token: rotated q (nh·hd), k and v (nkv·hd each), two floats per query head.
        assert_eq!(a, 256 * (nh * hd + 2 * nkv * hd + 2 * nh));
    }
}
