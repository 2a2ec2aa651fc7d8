//! AdamW on the LoRA factors only, with torch.optim.AdamW's exact update, and global grad-norm clipping as
//! torch.nn.utils.clip_grad_norm_ computes it.

use burn::tensor::{backend::Backend, Tensor};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 2>,
    pub v: Tensor<B, 2>,
}

/// AdamW state for a list of parameters (in a fixed order).
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub moments: Vec<Option<Moments<B>>>,
}

impl<B: Backend> AdamW<B> {
    /// Fresh state for `n` parameters.
    pub fn new(cfg: AdamWConfig, n: usize) -> Self {
        AdamW {
            cfg,
            step: 0,
            moments: vec![None; n],
        }
    }

    /// One update of every parameter with its gradient (same order as construction). Returns new params.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 2>>,
        grads: Vec<Tensor<B, 2>>,
    ) -> Vec<Tensor<B, 2>> {
        assert_eq!(
            params.len(),
            self.moments.len(),
            "AdamW: parameter count changed"
        );
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        let mut out = Vec::with_capacity(params.len());
        for ((p, g), slot) in params.into_iter().zip(grads).zip(self.moments.iter_mut()) {
            let p = if c.weight_decay != 0.0 {
                p.mul_scalar(1.0 - lr * c.weight_decay)
            } else {
                p
            };
            let (m, v) = match slot.take() {
                Some(Moments { m, v }) => (m, v),
                None => (g.zeros_like(), g.zeros_like()),
            };
            let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
            let v = v.mul_scalar(c.beta2) + g.clone().square().mul_scalar(1.0 - c.beta2);
            let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(c.eps);
            let p = p - m.clone().div(denom).mul_scalar(step_size);
            *slot = Some(Moments { m, v });
            out.push(p);
        }
        out
    }
}

/// The global L2 norm of all gradients (torch's `clip_grad_norm_` total_norm).
/// The per-tensor sums of squares are read back in one transfer (one device sync, not one per parameter) and
/// added in f64 in parameter order.
pub fn global_norm<B: Backend>(grads: &[Tensor<B, 2>]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    let sums: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| g.clone().cast(burn::tensor::DType::F32).square().sum())
        .collect();
    let host = Tensor::cat(sums, 0).into_data();
    let vals: Vec<f32> = host
        .convert::<f32>()
        .into_vec()
        .expect("f32 sums of squares");
    vals.iter().map(|&s| s as f64).sum::<f64>().sqrt()
}

/// Scale gradients so their global norm is at most `max_norm` (coefficient max_norm / (norm + 1e-6), clamped to
/// 1, as torch). Returns the norm before clipping.
pub fn clip_grad_norm<B: Backend>(grads: &mut [Tensor<B, 2>], max_norm: f64) -> f64 {
    let total = global_norm(grads);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(coef);
        }
    }
    total
}
