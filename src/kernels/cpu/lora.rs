//! Frozen linear layers with their LoRA adapters as one autodiff node, several layers sharing one input at
//! once (q/k/v, gate/up): `y = [x·W_jᵀ (+ b_j) + s_j·((x ∘ m_j)·A_jᵀ)·B_jᵀ]_j`, the outputs side by side.
//!
//! One node per group instead of one per module means one pass over x for all adapters' `x·Aᵀ`, one dx
//! buffer the frozen GEMMs accumulate into (`Σ_j dy_j·W_j`, no per-module gradients added afterwards), and
//! one pass over dx for `Σ_j (u_j·A_j) ∘ m_j`, with `u_j = s_j·dy_j·B_j`. The adapters' small products are
//! row-streaming kernels (the GEMM library would copy x or dy into packed panels for each of them). W stays
//! in torch layout `[out, in]`; the GEMMs read it transposed. The output buffers are written by the GEMMs
//! without being zeroed first.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::Tensor;
use rayon::prelude::*;

use std::sync::Arc;

use super::gemm::{gemm, gemm_cols_new, gemm_sum_new, MatMut, MatRef, Term};
use super::qgemm::{dyw_acc, xwt_into};
use super::simd::{self, simd_fn};
use super::{flex_f32, Cpu, Rows};
use crate::kernels::prof::{self, Cat};
use crate::kernels::LinearRef;
use crate::quant::{Frozen, QMatrix};

fn rows_ref(r: &Rows) -> MatRef<'_> {
    MatRef::rows(r.data(), r.off, r.rows, r.cols, r.rs)
}

/// Row blocks for the adapter passes: enough blocks for every thread, few enough that the per-block partial
/// dA / dB sums stay cheap. Fixed for a given n, so the summation order (and every bit of the result) does
/// not depend on thread timing.
fn row_blocks(n: usize) -> Vec<(usize, usize)> {
    let t = (4 * rayon::current_num_threads()).clamp(1, 64);
    let per = n.div_ceil(t).max(16);
    (0..n)
        .step_by(per)
        .map(|r0| (r0, (r0 + per).min(n)))
        .collect()
}

/// Split `v` into consecutive mutable pieces of `sizes[i]` elements.
fn split_sizes(mut v: &mut [f32], sizes: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for n in sizes {
        let (h, t) = v.split_at_mut(n);
        out.push(h);
        v = t;
    }
    out
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &Rows) -> Vec<f32> {
    let mut t = vec![0f32; m.rows * m.cols];
    for i in 0..m.rows {
        for (j, &v) in m.row(i).iter().enumerate() {
            t[j * m.rows + i] = v;
        }
    }
    t
}

const L: usize = 16;
/// Adapter rank handled per pass (accumulators kept in registers).
const KB: usize = 8;

simd_fn! {
    /// Forward of one row: x̃ = x ∘ m (written to `xd` when there is a mask), low = x̃·Aᵀ, y += s·low·Bᵀ
    /// (`bt` = Bᵀ, `[r, out]`).
    fn fwd_row(
        x: &[f32],
        m: Option<&[f32]>,
        xd: Option<&mut [f32]>,
        a: &[f32],
        bt: &[f32],
        scale: f32,
        low: &mut [f32],
        y: &mut [f32],
    ) {
        let inp = x.len();
        let out = y.len();
        let xs: &[f32] = match (m, xd) {
            (Some(m), Some(xd)) => {
                for ((o, &v), &k) in xd.iter_mut().zip(x).zip(m) {
                    *o = v * k;
                }
                xd
            }
            _ => x,
        };
        for (k, l) in low.iter_mut().enumerate() {
            *l = simd::dot(xs, &a[k * inp..(k + 1) * inp]);
        }
        // y += Σ_k (s·low_k)·Bᵀ_k, one pass over y per KB ranks.
        let r = low.len();
        let mut k0 = 0;
        while k0 < r {
            let k1 = (k0 + KB).min(r);
            let mut c = [0f32; KB];
            for k in k0..k1 {
                c[k - k0] = scale * low[k];
            }
            let mut o = 0;
            while o + L <= out {
                let mut acc = simd::ld(y, o);
                for k in k0..k1 {
                    let b = simd::ld(bt, k * out + o);
                    for l in 0..L {
                        acc[l] = simd::fma(c[k - k0], b[l], acc[l]);
                    }
                }
                simd::st(y, o, acc);
                o += L;
            }
            while o < out {
                for k in k0..k1 {
                    y[o] = simd::fma(c[k - k0], bt[k * out + o], y[o]);
                }
                o += 1;
            }
            k0 = k1;
        }
    }
}

simd_fn! {
    /// Backward, first pass over one row of dy: u = s·dy·B (`bt` = Bᵀ `[r, out]`) and dBᵀ += s·low ⊗ dy.
    fn bwd_dy_row(dy: &[f32], bt: &[f32], low: &[f32], scale: f32, u: &mut [f32], dbt: &mut [f32]) {
        let out = dy.len();
        let r = low.len();
        let mut k0 = 0;
        while k0 < r {
            let k1 = (k0 + KB).min(r);
            let mut acc = [[0f32; L]; KB];
            let mut c = [0f32; KB];
            for k in k0..k1 {
                c[k - k0] = scale * low[k];
            }
            let mut o = 0;
            while o + L <= out {
                let g = simd::ld(dy, o);
                for k in k0..k1 {
                    let b = simd::ld(bt, k * out + o);
                    let a = &mut acc[k - k0];
                    for l in 0..L {
                        a[l] = simd::fma(g[l], b[l], a[l]);
                    }
                    let mut d = simd::ld(dbt, k * out + o);
                    for l in 0..L {
                        d[l] = simd::fma(c[k - k0], g[l], d[l]);
                    }
                    simd::st(dbt, k * out + o, d);
                }
                o += L;
            }
            for k in k0..k1 {
                let mut sum: f32 = acc[k - k0].iter().sum();
                for oo in o..out {
                    sum = simd::fma(dy[oo], bt[k * out + oo], sum);
                    dbt[k * out + oo] = simd::fma(c[k - k0], dy[oo], dbt[k * out + oo]);
                }
                u[k] = scale * sum;
            }
            k0 = k1;
        }
    }
}

simd_fn! {
    /// Backward, second pass over one row: dx += (u·A) ∘ m and dA += u ⊗ x̃.
    fn bwd_x_row(
        u: &[f32],
        a: &[f32],
        m: Option<&[f32]>,
        xd: &[f32],
        dx: Option<&mut [f32]>,
        da: &mut [f32],
    ) {
        let inp = xd.len();
        let r = u.len();
        if let Some(dx) = dx {
            let mut j = 0;
            while j + L <= inp {
                let mut acc = [0f32; L];
                for (k, &uk) in u.iter().enumerate() {
                    let av = simd::ld(a, k * inp + j);
                    for l in 0..L {
                        acc[l] = simd::fma(uk, av[l], acc[l]);
                    }
                }
                let mut d = simd::ld(dx, j);
                match m {
                    Some(m) => {
                        let mv = simd::ld(m, j);
                        for l in 0..L {
                            d[l] = simd::fma(acc[l], mv[l], d[l]);
                        }
                    }
                    None => {
                        for l in 0..L {
                            d[l] += acc[l];
                        }
                    }
                }
                simd::st(dx, j, d);
                j += L;
            }
            while j < inp {
                let mut acc = 0f32;
                for (k, &uk) in u.iter().enumerate() {
                    acc = simd::fma(uk, a[k * inp + j], acc);
                }
                dx[j] += acc * m.map_or(1.0, |m| m[j]);
                j += 1;
            }
        }
        let mut j = 0;
        while j + L <= inp {
            let xv = simd::ld(xd, j);
            #[allow(clippy::needless_range_loop)] // k also indexes rows of `da`
            for k in 0..r {
                let mut d = simd::ld(da, k * inp + j);
                for l in 0..L {
                    d[l] = simd::fma(u[k], xv[l], d[l]);
                }
                simd::st(da, k * inp + j, d);
            }
            j += L;
        }
        while j < inp {
            for k in 0..r {
                da[k * inp + j] = simd::fma(u[k], xd[j], da[k * inp + j]);
            }
            j += 1;
        }
    }
}

/// One adapter of a group, as the kernels use it.
#[derive(Debug, Clone)]
struct Adapter {
    /// A, `[r, in]`, packed.
    a: Vec<f32>,
    /// Bᵀ, `[r, out_j]`.
    bt: Vec<f32>,
    scale: f32,
    /// Dropout keep mask (already scaled), `[n, in]`.
    mask: Option<FlexTensor>,
    /// x̃·Aᵀ, `[n, r]` (filled by the forward).
    low: Vec<f32>,
}

/// A member's frozen W, `[out_j, in]`.
#[derive(Debug, Clone)]
enum FrozenW {
    Dense(FlexTensor),
    /// Decoded a tile of rows at a time inside the GEMMs ([`super::qgemm`]).
    Quant(Arc<QMatrix>),
}

/// One member of a group.
#[derive(Debug, Clone)]
struct Member {
    w: FrozenW,
    /// First output column.
    col0: usize,
    out: usize,
    adapter: Option<Adapter>,
}

#[derive(Debug, Clone)]
struct State {
    x: FlexTensor,
    members: Vec<Member>,
}

fn forward_adapters(x: &Rows, members: &mut [Member], y: &mut [f32], cols: usize) {
    let n = x.rows;
    let inp = x.cols;
    if members.iter().all(|m| m.adapter.is_none()) || n == 0 {
        return;
    }
    let masks: Vec<Option<Rows>> = members
        .iter()
        .map(|m| {
            m.adapter
                .as_ref()
                .and_then(|a| a.mask.as_ref().map(Rows::of))
        })
        .collect();
    let ranks: Vec<usize> = members
        .iter()
        .map(|m| m.adapter.as_ref().map_or(0, |a| a.a.len() / inp.max(1)))
        .collect();
    let rsum: usize = ranks.iter().sum();
    // low of all adapters, row-major [n, Σr], split per adapter afterwards.
    let mut low = vec![0f32; n * rsum];
    let blocks = row_blocks(n);
    let ys = split_sizes(y, blocks.iter().map(|(r0, r1)| (r1 - r0) * cols));
    let ls = split_sizes(&mut low, blocks.iter().map(|(r0, r1)| (r1 - r0) * rsum));
    let mems: &[Member] = members;
    blocks
        .par_iter()
        .zip(ys.into_par_iter())
        .zip(ls.into_par_iter())
        .for_each(|((&(r0, r1), yb), lb)| {
            let mut xd = vec![0f32; inp];
            for (k, i) in (r0..r1).enumerate() {
                let mut roff = 0;
                for (j, m) in mems.iter().enumerate() {
                    let Some(ad) = &m.adapter else { continue };
                    let r = ranks[j];
                    let mask = masks[j].as_ref().map(|mk| mk.row(i));
                    fwd_row(
                        x.row(i),
                        mask,
                        mask.is_some().then_some(xd.as_mut_slice()),
                        &ad.a,
                        &ad.bt,
                        ad.scale,
                        &mut lb[k * rsum + roff..k * rsum + roff + r],
                        &mut yb[k * cols + m.col0..k * cols + m.col0 + m.out],
                    );
                    roff += r;
                }
            }
        });
    let mut roff = 0;
    for (j, m) in members.iter_mut().enumerate() {
        if let Some(ad) = m.adapter.as_mut() {
            let r = ranks[j];
            ad.low = (0..n)
                .flat_map(|i| low[i * rsum + roff..i * rsum + roff + r].iter().copied())
                .collect();
            roff += r;
        }
    }
}

#[derive(Debug)]
struct GroupBackward;

impl<const N: usize> Backward<Flex, N> for GroupBackward {
    type State = State;

    fn backward(self, ops: Ops<State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let parents = ops.parents;
        let dy = Rows::of(&grad);
        let x = Rows::of(&st.x);
        let (n, inp) = (x.rows, x.cols);
        let blocks = row_blocks(n);
        let adapters: Vec<(usize, &Member, &Adapter)> = st
            .members
            .iter()
            .filter_map(|m| m.adapter.as_ref().map(|a| (m, a)))
            .enumerate()
            .map(|(j, (m, a))| (j, m, a))
            .collect();
        let ranks: Vec<usize> = adapters
            .iter()
            .map(|(_, _, a)| a.a.len() / inp.max(1))
            .collect();
        let rsum: usize = ranks.iter().sum();
        // Pass 1 over dy: u_j = s_j·dy_j·B_j ([n, Σr]) and dB_jᵀ partials per row block.
        let t_u = prof::time(
            Cat::LoraBwd,
            adapters
                .iter()
                .zip(&ranks)
                .map(|((_, m, _), r)| 4.0 * (n * m.out * r) as f64)
                .sum(),
        );
        let mut u = vec![0f32; n * rsum];
        let us = split_sizes(&mut u, blocks.iter().map(|(r0, r1)| (r1 - r0) * rsum));
        let dbt_parts: Vec<Vec<Vec<f32>>> = blocks
            .par_iter()
            .zip(us.into_par_iter())
            .map(|(&(r0, r1), ub)| {
                let mut dbt: Vec<Vec<f32>> = adapters
                    .iter()
                    .zip(&ranks)
                    .map(|((_, m, _), r)| vec![0f32; r * m.out])
                    .collect();
                for (k, i) in (r0..r1).enumerate() {
                    let g = dy.row(i);
                    let mut roff = 0;
                    for ((j, m, a), &r) in adapters.iter().zip(&ranks) {
                        bwd_dy_row(
                            &g[m.col0..m.col0 + m.out],
                            &a.bt,
                            &a.low[i * r..(i + 1) * r],
                            a.scale,
                            &mut ub[k * rsum + roff..k * rsum + roff + r],
                            &mut dbt[*j],
                        );
                        roff += r;
                    }
                }
                dbt
            })
            .collect();
        drop(t_u);
        let x_parent = parents[0].clone();
        let mut dx = None;
        if x_parent.is_some() {
            let flops: usize = st.members.iter().map(|m| 2 * n * m.out * inp).sum();
            let _t = prof::time(Cat::LinearBwd, flops as f64);
            let dy_of = |m: &Member| MatRef::rows(dy.data(), dy.off + m.col0, n, m.out, dy.rs);
            let dense: Vec<(&Member, Rows)> = st
                .members
                .iter()
                .filter_map(|m| match &m.w {
                    FrozenW::Dense(w) => Some((m, Rows::of(w))),
                    FrozenW::Quant(_) => None,
                })
                .collect();
            let terms: Vec<Term> = dense
                .iter()
                .map(|(m, w)| Term {
                    a: dy_of(m),
                    b: rows_ref(w),
                    beta: 1.0,
                })
                .collect();
            let mut d = gemm_sum_new(n, inp, &terms, true);
            for m in &st.members {
                if let FrozenW::Quant(q) = &m.w {
                    dyw_acc(&mut d, dy_of(m), q);
                }
            }
            dx = Some(d);
        }
        // Pass 2 over x (and dx): dx += Σ_j (u_j·A_j) ∘ m_j, dA_j = u_jᵀ·(x ∘ m_j).
        let t_x = prof::time(Cat::LoraBwd, 4.0 * (n * rsum * inp) as f64);
        let masks: Vec<Option<Rows>> = adapters
            .iter()
            .map(|(_, _, a)| a.mask.as_ref().map(Rows::of))
            .collect();
        let dxs: Vec<Option<&mut [f32]>> = match dx.as_mut() {
            Some(v) => split_sizes(v, blocks.iter().map(|(r0, r1)| (r1 - r0) * inp))
                .into_iter()
                .map(Some)
                .collect(),
            None => blocks.iter().map(|_| None).collect(),
        };
        let da_parts: Vec<Vec<Vec<f32>>> = if adapters.is_empty() {
            Vec::new()
        } else {
            blocks
                .par_iter()
                .zip(dxs.into_par_iter())
                .map(|(&(r0, r1), mut dxb)| {
                    let mut da: Vec<Vec<f32>> = ranks.iter().map(|r| vec![0f32; r * inp]).collect();
                    let mut xd = vec![0f32; inp];
                    for (k, i) in (r0..r1).enumerate() {
                        let mut roff = 0;
                        for (j, (_, _, a)) in adapters.iter().enumerate() {
                            let r = ranks[j];
                            let mask = masks[j].as_ref().map(|mk| mk.row(i));
                            let xs: &[f32] = match mask {
                                Some(mv) => {
                                    for ((o, &v), &q) in xd.iter_mut().zip(x.row(i)).zip(mv) {
                                        *o = v * q;
                                    }
                                    &xd
                                }
                                None => x.row(i),
                            };
                            bwd_x_row(
                                &u[i * rsum + roff..i * rsum + roff + r],
                                &a.a,
                                mask,
                                xs,
                                dxb.as_mut().map(|d| &mut d[k * inp..(k + 1) * inp]),
                                &mut da[j],
                            );
                            roff += r;
                        }
                    }
                    da
                })
                .collect()
        };
        drop(t_x);
        if let (Some(p), Some(dx)) = (x_parent, dx) {
            grads.register::<Flex>(p.id, flex_f32(dx, &[n, inp]));
        }
        for (j, ((_, m, _), &r)) in adapters.iter().zip(&ranks).enumerate() {
            if let Some(p) = &parents[1 + 2 * j] {
                let mut da = vec![0f32; r * inp];
                for part in &da_parts {
                    for (d, v) in da.iter_mut().zip(&part[j]) {
                        *d += v;
                    }
                }
                grads.register::<Flex>(p.id, flex_f32(da, &[r, inp]));
            }
            if let Some(p) = &parents[2 + 2 * j] {
                let out = m.out;
                let mut dbt = vec![0f32; r * out];
                for part in &dbt_parts {
                    for (d, v) in dbt.iter_mut().zip(&part[j]) {
                        *d += v;
                    }
                }
                let mut db = vec![0f32; out * r];
                for k in 0..r {
                    for o in 0..out {
                        db[o * r + k] = dbt[k * out + o];
                    }
                }
                grads.register::<Flex>(p.id, flex_f32(db, &[out, r]));
            }
        }
    }
}

/// Rows from which the forward uses a transposed copy of W.
const TRANSPOSE_MIN_ROWS: usize = 128;

type WeightKey = (usize, usize, usize, usize);

/// Transposed copies of frozen weights, keyed by the identity of the weight's storage. The `Weak` proves the
/// key still names the same allocation (an `Arc` cannot be reallocated at an address a `Weak` still holds);
/// entries whose weight is gone are dropped on the next insertion.
#[allow(clippy::type_complexity)]
static TRANSPOSED: std::sync::Mutex<
    Option<
        std::collections::HashMap<WeightKey, (std::sync::Weak<burn::tensor::Bytes>, FlexTensor)>,
    >,
> = std::sync::Mutex::new(None);

/// W `[out, in]` as a packed `[in, out]` tensor, made once per weight.
fn transposed_weight(w: &FlexTensor) -> FlexTensor {
    let arc = w.data_arc();
    let shape = w.layout().shape().clone();
    let key: WeightKey = (
        std::sync::Arc::as_ptr(&arc) as usize,
        w.layout().start_offset(),
        shape[0],
        shape[1],
    );
    let mut guard = match TRANSPOSED.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let map = guard.get_or_insert_with(Default::default);
    if let Some((weak, t)) = map.get(&key) {
        if weak
            .upgrade()
            .is_some_and(|a| std::sync::Arc::ptr_eq(&a, &arc))
        {
            return t.clone();
        }
    }
    map.retain(|_, (weak, _)| weak.strong_count() > 0);
    let r = Rows::of(w);
    let t = flex_f32(transpose(&r), &[r.cols, r.rows]);
    map.insert(key, (std::sync::Arc::downgrade(&arc), t.clone()));
    t
}

/// The members' outputs side by side, `[n, Σ out_j]`, as one node, for f32 tensors with frozen weights and
/// biases; `None` when the inputs are outside what the kernel covers.
pub fn linear_group<B: Cpu>(
    x: &Tensor<B, 2>,
    members: &[LinearRef<'_, B>],
) -> Option<Tensor<B, 2>> {
    if members.is_empty() || members.iter().filter(|m| m.adapter.is_some()).count() > 3 {
        return None;
    }
    let xi = B::input(x);
    let xf = B::flex(&xi).clone();
    if !super::all_f32(&[&xf]) {
        return None;
    }
    let xr = Rows::of(&xf);
    let (n, inp) = (xr.rows, xr.cols);
    let mut mems = Vec::with_capacity(members.len());
    let mut biases = Vec::new();
    let mut parents = vec![xi];
    let mut col0 = 0;
    for m in members {
        let w = match m.weight {
            Frozen::Dense(t) => {
                let wi = B::input(t);
                let wf = B::flex(&wi).clone();
                if B::tracked(&wi) || !super::all_f32(&[&wf]) {
                    return None;
                }
                FrozenW::Dense(wf)
            }
            Frozen::Quant { q, .. } => FrozenW::Quant(q.clone()),
        };
        let [out, w_in] = m.weight.dims();
        if w_in != inp {
            return None;
        }
        if let Some(b) = m.bias {
            let bi = B::input(b);
            let bf = B::flex(&bi);
            let bv = Rows::of(bf).packed().into_owned();
            if B::tracked(&bi) || !super::all_f32(&[bf]) || bv.len() != out {
                return None;
            }
            biases.push((col0, bv));
        }
        let adapter = match &m.adapter {
            None => None,
            Some(ad) => {
                let (ai, bi) = (B::input(ad.a), B::input(ad.b));
                let (af, bf) = (B::flex(&ai), B::flex(&bi));
                let maskf = ad.mask.as_ref().map(|t| {
                    let i = B::input(t);
                    (B::flex(&i).clone(), B::tracked(&i))
                });
                if !super::all_f32(&[af, bf])
                    || maskf
                        .as_ref()
                        .is_some_and(|(t, tr)| *tr || !super::all_f32(&[t]))
                {
                    return None;
                }
                let (ar, br) = (Rows::of(af), Rows::of(bf));
                if ar.cols != inp || br.rows != out || br.cols != ar.rows {
                    return None;
                }
                if let Some((mt, _)) = &maskf {
                    let mr = Rows::of(mt);
                    if mr.rows != n || mr.cols != inp {
                        return None;
                    }
                }
                let adapter = Adapter {
                    a: ar.packed().into_owned(),
                    bt: transpose(&br),
                    scale: ad.scale as f32,
                    mask: maskf.map(|(t, _)| t),
                    low: Vec::new(),
                };
                parents.push(ai);
                parents.push(bi);
                Some(adapter)
            }
        };
        mems.push(Member {
            w,
            col0,
            out,
            adapter,
        });
        col0 += out;
    }
    let cols = col0;
    let flops: usize = mems.iter().map(|m| 2 * n * m.out * inp).sum();
    let t_lin = prof::time(Cat::LinearFwd, flops as f64);
    // Batches of training size read Wᵀ from a cached `[in, out]` copy (the GEMM runs ~14% faster on a
    // row-major right-hand side than on W read transposed); small ones (generation) read W directly.
    // A quantized W is never transposed or cached: it is decoded a tile at a time inside its GEMM.
    let mut y = match mems
        .iter()
        .map(|m| match &m.w {
            FrozenW::Dense(w) => Some(w),
            FrozenW::Quant(_) => None,
        })
        .collect::<Option<Vec<&FlexTensor>>>()
    {
        Some(dense) => {
            let wts: Vec<Option<FlexTensor>> = dense
                .iter()
                .map(|w| (n >= TRANSPOSE_MIN_ROWS).then(|| transposed_weight(w)))
                .collect();
            let ws: Vec<Rows> = dense
                .iter()
                .zip(&wts)
                .map(|(w, t)| Rows::of(t.as_ref().unwrap_or(w)))
                .collect();
            let terms: Vec<Term> = ws
                .iter()
                .zip(&wts)
                .map(|(w, t)| Term {
                    a: rows_ref(&xr),
                    b: if t.is_some() {
                        rows_ref(w)
                    } else {
                        rows_ref(w).t()
                    },
                    beta: 1.0,
                })
                .collect();
            gemm_cols_new(n, &terms, true)
        }
        None => {
            let mut y = vec![0f32; n * cols];
            for m in &mems {
                match &m.w {
                    FrozenW::Dense(w) => gemm(
                        MatMut::rows(&mut y, m.col0, n, m.out, cols),
                        rows_ref(&xr),
                        rows_ref(&Rows::of(w)).t(),
                        1.0,
                        false,
                        true,
                    ),
                    FrozenW::Quant(q) => xwt_into(&mut y, m.col0, cols, rows_ref(&xr), q),
                }
            }
            y
        }
    };
    for (c0, bv) in &biases {
        y.par_chunks_mut(cols.max(1)).for_each(|row| {
            for (o, b) in row[*c0..*c0 + bv.len()].iter_mut().zip(bv.iter()) {
                *o += b;
            }
        });
    }
    drop(t_lin);
    let rflops: usize = mems
        .iter()
        .filter_map(|m| {
            m.adapter
                .as_ref()
                .map(|a| 2 * n * (a.a.len() / inp.max(1)) * (inp + m.out))
        })
        .sum();
    let t_lora = prof::time(Cat::LoraFwd, rflops as f64);
    forward_adapters(&xr, &mut mems, &mut y, cols);
    drop(t_lora);
    let out_t = flex_f32(y, &[n, cols]);
    let state = State {
        x: xf,
        members: mems,
    };
    // One parent for x, two per adapter (A, B): at most seven.
    macro_rules! finish {
        ($n:literal) => {{
            let arr: [B::Input; $n] = parents.try_into().ok()?;
            B::output(GroupBackward, arr, state, out_t)
        }};
    }
    Some(match parents.len() {
        1 => finish!(1),
        3 => finish!(3),
        5 => finish!(5),
        7 => finish!(7),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests_util::*;
    use crate::kernels::reference;
    use crate::lora::linear::{LoraAdapter, LoraLinear};

    fn check(with_bias: bool, with_mask: bool) {
        let (n, inp, out, r) = (7, 24, 20, 4);
        let x = rand_vec(n * inp, 21);
        let w = rand_vec(out * inp, 22);
        let bias = rand_vec(out, 23);
        let a = rand_vec(r * inp, 24);
        let b = rand_vec(out * r, 25);
        let m: Vec<f32> = rand_vec(n * inp, 26)
            .iter()
            .map(|v| if *v > 0.0 { 1.25 } else { 0.0 })
            .collect();
        let dy = rand_vec(n * out, 27);
        let run = |fused: bool| {
            let dev = Default::default();
            let xt = ad_param::<2>(&x, [n, inp], &dev);
            let mut lin = LoraLinear::<AD>::new(
                "m",
                plain::<2>(&w, [out, inp], &dev),
                with_bias.then(|| plain::<1>(&bias, [out], &dev)),
            );
            lin.lora = Some(LoraAdapter {
                a: ad_param::<2>(&a, [r, inp], &dev),
                b: ad_param::<2>(&b, [out, r], &dev),
                scale: 2.5,
                dropout: if with_mask { 0.2 } else { 0.0 },
                dora: None,
                initial: None,
            });
            let mask = with_mask.then(|| plain::<2>(&m, [n, inp], &dev));
            let y = if fused {
                linear_group(&xt, &[lin.as_ref(mask)]).expect("fused path applies")
            } else {
                reference::linear(xt.clone(), &lin.as_ref(mask))
            };
            let g = backward_with(y.clone(), &dy, [n, out]);
            let l = lin.lora.as_ref().expect("adapter");
            (
                to_vec(y),
                to_vec(xt.grad(&g).expect("dx")),
                to_vec(l.a.grad(&g).expect("dA")),
                to_vec(l.b.grad(&g).expect("dB")),
            )
        };
        let f = run(true);
        let p = run(false);
        assert_close(&f.0, &p.0, 1e-5, "lora y");
        assert_close(&f.1, &p.1, 1e-5, "lora dx");
        assert_close(&f.2, &p.2, 1e-5, "lora dA");
        assert_close(&f.3, &p.3, 1e-5, "lora dB");
    }

    #[test]
    fn lora_linear_matches_plain() {
        check(false, false);
    }

    #[test]
    fn lora_linear_with_bias_and_dropout_matches_plain() {
        check(true, true);
    }

    /// Three modules sharing x (an adapter with dropout, a bare frozen one with a bias, an adapter without
    /// dropout) as one node, against the three plain modules side by side.
    #[test]
    fn linear_group_matches_plain_modules() {
        let (n, inp, r) = (9, 20, 3);
        let outs = [12usize, 8, 8];
        let x = rand_vec(n * inp, 51);
        let ws: Vec<Vec<f32>> = outs
            .iter()
            .enumerate()
            .map(|(j, &o)| rand_vec(o * inp, 52 + j as u64))
            .collect();
        let bias = rand_vec(8, 55);
        let a0 = rand_vec(r * inp, 56);
        let b0 = rand_vec(12 * r, 57);
        let a2 = rand_vec(r * inp, 58);
        let b2 = rand_vec(8 * r, 59);
        let m: Vec<f32> = rand_vec(n * inp, 60)
            .iter()
            .map(|v| if *v > -0.3 { 1.0 / 0.65 } else { 0.0 })
            .collect();
        let total: usize = outs.iter().sum();
        let dy = rand_vec(n * total, 61);
        let run = |fused: bool| {
            let dev = Default::default();
            let xt = ad_param::<2>(&x, [n, inp], &dev);
            let adapter = |a: &[f32], b: &[f32], out: usize| LoraAdapter {
                a: ad_param::<2>(a, [r, inp], &dev),
                b: ad_param::<2>(b, [out, r], &dev),
                scale: 1.5,
                dropout: 0.1,
                dora: None,
                initial: None,
            };
            let with_adapter = |w: &[f32], out: usize, ad: LoraAdapter<AD>| {
                let mut l = LoraLinear::<AD>::new("m", plain::<2>(w, [out, inp], &dev), None);
                l.lora = Some(ad);
                l
            };
            let mods = [
                with_adapter(&ws[0], 12, adapter(&a0, &b0, 12)),
                LoraLinear::<AD>::new(
                    "m",
                    plain::<2>(&ws[1], [8, inp], &dev),
                    Some(plain::<1>(&bias, [8], &dev)),
                ),
                with_adapter(&ws[2], 8, adapter(&a2, &b2, 8)),
            ];
            let masks = [Some(plain::<2>(&m, [n, inp], &dev)), None, None];
            let y = if fused {
                let refs: Vec<_> = mods
                    .iter()
                    .zip(&masks)
                    .map(|(l, mk)| l.as_ref(mk.clone()))
                    .collect();
                linear_group(&xt, &refs).expect("fused path applies")
            } else {
                let parts: Vec<_> = mods
                    .iter()
                    .zip(&masks)
                    .map(|(l, mk)| reference::linear(xt.clone(), &l.as_ref(mk.clone())))
                    .collect();
                Tensor::cat(parts, 1)
            };
            let g = backward_with(y.clone(), &dy, [n, total]);
            let mut grads = vec![to_vec(y), to_vec(xt.grad(&g).expect("dx"))];
            for l in [&mods[0], &mods[2]] {
                let ad = l.lora.as_ref().expect("adapter");
                grads.push(to_vec(ad.a.grad(&g).expect("dA")));
                grads.push(to_vec(ad.b.grad(&g).expect("dB")));
            }
            grads
        };
        let f = run(true);
        let p = run(false);
        for (i, (a, b)) in f.iter().zip(&p).enumerate() {
            assert_close(a, b, 1e-5, &format!("group output {i}"));
        }
    }
}
