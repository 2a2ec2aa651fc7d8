//! `lm_head` + cross-entropy without vocabulary-sized activations.
//!
//! The loss is `Σ_i lse(h_i·Wᵀ) − (h_i·Wᵀ)[t_i]` over the selected rows i. Rows go through in chunks of
//! [`chunk_rows`]: one GEMM gives the chunk's logits `[c, V]`, one pass per row gives the log-sum-exp and turns
//! the row into `softmax − onehot(t)`, and — when a gradient is wanted — a second GEMM gives that chunk's
//! `∂loss/∂h = (softmax − onehot)·W` right away. Only `[n, hidden]` is kept for the backward, which scales it by
//! the incoming gradient (the loss is a scalar, so this is exact: nothing is recomputed, no `[n, V]` logits,
//! probabilities or gradients are stored). W (`[V, hidden]`, torch layout, tied or not) must be frozen.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::simd::{self, simd_fn};
use super::{flex_f32, flex_of, from_ad, from_flex, kind, Kind, Rows};

/// Largest number of rows per chunk (`LORATUNE_XENT_CHUNK` overrides; default 512: a 100 MB logits buffer for a
/// 49k vocabulary, large enough for the GEMMs to run at full speed).
pub fn chunk_rows() -> usize {
    std::env::var("LORATUNE_XENT_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(512)
}

simd_fn! {
    /// Row of logits → (lse, logit[t]); with `grad`, the row becomes softmax − onehot(t).
    fn row_loss(row: &mut [f32], t: usize, grad: bool) -> (f32, f32) {
        let zt = row[t];
        let m = simd::max(row);
        if grad {
            let s = simd::exp_shift_sum(row, m);
            let inv = 1.0 / s;
            for v in row.iter_mut() {
                *v *= inv;
            }
            row[t] -= 1.0;
            (m + s.ln(), zt)
        } else {
            let s = simd::exp_shift_sum_ro(row, m);
            (m + s.ln(), zt)
        }
    }
}

/// Loss sum and, with `grad`, ∂loss/∂hidden `[n_all, d]` (zero on unselected rows).
pub(crate) fn forward_host(
    h: &Rows,
    w: &Rows,
    rows: &[usize],
    targets: &[usize],
    grad: bool,
    chunk: usize,
) -> (f64, Option<Vec<f32>>) {
    let (d, vocab) = (h.cols, w.rows);
    // Equal chunks of at most `chunk` rows.
    let n_chunks = rows.len().div_ceil(chunk.max(1)).max(1);
    let c = rows.len().div_ceil(n_chunks).max(1);
    let mut logits = vec![0f32; c * vocab];
    let mut hc = vec![0f32; c * d];
    let mut dhc = vec![0f32; c * d];
    let mut dh = grad.then(|| vec![0f32; h.rows * d]);
    let mut total = 0f64;
    let wref = MatRef::rows(w.data(), w.off, w.rows, w.cols, w.rs);
    for (ch, tg) in rows.chunks(c).zip(targets.chunks(c)) {
        let cn = ch.len();
        for (k, &r) in ch.iter().enumerate() {
            hc[k * d..(k + 1) * d].copy_from_slice(h.row(r));
        }
        gemm(
            MatMut::packed(&mut logits[..cn * vocab], cn, vocab),
            MatRef::packed(&hc[..cn * d], cn, d),
            wref.t(),
            1.0,
            false,
            true,
        );
        let part: f64 = logits[..cn * vocab]
            .par_chunks_mut(vocab)
            .zip(tg.par_iter())
            .map(|(row, &t)| {
                let (lse, zt) = row_loss(row, t, grad);
                (lse - zt) as f64
            })
            .sum();
        total += part;
        if let Some(dh) = dh.as_mut() {
            gemm(
                MatMut::packed(&mut dhc[..cn * d], cn, d),
                MatRef::packed(&logits[..cn * vocab], cn, vocab),
                wref,
                1.0,
                false,
                true,
            );
            for (k, &r) in ch.iter().enumerate() {
                dh[r * d..(r + 1) * d].copy_from_slice(&dhc[k * d..(k + 1) * d]);
            }
        }
    }
    (total, dh)
}

#[derive(Debug)]
struct XentBackward;

impl Backward<Flex, 1> for XentBackward {
    /// ∂loss/∂hidden.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let Some(p) = parent {
            let _t = super::prof::time(super::prof::Cat::XentBwd, 0.0);
            let g = Rows::of(&grad).row(0)[0];
            let dh = ops.state;
            let shape = dh.layout().shape().clone();
            let mut v = Rows::of(&dh).packed().into_owned();
            v.par_chunks_mut(4096).for_each(|c| {
                for x in c {
                    *x *= g;
                }
            });
            grads.register::<Flex>(p.id, flex_f32(v, &shape));
        }
    }
}

/// Summed token cross-entropy of `hidden[rows]·weightᵀ` against `targets` (a `[1]` tensor), for f32 tensors on
/// `Flex` / `Autodiff<Flex>` with a frozen `weight` `[V, hidden]`; `Err(hidden)` when it does not apply.
/// Targets must be `< V` (checked).
pub fn lm_xent<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    rows: &[usize],
    targets: &[usize],
) -> Result<Tensor<B, 1>, Tensor<B, 2>> {
    lm_xent_chunked(hidden, weight, rows, targets, chunk_rows())
}

fn lm_xent_chunked<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    rows: &[usize],
    targets: &[usize],
    chunk: usize,
) -> Result<Tensor<B, 1>, Tensor<B, 2>> {
    let Some(k) = kind::<B>() else {
        return Err(hidden);
    };
    let (wf, w_tracked) = flex_of(weight, k);
    let (hf, h_tracked) = flex_of(&hidden, k);
    if w_tracked || !super::all_f32(&[&wf, &hf]) || rows.len() != targets.len() {
        return Err(hidden);
    }
    let (h, w) = (Rows::of(&hf), Rows::of(&wf));
    if w.cols != h.cols || rows.iter().any(|&r| r >= h.rows) || targets.iter().any(|&t| t >= w.rows)
    {
        return Err(hidden);
    }
    let want_grad = k == Kind::Autodiff && h_tracked;
    let flops = 2.0 * (rows.len() * h.cols * w.rows) as f64 * if want_grad { 2.0 } else { 1.0 };
    let timer = super::prof::time(super::prof::Cat::XentFwd, flops);
    let (loss, dh) = forward_host(&h, &w, rows, targets, want_grad, chunk);
    drop(timer);
    let out = flex_f32(vec![loss as f32], &[1]);
    match k {
        Kind::Plain => Ok(from_flex(out)),
        Kind::Autodiff => {
            let ha = super::ad_prim(hidden);
            let shape = [h.rows, h.cols];
            let t = match XentBackward
                .prepare::<NoCheckpointing>([ha.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let dh = dh.unwrap_or_else(|| vec![0f32; shape[0] * shape[1]]);
                    prep.finish(flex_f32(dh, &shape), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            Ok(from_ad(t))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::tests_util::*;
    use burn::tensor::{activation, Int, TensorData};

    #[test]
    fn xent_matches_plain_log_softmax_gather() {
        let (n, d, v) = (9, 16, 300);
        let h = rand_vec(n * d, 31);
        let w = rand_vec(v * d, 32)
            .iter()
            .map(|x| x * 3.0)
            .collect::<Vec<_>>();
        let rows = vec![0usize, 2, 3, 5, 8];
        let targets = vec![7usize, 299, 0, 150, 7];
        let run = |fused: Option<usize>| {
            let dev = Default::default();
            let ht = ad_param::<2>(&h, [n, d], &dev);
            let wt = plain::<2>(&w, [v, d], &dev);
            let loss = if let Some(chunk) = fused {
                lm_xent_chunked(ht.clone(), &wt, &rows, &targets, chunk).expect("fused")
            } else {
                let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
                let idx = Tensor::<AD, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &dev);
                let logits = ht.clone().select(0, idx).matmul(wt.clone().transpose());
                let tg: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
                let tg =
                    Tensor::<AD, 2, Int>::from_data(TensorData::new(tg, [rows.len(), 1]), &dev);
                activation::log_softmax(logits, 1).gather(1, tg).sum().neg()
            };
            // A non-unit upstream gradient (the trainer divides by the token count).
            let g = loss.clone().mul_scalar(0.37).backward();
            (to_vec(loss), to_vec(ht.grad(&g).expect("grad")))
        };
        let (l1, g1) = run(Some(128));
        let (l0, g0) = run(None);
        assert_close(&l1, &l0, 1e-4, "xent loss");
        assert_close(&g1, &g0, 1e-5, "xent grad");
        // Chunking does not change anything.
        let (l2, g2) = run(Some(2));
        assert_close(&l2, &l0, 1e-4, "chunked loss");
        assert_close(&g2, &g0, 1e-5, "chunked grad");
    }
}
