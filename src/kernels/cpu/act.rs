//! The gated MLP activation `silu(gate) · up` in one pass (and one pass back).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::simd::{self, simd_fn};
use super::{flex_f32, Cpu, Rows};
use crate::kernels::prof;

const ROWS_PER_TASK: usize = 8;

simd_fn! {
    fn fwd_row(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
            *o = a * simd::sigmoid(a) * b;
        }
    }
}

simd_fn! {
    fn bwd_row(dy: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for j in 0..dy.len() {
            let a = g[j];
            let s = simd::sigmoid(a);
            let silu = a * s;
            dg[j] = dy[j] * u[j] * (s + silu * (1.0 - s));
            du[j] = dy[j] * silu;
        }
    }
}

fn forward_host(g: &Rows, u: &Rows) -> Vec<f32> {
    let d = g.cols;
    let mut y = vec![0f32; g.rows * d];
    if d == 0 {
        return y;
    }
    y.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, c)| {
            for (k, r) in c.chunks_mut(d).enumerate() {
                let i = t * ROWS_PER_TASK + k;
                fwd_row(g.row(i), u.row(i), r);
            }
        });
    y
}

/// What the backward keeps: the input gate|up, `[n, 2i]`.
#[derive(Debug, Clone)]
struct State {
    gate_up: FlexTensor,
}

#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 1> for SiluMulBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let r = Rows::of(&ops.state.gate_up);
        let d = r.cols / 2;
        let (g, u) = (r.col_range(0, d), r.col_range(d, 2 * d));
        let _t = prof::time(prof::Cat::ActBwd, 0.0);
        let n = g.rows;
        let dy = Rows::of(&grad);
        // One [n, 2i] gradient: dgate | dup per row.
        let mut out = vec![0f32; n * 2 * d];
        if d > 0 {
            out.par_chunks_mut(2 * d * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(t, c)| {
                    for (k, row) in c.chunks_mut(2 * d).enumerate() {
                        let i = t * ROWS_PER_TASK + k;
                        let (rg, ru) = row.split_at_mut(d);
                        bwd_row(dy.row(i), g.row(i), u.row(i), rg, ru);
                    }
                });
        }
        let [parent] = ops.parents;
        if let Some(p) = parent {
            grads.register::<Flex>(p.id, flex_f32(out, &[n, 2 * d]));
        }
    }
}

/// `silu(gate) · up` on gate|up side by side in one f32 `[n, 2i]` tensor (a fused or grouped projection's output);
/// `None` when the input is outside what the kernel covers.
pub fn silu_mul_packed<B: Cpu>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let i0 = B::input(gate_up);
    let f = B::flex(&i0);
    let r = Rows::of(f);
    if !super::all_f32(&[f]) || !r.cols.is_multiple_of(2) {
        return None;
    }
    let i = r.cols / 2;
    let timer = prof::time(prof::Cat::ActFwd, 0.0);
    let y = forward_host(&r.col_range(0, i), &r.col_range(i, 2 * i));
    drop(timer);
    let out = flex_f32(y, &[r.rows, i]);
    let state = State { gate_up: f.clone() };
    Some(B::output(SiluMulBackward, [i0], state, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests_util::*;
    use burn::tensor::activation;

    #[test]
    fn silu_mul_matches_plain_values_and_gradients() {
        let g = rand_vec(5 * 33, 11)
            .iter()
            .map(|v| v * 6.0)
            .collect::<Vec<_>>();
        let u = rand_vec(5 * 33, 12);
        let dy = rand_vec(5 * 33, 13);
        let run = |fused: bool| {
            let dev = Default::default();
            let gt = ad_param::<2>(&g, [5, 33], &dev);
            let ut = ad_param::<2>(&u, [5, 33], &dev);
            let y = if fused {
                silu_mul_packed(&Tensor::cat(vec![gt.clone(), ut.clone()], 1)).expect("fused")
            } else {
                activation::silu(gt.clone()) * ut.clone()
            };
            let gr = backward_with(y.clone(), &dy, [5, 33]);
            (
                to_vec(y),
                to_vec(gt.grad(&gr).expect("grad")),
                to_vec(ut.grad(&gr).expect("grad")),
            )
        };
        let (y1, a1, b1) = run(true);
        let (y0, a0, b0) = run(false);
        assert_close(&y1, &y0, 1e-5, "silu·up values");
        assert_close(&a1, &a0, 1e-5, "d gate");
        assert_close(&b1, &b0, 1e-5, "d up");
    }

    #[test]
    fn silu_mul_packed_matches_plain() {
        let gu = rand_vec(4 * 40, 14)
            .iter()
            .map(|v| v * 5.0)
            .collect::<Vec<_>>();
        let dy = rand_vec(4 * 20, 15);
        let run = |fused: bool| {
            let dev = Default::default();
            let t = ad_param::<2>(&gu, [4, 40], &dev);
            let y = if fused {
                silu_mul_packed(&t).expect("fused")
            } else {
                let g = t.clone().slice([0..4, 0..20]);
                let u = t.clone().slice([0..4, 20..40]);
                activation::silu(g) * u
            };
            let gr = backward_with(y.clone(), &dy, [4, 20]);
            (to_vec(y), to_vec(t.grad(&gr).expect("grad")))
        };
        let (y1, g1) = run(true);
        let (y0, g0) = run(false);
        assert_close(&y1, &y0, 1e-5, "packed silu·up values");
        assert_close(&g1, &g0, 1e-5, "packed silu·up grad");
    }
}
