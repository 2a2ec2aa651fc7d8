//! Attention in query blocks on the backend's own GEMMs, memory linear in the sequence length: the GPU path.
//!
//! The forward sweeps blocks of [`BLOCK_ROWS`] query rows; each block's scores `[b, heads, rows, keys]` (only the
//! keys the block can see: causal end, sliding-window start) go through one batched GEMM, the masked softmax in
//! f32, and a second GEMM with V — the reference's arithmetic, block by block. Only the output and one f32
//! log-sum-exp per query row are kept; the backward recomputes each block's probabilities from them
//! (FlashAttention's split, at block granularity) and runs four GEMMs per block. Masks are built per block on
//! the device from per-token data (padding, packed-sample ids, the window) — no `[s, s]` tensor exists. Grouped
//! KV heads are folded into the rows, as in the reference, so K and V are never repeated.
//!
//! Why GEMMs rather than a hand-written tile kernel: on an H200 (2026-12-04, `scripts/bench/RESULTS.md`) the
//! Llama-3.2-1B step with the unit-per-row CubeCL kernels ([`super::cube::attention`]) ran 10× slower than with
//! burn's decomposed attention (2026-11-26), ~4.5 s of it outside the GEMMs, while GEMMs run on the tensor cores.
//! `LORATUNE_ATTENTION=tile` selects those kernels.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData, TensorPrimitive};

use super::prof::live;
use super::AttnSpec;

/// Query rows per block: a block's f32 scores are `batch × heads × 256 × keys` (128 MB at 32 heads, 4096 keys).
pub const BLOCK_ROWS: usize = 256;

/// Per-token masking data on the device, and the shapes and scalars of one call.
#[derive(Debug, Clone)]
struct Plan<B: Backend> {
    b: usize,
    s: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    block: usize,
    /// `[b, s]`: false for padding.
    valid: Tensor<B, 2, Bool>,
    /// `[b, s]` packed-sample ids.
    seg: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> Plan<B> {
    fn new(spec: &AttnSpec, block: usize, device: &B::Device) -> Self {
        let (b, s, nh, nkv, hd) = spec.dims();
        let m = &spec.masking;
        let valid = Tensor::from_data(TensorData::new(m.key_valid.clone(), [b, s]), device);
        let seg = m.segments.as_ref().map(|seg| {
            let ids: Vec<i32> = seg.iter().map(|&x| x as i32).collect();
            Tensor::from_data(TensorData::new(ids, [b, s]), device)
        });
        Plan {
            b,
            s,
            nh,
            nkv,
            hd,
            scale: spec.scale as f64,
            softcap: spec.softcap,
            window: m.window,
            block: block.max(1),
            valid,
            seg,
        }
    }

    /// Each block's query rows `r0..r1` and the keys `k0..k1` it can see (causal end, window start).
    fn blocks(&self) -> Vec<(usize, usize, usize, usize)> {
        (0..self.s)
            .step_by(self.block)
            .map(|r0| {
                let r1 = (r0 + self.block).min(self.s);
                let k0 = self.window.map_or(0, |w| (r0 + 1).saturating_sub(w));
                (r0, r1, k0, r1)
            })
            .collect()
    }

    /// The block's mask `[b, 1, rows, keys]` (true = blocked), [`super::Masking::row_into`]'s rule on the device.
    fn mask(&self, r0: usize, r1: usize, k0: usize, k1: usize) -> Tensor<B, 4, Bool> {
        let (b, bq, kn) = (self.b, r1 - r0, k1 - k0);
        let dev = self.valid.device();
        let shape = [b, bq, kn];
        let qpos = Tensor::<B, 1, Int>::arange(r0 as i64..r1 as i64, &dev)
            .reshape([1, bq, 1])
            .expand(shape);
        let kpos = Tensor::<B, 1, Int>::arange(k0 as i64..k1 as i64, &dev)
            .reshape([1, 1, kn])
            .expand(shape);
        let padding = self
            .valid
            .clone()
            .slice([0..b, k0..k1])
            .reshape([b, 1, kn])
            .expand(shape)
            .bool_not();
        let mut blocked = kpos.clone().greater(qpos.clone()).bool_or(padding);
        if let Some(w) = self.window {
            blocked = blocked.bool_or(qpos.clone().sub(kpos.clone()).greater_equal_elem(w as i64));
        }
        if let Some(seg) = &self.seg {
            let sq = seg
                .clone()
                .slice([0..b, r0..r1])
                .reshape([b, bq, 1])
                .expand(shape);
            let sk = seg
                .clone()
                .slice([0..b, k0..k1])
                .reshape([b, 1, kn])
                .expand(shape);
            blocked = blocked.bool_or(sq.not_equal(sk));
        }
        // A query with nothing to attend to (a fully padded row) attends to itself: finite, unused.
        let none_open = blocked
            .clone()
            .bool_not()
            .any_dim(2)
            .bool_not()
            .expand(shape);
        let own = kpos.equal(qpos).bool_and(none_open);
        blocked.bool_and(own.bool_not()).reshape([b, 1, bq, kn])
    }

    /// The block's query rows with the grouped heads folded in: `[b, nkv, g·rows, hd]`.
    fn rows5(&self, t: &Tensor<B, 4>, r0: usize, r1: usize) -> Tensor<B, 4> {
        t.clone()
            .slice([0..self.b, 0..self.nh, r0..r1, 0..self.hd])
            .reshape([self.b, self.nkv, self.nh / self.nkv * (r1 - r0), self.hd])
    }

    fn keys(&self, t: &Tensor<B, 4>, k0: usize, k1: usize) -> Tensor<B, 4> {
        t.clone()
            .slice([0..self.b, 0..self.nkv, k0..k1, 0..self.hd])
    }

    /// Scaled (and soft-capped) f32 scores `[b, nh, rows, keys]` of a block, before masking.
    fn scores(&self, q5: Tensor<B, 4>, k: &Tensor<B, 4>, (r0, r1, k0, k1): Blk) -> Tensor<B, 4> {
        let x = q5.matmul(self.keys(k, k0, k1).swap_dims(2, 3));
        let s = x
            .reshape([self.b, self.nh, r1 - r0, k1 - k0])
            .cast(DType::F32)
            .mul_scalar(self.scale);
        match self.softcap {
            Some(c) => s.div_scalar(c).tanh().mul_scalar(c),
            None => s,
        }
    }
}

type Blk = (usize, usize, usize, usize);

/// Forward on the inner backend: the output `[b, nh, s, hd]` (q's dtype) and the f32 log-sum-exp `[b, nh, s, 1]`.
fn forward<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    plan: &Plan<B>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let dtype = q.dtype();
    let (b, nh, nkv, hd) = (plan.b, plan.nh, plan.nkv, plan.hd);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for blk @ (r0, r1, k0, k1) in plan.blocks() {
        let (bq, kn) = (r1 - r0, k1 - k0);
        let s = live(plan.scores(plan.rows5(q, r0, r1), k, blk).mask_fill(
            plan.mask(r0, r1, k0, k1).expand([b, nh, bq, kn]),
            f32::NEG_INFINITY,
        ));
        let max = live(s.clone().max_dim(3));
        let e = live(s.sub(max.clone()).exp());
        let sum = live(e.clone().sum_dim(3));
        let p = live(e.div(sum.clone()).cast(dtype));
        let o = live(
            p.reshape([b, nkv, nh / nkv * bq, kn])
                .matmul(plan.keys(v, k0, k1))
                .reshape([b, nh, bq, hd]),
        );
        outs.push(o);
        lses.push(live(max.add(sum.log())));
    }
    // Read while the blocks' pieces and their concatenation are alive at once.
    let out = live((Tensor::cat(outs.clone(), 2), Tensor::cat(lses.clone(), 2)));
    drop((outs, lses));
    out
}

/// Backward on the inner backend: (dq, dk, dv) in the inputs' dtype.
fn backward<B: Backend>(d_o: Tensor<B, 4>, st: &Saved<B>) -> [Tensor<B, 4>; 3] {
    let plan = &st.plan;
    let dtype = st.q.dtype();
    let (b, s, nh, nkv, hd) = (plan.b, plan.s, plan.nh, plan.nkv, plan.hd);
    let g = nh / nkv;
    let dev = st.q.device();
    // D = rowsum(dO ∘ O), f32.
    let delta = d_o
        .clone()
        .cast(DType::F32)
        .mul(st.o.clone().cast(DType::F32))
        .sum_dim(3);
    let mut dqs = Vec::new();
    let mut dk = live(Tensor::<B, 4>::zeros([b, nkv, s, hd], (&dev, DType::F32)));
    let mut dv = live(Tensor::<B, 4>::zeros([b, nkv, s, hd], (&dev, DType::F32)));
    for blk @ (r0, r1, k0, k1) in plan.blocks() {
        let (bq, kn) = (r1 - r0, k1 - k0);
        let q5 = plan.rows5(&st.q, r0, r1);
        let capped = live(plan.scores(q5.clone(), &st.k, blk));
        let lse = st.lse.clone().slice([0..b, 0..nh, r0..r1, 0..1]);
        let p = live(
            capped
                .clone()
                .mask_fill(
                    plan.mask(r0, r1, k0, k1).expand([b, nh, bq, kn]),
                    f32::NEG_INFINITY,
                )
                .sub(lse)
                .exp(),
        );
        let do5 = plan.rows5(&d_o, r0, r1);
        let keys = [0..b, 0..nkv, k0..k1, 0..hd];
        let dv_blk = live(
            p.clone()
                .cast(dtype)
                .reshape([b, nkv, g * bq, kn])
                .swap_dims(2, 3)
                .matmul(do5.clone()),
        );
        dv = live(dv.clone().slice_assign(
            keys.clone(),
            dv.slice(keys.clone()).add(dv_blk.cast(DType::F32)),
        ));
        let dp = live(
            do5.matmul(plan.keys(&st.v, k0, k1).swap_dims(2, 3))
                .reshape([b, nh, bq, kn])
                .cast(DType::F32),
        );
        let d_blk = delta.clone().slice([0..b, 0..nh, r0..r1, 0..1]);
        let mut ds = live(p.mul(dp.sub(d_blk)));
        if let Some(c) = plan.softcap {
            // d(c·tanh(u/c))/du = 1 − tanh² = 1 − (capped/c)²
            ds = live(ds.mul(capped.div_scalar(c).powi_scalar(2).neg().add_scalar(1.0)));
        }
        let dx = live(
            ds.mul_scalar(plan.scale)
                .cast(dtype)
                .reshape([b, nkv, g * bq, kn]),
        );
        let dq_blk = live(dx.clone().matmul(plan.keys(&st.k, k0, k1)));
        dqs.push(dq_blk.reshape([b, nh, bq, hd]));
        let dk_blk = live(dx.swap_dims(2, 3).matmul(q5));
        dk = live(
            dk.clone()
                .slice_assign(keys.clone(), dk.slice(keys).add(dk_blk.cast(DType::F32))),
        );
    }
    let grads = live([
        Tensor::cat(dqs.clone(), 2),
        dk.clone().cast(dtype),
        dv.clone().cast(dtype),
    ]);
    drop((dqs, dk, dv));
    grads
}

#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    o: Tensor<B, 4>,
    lse: Tensor<B, 4>,
    plan: Plan<B>,
}

#[derive(Debug)]
struct BlockAttentionBackward;

impl<B: Backend> Backward<B, 3> for BlockAttentionBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o =
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let ds = backward(d_o, &ops.state);
        for (p, d) in ops.parents.iter().zip(ds) {
            if let Some(p) = p {
                grads.register::<B>(p.id, d.into_primitive().tensor());
            }
        }
    }
}

/// Attention of rotated q `[b, nh, s, hd]` over k / v `[b, nkv, s, hd]` (no KV cache), `[b, nh, s, hd]` out,
/// with its own backward.
pub fn attention<B: Backend>(
    q: Tensor<Autodiff<B>, 4>,
    k: Tensor<Autodiff<B>, 4>,
    v: Tensor<Autodiff<B>, 4>,
    spec: &AttnSpec,
    block: usize,
) -> Tensor<Autodiff<B>, 4> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let inner = |p: burn::tensor::ops::FloatTensor<B>| {
        Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p))
    };
    let (qi, ki, vi) = (
        inner(q.primitive.clone()),
        inner(k.primitive.clone()),
        inner(v.primitive.clone()),
    );
    let plan = Plan::new(spec, block, &qi.device());
    let (o, lse) = forward(&qi, &ki, &vi, &plan);
    let o_prim = o.clone().into_primitive().tensor();
    let out = match BlockAttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                q: qi,
                k: ki,
                v: vi,
                o,
                lse,
                plan,
            },
            o_prim,
        ),
        OpsKind::UnTracked(prep) => prep.finish(o_prim),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Whether [`attention`] takes this call: no KV cache, whole KV-head groups, masking data for every token.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn covers(spec: &AttnSpec) -> bool {
    spec.keys == spec.seq
        && spec.kv_heads > 0
        && spec.heads.is_multiple_of(spec.kv_heads)
        && spec.masking.key_valid.len() == spec.batch * spec.seq
}

/// `[b, nh, s, hd]` → `[b·s, nh·hd]`, the layout o_proj reads.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn rows<B: Backend>(o: Tensor<B, 4>) -> Tensor<B, 2> {
    let [b, nh, s, hd] = o.dims();
    o.swap_dims(1, 2).reshape([b * s, nh * hd])
}

/// The forward alone (inference: evaluation, generation without a cache).
pub fn attention_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: &AttnSpec,
    block: usize,
) -> Tensor<B, 4> {
    let plan = Plan::new(spec, block, &q.device());
    forward(&q, &k, &v, &plan).0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::kernels::check::AttnCase;
    use crate::kernels::{reference, Attention, Masking};

    type AD = Autodiff<Flex>;

    fn rel(a: &Tensor<AD, 4>, b: &Tensor<AD, 4>) -> f32 {
        let d = a.clone().sub(b.clone()).abs().max().into_scalar();
        let m = b.clone().abs().max().into_scalar();
        d / m.max(1e-12)
    }

    /// Blockwise attention equals the reference (values and q/k/v gradients) for every mask variant, with blocks
    /// smaller than, not dividing, and larger than the sequence.
    #[test]
    fn blockwise_equals_the_reference() {
        let dev = Default::default();
        let case = |batch, seq, heads, kv_heads| AttnCase {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: 8,
            window: None,
            packed: false,
            padded: false,
            softcap: None,
        };
        // (name, case, a masking in place of the case's)
        let cases = [
            ("causal gqa", case(2, 19, 4, 2), None),
            (
                "end padding, packing",
                AttnCase {
                    padded: true,
                    packed: true,
                    ..case(2, 21, 2, 2)
                },
                None,
            ),
            (
                // The second row's first 5 positions: fully padded queries attend to themselves.
                "left padding",
                case(2, 17, 2, 2),
                Some(Masking {
                    key_valid: (0..34).map(|i| !(17..22).contains(&i)).collect(),
                    ..Default::default()
                }),
            ),
            (
                "window + packing + softcap, one kv head",
                AttnCase {
                    window: Some(5),
                    packed: true,
                    softcap: Some(3.0),
                    ..case(1, 23, 4, 1)
                },
                None,
            ),
        ];
        for (name, c, masking) in cases {
            let (b, s, nh, nkv, hd) = (c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
            let mut spec = crate::kernels::check::case_spec(&c);
            if let Some(m) = masking {
                spec.masking = Arc::new(m);
            }
            let n = Distribution::Normal(0.0, 1.0);
            let q = Tensor::<AD, 4>::random([b, nh, s, hd], n, &dev);
            let k = Tensor::<AD, 4>::random([b, nkv, s, hd], n, &dev);
            let v = Tensor::<AD, 4>::random([b, nkv, s, hd], n, &dev);
            let dy = Tensor::<AD, 4>::random([b, nh, s, hd], n, &dev);
            // The reference on the same (already rotated) heads: its rows-layout attention with RoPE off.
            let att = Attention::<AD>::new(
                spec.clone(),
                burn::tensor::DType::F32,
                &dev,
                Attention::<AD>::shared_tables(),
            );
            let run = |blockwise: Option<usize>| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let o = match blockwise {
                    Some(block) => attention(q.clone(), k.clone(), v.clone(), &spec, block),
                    None => reference::attention_heads(q.clone(), k.clone(), v.clone(), &att),
                };
                let g = o.clone().mul(dy.clone()).sum().backward();
                let grads = [&q, &k, &v].map(|t| Tensor::<AD, 4>::from_inner(t.grad(&g).unwrap()));
                (o, grads)
            };
            let (o_ref, g_ref) = run(None);
            for block in [4, 7, 64] {
                let (o, g) = run(Some(block));
                assert!(
                    rel(&o, &o_ref) < 1e-5,
                    "{name}, block {block}: output {}",
                    rel(&o, &o_ref)
                );
                for (i, (a, r)) in g.iter().zip(&g_ref).enumerate() {
                    assert!(
                        rel(a, r) < 1e-5,
                        "{name}, block {block}: grad {i} off by {}",
                        rel(a, r)
                    );
                }
            }
            let fwd = attention_forward(
                q.clone().inner(),
                k.clone().inner(),
                v.clone().inner(),
                &spec,
                5,
            );
            let d = fwd.sub(o_ref.inner()).abs().max().into_scalar();
            assert!(d < 1e-5, "{name}: forward-only path off by {d}");
        }
    }
}
