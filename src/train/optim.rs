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

/// Moments of one parameter, and how many updates it has had (torch's per-parameter `state["step"]`: a
/// parameter without a gradient in a step — an expert no token was routed to — is skipped, as torch skips a
/// parameter whose `.grad` is None).
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 2>,
    pub v: Tensor<B, 2>,
    pub step: u64,
}

/// AdamW state for a list of parameters (in a fixed order).
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    pub moments: Vec<Option<Moments<B>>>,
    /// Per-parameter learning-rate multipliers (LoRA+'s B group; torch's per-group `lr`, which weight decay uses
    /// too). Empty = 1 for all.
    pub lr_scale: Vec<f64>,
}

impl<B: Backend> AdamW<B> {
    /// Fresh state for `n` parameters.
    pub fn new(cfg: AdamWConfig, n: usize) -> Self {
        AdamW {
            cfg,
            step: 0,
            moments: vec![None; n],
            lr_scale: Vec::new(),
        }
    }

    /// One update of every parameter with its gradient (same order as construction); a parameter without one
    /// (`None`) keeps its value and state. Returns the new params.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 2>>,
        grads: Vec<Option<Tensor<B, 2>>>,
    ) -> Vec<Tensor<B, 2>> {
        assert_eq!(
            params.len(),
            self.moments.len(),
            "AdamW: parameter count changed"
        );
        self.step += 1;
        let c = self.cfg;
        let mut out = Vec::with_capacity(params.len());
        for (i, ((p, g), slot)) in params
            .into_iter()
            .zip(grads)
            .zip(self.moments.iter_mut())
            .enumerate()
        {
            let lr = lr * self.lr_scale.get(i).copied().unwrap_or(1.0);
            let Some(g) = g else {
                out.push(p);
                continue;
            };
            let t = slot.as_ref().map_or(0, |s| s.step) + 1;
            let bc1 = 1.0 - c.beta1.powi(t as i32);
            let bc2_sqrt = (1.0 - c.beta2.powi(t as i32)).sqrt();
            let step_size = lr / bc1;
            let p = if c.weight_decay != 0.0 {
                p.mul_scalar(1.0 - lr * c.weight_decay)
            } else {
                p
            };
            let (m, v) = match slot.take() {
                Some(Moments { m, v, .. }) => (m, v),
                None => (g.zeros_like(), g.zeros_like()),
            };
            let m = m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
            let v = v.mul_scalar(c.beta2) + g.clone().square().mul_scalar(1.0 - c.beta2);
            let denom = v.clone().sqrt().div_scalar(bc2_sqrt).add_scalar(c.eps);
            let p = p - m.clone().div(denom).mul_scalar(step_size);
            *slot = Some(Moments { m, v, step: t });
            out.push(p);
        }
        out
    }
}

/// The global L2 norm of all gradients (torch's `clip_grad_norm_` total_norm).
/// The per-tensor sums of squares are read back in one transfer (one device sync, not one per parameter) and
/// added in f64 in parameter order.
pub fn global_norm<B: Backend>(grads: &[Option<Tensor<B, 2>>]) -> f64 {
    let sums: Vec<Tensor<B, 1>> = grads
        .iter()
        .flatten()
        .map(|g| g.clone().cast(burn::tensor::DType::F32).square().sum())
        .collect();
    if sums.is_empty() {
        return 0.0;
    }
    let host = Tensor::cat(sums, 0).into_data();
    let vals: Vec<f32> = host
        .convert::<f32>()
        .into_vec()
        .expect("f32 sums of squares");
    vals.iter().map(|&s| s as f64).sum::<f64>().sqrt()
}

/// Scale gradients so their global norm is at most `max_norm` (coefficient max_norm / (norm + 1e-6), clamped to
/// 1, as torch). Returns the norm before clipping.
pub fn clip_grad_norm<B: Backend>(grads: &mut [Option<Tensor<B, 2>>], max_norm: f64) -> f64 {
    let total = global_norm(grads);
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.clone().mul_scalar(coef);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn scalar(v: f32) -> Tensor<Flex, 2> {
        Tensor::from_floats([[v]], &Default::default())
    }

    fn value(t: &Tensor<Flex, 2>) -> f32 {
        t.clone().into_data().to_vec::<f32>().unwrap()[0]
    }

    /// torch.optim.AdamW skips a parameter whose `.grad` is None (an expert no token reached): its value, moments
    /// and own step count stay, so its first real update is a first step (bias corrections with t = 1), not the
    /// optimizer's second. Hand values: a constant gradient moves Adam by lr·sign(g) per step (eps aside).
    #[test]
    fn a_parameter_without_gradient_is_skipped_like_torch() {
        let mut opt = AdamW::<Flex>::new(AdamWConfig::default(), 2);
        let out = opt.step(
            0.1,
            vec![scalar(1.0), scalar(2.0)],
            vec![Some(scalar(0.5)), None],
        );
        assert!((value(&out[0]) - 0.9).abs() < 1e-6, "{}", value(&out[0]));
        assert_eq!(value(&out[1]), 2.0);
        assert!(opt.moments[1].is_none());
        let out = opt.step(0.1, out, vec![Some(scalar(0.5)), Some(scalar(-1.0))]);
        assert!((value(&out[0]) - 0.8).abs() < 1e-6, "{}", value(&out[0]));
        // with the optimizer's t = 2 instead of the parameter's own t = 1 this would be 2.0744
        assert!((value(&out[1]) - 2.1).abs() < 1e-6, "{}", value(&out[1]));
        assert_eq!(opt.moments[0].as_ref().unwrap().step, 2);
        assert_eq!(opt.moments[1].as_ref().unwrap().step, 1);
        assert_eq!(opt.step, 2);
        // the global norm leaves the missing gradient out
        let n = global_norm(&[Some(scalar(3.0)), None, Some(scalar(4.0))]);
        assert!((n - 5.0).abs() < 1e-9);
    }
}
