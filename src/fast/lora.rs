//! A frozen linear layer with its LoRA adapter as one autodiff node:
//! `y = x·Wᵀ (+ b) + s·(x̃·Aᵀ)·Bᵀ`, x̃ = x ∘ dropout mask (or x).
//!
//! The adapter's product accumulates into `y` inside the GEMM (no `delta` temporary, no separate scale and add
//! passes); the backward forms `u = s·dy·B` once and reuses it for dx (`dy·W + u·A`, accumulated in place),
//! dA (`uᵀ·x̃`) and dB (`s·dyᵀ·(x̃·Aᵀ)`). W stays in torch layout `[out, in]`; the GEMM reads it transposed.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::{flex_f32, flex_of, from_ad, from_flex, kind, Kind, Rows};

fn rows_ref(r: &Rows) -> MatRef<'_> {
    MatRef::rows(r.data(), r.off, r.rows, r.cols, r.rs)
}

#[derive(Debug, Clone)]
struct State {
    /// x̃ (the adapter's input after dropout).
    xd: FlexTensor,
    /// Dropout mask (already scaled), when there is one.
    mask: Option<FlexTensor>,
    /// x̃·Aᵀ, `[n, r]`.
    low: FlexTensor,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    scale: f32,
}

#[derive(Debug)]
struct LoraBackward;

impl Backward<Flex, 3> for LoraBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let s = ops.state;
        let [px, pa, pb] = ops.parents;
        let dy = Rows::of(&grad);
        let (w, a, b) = (Rows::of(&s.w), Rows::of(&s.a), Rows::of(&s.b));
        let (n, out, inp, r) = (dy.rows, w.rows, w.cols, a.rows);
        // u = s·dy·B, [n, r]
        let mut u = vec![0f32; n * r];
        gemm(
            MatMut::packed(&mut u, n, r),
            rows_ref(&dy),
            rows_ref(&b),
            s.scale,
            false,
            true,
        );
        if let Some(p) = px {
            let mut dx = vec![0f32; n * inp];
            gemm(
                MatMut::packed(&mut dx, n, inp),
                rows_ref(&dy),
                rows_ref(&w),
                1.0,
                false,
                true,
            );
            match &s.mask {
                None => gemm(
                    MatMut::packed(&mut dx, n, inp),
                    MatRef::packed(&u, n, r),
                    rows_ref(&a),
                    1.0,
                    true,
                    true,
                ),
                Some(m) => {
                    let mut t = vec![0f32; n * inp];
                    gemm(
                        MatMut::packed(&mut t, n, inp),
                        MatRef::packed(&u, n, r),
                        rows_ref(&a),
                        1.0,
                        false,
                        true,
                    );
                    let m = Rows::of(m);
                    dx.par_chunks_mut(inp.max(1))
                        .zip(t.par_chunks(inp.max(1)))
                        .enumerate()
                        .for_each(|(i, (d, t))| {
                            for ((d, t), m) in d.iter_mut().zip(t).zip(m.row(i)) {
                                *d += t * m;
                            }
                        });
                }
            }
            grads.register::<Flex>(p.id, flex_f32(dx, &[n, inp]));
        }
        if let Some(p) = pa {
            let xd = Rows::of(&s.xd);
            let mut da = vec![0f32; r * inp];
            gemm(
                MatMut::packed(&mut da, r, inp),
                MatRef::packed(&u, n, r).t(),
                rows_ref(&xd),
                1.0,
                false,
                true,
            );
            grads.register::<Flex>(p.id, flex_f32(da, &[r, inp]));
        }
        if let Some(p) = pb {
            let low = Rows::of(&s.low);
            let mut db = vec![0f32; out * r];
            gemm(
                MatMut::packed(&mut db, out, r),
                rows_ref(&dy).t(),
                rows_ref(&low),
                s.scale,
                false,
                true,
            );
            grads.register::<Flex>(p.id, flex_f32(db, &[out, r]));
        }
    }
}

/// The inputs of a fused LoRA linear (all tensors on the same backend).
pub struct LoraInputs<'a, B: Backend> {
    pub weight: &'a Tensor<B, 2>,
    pub bias: Option<&'a Tensor<B, 1>>,
    pub a: &'a Tensor<B, 2>,
    pub b: &'a Tensor<B, 2>,
    pub scale: f64,
}

/// `x·Wᵀ (+ bias) + s·((x ∘ mask)·Aᵀ)·Bᵀ` as one node, for f32 tensors on `Flex` / `Autodiff<Flex>` with a frozen
/// W / bias; `Err((x, mask))` when it does not apply.
#[allow(clippy::type_complexity)]
pub fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    mask: Option<Tensor<B, 2>>,
    p: &LoraInputs<'_, B>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Option<Tensor<B, 2>>)> {
    let Some(k) = kind::<B>() else {
        return Err((x, mask));
    };
    let (wf, w_tracked) = flex_of(p.weight, k);
    let bias = p.bias.map(|b| flex_of(b, k));
    let (af, _) = flex_of(p.a, k);
    let (bf, _) = flex_of(p.b, k);
    let (xf, _) = flex_of(&x, k);
    let maskf = mask.as_ref().map(|m| flex_of(m, k));
    let mut all = vec![&wf, &af, &bf, &xf];
    if let Some((b, _)) = &bias {
        all.push(b);
    }
    if let Some((m, _)) = &maskf {
        all.push(m);
    }
    if w_tracked
        || bias.as_ref().is_some_and(|(_, t)| *t)
        || maskf.as_ref().is_some_and(|(_, t)| *t)
        || !super::all_f32(&all)
    {
        return Err((x, mask));
    }
    let xr = Rows::of(&xf);
    let (w, a, b) = (Rows::of(&wf), Rows::of(&af), Rows::of(&bf));
    let (n, inp, out, r) = (xr.rows, xr.cols, w.rows, a.rows);
    if w.cols != inp || a.cols != inp || b.rows != out || b.cols != r {
        return Err((x, mask));
    }
    let scale = p.scale as f32;
    let mut y = vec![0f32; n * out];
    gemm(
        MatMut::packed(&mut y, n, out),
        rows_ref(&xr),
        rows_ref(&w).t(),
        1.0,
        false,
        true,
    );
    if let Some((bt, _)) = &bias {
        let bv = Rows::of(bt).packed().into_owned();
        if bv.len() != out {
            return Err((x, mask));
        }
        y.par_chunks_mut(out.max(1)).for_each(|row| {
            for (o, b) in row.iter_mut().zip(&bv) {
                *o += b;
            }
        });
    }
    let xd = match &maskf {
        None => xf.clone(),
        Some((m, _)) => {
            let m = Rows::of(m);
            let mut v = vec![0f32; n * inp];
            v.par_chunks_mut(inp.max(1))
                .enumerate()
                .for_each(|(i, row)| {
                    for ((o, x), m) in row.iter_mut().zip(xr.row(i)).zip(m.row(i)) {
                        *o = x * m;
                    }
                });
            flex_f32(v, &[n, inp])
        }
    };
    let xdr = Rows::of(&xd);
    let mut low = vec![0f32; n * r];
    gemm(
        MatMut::packed(&mut low, n, r),
        rows_ref(&xdr),
        rows_ref(&a).t(),
        1.0,
        false,
        true,
    );
    gemm(
        MatMut::packed(&mut y, n, out),
        MatRef::packed(&low, n, r),
        rows_ref(&b).t(),
        scale,
        true,
        true,
    );
    let out_t = flex_f32(y, &[n, out]);
    match k {
        Kind::Plain => Ok(from_flex(out_t)),
        Kind::Autodiff => {
            let xa = super::ad_prim(x);
            let aa = super::ad_prim(p.a.clone());
            let ba = super::ad_prim(p.b.clone());
            let t = match LoraBackward
                .prepare::<NoCheckpointing>([xa.node.clone(), aa.node.clone(), ba.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    State {
                        xd,
                        mask: maskf.map(|(m, _)| m),
                        low: flex_f32(low, &[n, r]),
                        w: wf,
                        a: af,
                        b: bf,
                        scale,
                    },
                    out_t,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out_t),
            };
            Ok(from_ad(t))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::tests_util::*;
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
            let lin = LoraLinear::<AD> {
                weight: plain::<2>(&w, [out, inp], &dev),
                bias: with_bias.then(|| plain::<1>(&bias, [out], &dev)),
                lora: Some(LoraAdapter {
                    a: ad_param::<2>(&a, [r, inp], &dev),
                    b: ad_param::<2>(&b, [out, r], &dev),
                    scale: 2.5,
                    dropout: if with_mask { 0.2 } else { 0.0 },
                }),
                merged: false,
            };
            let mask = with_mask.then(|| plain::<2>(&m, [n, inp], &dev));
            let y = if fused {
                let l = lin.lora.as_ref().expect("adapter");
                let p = LoraInputs {
                    weight: &lin.weight,
                    bias: lin.bias.as_ref(),
                    a: &l.a,
                    b: &l.b,
                    scale: l.scale,
                };
                lora_linear(xt.clone(), mask, &p)
                    .ok()
                    .expect("fused path applies")
            } else {
                lin.forward_plain(xt.clone(), mask)
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
}
