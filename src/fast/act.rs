//! The gated MLP activation `silu(gate) · up` in one pass (and one pass back).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use super::simd::{self, simd_fn};
use super::{flex_f32, flex_of, from_ad, from_flex, kind, Kind, Rows};

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

fn backward_host(dy: &Rows, g: &Rows, u: &Rows) -> (Vec<f32>, Vec<f32>) {
    let d = g.cols;
    let mut dg = vec![0f32; g.rows * d];
    let mut du = vec![0f32; g.rows * d];
    if d == 0 {
        return (dg, du);
    }
    dg.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(du.par_chunks_mut(d * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(t, (cg, cu))| {
            for (k, (rg, ru)) in cg.chunks_mut(d).zip(cu.chunks_mut(d)).enumerate() {
                let i = t * ROWS_PER_TASK + k;
                bwd_row(dy.row(i), g.row(i), u.row(i), rg, ru);
            }
        });
    (dg, du)
}

#[derive(Debug, Clone)]
struct State {
    /// gate and up (or gate|up side by side when `packed`).
    g: FlexTensor,
    u: Option<FlexTensor>,
}

impl State {
    fn rows(&self) -> (Rows, Rows) {
        match &self.u {
            Some(u) => (Rows::of(&self.g), Rows::of(u)),
            None => {
                let r = Rows::of(&self.g);
                let i = r.cols / 2;
                (r.col_range(0, i), r.col_range(i, 2 * i))
            }
        }
    }
}

#[derive(Debug)]
struct SiluMulBackward;

impl<const N: usize> Backward<Flex, N> for SiluMulBackward {
    type State = State;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (g, u) = ops.state.rows();
        let _t = super::prof::time(super::prof::Cat::ActBwd, 0.0);
        let (n, d) = (g.rows, g.cols);
        let dy = Rows::of(&grad);
        if ops.state.u.is_none() {
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
            if let Some(p) = &ops.parents[0] {
                grads.register::<Flex>(p.id, flex_f32(out, &[n, 2 * d]));
            }
            return;
        }
        let (dg, du) = backward_host(&dy, &g, &u);
        if let Some(p) = &ops.parents[0] {
            grads.register::<Flex>(p.id, flex_f32(dg, &[n, d]));
        }
        if let Some(p) = ops.parents.get(1).and_then(|p| p.as_ref()) {
            grads.register::<Flex>(p.id, flex_f32(du, &[n, d]));
        }
    }
}

/// `silu(gate) · up` fused, for f32 `[n, i]` tensors on `Flex` / `Autodiff<Flex>`; `Err` when it does not apply.
#[allow(clippy::type_complexity)]
pub fn silu_mul<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let Some(k) = kind::<B>() else {
        return Err((gate, up));
    };
    let (gf, _) = flex_of(&gate, k);
    let (uf, _) = flex_of(&up, k);
    if !super::all_f32(&[&gf, &uf]) || gf.layout().shape() != uf.layout().shape() {
        return Err((gate, up));
    }
    let (gr, ur) = (Rows::of(&gf), Rows::of(&uf));
    let timer = super::prof::time(super::prof::Cat::ActFwd, 0.0);
    let y = forward_host(&gr, &ur);
    drop(timer);
    let out = flex_f32(y, &[gr.rows, gr.cols]);
    match k {
        Kind::Plain => Ok(from_flex(out)),
        Kind::Autodiff => {
            let ga = super::ad_prim(gate);
            let ua = super::ad_prim(up);
            let t = match SiluMulBackward
                .prepare::<NoCheckpointing>([ga.node.clone(), ua.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    State {
                        g: ga.primitive,
                        u: Some(ua.primitive),
                    },
                    out,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            Ok(from_ad(t))
        }
    }
}

/// [`silu_mul`] on gate|up side by side in one `[n, 2i]` tensor (a fused or grouped projection's output).
pub fn silu_mul_packed<B: Backend>(gate_up: Tensor<B, 2>) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    let Some(k) = kind::<B>() else {
        return Err(gate_up);
    };
    let (f, _) = flex_of(&gate_up, k);
    let r = Rows::of(&f);
    if !super::all_f32(&[&f]) || r.cols % 2 != 0 {
        return Err(gate_up);
    }
    let i = r.cols / 2;
    let timer = super::prof::time(super::prof::Cat::ActFwd, 0.0);
    let y = forward_host(&r.col_range(0, i), &r.col_range(i, 2 * i));
    drop(timer);
    let out = flex_f32(y, &[r.rows, i]);
    match k {
        Kind::Plain => Ok(from_flex(out)),
        Kind::Autodiff => {
            let a = super::ad_prim(gate_up);
            let t = match SiluMulBackward
                .prepare::<NoCheckpointing>([a.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    State {
                        g: a.primitive,
                        u: None,
                    },
                    out,
                ),
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
                silu_mul(gt.clone(), ut.clone()).expect("fused")
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
                silu_mul_packed(t.clone()).unwrap_or_else(|_| panic!("fused"))
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
