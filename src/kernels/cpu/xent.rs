//! `lm_head` + cross-entropy without vocabulary-sized activations.
//!
//! The loss is `Σ_i lse(h_i·Wᵀ) − (h_i·Wᵀ)[t_i]` over the selected rows i, and — the loss being the graph's
//! root — its gradient with respect to the hidden states, `(softmax_i − onehot(t_i))·W`, is formed during the
//! forward: only `[n, hidden]` is kept for the backward, which scales it by the incoming gradient (exact,
//! nothing recomputed). The vocabulary is swept in tiles of [`tile_cols`] columns with an online softmax (as
//! flash attention does over keys): per tile one GEMM gives the logits `[rows, tile]`, one pass per row updates
//! the running max m and sum s and turns the tile into `exp(logit − m)`, and a second GEMM accumulates
//! `exp(logits − m)·W_tile` into `dh` after rescaling its rows by `exp(m_old − m_new)`. At the end
//! `dh = dh / s − W[t]`, `lse = m + ln s`. W (`[V, hidden]`, torch layout, tied or not) is read once per row
//! chunk and the logits tile stays in the cache. W must be frozen.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::qgemm::WeightRows;
use super::simd::{self, simd_fn};
use super::{flex_f32, Cpu, Rows};
use crate::kernels::prof;
use crate::quant::Frozen;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&c: &usize| c > 0)
}

/// Largest number of rows swept together (`LORATUNE_XENT_CHUNK` overrides; default 1024).
pub fn chunk_rows() -> usize {
    env_usize("LORATUNE_XENT_CHUNK").unwrap_or(1024)
}

/// Vocabulary columns per tile for `rows` rows (`LORATUNE_XENT_TILE` overrides): a logits tile of ~8 MB, which
/// stays in the last-level cache between the two GEMMs.
pub fn tile_cols(rows: usize) -> usize {
    env_usize("LORATUNE_XENT_TILE")
        .unwrap_or_else(|| ((2 << 20) / rows.max(1)).clamp(256, 8192) / 16 * 16)
}

simd_fn! {
    /// One row of a logits tile: update the running (max, sum) and write `exp(logit − new max)` in place (when
    /// `write`). Returns the factor `exp(old max − new max)` that earlier accumulations must be scaled by.
    fn tile_row(row: &mut [f32], m: &mut f32, s: &mut f32, write: bool) -> f32 {
        let tmax = simd::max(row);
        let m_new = if tmax > *m { tmax } else { *m };
        let fac = if *m == f32::NEG_INFINITY { 0.0 } else { simd::exp(*m - m_new) };
        let part = if write {
            simd::exp_shift_sum(row, m_new)
        } else {
            simd::exp_shift_sum_ro(row, m_new)
        };
        *s = *s * fac + part;
        *m = m_new;
        fac
    }
}

/// Loss sum and, with `grad`, ∂loss/∂hidden `[n_all, d]` (zero on unselected rows).
pub(crate) fn forward_host(
    h: &Rows,
    w: &WeightRows<'_>,
    rows: &[usize],
    targets: &[usize],
    grad: bool,
    chunk: usize,
    tile: Option<usize>,
) -> (f64, Option<Vec<f32>>) {
    let (d, vocab) = (h.cols, w.rows());
    let n_chunks = rows.len().div_ceil(chunk.max(1)).max(1);
    let c = rows.len().div_ceil(n_chunks).max(1);
    let tw = tile
        .unwrap_or_else(|| tile_cols(c))
        .max(1)
        .min(vocab.max(1));
    let mut logits = vec![0f32; c * tw];
    let mut hc = vec![0f32; c * d];
    let mut acc = vec![0f32; c * d];
    let mut dh = grad.then(|| vec![0f32; h.rows * d]);
    let mut total = 0f64;
    let mut wbuf = Vec::new();
    let mut trow = Vec::new();
    for (ch, tg) in rows.chunks(c).zip(targets.chunks(c)) {
        let cn = ch.len();
        for (k, &r) in ch.iter().enumerate() {
            hc[k * d..(k + 1) * d].copy_from_slice(h.row(r));
        }
        let hm = MatRef::packed(&hc[..cn * d], cn, d);
        let mut m = vec![f32::NEG_INFINITY; cn];
        let mut s = vec![0f32; cn];
        let mut zt = vec![0f32; cn];
        let mut fac = vec![0f32; cn];
        acc[..cn * d].fill(0.0);
        let mut v0 = 0;
        while v0 < vocab {
            let v1 = (v0 + tw).min(vocab);
            let tn = v1 - v0;
            let lt = &mut logits[..cn * tn];
            let w_tile = w.tile(v0, v1, &mut wbuf);
            gemm(MatMut::packed(lt, cn, tn), hm, w_tile.t(), 1.0, false, true);
            lt.par_chunks_mut(tn)
                .zip(m.par_iter_mut())
                .zip(s.par_iter_mut())
                .zip(zt.par_iter_mut())
                .zip(fac.par_iter_mut())
                .zip(tg.par_iter())
                .for_each(|(((((row, m), s), z), f), &t)| {
                    if (v0..v1).contains(&t) {
                        *z = row[t - v0];
                    }
                    *f = tile_row(row, m, s, grad);
                });
            if grad {
                acc[..cn * d]
                    .par_chunks_mut(d.max(1))
                    .zip(fac.par_iter())
                    .for_each(|(row, &f)| {
                        if f != 1.0 {
                            row.iter_mut().for_each(|x| *x *= f);
                        }
                    });
                gemm(
                    MatMut::packed(&mut acc[..cn * d], cn, d),
                    MatRef::packed(lt, cn, tn),
                    w_tile,
                    1.0,
                    true,
                    true,
                );
            }
            v0 = v1;
        }
        total += (0..cn)
            .map(|k| (m[k] + s[k].ln() - zt[k]) as f64)
            .sum::<f64>();
        if let Some(dh) = dh.as_mut() {
            for (k, (&r, &t)) in ch.iter().zip(tg).enumerate() {
                let inv = 1.0 / s[k];
                let wm = w.tile(t, t + 1, &mut trow);
                let wt = &wm.data[wm.off..wm.off + d];
                for ((o, &a), &wv) in dh[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(&acc[k * d..(k + 1) * d])
                    .zip(wt)
                {
                    *o = a * inv - wv;
                }
            }
        }
    }
    (total, dh)
}

#[derive(Debug)]
struct XentBackward;

impl Backward<Flex, 1> for XentBackward {
    /// ∂loss/∂hidden (formed during the forward whenever hidden is tracked).
    type State = Option<FlexTensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let (Some(p), Some(dh)) = (parent, ops.state) {
            let _t = prof::time(prof::Cat::XentBwd, 0.0);
            let g = Rows::of(&grad).row(0)[0];
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

/// Summed token cross-entropy of `hidden[rows]·weightᵀ` against `targets` (a `[1]` tensor), for f32 tensors
/// with a frozen `weight` `[V, hidden]`; `None` when the inputs are outside what the kernel covers (targets must
/// be `< V`).
pub fn lm_xent<B: Cpu>(
    hidden: &Tensor<B, 2>,
    weight: &Frozen<B>,
    rows: &[usize],
    targets: &[usize],
) -> Option<Tensor<B, 1>> {
    lm_xent_chunked(hidden, weight, rows, targets, chunk_rows(), None)
}

fn lm_xent_chunked<B: Cpu>(
    hidden: &Tensor<B, 2>,
    weight: &Frozen<B>,
    rows: &[usize],
    targets: &[usize],
    chunk: usize,
    tile: Option<usize>,
) -> Option<Tensor<B, 1>> {
    let hi = B::input(hidden);
    let hf = B::flex(&hi);
    if !super::all_f32(&[hf]) || rows.len() != targets.len() {
        return None;
    }
    let h = Rows::of(hf);
    let dense;
    let w = match weight {
        Frozen::Dense(t) => {
            let wi = B::input(t);
            if B::tracked(&wi) || !super::all_f32(&[B::flex(&wi)]) {
                return None;
            }
            dense = Rows::of(B::flex(&wi));
            WeightRows::Dense(MatRef::rows(
                dense.data(),
                dense.off,
                dense.rows,
                dense.cols,
                dense.rs,
            ))
        }
        Frozen::Quant { q, .. } => WeightRows::Quant(q),
    };
    if w.cols() != h.cols
        || rows.iter().any(|&r| r >= h.rows)
        || targets.iter().any(|&t| t >= w.rows())
    {
        return None;
    }
    let want_grad = B::AUTODIFF && B::tracked(&hi);
    let flops = 2.0 * (rows.len() * h.cols * w.rows()) as f64 * if want_grad { 2.0 } else { 1.0 };
    let timer = prof::time(prof::Cat::XentFwd, flops);
    let (loss, dh) = forward_host(&h, &w, rows, targets, want_grad, chunk, tile);
    drop(timer);
    let out = flex_f32(vec![loss as f32], &[1]);
    let state = dh.map(|dh| flex_f32(dh, &[h.rows, h.cols]));
    Some(B::output(XentBackward, [hi], state, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests_util::*;
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
        let run = |fused: Option<(usize, Option<usize>)>| {
            let dev = Default::default();
            let ht = ad_param::<2>(&h, [n, d], &dev);
            let wt = Frozen::Dense(plain::<2>(&w, [v, d], &dev));
            let loss = if let Some((chunk, tile)) = fused {
                lm_xent_chunked(&ht, &wt, &rows, &targets, chunk, tile).expect("fused")
            } else {
                let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
                let idx = Tensor::<AD, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &dev);
                let logits = ht.clone().select(0, idx).matmul(wt.dense().transpose());
                let tg: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
                let tg =
                    Tensor::<AD, 2, Int>::from_data(TensorData::new(tg, [rows.len(), 1]), &dev);
                activation::log_softmax(logits, 1).gather(1, tg).sum().neg()
            };
            // A non-unit upstream gradient (the trainer divides by the token count).
            let g = loss.clone().mul_scalar(0.37).backward();
            (to_vec(loss), to_vec(ht.grad(&g).expect("grad")))
        };
        let (l1, g1) = run(Some((128, None)));
        let (l0, g0) = run(None);
        assert_close(&l1, &l0, 1e-4, "xent loss");
        assert_close(&g1, &g0, 1e-5, "xent grad");
        // Row chunks and vocabulary tiles (with a partial last tile) do not change anything.
        for (chunk, tile) in [(2, Some(64)), (3, Some(7)), (4, Some(300))] {
            let (l2, g2) = run(Some((chunk, tile)));
            assert_close(&l2, &l0, 1e-4, "chunked loss");
            assert_close(&g2, &g0, 1e-5, "chunked grad");
        }
    }
}
