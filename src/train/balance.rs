//! A mixture of experts' load-balancing loss (`router_aux_loss_coef`), as transformers'
//! `load_balancing_loss_func` computes it for Mixtral (Switch Transformer, eq. 4–6):
//!
//! `aux = E · Σ_e f_e · P_e`, over every MoE layer's router at once, padding rows excluded: `f_e` is the share of
//! (row, layer, slot) choices that went to expert e (`top_k` per row and layer), `P_e` the mean over (row, layer)
//! of the router's softmax probability of e. The choices are not differentiable, so `f` is a constant and the
//! loss is linear in each layer's probabilities — a sum of per-layer terms `Σ_{t,e} W[t, e] · p_l[t, e]` with
//! `W[t, e] = E · f_e · real_t / rows`, which the layer recompute can add layer by layer.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::model::decoder::DropoutSource;
use crate::model::{CausalLm, TokenBatch};

/// Records the routers' probabilities and choices of a forward pass (dropout masks pass through to `inner`).
pub struct Routing<'a, B: Backend> {
    inner: &'a mut dyn DropoutSource<B>,
    /// Per MoE layer in forward order: probabilities `[n, experts]` (f32) and the chosen experts `[n·top_k]`.
    pub layers: Vec<(Tensor<B, 2>, Vec<i32>)>,
}

impl<'a, B: Backend> Routing<'a, B> {
    pub fn new(inner: &'a mut dyn DropoutSource<B>) -> Self {
        Routing {
            inner,
            layers: Vec::new(),
        }
    }

    /// The balancing loss of the recorded forward over `tokens`.
    pub fn balancing_loss(&self, model: &CausalLm<B>, tokens: &TokenBatch) -> Tensor<B, 1> {
        let w = Balance::new(model, &self.layers, &tokens.attention_mask);
        let mut terms = self.layers.iter().map(|(p, _)| w.term(p.clone()));
        let first = terms
            .next()
            .expect("a mixture-of-experts model has routers");
        terms.fold(first, |a, t| a + t)
    }
}

impl<B: Backend> DropoutSource<B> for Routing<'_, B> {
    fn mask(&mut self, n: usize, f: usize, p: f64, device: &B::Device) -> Option<Tensor<B, 2>> {
        self.inner.mask(n, f, p, device)
    }

    fn routing(&mut self, probs: &Tensor<B, 2>, chosen: &[i32]) {
        self.layers.push((probs.clone(), chosen.to_vec()));
    }
}

/// The constant weights `W` of the balancing loss for one forward pass (see the module docs).
pub struct Balance {
    /// `E · f_e / rows` per expert.
    per_expert: Vec<f32>,
    /// 1 for a real row, 0 for padding.
    real: Vec<f32>,
}

impl Balance {
    /// From the choices of every MoE layer of a pass over rows whose padding is `attention_mask`.
    pub fn new<B: Backend, T>(
        model: &CausalLm<B>,
        layers: &[(T, Vec<i32>)],
        attention_mask: &[bool],
    ) -> Balance {
        let moe = model.config.moe.expect("a mixture-of-experts model");
        let (experts, k) = (moe.experts, moe.top_k);
        let real: Vec<f32> = attention_mask.iter().map(|&m| f32::from(m)).collect();
        let mut counts = vec![0f64; experts];
        for (_, chosen) in layers {
            for (t, row) in chosen.chunks(k).enumerate() {
                if attention_mask[t] {
                    for &e in row {
                        counts[e as usize] += 1.0;
                    }
                }
            }
        }
        let rows = (layers.len() * attention_mask.iter().filter(|&&m| m).count()).max(1) as f64;
        let per_expert = counts
            .iter()
            .map(|c| (experts as f64 * (c / rows) / rows) as f32)
            .collect();
        Balance { per_expert, real }
    }

    /// One layer's term `Σ_{t,e} W[t, e] · probs[t, e]`.
    pub fn term<B: Backend>(&self, probs: Tensor<B, 2>) -> Tensor<B, 1> {
        let [n, e] = probs.dims();
        let w: Vec<f32> = self
            .real
            .iter()
            .flat_map(|&r| self.per_expert.iter().map(move |&f| r * f))
            .collect();
        let w = Tensor::from_data(TensorData::new(w, [n, e]), &probs.device());
        (probs * w).sum()
    }
}
