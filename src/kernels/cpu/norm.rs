//! RMSNorm over the last dimension: `y = x · rstd · w̃`, rstd = 1/√(mean(x²) + eps), w̃ = w or 1 + w (Gemma).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::simd::{self, simd_fn};
use super::{flex_f32, Cpu, Rows};
use crate::kernels::{prof, NormRef};

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

simd_fn! {
    fn fwd_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
        let d = x.len();
        let ms = simd::dot(x, x) / d as f32;
        let rstd = 1.0 / (ms + eps).sqrt();
        for ((o, &a), &b) in y.iter_mut().zip(x).zip(w) {
            *o = a * rstd * b;
        }
        rstd
    }
}

simd_fn! {
    fn bwd_row(dy: &[f32], x: &[f32], w: &[f32], rstd: f32, dx: &mut [f32]) {
        let d = x.len();
        // g = dy·w̃; dx = rstd·(g − x·rstd²·(g·x)/d)
        let mut acc = [0f32; 16];
        let mut i = 0;
        while i + 16 <= d {
            for l in 0..16 {
                acc[l] += dy[i + l] * w[i + l] * x[i + l];
            }
            i += 16;
        }
        let mut gx: f32 = acc.iter().sum();
        while i < d {
            gx += dy[i] * w[i] * x[i];
            i += 1;
        }
        let c = rstd * rstd * gx / d as f32;
        for j in 0..d {
            dx[j] = rstd * (dy[j] * w[j] - x[j] * c);
        }
    }
}

/// Forward on host rows: returns (y packed `[rows, d]`, rstd per row).
pub(crate) fn forward_host(x: &Rows, w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = x.cols;
    let mut y = vec![0f32; x.rows * d];
    let mut rstd = vec![0f32; x.rows];
    if d == 0 {
        return (y, rstd);
    }
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .enumerate()
        .for_each(|(t, (yc, rc))| {
            for (k, (yr, r)) in yc.chunks_mut(d).zip(rc.iter_mut()).enumerate() {
                *r = fwd_row(x.row(t * ROWS_PER_TASK + k), w, eps, yr);
            }
        });
    (y, rstd)
}

/// Backward on host rows: dx packed `[rows, d]`.
pub(crate) fn backward_host(dy: &Rows, x: &Rows, w: &[f32], rstd: &[f32]) -> Vec<f32> {
    let d = x.cols;
    let mut dx = vec![0f32; x.rows * d];
    if d == 0 {
        return dx;
    }
    dx.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, c)| {
            for (k, r) in c.chunks_mut(d).enumerate() {
                let i = t * ROWS_PER_TASK + k;
                bwd_row(dy.row(i), x.row(i), w, rstd[i], r);
            }
        });
    dx
}

#[derive(Debug, Clone)]
struct State {
    x: FlexTensor,
    w: Arc<Vec<f32>>,
    rstd: Arc<Vec<f32>>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 1> for RmsNormBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [parent] = ops.parents;
        if let Some(p) = parent {
            let s = ops.state;
            let _t = prof::time(prof::Cat::NormBwd, 0.0);
            let shape = s.x.layout().shape().clone();
            let dx = backward_host(&Rows::of(&grad), &Rows::of(&s.x), &s.w, &s.rstd);
            grads.register::<Flex>(p.id, flex_f32(dx, &shape));
        }
    }
}

/// RMSNorm over the last dimension of an f32 tensor with a frozen weight; `offset` is added to the weight (1 for
/// Gemma's `x̂·(1 + w)`). `None` when the inputs are outside what the kernel covers.
pub fn rms_norm<B: Cpu, const D: usize>(
    x: &Tensor<B, D>,
    norm: &NormRef<'_, B>,
) -> Option<Tensor<B, D>> {
    let (eps, offset) = (norm.eps, norm.offset);
    let wi = B::input(norm.weight);
    let xi = B::input(x);
    let (wt, xf) = (B::flex(&wi), B::flex(&xi));
    if B::tracked(&wi) || !super::all_f32(&[wt, xf]) {
        return None;
    }
    let mut w = Rows::of(wt).packed().into_owned();
    if w.len() != *xf.layout().shape().last().unwrap_or(&0) {
        return None;
    }
    if offset != 0.0 {
        w.iter_mut().for_each(|v| *v += offset);
    }
    let shape = xf.layout().shape().clone();
    let rows = Rows::of(xf);
    let timer = prof::time(prof::Cat::NormFwd, 0.0);
    let (y, rstd) = forward_host(&rows, &w, eps as f32);
    drop(timer);
    let state = State {
        x: xf.clone(),
        w: Arc::new(w),
        rstd: Arc::new(rstd),
    };
    Some(B::output(RmsNormBackward, [xi], state, flex_f32(y, &shape)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests_util::*;
    use crate::kernels::reference;

    #[test]
    fn rms_norm_matches_plain_values_and_gradients() {
        for offset in [0.0, 1.0] {
            let x = rand_vec(6 * 40, 1);
            let w = rand_vec(40, 2);
            let dy = rand_vec(6 * 40, 3);
            let run = |fused: bool| {
                let dev = Default::default();
                let xt = ad_param::<2>(&x, [6, 40], &dev);
                let wt = plain::<1>(&w, [40], &dev);
                let norm = NormRef {
                    weight: &wt,
                    eps: 1e-5,
                    offset,
                };
                let y = if fused {
                    rms_norm(&xt, &norm).expect("fused path applies")
                } else {
                    reference::rms_norm(xt.clone(), &norm)
                };
                let g = backward_with(y.clone(), &dy, [6, 40]);
                (to_vec(y), to_vec(xt.grad(&g).expect("grad")))
            };
            let (y1, g1) = run(true);
            let (y0, g0) = run(false);
            assert_close(&y1, &y0, 1e-5, "rmsnorm values");
            assert_close(&g1, &g0, 1e-5, "rmsnorm grad");
        }
    }

    #[test]
    fn rms_norm_on_a_strided_view() {
        // A column slice (row stride 64, 40 columns) of a [6, 64] tensor, as for fused projections.
        let dev = Default::default();
        let x = rand_vec(6 * 64, 4);
        let w = rand_vec(40, 5);
        let xt = plain::<2>(&x, [6, 64], &dev).slice([0..6, 10..50]);
        let wt = plain::<1>(&w, [40], &dev);
        let norm = NormRef {
            weight: &wt,
            eps: 1e-6,
            offset: 0.0,
        };
        let a = to_vec(rms_norm(&xt, &norm).expect("fused"));
        let b = to_vec(reference::rms_norm(xt, &norm));
        assert_close(&a, &b, 1e-5, "strided rmsnorm");
    }
}
