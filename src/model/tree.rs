//! The decoder's module tree, written once.
//!
//! [`Tree::build`] is the one place where module names (transformers' `model.layers.N.self_attn.q_proj`, …), their
//! shapes and a family's layout (fused projections, q/k norms, sandwich norms, biases, a tied head) are written.
//! The tree is generic over what its leaves are ([`Leaves`]):
//! - [`Shapes`]: the layout a config implies — the expected checkpoint tensors ([`expected_tensors`]), the
//!   LoRA-targetable linears, what a checkpoint is validated against;
//! - [`Weights`]: a loaded model (built by the loader from a tensor source, so loading is the same walk).
//!
//! Every leaf keeps its full path, so walking a loaded tree ([`Tree::leaves`], [`Tree::linears`]) never spells a
//! name again; [`Tree::map`] converts the leaves (a training model to its inference backend).
//!
//! Why not burn's `Module` derive: its parameter paths are Rust field names (with enum variants and `Param`
//! wrappers), not transformers' names, and the fused kernels read plain tensors. One generic tree gives the names,
//! the shapes and the structure from the same code.

use std::fmt::Debug;
use std::marker::PhantomData;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::config::ModelConfig;
use crate::lora::linear::LoraLinear;
use crate::quant::Frozen;

/// What a tree's leaves are.
pub trait Leaves: Clone + Debug {
    type Linear: LinearLeaf;
    type Norm: Clone + Debug + NormLeaf;
    type Embedding: Clone + Debug + Named;
}

/// A leaf's full module path (`model.layers.0.self_attn.q_proj`).
pub trait Named {
    fn path(&self) -> &str;
}

/// What the walks need to know of a norm leaf.
pub trait NormLeaf: Named {
    /// It carries a bias tensor (a LayerNorm: Falcon).
    fn has_bias(&self) -> bool;
}

/// What the walks need to know of a linear leaf.
pub trait LinearLeaf: Clone + Debug + Named {
    /// It carries a bias tensor.
    fn has_bias(&self) -> bool;
    /// It shares the embedding matrix (a tied `lm_head`): no tensor of its own in a checkpoint.
    fn is_tied(&self) -> bool;
}

/// The decoder: embeddings, layers, final norm, head.
#[derive(Debug, Clone)]
pub struct Tree<L: Leaves> {
    pub embed_tokens: L::Embedding,
    pub layers: Vec<Layer<L>>,
    pub norm: L::Norm,
    pub lm_head: L::Linear,
}

/// One decoder layer, by role. Which checkpoint names fill each role is decided in [`Tree::build`].
#[derive(Debug, Clone)]
pub struct Layer<L: Leaves> {
    /// Before attention (`input_layernorm`).
    pub input_norm: L::Norm,
    /// `q_proj`, `k_proj`, `v_proj` — or one fused `qkv_proj`; their outputs side by side are q|k|v.
    pub qkv: Vec<L::Linear>,
    /// Per-head norms of q and k (Qwen3).
    pub q_norm: Option<L::Norm>,
    pub k_norm: Option<L::Norm>,
    pub o_proj: L::Linear,
    /// After attention (Gemma 2's `post_attention_layernorm`).
    pub attn_out_norm: Option<L::Norm>,
    /// Before the MLP (`post_attention_layernorm`; Gemma 2's `pre_feedforward_layernorm`; Falcon's `ln_mlp`); `None`
    /// when the MLP reads the attention's normed input (a parallel Falcon layer with one LayerNorm).
    pub mlp_in_norm: Option<L::Norm>,
    /// The gated MLP: one, or a router over experts.
    pub mlp: Mlp<L>,
    /// After the MLP (Gemma 2's `post_feedforward_layernorm`).
    pub mlp_out_norm: Option<L::Norm>,
    /// Sliding-window size of this layer (`None` = full causal).
    pub window: Option<usize>,
}

/// The module name of Mixtral's sparse MoE block (`model.layers.N.block_sparse_moe`, as on the Hub).
pub const MOE_BLOCK: &str = "block_sparse_moe";

/// A gated MLP: `gate_proj`, `up_proj` — or one fused `gate_up_proj` — whose outputs side by side are gate|up, then
/// `down_proj` (a Mixtral expert: `w1`, `w3`, then `w2`).
#[derive(Debug, Clone)]
pub struct Ffn<L: Leaves> {
    pub gate_up: Vec<L::Linear>,
    pub down: L::Linear,
}

impl<L: Leaves> Ffn<L> {
    fn linears(&self) -> impl Iterator<Item = &L::Linear> {
        self.gate_up.iter().chain(std::iter::once(&self.down))
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut L::Linear> {
        self.gate_up
            .iter_mut()
            .chain(std::iter::once(&mut self.down))
    }

    fn map<M: Leaves>(&self, f: &mut impl MapLeaves<L, M>) -> Ffn<M> {
        Ffn {
            gate_up: self.gate_up.iter().map(|x| f.linear(x)).collect(),
            down: f.linear(&self.down),
        }
    }
}

/// A layer's MLP.
#[derive(Debug, Clone)]
pub enum Mlp<L: Leaves> {
    Dense(Ffn<L>),
    /// A sparse mixture of experts (Mixtral's `block_sparse_moe`): the router (`gate`, `[experts, hidden]`) scores
    /// every expert per token; the `top_k` best run, weighted by the softmax renormalised over them.
    Moe {
        router: L::Linear,
        experts: Vec<Ffn<L>>,
        top_k: usize,
    },
}

impl<L: Leaves> Mlp<L> {
    /// Its linear modules in forward order (gate/up, down; or the router, then each expert's gate/up, down).
    pub fn linears(&self) -> Vec<&L::Linear> {
        match self {
            Mlp::Dense(f) => f.linears().collect(),
            Mlp::Moe {
                router, experts, ..
            } => std::iter::once(router)
                .chain(experts.iter().flat_map(Ffn::linears))
                .collect(),
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut L::Linear> {
        match self {
            Mlp::Dense(f) => f.linears_mut().collect(),
            Mlp::Moe {
                router, experts, ..
            } => std::iter::once(router)
                .chain(experts.iter_mut().flat_map(Ffn::linears_mut))
                .collect(),
        }
    }

    /// Groups of linears whose checkpoint tensors are listed together (weights, then biases).
    fn tensor_groups(&self) -> Vec<&[L::Linear]> {
        match self {
            Mlp::Dense(f) => vec![&f.gate_up[..], std::slice::from_ref(&f.down)],
            Mlp::Moe {
                router, experts, ..
            } => std::iter::once(std::slice::from_ref(router))
                .chain(
                    experts
                        .iter()
                        .flat_map(|e| [&e.gate_up[..], std::slice::from_ref(&e.down)]),
                )
                .collect(),
        }
    }

    fn map<M: Leaves>(&self, f: &mut impl MapLeaves<L, M>) -> Mlp<M> {
        match self {
            Mlp::Dense(x) => Mlp::Dense(x.map(f)),
            Mlp::Moe {
                router,
                experts,
                top_k,
            } => Mlp::Moe {
                router: f.linear(router),
                experts: experts.iter().map(|e| e.map(f)).collect(),
                top_k: *top_k,
            },
        }
    }
}

impl<L: Leaves> Layer<L> {
    /// The layer's linear modules in forward order (q/k/v, o, then the MLP's): [`Tree::linears`]'s order.
    pub fn linears(&self) -> Vec<&L::Linear> {
        let mut out: Vec<_> = self.qkv.iter().collect();
        out.push(&self.o_proj);
        out.extend(self.mlp.linears());
        out
    }
}

/// Makes the leaves while [`Tree::build`] walks a config.
pub trait Make<L: Leaves> {
    type Error;
    fn embedding(
        &mut self,
        path: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<L::Embedding, Self::Error>;
    /// A linear with weight `[out, in]` (torch layout) and, when `bias`, a bias `[out]`.
    fn linear(
        &mut self,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<L::Linear, Self::Error>;
    /// A head that reads the embedding matrix.
    fn tied(&mut self, path: &str, embedding: &L::Embedding) -> Result<L::Linear, Self::Error>;
    /// An RMSNorm `weight [dim]`, or with `bias` a LayerNorm (`weight`, `bias`).
    fn norm(&mut self, path: &str, dim: usize, bias: bool) -> Result<L::Norm, Self::Error>;
}

/// Converts every leaf of a tree ([`Tree::map`]).
pub trait MapLeaves<L: Leaves, M: Leaves> {
    fn embedding(&mut self, e: &L::Embedding) -> M::Embedding;
    fn linear(&mut self, l: &L::Linear) -> M::Linear;
    fn norm(&mut self, n: &L::Norm) -> M::Norm;
}

/// A leaf in checkpoint order ([`Tree::leaves`]).
#[derive(Debug)]
pub enum Leaf<'a, L: Leaves> {
    Embedding(&'a L::Embedding),
    /// A linear's `weight`.
    Weight(&'a L::Linear),
    /// A linear's `bias`.
    Bias(&'a L::Linear),
    Norm(&'a L::Norm),
    /// A LayerNorm's `bias`.
    NormBias(&'a L::Norm),
}

impl<L: Leaves> Leaf<'_, L> {
    /// The checkpoint tensor's name (`….weight` / `….bias`).
    pub fn tensor_name(&self) -> String {
        match self {
            Leaf::Embedding(e) => format!("{}.weight", e.path()),
            Leaf::Weight(l) => format!("{}.weight", l.path()),
            Leaf::Bias(l) => format!("{}.bias", l.path()),
            Leaf::Norm(n) => format!("{}.weight", n.path()),
            Leaf::NormBias(n) => format!("{}.bias", n.path()),
        }
    }
}

impl<L: Leaves> Tree<L> {
    /// The tree a config describes, its leaves made by `m`.
    pub fn build<M: Make<L>>(cfg: &ModelConfig, m: &mut M) -> Result<Self, M::Error> {
        if let Some(layout) = cfg.falcon {
            return Self::build_falcon(cfg, layout, m);
        }
        let h = cfg.hidden_size;
        let (qo, kvo, i) = (cfg.q_out(), cfg.kv_out(), cfg.intermediate_size);
        let embed_tokens = m.embedding("model.embed_tokens", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, &window) in cfg.layer_windows.iter().enumerate() {
            let p = format!("{}{l}", cfg.family.rules().layer_prefix);
            let attn = |name: &str| format!("{p}.self_attn.{name}");
            let mlp = |name: &str| format!("{p}.mlp.{name}");
            let norm = |name: &str| format!("{p}.{name}");
            let qkv = if cfg.fused_projections() {
                vec![m.linear(&attn("qkv_proj"), qo + 2 * kvo, h, false)?]
            } else {
                vec![
                    m.linear(&attn("q_proj"), qo, h, cfg.qkv_bias)?,
                    m.linear(&attn("k_proj"), kvo, h, cfg.qkv_bias)?,
                    m.linear(&attn("v_proj"), kvo, h, cfg.qkv_bias)?,
                ]
            };
            let o_proj = m.linear(&attn("o_proj"), h, qo, cfg.o_bias)?;
            let mlp = match cfg.moe {
                Some(moe) => {
                    let sparse = |name: &str| format!("{p}.{MOE_BLOCK}.{name}");
                    let router = m.linear(&sparse("gate"), moe.experts, h, false)?;
                    let mut experts = Vec::with_capacity(moe.experts);
                    for e in 0..moe.experts {
                        let w = |name: &str| sparse(&format!("experts.{e}.{name}"));
                        experts.push(Ffn {
                            gate_up: vec![
                                m.linear(&w("w1"), i, h, false)?,
                                m.linear(&w("w3"), i, h, false)?,
                            ],
                            down: m.linear(&w("w2"), h, i, false)?,
                        });
                    }
                    Mlp::Moe {
                        router,
                        experts,
                        top_k: moe.top_k,
                    }
                }
                None if cfg.fused_projections() => Mlp::Dense(Ffn {
                    gate_up: vec![m.linear(&mlp("gate_up_proj"), 2 * i, h, false)?],
                    down: m.linear(&mlp("down_proj"), h, i, false)?,
                }),
                None => Mlp::Dense(Ffn {
                    gate_up: vec![
                        m.linear(&mlp("gate_proj"), i, h, cfg.mlp_bias)?,
                        m.linear(&mlp("up_proj"), i, h, cfg.mlp_bias)?,
                    ],
                    down: m.linear(&mlp("down_proj"), h, i, cfg.mlp_bias)?,
                }),
            };
            let (q_norm, k_norm) = if cfg.qk_norm() {
                (
                    Some(m.norm(&attn("q_norm"), cfg.head_dim, false)?),
                    Some(m.norm(&attn("k_norm"), cfg.head_dim, false)?),
                )
            } else {
                (None, None)
            };
            let input_norm = m.norm(&norm("input_layernorm"), h, false)?;
            let (attn_out_norm, mlp_in_norm, mlp_out_norm) = if cfg.sandwich_norms() {
                (
                    Some(m.norm(&norm("post_attention_layernorm"), h, false)?),
                    m.norm(&norm("pre_feedforward_layernorm"), h, false)?,
                    Some(m.norm(&norm("post_feedforward_layernorm"), h, false)?),
                )
            } else {
                (
                    None,
                    m.norm(&norm("post_attention_layernorm"), h, false)?,
                    None,
                )
            };
            layers.push(Layer {
                input_norm,
                qkv,
                q_norm,
                k_norm,
                o_proj,
                attn_out_norm,
                mlp_in_norm: Some(mlp_in_norm),
                mlp,
                mlp_out_norm,
                window,
            });
        }
        let norm = m.norm("model.norm", h, false)?;
        Self::with_head(cfg, m, embed_tokens, layers, norm)
    }

    /// The tree with its head: tied to the embeddings, or `lm_head`.
    fn with_head<M: Make<L>>(
        cfg: &ModelConfig,
        m: &mut M,
        embed_tokens: L::Embedding,
        layers: Vec<Layer<L>>,
        norm: L::Norm,
    ) -> Result<Self, M::Error> {
        let lm_head = if cfg.tie_word_embeddings {
            m.tied("lm_head", &embed_tokens)?
        } else {
            m.linear("lm_head", cfg.vocab_size, cfg.hidden_size, false)?
        };
        Ok(Tree {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Falcon's tree (`transformer.word_embeddings`, `transformer.h.N`, `transformer.ln_f`): LayerNorms with bias,
    /// one fused `query_key_value` (its output grouped per key/value head), `dense`, a non-gated
    /// `dense_h_to_4h` → `dense_4h_to_h` MLP.
    fn build_falcon<M: Make<L>>(
        cfg: &ModelConfig,
        layout: crate::model::config::FalconLayout,
        m: &mut M,
    ) -> Result<Self, M::Error> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, layout.bias);
        let qkv_out = cfg.q_out() + 2 * cfg.kv_out();
        let embed_tokens = m.embedding("transformer.word_embeddings", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (l, &window) in cfg.layer_windows.iter().enumerate() {
            let p = format!("{}{l}", cfg.family.rules().layer_prefix);
            let sub = |name: &str| format!("{p}.{name}");
            let (input_norm, mlp_in_norm) = if layout.shared_norm {
                (m.norm(&sub("input_layernorm"), h, true)?, None)
            } else if layout.parallel {
                (
                    m.norm(&sub("ln_attn"), h, true)?,
                    Some(m.norm(&sub("ln_mlp"), h, true)?),
                )
            } else {
                (
                    m.norm(&sub("input_layernorm"), h, true)?,
                    Some(m.norm(&sub("post_attention_layernorm"), h, true)?),
                )
            };
            layers.push(Layer {
                input_norm,
                qkv: vec![m.linear(&sub("self_attention.query_key_value"), qkv_out, h, b)?],
                q_norm: None,
                k_norm: None,
                o_proj: m.linear(&sub("self_attention.dense"), h, cfg.q_out(), b)?,
                attn_out_norm: None,
                mlp_in_norm,
                mlp: Mlp::Dense(Ffn {
                    gate_up: vec![m.linear(&sub("mlp.dense_h_to_4h"), i, h, b)?],
                    down: m.linear(&sub("mlp.dense_4h_to_h"), h, i, b)?,
                }),
                mlp_out_norm: None,
                window,
            });
        }
        let norm = m.norm("transformer.ln_f", h, true)?;
        Self::with_head(cfg, m, embed_tokens, layers, norm)
    }

    /// Every checkpoint tensor in checkpoint order: the embeddings; per layer the attention input projections'
    /// weights then their biases, the same for the MLP input projections (or the router), o_proj, down_proj (or
    /// each expert's projections), then the norms; the final norm; an untied head.
    pub fn leaves(&self) -> Vec<Leaf<'_, L>> {
        let mut out = vec![Leaf::Embedding(&self.embed_tokens)];
        for layer in &self.layers {
            let mlp = layer.mlp.tensor_groups();
            let (mlp_in, mlp_rest) = mlp.split_first().expect("an MLP has linears");
            let groups = [&layer.qkv[..], mlp_in, std::slice::from_ref(&layer.o_proj)];
            for g in groups.into_iter().chain(mlp_rest.iter().copied()) {
                out.extend(g.iter().map(Leaf::Weight));
                out.extend(g.iter().filter(|l| l.has_bias()).map(Leaf::Bias));
            }
            let norms = [
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                Some(&layer.input_norm),
                layer.attn_out_norm.as_ref(),
                layer.mlp_in_norm.as_ref(),
                layer.mlp_out_norm.as_ref(),
            ];
            for n in norms.into_iter().flatten() {
                out.push(Leaf::Norm(n));
                if n.has_bias() {
                    out.push(Leaf::NormBias(n));
                }
            }
        }
        out.push(Leaf::Norm(&self.norm));
        if self.norm.has_bias() {
            out.push(Leaf::NormBias(&self.norm));
        }
        if !self.lm_head.is_tied() {
            out.push(Leaf::Weight(&self.lm_head));
        }
        out
    }

    /// Every linear in forward order (per layer q, k, v / qkv, o, gate, up / gate_up, down; `lm_head` last), tied
    /// head included.
    pub fn linears(&self) -> Vec<&L::Linear> {
        let mut out: Vec<_> = self.layers.iter().flat_map(Layer::linears).collect();
        out.push(&self.lm_head);
        out
    }

    /// [`Tree::linears`], mutable, in the same order.
    pub fn linears_mut(&mut self) -> Vec<&mut L::Linear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            out.extend(&mut l.qkv);
            out.push(&mut l.o_proj);
            out.extend(l.mlp.linears_mut());
        }
        out.push(&mut self.lm_head);
        out
    }

    /// The same tree with every leaf converted.
    pub fn map<M: Leaves>(&self, f: &mut impl MapLeaves<L, M>) -> Tree<M> {
        let opt = |f: &mut dyn FnMut(&L::Norm) -> M::Norm, n: &Option<L::Norm>| n.as_ref().map(f);
        let layers = self
            .layers
            .iter()
            .map(|l| Layer {
                input_norm: f.norm(&l.input_norm),
                qkv: l.qkv.iter().map(|x| f.linear(x)).collect(),
                q_norm: opt(&mut |n| f.norm(n), &l.q_norm),
                k_norm: opt(&mut |n| f.norm(n), &l.k_norm),
                o_proj: f.linear(&l.o_proj),
                attn_out_norm: opt(&mut |n| f.norm(n), &l.attn_out_norm),
                mlp_in_norm: opt(&mut |n| f.norm(n), &l.mlp_in_norm),
                mlp: l.mlp.map(f),
                mlp_out_norm: opt(&mut |n| f.norm(n), &l.mlp_out_norm),
                window: l.window,
            })
            .collect();
        Tree {
            embed_tokens: f.embedding(&self.embed_tokens),
            layers,
            norm: f.norm(&self.norm),
            lm_head: f.linear(&self.lm_head),
        }
    }
}

// ------------------------------------------------------------------------------------------------- shapes

/// Leaves that are shapes: the layout a config implies.
#[derive(Debug, Clone)]
pub struct Shapes;

/// A linear's shape.
#[derive(Debug, Clone)]
pub struct LinearShape {
    pub path: String,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
    pub tied: bool,
}

/// A norm's or an embedding's shape.
#[derive(Debug, Clone)]
pub struct VectorShape {
    pub path: String,
    pub dims: Vec<usize>,
    /// A norm with a bias of the same shape.
    pub bias: bool,
}

impl Named for LinearShape {
    fn path(&self) -> &str {
        &self.path
    }
}

impl LinearLeaf for LinearShape {
    fn has_bias(&self) -> bool {
        self.bias
    }
    fn is_tied(&self) -> bool {
        self.tied
    }
}

impl Named for VectorShape {
    fn path(&self) -> &str {
        &self.path
    }
}

impl NormLeaf for VectorShape {
    fn has_bias(&self) -> bool {
        self.bias
    }
}

impl Leaves for Shapes {
    type Linear = LinearShape;
    type Norm = VectorShape;
    type Embedding = VectorShape;
}

struct ShapeMaker;

impl Make<Shapes> for ShapeMaker {
    type Error = std::convert::Infallible;
    fn embedding(
        &mut self,
        path: &str,
        vocab: usize,
        dim: usize,
    ) -> Result<VectorShape, Self::Error> {
        Ok(VectorShape {
            path: path.into(),
            dims: vec![vocab, dim],
            bias: false,
        })
    }
    fn linear(
        &mut self,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<LinearShape, Self::Error> {
        Ok(LinearShape {
            path: path.into(),
            out,
            inp,
            bias,
            tied: false,
        })
    }
    fn tied(&mut self, path: &str, e: &VectorShape) -> Result<LinearShape, Self::Error> {
        Ok(LinearShape {
            path: path.into(),
            out: e.dims[0],
            inp: e.dims[1],
            bias: false,
            tied: true,
        })
    }
    fn norm(&mut self, path: &str, dim: usize, bias: bool) -> Result<VectorShape, Self::Error> {
        Ok(VectorShape {
            path: path.into(),
            dims: vec![dim],
            bias,
        })
    }
}

/// The layout a config implies.
pub fn layout(cfg: &ModelConfig) -> Tree<Shapes> {
    match Tree::build(cfg, &mut ShapeMaker) {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

/// The checkpoint tensors a config implies, by HF name with their torch-layout shapes, in checkpoint order.
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    layout(cfg)
        .leaves()
        .into_iter()
        .map(|leaf| {
            let shape = match &leaf {
                Leaf::Embedding(e) | Leaf::Norm(e) | Leaf::NormBias(e) => e.dims.clone(),
                Leaf::Weight(l) => vec![l.out, l.inp],
                Leaf::Bias(l) => vec![l.out],
            };
            (leaf.tensor_name(), shape)
        })
        .collect()
}

/// The embedding matrix's tensor name (`model.embed_tokens.weight`; Falcon's `transformer.word_embeddings.weight`).
pub fn embedding_tensor_name(cfg: &ModelConfig) -> String {
    Leaf::<Shapes>::Embedding(&layout(cfg).embed_tokens).tensor_name()
}

/// Paths of the linear modules LoRA can target, in forward order (`lm_head` last, also when tied).
pub fn linear_paths(cfg: &ModelConfig) -> Vec<String> {
    layout(cfg)
        .linears()
        .into_iter()
        .map(|l| l.path.clone())
        .collect()
}

// ------------------------------------------------------------------------------------------------ weights

/// Leaves that are tensors on backend `B`: a loaded model.
#[derive(Debug, Clone)]
pub struct Weights<B: Backend>(PhantomData<B>);

/// RMSNorm, computed in f32: `x̂·(w + offset)` (offset 1 for Gemma); with a `bias`, LayerNorm (mean-centred,
/// `x̂·w + b`: Falcon).
#[derive(Debug, Clone)]
pub struct RmsNorm<B: Backend> {
    pub path: String,
    pub weight: Tensor<B, 1>,
    pub bias: Option<Tensor<B, 1>>,
    pub eps: f64,
    pub offset: f32,
}

/// The token embedding matrix `[vocab, hidden]` (dense, or quantized: a lookup dequantizes only its rows).
#[derive(Debug, Clone)]
pub struct Embedding<B: Backend> {
    pub path: String,
    pub weight: Frozen<B>,
}

impl<B: Backend> Named for RmsNorm<B> {
    fn path(&self) -> &str {
        &self.path
    }
}

impl<B: Backend> NormLeaf for RmsNorm<B> {
    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }
}

impl<B: Backend> Named for Embedding<B> {
    fn path(&self) -> &str {
        &self.path
    }
}

impl<B: Backend> Named for LoraLinear<B> {
    fn path(&self) -> &str {
        &self.path
    }
}

impl<B: Backend> LinearLeaf for LoraLinear<B> {
    fn has_bias(&self) -> bool {
        self.bias.is_some()
    }
    fn is_tied(&self) -> bool {
        self.tied
    }
}

impl<B: Backend> Leaves for Weights<B> {
    type Linear = LoraLinear<B>;
    type Norm = RmsNorm<B>;
    type Embedding = Embedding<B>;
}
