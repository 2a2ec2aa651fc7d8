//! The decoder-only transformer as math: embeddings, layers of (norm → attention → norm → gated MLP) with
//! residuals, a final norm and the head. Every hot operation is a [`Kernels`] op; every switch is a
//! [`ModelConfig`] field (the families decide those fields, see [`super::families`]); the module tree and its
//! names are [`super::tree`].

use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation, DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::config::ModelConfig;
use super::tree::{Embedding, Ffn, Layer, MapLeaves, Mlp, RmsNorm, Tree, Weights};
use crate::kernels::{Attention, AttnSpec, Kernels, KvSlot, Masking, NormRef, Qkv, Rope};
use crate::lora::linear::{Dora, LoraAdapter, LoraLinear};

/// The causal LM: the module tree plus what a forward needs besides weights.
#[derive(Debug, Clone)]
pub struct CausalLm<B: Backend> {
    pub config: ModelConfig,
    pub model: Tree<Weights<B>>,
    /// RoPE inverse frequencies (f32, as transformers computes them).
    pub inv_freq: Vec<f32>,
    pub device: B::Device,
    /// `lora_modules_to_save`: fully trained copies of the embedding and `lm_head`.
    pub saved: SavedModules<B>,
}

/// PEFT's `modules_to_save`: full f32 copies of the embedding matrix and/or `lm_head` (`[vocab, hidden]`), trained
/// in full and used instead of the frozen weights. A tied model gets two independent copies, as PEFT makes them.
#[derive(Debug, Clone)]
pub struct SavedModules<B: Backend> {
    pub embed_tokens: Option<Tensor<B, 2>>,
    pub lm_head: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for SavedModules<B> {
    fn default() -> Self {
        SavedModules {
            embed_tokens: None,
            lm_head: None,
        }
    }
}

impl<B: Backend> SavedModules<B> {
    pub fn is_empty(&self) -> bool {
        self.embed_tokens.is_none() && self.lm_head.is_none()
    }

    /// The same copies through `f` (another backend, detached, …).
    pub fn map<C: Backend>(&self, f: impl Fn(Tensor<B, 2>) -> Tensor<C, 2>) -> SavedModules<C> {
        SavedModules {
            embed_tokens: self.embed_tokens.clone().map(&f),
            lm_head: self.lm_head.clone().map(&f),
        }
    }
}

/// One forward pass's token layout: a `[batch, seq]` grid of ids with positions, padding and packing.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    /// `[batch·seq]` token ids.
    pub input_ids: Vec<u32>,
    /// `[batch·seq]` RoPE positions (restart at 0 for each packed sample).
    pub position_ids: Vec<u32>,
    /// `[batch·seq]`: false for padding (never attended to).
    pub attention_mask: Vec<bool>,
    /// `[batch·seq]` packed-sample ids: attention never crosses a segment boundary.
    pub segment_ids: Option<Vec<u32>>,
}

impl TokenBatch {
    /// Rows of ids with an attention mask (1 = real token); positions `0..seq` as transformers uses by default.
    pub fn from_rows(rows: &[Vec<u32>], masks: Option<&[Vec<bool>]>) -> Self {
        let batch = rows.len();
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut attention_mask = Vec::with_capacity(batch * seq);
        for (r, row) in rows.iter().enumerate() {
            for i in 0..seq {
                input_ids.push(row.get(i).copied().unwrap_or(0));
                let real = i < row.len()
                    && masks
                        .map(|m| m[r].get(i).copied().unwrap_or(false))
                        .unwrap_or(true);
                attention_mask.push(real);
            }
        }
        let position_ids = (0..batch).flat_map(|_| 0..seq as u32).collect();
        TokenBatch {
            batch,
            seq,
            input_ids,
            position_ids,
            attention_mask,
            segment_ids: None,
        }
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<KvSlot<B>>,
    /// Attention mask of every cached position (per batch row).
    key_valid: Vec<Vec<bool>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `n_layers` layers and `batch` rows.
    pub fn new(n_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            key_valid: vec![Vec::new(); batch],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a training forward draws or reports along the way: LoRA-dropout masks (None in eval / inference), and the
/// routers' choices of a mixture of experts (for its load-balancing loss).
pub trait DropoutSource<B: Backend> {
    /// A keep mask scaled by 1/(1-p), `[n, features]`, or None when p == 0.
    fn mask(
        &mut self,
        n: usize,
        features: usize,
        p: f64,
        device: &B::Device,
    ) -> Option<Tensor<B, 2>>;

    /// A MoE layer's router gave these probabilities (`[n, experts]`, f32, part of the graph) and chose these
    /// experts (`[n·top_k]`, best first). Ignored unless a balancing loss is wanted.
    fn routing(&mut self, _probs: &Tensor<B, 2>, _chosen: &[i32]) {}
}

/// No dropout (evaluation, inference, parity tests).
pub struct NoDropout;

impl<B: Backend> DropoutSource<B> for NoDropout {
    fn mask(&mut self, _: usize, _: usize, _: f64, _: &B::Device) -> Option<Tensor<B, 2>> {
        None
    }
}

/// A group of modules reading the same input (q/k/v, gate/up; or one module): their outputs side by side. The
/// dropout masks are drawn in module order.
fn group<B: Kernels>(
    mods: &[LoraLinear<B>],
    x: Tensor<B, 2>,
    drop: &mut dyn DropoutSource<B>,
) -> Tensor<B, 2> {
    let [n, f] = x.dims();
    let device = x.device();
    let masks: Vec<Option<Tensor<B, 2>>> = mods
        .iter()
        .map(|l| match (&l.lora, l.merged) {
            (Some(a), false) if a.dropout > 0.0 => drop.mask(n, f, a.dropout, &device),
            _ => None,
        })
        .collect();
    let refs: Vec<_> = mods
        .iter()
        .zip(&masks)
        .map(|(l, m)| l.as_ref(m.clone()))
        .collect();
    let y = B::lora_linear_group(x.clone(), &refs);
    let scales: Vec<Option<Tensor<B, 2>>> = mods.iter().map(LoraLinear::dora_scale).collect();
    if scales.iter().all(Option::is_none) {
        return y;
    }
    dora_rescale(mods, &masks, scales, x, y)
}

/// DoRA on a group's output (PEFT's `DoraLinearLayer.forward`): with g = m / ‖W + s·B·A‖ (norm detached) and x′ the
/// member's dropped input, its columns become x·Wᵀ + b + (g − 1)·(x′·Wᵀ) + g·s·(x′·Aᵀ)·Bᵀ — the kernel's output plus
/// (g − 1) times the member without bias on x′ (one more pass of the member, as PEFT's), or, without dropout,
/// g·(y − b) + b = g·y + (1 − g)·b from the output alone: one scaling of the whole group (g = 1 for the members
/// without DoRA), so the step pays two element-wise passes, not a slice and a concatenation per member.
fn dora_rescale<B: Kernels>(
    mods: &[LoraLinear<B>],
    masks: &[Option<Tensor<B, 2>>],
    scales: Vec<Option<Tensor<B, 2>>>,
    x: Tensor<B, 2>,
    y: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [n, _] = y.dims();
    let dtype = y.dtype();
    let device = y.device();
    let ones = |out: usize| Tensor::<B, 2>::ones([1, out], (&device, DType::F32));
    let g_all = Tensor::cat(
        mods.iter()
            .zip(&scales)
            .map(|(l, g)| g.clone().unwrap_or_else(|| ones(l.out_features())))
            .collect(),
        1,
    );
    let dropped = mods
        .iter()
        .zip(masks)
        .zip(&scales)
        .any(|((_, m), g)| m.is_some() && g.is_some());
    if !dropped {
        let scaled = y * g_all.clone().cast(dtype);
        let biased = mods
            .iter()
            .zip(&scales)
            .any(|(l, g)| g.is_some() && l.bias.is_some());
        if !biased {
            return scaled;
        }
        let b_all = Tensor::cat(
            mods.iter()
                .map(|l| match &l.bias {
                    Some(b) => b.clone().cast(DType::F32).reshape([1, l.out_features()]),
                    None => Tensor::zeros([1, l.out_features()], (&device, DType::F32)),
                })
                .collect(),
            1,
        );
        let one_minus_g = g_all.neg().add_scalar(1.0);
        return scaled + (b_all * one_minus_g).cast(dtype);
    }
    // With dropout: the members' own passes on their dropped inputs.
    let mut parts = Vec::with_capacity(mods.len());
    let mut col = 0;
    for ((l, mask), g) in mods.iter().zip(masks).zip(scales) {
        let out = l.out_features();
        let yi = y.clone().slice([0..n, col..col + out]);
        col += out;
        let Some(g) = g else {
            parts.push(yi);
            continue;
        };
        let z = match mask {
            None => match &l.bias {
                Some(b) => yi.clone() - b.clone().cast(dtype).reshape([1, out]),
                None => yi.clone(),
            },
            Some(m) => {
                let mut unbiased = l.as_ref(None);
                unbiased.bias = None;
                B::lora_linear_group(x.clone() * m.clone().cast(x.dtype()), &[unbiased])
            }
        };
        parts.push(yi + (z.cast(DType::F32) * g.sub_scalar(1.0)).cast(dtype));
    }
    Tensor::cat(parts, 1)
}

fn norm<B: Kernels, const D: usize>(n: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    if let Some(bias) = &n.bias {
        return crate::kernels::reference::layer_norm(x, &n.weight, bias, n.eps);
    }
    let norm = NormRef {
        weight: &n.weight,
        eps: n.eps,
        offset: n.offset,
    };
    B::rms_norm(x, &norm)
}

/// Which experts each row is routed to.
struct Routes {
    /// `[n·top_k]`: row r's experts, best first.
    chosen: Vec<i32>,
    /// Per expert: the rows routed to it (ascending) and, for each, its slot `r·top_k + j` in `chosen`.
    per_expert: Vec<(Vec<i32>, Vec<i32>)>,
}

/// The `top_k` largest of each row of `probs` (`[n, experts]`), ties to the lower index (as `torch.topk` on
/// distinct values; a tie is a coin flip in torch too). Rows with `real[r] == false` (padding) are chosen for but
/// sent to no expert.
fn top_k_routes(probs: &[f32], experts: usize, top_k: usize, real: &[bool]) -> Routes {
    let n = probs.len() / experts.max(1);
    let mut chosen = Vec::with_capacity(n * top_k);
    let mut per_expert = vec![(Vec::new(), Vec::new()); experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for r in 0..n {
        let p = &probs[r * experts..(r + 1) * experts];
        order.clear();
        order.extend(0..experts);
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        for (j, &e) in order[..top_k].iter().enumerate() {
            chosen.push(e as i32);
            if real[r] {
                per_expert[e].0.push(r as i32);
                per_expert[e].1.push((r * top_k + j) as i32);
            }
        }
    }
    Routes { chosen, per_expert }
}

/// The attention settings of one forward pass, one per sliding window, on the host (no backend): what a pass
/// over the layers shares, and what a layer recomputed in the backward needs again.
pub(crate) type AttnSpecs = HashMap<Option<usize>, AttnSpec>;

/// [`AttnSpecs`] as a backend's layers read them.
pub(crate) type AttnSettings<B> = HashMap<Option<usize>, Attention<B>>;

impl<B: Kernels> CausalLm<B> {
    /// Final hidden states `[b·s, hidden]` (after the final norm).
    pub fn forward_hidden(
        &self,
        batch: &TokenBatch,
        cache: Option<&mut KvCache<B>>,
        drop: &mut dyn DropoutSource<B>,
    ) -> Tensor<B, 2> {
        let s = batch.seq;
        let mut x = self.embed(batch);
        // Key validity over the whole (cached + new) sequence.
        let offset = cache.as_ref().map(|c| c.len).unwrap_or(0);
        let mut key_valid: Vec<Vec<bool>> = match &cache {
            Some(c) => c.key_valid.clone(),
            None => vec![Vec::new(); batch.batch],
        };
        for (r, kv) in key_valid.iter_mut().enumerate() {
            kv.extend_from_slice(&batch.attention_mask[r * s..(r + 1) * s]);
        }
        let specs = self.attention_specs(batch, offset, &key_valid);
        let settings = self.attention_settings(&specs, x.dtype());
        let mut cache = cache;
        for (li, layer) in self.model.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[li]);
            x = self.layer(layer, x, &settings[&layer.window], slot, drop);
        }
        if let Some(c) = cache {
            c.key_valid = key_valid;
            c.len = offset + s;
        }
        self.final_norm(x)
    }

    /// The token embeddings of a batch `[b·s, hidden]` (scaled where the family scales them).
    pub(crate) fn embed(&self, batch: &TokenBatch) -> Tensor<B, 2> {
        let x = match &self.saved.embed_tokens {
            Some(w) => {
                let ids: Vec<i32> = batch.input_ids.iter().map(|&i| i as i32).collect();
                let n = ids.len();
                let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &self.device);
                let x = w.clone().select(0, ids);
                // The rest of the model runs in its own dtype.
                x.cast(self.model.embed_tokens.weight.dtype())
            }
            None => self.model.embed_tokens.weight.gather_rows(&batch.input_ids),
        };
        match self.config.embedding_scale() {
            Some(scale) => x.mul_scalar(scale),
            None => x,
        }
    }

    /// The attention settings of a pass (one per window of the model's layers) for queries at positions
    /// `offset..offset + seq` over keys whose validity is `key_valid` (per batch row, cached keys first).
    pub(crate) fn attention_specs(
        &self,
        batch: &TokenBatch,
        offset: usize,
        key_valid: &[Vec<bool>],
    ) -> AttnSpecs {
        let cfg = &self.config;
        let (b, s) = (batch.batch, batch.seq);
        let keys = offset + s;
        let rope = Arc::new(Rope::new(&self.inv_freq, &batch.position_ids));
        let mut specs = AttnSpecs::new();
        for layer in &self.model.layers {
            specs.entry(layer.window).or_insert_with(|| {
                let masking = Masking {
                    key_valid: key_valid.concat(),
                    segments: batch.segment_ids.clone(),
                    window: layer.window,
                };
                AttnSpec {
                    batch: b,
                    seq: s,
                    keys,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_key_value_heads,
                    head_dim: cfg.head_dim,
                    scale: cfg.attn_scale() as f32,
                    softcap: cfg.attn_logit_softcapping,
                    rope: rope.clone(),
                    masking: Arc::new(masking),
                }
            });
        }
        specs
    }

    /// [`AttnSpecs`] for training (no cache: keys are the batch's own tokens).
    pub(crate) fn train_attention_specs(&self, batch: &TokenBatch) -> AttnSpecs {
        let key_valid: Vec<Vec<bool>> = batch
            .attention_mask
            .chunks(batch.seq.max(1))
            .map(<[bool]>::to_vec)
            .collect();
        self.attention_specs(batch, 0, &key_valid)
    }

    /// The settings this backend's layers read (the RoPE tables shared by every window).
    pub(crate) fn attention_settings(&self, specs: &AttnSpecs, dtype: DType) -> AttnSettings<B> {
        let tables = Attention::<B>::shared_tables();
        specs
            .iter()
            .map(|(w, spec)| {
                (
                    *w,
                    Attention::new(spec.clone(), dtype, &self.device, tables.clone()),
                )
            })
            .collect()
    }

    /// Layer `li` without a cache (a training pass, or one layer recomputed in the backward).
    pub(crate) fn layer_at(
        &self,
        li: usize,
        x: Tensor<B, 2>,
        settings: &AttnSettings<B>,
        drop: &mut dyn DropoutSource<B>,
    ) -> Tensor<B, 2> {
        let layer = &self.model.layers[li];
        self.layer(layer, x, &settings[&layer.window], None, drop)
    }

    /// The final norm.
    pub(crate) fn final_norm(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        norm(&self.model.norm, x)
    }

    /// One layer: attention and the MLP, each between its norms and added to the residual stream — one after the
    /// other, or (a parallel Falcon layer) both from the layer input, `x + (mlp + attention)` as transformers adds.
    fn layer(
        &self,
        layer: &Layer<Weights<B>>,
        x: Tensor<B, 2>,
        att: &Attention<B>,
        cache: Option<&mut KvSlot<B>>,
        drop: &mut dyn DropoutSource<B>,
    ) -> Tensor<B, 2> {
        let normed = norm(&layer.input_norm, x.clone());
        let qkv = group(&layer.qkv, normed.clone(), drop);
        let qkv = match self.config.fused_qkv_order() {
            Some(order) => {
                let n = order.len();
                qkv.select(
                    1,
                    Tensor::from_data(TensorData::new(order, [n]), &self.device),
                )
            }
            None => qkv,
        };
        let h = self.attend(layer, qkv, att, cache);
        let h = group(std::slice::from_ref(&layer.o_proj), h, drop);
        let attn = match &layer.attn_out_norm {
            Some(n) => norm(n, h),
            None => h,
        };
        let parallel = self.config.falcon.is_some_and(|f| f.parallel);
        let (x, mlp_in) = if parallel {
            let mlp_in = match &layer.mlp_in_norm {
                Some(n) => norm(n, x.clone()),
                None => normed,
            };
            (x, mlp_in)
        } else {
            let x = x + attn.clone();
            let n = layer
                .mlp_in_norm
                .as_ref()
                .expect("a sequential layer has an MLP norm");
            let mlp_in = norm(n, x.clone());
            (x, mlp_in)
        };
        let h = match &layer.mlp {
            Mlp::Dense(ffn) => self.ffn(ffn, mlp_in, drop),
            Mlp::Moe {
                router,
                experts,
                top_k,
            } => self.moe(router, experts, *top_k, mlp_in, &att.spec, drop),
        };
        let h = match &layer.mlp_out_norm {
            Some(n) => norm(n, h),
            None => h,
        };
        if parallel {
            x + (h + attn)
        } else {
            x + h
        }
    }

    /// The MLP: gate|up, the activation of gate times up, down (Falcon's is not gated: up, its activation, down).
    fn ffn(
        &self,
        ffn: &Ffn<Weights<B>>,
        x: Tensor<B, 2>,
        drop: &mut dyn DropoutSource<B>,
    ) -> Tensor<B, 2> {
        let gate_up = group(&ffn.gate_up, x, drop);
        let h = if self.config.falcon.is_some() {
            crate::kernels::reference::activation_of(gate_up, self.config.hidden_act)
        } else {
            B::glu(gate_up, self.config.hidden_act)
        };
        group(std::slice::from_ref(&ffn.down), h, drop)
    }

    /// A sparse mixture of experts, as transformers' `MixtralSparseMoeBlock`: router logits `[n, experts]`, their
    /// softmax in f32, the `top_k` largest per token (ties to the lower expert index) renormalised to sum to one;
    /// each expert runs on the rows routed to it only, its output scaled by the row's weight (in f32) and added
    /// into the result. The choice of experts is not differentiable; the weights are (through the router).
    fn moe(
        &self,
        router: &LoraLinear<B>,
        experts: &[Ffn<Weights<B>>],
        top_k: usize,
        x: Tensor<B, 2>,
        spec: &AttnSpec,
        drop: &mut dyn DropoutSource<B>,
    ) -> Tensor<B, 2> {
        let [n, hidden] = x.dims();
        // Padding rows are routed (the balance loss skips them) but reach no expert: their hidden values are
        // undefined, so they must not decide which rows an expert sees. Their output is zero.
        let (s, keys) = (spec.seq, spec.keys);
        let real: Vec<bool> = (0..n)
            .map(|r| spec.masking.key_valid[(r / s) * keys + keys - s + r % s])
            .collect();
        let dtype = x.dtype();
        let device = x.device();
        let logits = group(std::slice::from_ref(router), x.clone(), drop);
        let probs = activation::softmax(logits.cast(DType::F32), 1);
        let host = crate::model::weights::host_f32(probs.clone())
            .expect("reading the router's probabilities back from the device");
        let routes = top_k_routes(&host, experts.len(), top_k, &real);
        drop.routing(&probs, &routes.chosen);
        let chosen = Tensor::<B, 2, Int>::from_data(
            TensorData::new(routes.chosen.clone(), [n, top_k]),
            &device,
        );
        let weights = probs.gather(1, chosen);
        let weights = weights.clone().div(weights.sum_dim(1)).reshape([n * top_k]);
        // Each expert on the rows routed to it (gathered), the outputs stacked in expert order and added into the
        // result by one scatter-add (a row's experts in expert order, as transformers' index_add_ loop adds them).
        let index = |v: &[i32]| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device)
        };
        let mut ys = Vec::with_capacity(experts.len());
        for (expert, (routed, _)) in experts.iter().zip(&routes.per_expert) {
            if !routed.is_empty() {
                let xe = x.clone().select(0, index(routed));
                ys.push(self.ffn(expert, xe, drop));
            }
        }
        let (rows, slots): (Vec<i32>, Vec<i32>) = routes
            .per_expert
            .iter()
            .flat_map(|(r, s)| r.iter().copied().zip(s.iter().copied()))
            .unzip();
        let m = rows.len();
        let rows = index(&rows);
        let w = weights.select(0, index(&slots)).reshape([m, 1]);
        let y = (Tensor::cat(ys, 0).cast(DType::F32) * w).cast(dtype);
        Tensor::<B, 2>::zeros([n, hidden], (&device, dtype)).select_assign(
            0,
            rows,
            y,
            IndexingUpdateOp::Add,
        )
    }

    /// Attention from q|k|v `[b·s, (nh + 2·nkv)·hd]`: per-head q/k norms when the family has them, RoPE, the
    /// masked softmax over the keys (and the KV cache when decoding).
    fn attend(
        &self,
        layer: &Layer<Weights<B>>,
        qkv: Tensor<B, 2>,
        att: &Attention<B>,
        cache: Option<&mut KvSlot<B>>,
    ) -> Tensor<B, 2> {
        if cache.is_none() && layer.q_norm.is_none() && layer.k_norm.is_none() {
            return B::rope_attention(Qkv::Packed(qkv), att);
        }
        let (b, s, nh, nkv, hd) = att.spec.dims();
        let n = b * s;
        let (qo, ko) = (nh * hd, nkv * hd);
        let mut q = qkv.clone().slice([0..n, 0..qo]);
        let mut k = qkv.clone().slice([0..n, qo..qo + ko]);
        let v = qkv.slice([0..n, qo + ko..qo + 2 * ko]);
        if let Some(qn) = &layer.q_norm {
            q = norm(qn, q.reshape([b, s, nh, hd])).reshape([n, qo]);
        }
        if let Some(kn) = &layer.k_norm {
            k = norm(kn, k.reshape([b, s, nkv, hd])).reshape([n, ko]);
        }
        match cache {
            Some(slot) => B::rope_attention_cached(Qkv::Split(q, k, v), att, slot),
            None => B::rope_attention(Qkv::Split(q, k, v), att),
        }
    }

    /// Logits `[n, vocab]` for hidden rows `[n, hidden]` (lm_head + final soft-capping).
    pub fn logits(&self, hidden: Tensor<B, 2>, drop: &mut dyn DropoutSource<B>) -> Tensor<B, 2> {
        let logits = match &self.saved.lm_head {
            // A trained lm_head: a plain product, so that its gradient reaches the copy.
            Some(w) => hidden.cast(DType::F32).matmul(w.clone().transpose()),
            None => group(std::slice::from_ref(&self.model.lm_head), hidden, drop),
        };
        match self.config.final_logit_softcapping {
            Some(cap) => logits.div_scalar(cap).tanh().mul_scalar(cap),
            None => logits,
        }
    }

    /// Full forward to logits `[b, s, vocab]` in f32 (inference / parity checks).
    pub fn forward(&self, batch: &TokenBatch) -> Tensor<B, 3> {
        let h = self.forward_hidden(batch, None, &mut NoDropout);
        let logits = self.logits(h, &mut NoDropout).cast(DType::F32);
        logits.reshape([batch.batch, batch.seq, self.config.vocab_size])
    }
}

impl<B: Backend> CausalLm<B> {
    /// Every linear module with its HF path, in forward order (`lm_head` last).
    pub fn linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        self.model
            .linears()
            .into_iter()
            .map(|l| (l.path.clone(), l))
            .collect()
    }

    /// [`CausalLm::linears`], mutable.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        self.model
            .linears_mut()
            .into_iter()
            .map(|l| (l.path.clone(), l))
            .collect()
    }
}

/// A training model's leaves on its inner backend (shared tensors, no graph).
struct Inner;

impl<B: AutodiffBackend> MapLeaves<Weights<B>, Weights<B::InnerBackend>> for Inner {
    fn embedding(&mut self, e: &Embedding<B>) -> Embedding<B::InnerBackend> {
        Embedding {
            path: e.path.clone(),
            weight: e.weight.map(|t| t.inner()),
        }
    }

    fn linear(&mut self, l: &LoraLinear<B>) -> LoraLinear<B::InnerBackend> {
        LoraLinear {
            path: l.path.clone(),
            weight: l.weight.map(|t| t.inner()),
            bias: l.bias.clone().map(|b| b.inner()),
            lora: l.lora.as_ref().map(|a| LoraAdapter {
                a: a.a.clone().inner(),
                b: a.b.clone().inner(),
                scale: a.scale,
                dropout: a.dropout,
                initial: a.initial.clone(),
                dora: a.dora.as_ref().map(|d| Dora {
                    magnitude: d.magnitude.clone().inner(),
                    w_sq: d.w_sq.clone().inner(),
                    merged_scale: d.merged_scale.clone().map(|t| t.inner()),
                }),
            }),
            merged: l.merged,
            tied: l.tied,
        }
    }

    fn norm(&mut self, n: &RmsNorm<B>) -> RmsNorm<B::InnerBackend> {
        RmsNorm {
            path: n.path.clone(),
            weight: n.weight.clone().inner(),
            bias: n.bias.clone().map(|b| b.inner()),
            eps: n.eps,
            offset: n.offset,
        }
    }
}

/// A training model's leaves on the same backend, untracked (shared tensors; operations on them record nothing).
struct Detach;

impl<B: AutodiffBackend> MapLeaves<Weights<B>, Weights<B>> for Detach {
    fn embedding(&mut self, e: &Embedding<B>) -> Embedding<B> {
        let e = Inner.embedding(e);
        Embedding {
            path: e.path,
            weight: e.weight.map(Tensor::from_inner),
        }
    }

    fn linear(&mut self, l: &LoraLinear<B>) -> LoraLinear<B> {
        let l = Inner.linear(l);
        LoraLinear {
            path: l.path,
            weight: l.weight.map(Tensor::from_inner),
            bias: l.bias.map(Tensor::from_inner),
            lora: l.lora.map(|a| LoraAdapter {
                a: Tensor::from_inner(a.a),
                b: Tensor::from_inner(a.b),
                scale: a.scale,
                dropout: a.dropout,
                initial: a.initial,
                dora: a.dora.map(|d| Dora {
                    magnitude: Tensor::from_inner(d.magnitude),
                    w_sq: Tensor::from_inner(d.w_sq),
                    merged_scale: d.merged_scale.map(Tensor::from_inner),
                }),
            }),
            merged: l.merged,
            tied: l.tied,
        }
    }

    fn norm(&mut self, n: &RmsNorm<B>) -> RmsNorm<B> {
        let n = Inner.norm(n);
        RmsNorm {
            path: n.path,
            weight: Tensor::from_inner(n.weight),
            bias: n.bias.map(Tensor::from_inner),
            eps: n.eps,
            offset: n.offset,
        }
    }
}

impl<B: AutodiffBackend> CausalLm<B> {
    /// The same model on the same backend with every tensor untracked: a forward records no graph but runs the
    /// very operations a tracked forward runs (bit for bit the same values, which the inner backend's
    /// implementations need not be).
    pub fn detached(&self) -> CausalLm<B> {
        CausalLm {
            config: self.config.clone(),
            model: self.model.map(&mut Detach),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
            saved: self.saved.map(|t| Tensor::from_inner(t.inner())),
        }
    }

    /// The same model on the inner backend (no autodiff graph), sharing every tensor.
    pub fn valid(&self) -> CausalLm<B::InnerBackend> {
        CausalLm {
            config: self.config.clone(),
            model: self.model.map(&mut Inner),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
            saved: self.saved.map(|t| t.inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::top_k_routes;

    /// Hand-routed: 2 rows over 4 experts, top 2; a tie goes to the lower expert index; each expert lists its rows
    /// in order with their slots in the flattened `[n, k]` choice.
    #[test]
    fn top_k_routes_by_hand() {
        let probs = [0.1, 0.4, 0.3, 0.2, 0.25, 0.25, 0.4, 0.1];
        let r = top_k_routes(&probs, 4, 2, &[true, true]);
        assert_eq!(r.chosen, vec![1, 2, 2, 0]);
        assert_eq!(r.per_expert[0], (vec![1], vec![3]));
        assert_eq!(r.per_expert[1], (vec![0], vec![0]));
        assert_eq!(r.per_expert[2], (vec![0, 1], vec![1, 2]));
        assert_eq!(r.per_expert[3], (vec![], vec![]));
        // Row 0 is padding: its choice is kept (the balance loss masks it) but no expert sees it.
        let r = top_k_routes(&probs, 4, 2, &[false, true]);
        assert_eq!(r.chosen, vec![1, 2, 2, 0]);
        assert_eq!(r.per_expert[0], (vec![1], vec![3]));
        assert_eq!(r.per_expert[1], (vec![], vec![]));
        assert_eq!(r.per_expert[2], (vec![1], vec![2]));
    }

    /// DoRA with dropout on a fused group (a DoRA member with a bias, then a plain LoRA member): the group's output
    /// equals PEFT's formula computed densely — x·Wᵀ + b + (g − 1)·(x′·Wᵀ) + g·s·(x′·Aᵀ)·Bᵀ with
    /// g = m / ‖W + s·B·A‖ and x′ = x ⊙ mask — and the plain member is untouched.
    #[test]
    fn dora_with_dropout_is_pefts_formula() {
        use super::{group, DropoutSource};
        use crate::lora::linear::{Dora, LoraAdapter, LoraLinear};
        use burn::backend::Flex;
        use burn::tensor::{Tensor, TensorData};
        type B = Flex;
        let dev = Default::default();
        let t = |v: Vec<f32>, s: [usize; 2]| Tensor::<B, 2>::from_data(TensorData::new(v, s), &dev);
        let vals = |n: usize, k: u32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u32 * 2654435761 + k * 97) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let (n, inp, o1, o2, r) = (3, 5, 4, 2, 2);
        let (x, w1, w2) = (
            t(vals(n * inp, 1), [n, inp]),
            t(vals(o1 * inp, 2), [o1, inp]),
            t(vals(o2 * inp, 3), [o2, inp]),
        );
        let bias = Tensor::<B, 1>::from_data(TensorData::new(vals(o1, 4), [o1]), &dev);
        let (a1, b1, a2, b2) = (
            t(vals(r * inp, 5), [r, inp]),
            t(vals(o1 * r, 6), [o1, r]),
            t(vals(r * inp, 7), [r, inp]),
            t(vals(o2 * r, 8), [o2, r]),
        );
        let mag = t(vec![0.7, 1.3, 2.0, 0.4], [1, o1]);
        let mut m1 = LoraLinear::new("a", w1.clone(), Some(bias.clone()));
        let mut dora = Dora::init(&m1.weight);
        dora.magnitude = mag.clone();
        m1.lora = Some(LoraAdapter {
            a: a1.clone(),
            b: b1.clone(),
            scale: 1.5,
            dropout: 0.5,
            dora: Some(dora),
            initial: None,
        });
        let mut m2 = LoraLinear::new("b", w2.clone(), None);
        m2.lora = Some(LoraAdapter {
            a: a2.clone(),
            b: b2.clone(),
            scale: 1.5,
            dropout: 0.5,
            dora: None,
            initial: None,
        });
        // Each member draws its own keep mask (scaled by 1/(1-p) = 2).
        struct Masks(Vec<Vec<f32>>);
        impl DropoutSource<B> for Masks {
            fn mask(
                &mut self,
                n: usize,
                f: usize,
                _: f64,
                dev: &<B as burn::tensor::backend::BackendTypes>::Device,
            ) -> Option<Tensor<B, 2>> {
                let v = self.0.remove(0);
                Some(Tensor::from_data(TensorData::new(v, [n, f]), dev))
            }
        }
        let k1: Vec<f32> = (0..n * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 2.0 })
            .collect();
        let k2: Vec<f32> = (0..n * inp)
            .map(|i| if i % 4 == 1 { 0.0 } else { 2.0 })
            .collect();
        let y = group(
            &[m1, m2],
            x.clone(),
            &mut Masks(vec![k1.clone(), k2.clone()]),
        );
        let x1 = x.clone() * t(k1, [n, inp]);
        let x2 = x.clone() * t(k2, [n, inp]);
        let full = w1.clone() + b1.clone().matmul(a1.clone()).mul_scalar(1.5);
        let g = mag / full.square().sum_dim(1).sqrt().reshape([1, o1]);
        let want1 = x.clone().matmul(w1.clone().transpose())
            + bias.reshape([1, o1])
            + (g.clone() - 1.0) * x1.clone().matmul(w1.transpose())
            + g * x1
                .matmul(a1.transpose())
                .matmul(b1.transpose())
                .mul_scalar(1.5);
        let want2 = x.matmul(w2.transpose())
            + x2.matmul(a2.transpose())
                .matmul(b2.transpose())
                .mul_scalar(1.5);
        let want = Tensor::cat(vec![want1, want2], 1);
        let d: f32 = (y - want).abs().max().into_scalar();
        assert!(d < 1e-5, "max |Δ| {d}");
    }
}
