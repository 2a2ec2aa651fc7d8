//! What a training run holds resident, by part: the frozen base (per storage format), the adapters with their
//! gradients and AdamW state, and the activations of one micro-batch (an estimate from the shapes). Printed in
//! the training header and reported by `loratune bench`.

use std::collections::BTreeMap;
use std::fmt;

use burn::tensor::backend::Backend;

use super::decoder::CausalLm;
use super::tree::Leaf;

/// Resident bytes of a run, by part.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryReport {
    /// The frozen base as held (quantized matrices at their storage size, tied matrices once).
    pub base_bytes: usize,
    /// The same base in f32 (what it would hold dense).
    pub base_f32_bytes: usize,
    /// Per storage format (`F32`, `BF16`, `Q4_K`, `NF4+DQ`, …): (matrices and vectors, bytes).
    pub formats: BTreeMap<String, (usize, usize)>,
    /// LoRA factors, their gradients and AdamW's two moments, all f32.
    pub adapter_bytes: usize,
    /// Activations kept for the backward of one micro-batch (estimate).
    pub activation_bytes: usize,
}

fn mb(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let formats: Vec<String> = self
            .formats
            .iter()
            .map(|(k, (n, b))| format!("{k} ×{n} {:.1} MB", mb(*b)))
            .collect();
        write!(
            f,
            "memory: base {:.1} MB ({:.2}× its f32 size; {}), adapters + grads + AdamW {:.1} MB, activations ≈ {:.1} MB (estimate)",
            mb(self.base_bytes),
            self.base_bytes as f64 / self.base_f32_bytes.max(1) as f64,
            formats.join(", "),
            mb(self.adapter_bytes),
            mb(self.activation_bytes),
        )
    }
}

impl<B: Backend> CausalLm<B> {
    /// Resident bytes of the model and of training it on `tokens` tokens per micro-batch, with layer recompute
    /// (`recompute`) or not, activations in `act_bytes`-byte elements.
    pub fn memory(&self, tokens: usize, recompute: bool, act_bytes: usize) -> MemoryReport {
        let mut formats: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let (mut base, mut f32_total, mut adapter_params) = (0usize, 0usize, 0usize);
        let mut add = |format: String, bytes: usize, elems: usize| {
            let e = formats.entry(format).or_default();
            e.0 += 1;
            e.1 += bytes;
            base += bytes;
            f32_total += 4 * elems;
        };
        let dense_name = |d: burn::tensor::DType| format!("{d:?}").to_uppercase();
        for leaf in self.model.leaves() {
            match leaf {
                Leaf::Embedding(e) => {
                    let [r, c] = e.weight.dims();
                    let fmt = e
                        .weight
                        .quant()
                        .map_or_else(|| dense_name(e.weight.dtype()), |q| q.format());
                    add(fmt, e.weight.resident_bytes(), r * c);
                }
                Leaf::Weight(l) => {
                    if let Some(a) = &l.lora {
                        adapter_params += a.a.shape().num_elements() + a.b.shape().num_elements();
                    }
                    if l.tied {
                        continue;
                    }
                    let [r, c] = l.weight.dims();
                    let fmt = l
                        .weight
                        .quant()
                        .map_or_else(|| dense_name(l.weight.dtype()), |q| q.format());
                    add(fmt, l.weight.resident_bytes(), r * c);
                }
                Leaf::Bias(l) => {
                    if let Some(b) = &l.bias {
                        let n = b.shape().num_elements();
                        add(dense_name(b.dtype()), n * b.dtype().size(), n);
                    }
                }
                Leaf::Norm(n) => {
                    let k = n.weight.shape().num_elements();
                    add(dense_name(n.weight.dtype()), k * n.weight.dtype().size(), k);
                }
                Leaf::NormBias(n) => {
                    if let Some(b) = &n.bias {
                        let k = b.shape().num_elements();
                        add(dense_name(b.dtype()), k * b.dtype().size(), k);
                    }
                }
            }
        }
        // modules_to_save: trained in full like the adapters (f32 weight, gradient, two AdamW moments).
        for w in [&self.saved.embed_tokens, &self.saved.lm_head]
            .into_iter()
            .flatten()
        {
            adapter_params += w.shape().num_elements();
        }
        let c = &self.config;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        // Kept per token by one layer: the two norms' inputs and outputs, q|k|v, the attention output, o_proj's
        // output, gate|up and the activation (the fused kernels' saved tensors).
        let per_layer = 5 * h + q + 2 * kv + q + 3 * i;
        let layers = c.num_hidden_layers;
        let per_token = if recompute {
            layers * h + per_layer
        } else {
            layers * per_layer
        };
        MemoryReport {
            base_bytes: base,
            base_f32_bytes: f32_total,
            formats,
            adapter_bytes: 16 * adapter_params,
            activation_bytes: tokens * per_token * act_bytes,
        }
    }
}
