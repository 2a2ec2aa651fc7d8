//! Everything that differs between model families, one file per family: config.json keys and defaults, the GGUF
//! hyperparameters in both directions and llama.cpp's tensor names, the default LoRA targets.
//!
//! A family is a [`Rules`] value — data plus a few functions for what is irregular — and the rest of loratune reads
//! it through [`Family::rules`]; nothing outside this folder and the config parsers branches on a family. The
//! decoder itself only sees [`ModelConfig`](super::ModelConfig) fields (norm offset, embedding scale, sandwich
//! norms, fused projections, soft-capping, windows). Adding a family is one file here (plus its fixtures), and
//! a new building block (an MoE block, a LayerNorm with bias) where the family needs one.

mod falcon;
mod gemma;
mod gemma2;
mod llama;
mod mistral;
mod mixtral;
mod phi3;
mod qwen2;
mod qwen3;

use crate::error::{Error, Result};
use crate::gguf::value::MetaValue;
use crate::kernels::Activation;

use super::config::{ModelConfig, RopeScaling};

/// The decoder families loratune runs. Each maps to one `*ForCausalLM` class of transformers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Mistral,
    Mixtral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma,
    Gemma2,
    Falcon,
}

impl Family {
    /// Every family, in the order the documentation lists them.
    pub const ALL: [Family; 9] = [
        Family::Llama,
        Family::Mistral,
        Family::Mixtral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Phi3,
        Family::Gemma,
        Family::Gemma2,
        Family::Falcon,
    ];

    /// What this family is (the one place a family is mapped to its file).
    pub fn rules(self) -> &'static Rules {
        match self {
            Family::Llama => &llama::RULES,
            Family::Mistral => &mistral::RULES,
            Family::Mixtral => &mixtral::RULES,
            Family::Qwen2 => &qwen2::RULES,
            Family::Qwen3 => &qwen3::RULES,
            Family::Phi3 => &phi3::RULES,
            Family::Gemma => &gemma::RULES,
            Family::Gemma2 => &gemma2::RULES,
            Family::Falcon => &falcon::RULES,
        }
    }

    /// The transformers class name (`architectures[0]`).
    pub fn architecture(self) -> &'static str {
        self.rules().architecture
    }

    /// The transformers `model_type`.
    pub fn model_type(self) -> &'static str {
        self.rules().model_type
    }

    /// The family of a transformers class name.
    pub fn from_architecture(name: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.architecture() == name)
    }

    /// The family of a transformers `model_type`.
    pub fn from_model_type(name: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.model_type() == name)
    }

    /// The family a GGUF `general.architecture` is read as.
    pub fn from_gguf_architecture(name: &str) -> Option<Family> {
        Self::ALL
            .into_iter()
            .find(|f| f.rules().reads_gguf && f.rules().gguf_architecture == name)
    }

    /// The supported `architectures` values, for error messages.
    pub fn supported_architectures() -> String {
        Self::ALL.map(Family::architecture).join(", ")
    }

    /// The GGUF architectures loratune reads, for error messages.
    pub fn supported_gguf_architectures() -> String {
        Self::ALL
            .into_iter()
            .filter(|f| f.rules().reads_gguf)
            .map(|f| f.rules().gguf_architecture)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which attention projections carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBias {
    /// config.json `attention_bias` (default false) puts a bias on q, k, v and o; in a GGUF, the tensors say.
    Configurable,
    /// q, k and v always have one, o never (Qwen2).
    QkvOnly,
    /// Never.
    None,
}

/// Which layers attend through a sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// Full causal attention everywhere.
    None,
    /// `sliding_window` (when set) on every layer (Mistral, Phi-3).
    EveryLayer,
    /// `sliding_window` on even layers, full attention on odd ones (Gemma 2); this default when unset.
    Alternating { default: usize },
    /// With `use_sliding_window: true`, `sliding_window` on the layers from `max_window_layers` (default 28) on
    /// (Qwen2/Qwen3); llama.cpp runs these families without a window.
    FromMaxWindowLayers,
}

/// Gemma 2's tanh soft-capping (config.json `attn_logit_softcapping`, `final_logit_softcapping`), as llama.cpp
/// stores it.
#[derive(Debug, Clone, Copy)]
pub struct Softcapping {
    /// llama.cpp's defaults when a GGUF lacks the keys.
    pub gguf_attn_default: f64,
    pub gguf_final_default: f64,
    /// The attention scale's `query_pre_attn_scalar` llama.cpp uses (it is not stored), from (layers, hidden,
    /// heads, head_dim).
    pub llamacpp_query_scalar: fn(usize, usize, usize, usize) -> f64,
}

/// What a family is. One `const RULES: Rules` per family file.
pub struct Rules {
    pub family: Family,
    /// transformers' class name (`architectures[0]`).
    pub architecture: &'static str,
    /// transformers' `model_type`.
    pub model_type: &'static str,

    // ------------------------------------------------------------------------------------------ config.json
    /// Keys naming the MLP activation, in the order transformers reads them.
    pub activation_keys: &'static [&'static str],
    /// The activation when no key names one.
    pub default_activation: Activation,
    /// Gemma's legacy `hidden_act: gelu` means the tanh approximation.
    pub gelu_means_tanh: bool,
    /// `tie_word_embeddings` when config.json does not say.
    pub tie_word_embeddings: bool,
    /// `rms_norm_eps` when config.json does not say.
    pub rms_norm_eps: f64,
    pub attention_bias: AttentionBias,
    /// config.json `mlp_bias` (Llama) can put a bias on the MLP projections.
    pub mlp_bias: bool,
    pub windows: Windows,
    /// `layer_types: sliding_attention` applies only when this key is true (Qwen's `use_sliding_window`).
    pub layer_types_gate: Option<&'static str>,
    pub softcapping: Option<Softcapping>,
    /// Attention scale from `query_pre_attn_scalar` (default head_dim) instead of head_dim (Gemma 2).
    pub query_pre_attn_scalar: bool,

    // ------------------------------------------------------------------------------------------- decoder
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Gemma's `x̂·(1 + w)` RMSNorm and embeddings scaled by √hidden.
    pub gemma_norms: bool,
    /// Norms after attention and after the MLP as well as before them (Gemma 2).
    pub sandwich_norms: bool,
    /// `qkv_proj` and `gate_up_proj` fused in the checkpoint (Phi-3); kept fused.
    pub fused_projections: bool,
    /// A sparse mixture-of-experts MLP (config.json `num_local_experts`, `num_experts_per_tok`,
    /// `router_aux_loss_coef`; Mixtral's module names).
    pub moe: bool,
    /// The Falcon block (config.json `new_decoder_architecture`, `multi_query`, `num_kv_heads`, `parallel_attn`,
    /// `num_ln_in_parallel_attn`, `bias`, `ffn_hidden_size`, `layer_norm_epsilon`; `transformer.h.N` names).
    pub falcon: bool,
    /// PEFT's default `target_modules` for this family.
    pub default_lora_targets: &'static [&'static str],
    /// Where decoder layer `N`'s module paths start: `{layer_prefix}N.`.
    pub layer_prefix: &'static str,

    // ---------------------------------------------------------------------------------------------- GGUF
    /// llama.cpp's `general.architecture`.
    pub gguf_architecture: &'static str,
    /// Whether a GGUF of that architecture is read as this family (Mistral's GGUFs say `llama`).
    pub reads_gguf: bool,
    /// Per-layer GGUF tensor base names → HF module paths under the layer prefix, in groups (shared groups are
    /// the consts below). A GGUF name listed twice maps to whichever of its modules the model has.
    pub gguf_tensors: &'static [&'static [(&'static str, &'static str)]],
    /// Model-level GGUF tensor base names → HF module paths.
    pub gguf_globals: GgufNames,
    /// llama.cpp stores q/k rows permuted for its interleaved RoPE (the `llama` architecture).
    pub gguf_permutes_qk: bool,
    /// `rope.dimension_count` below head_dim is read as partial rotary (Phi-3).
    pub gguf_partial_rotary: bool,
    /// A `rope_freqs` tensor carries Llama 3 rope scaling.
    pub gguf_rope_freqs: bool,
    /// The `{arch}.*` hyperparameters llama.cpp's converter writes.
    pub gguf_hyperparameters: fn(&ModelConfig, &mut Hparams) -> Result<()>,
    /// How llama.cpp's implementation of the architecture treats this model's attention windows: an error when it
    /// would run the model differently, notes when it approximates.
    pub llamacpp_windows: fn(&ModelConfig) -> std::result::Result<Vec<String>, String>,
}

impl Rules {
    /// A family with Llama's conventions (silu, untied head, eps 1e-6, no windows, q/v LoRA targets, llama.cpp's
    /// Llama tensor names, the llama-style GGUF keys); a family file overrides what differs.
    pub const fn llama_like(
        family: Family,
        architecture: &'static str,
        model_type: &'static str,
        gguf_architecture: &'static str,
    ) -> Rules {
        Rules {
            family,
            architecture,
            model_type,
            activation_keys: &["hidden_act"],
            default_activation: Activation::Silu,
            gelu_means_tanh: false,
            tie_word_embeddings: false,
            rms_norm_eps: 1e-6,
            attention_bias: AttentionBias::Configurable,
            mlp_bias: false,
            windows: Windows::None,
            layer_types_gate: None,
            softcapping: None,
            query_pre_attn_scalar: false,
            qk_norm: false,
            gemma_norms: false,
            sandwich_norms: false,
            fused_projections: false,
            moe: false,
            falcon: false,
            default_lora_targets: &["q_proj", "v_proj"],
            layer_prefix: "model.layers.",
            gguf_architecture,
            reads_gguf: true,
            gguf_tensors: LLAMA_GGUF_TENSORS,
            gguf_globals: LLAMA_GGUF_GLOBALS,
            gguf_permutes_qk: false,
            gguf_partial_rotary: false,
            gguf_rope_freqs: false,
            gguf_hyperparameters: llama_gguf_hyperparameters,
            llamacpp_windows: windows_ignored_by_llamacpp,
        }
    }

    /// (q/k/v bias, o bias) of this family, given what the checkpoint says for q and o (config.json's
    /// `attention_bias` for both; in a GGUF, whether the bias tensors are there).
    pub fn attention_biases(&self, q: bool, o: bool) -> (bool, bool) {
        match self.attention_bias {
            AttentionBias::QkvOnly => (true, false),
            AttentionBias::None => (false, false),
            AttentionBias::Configurable => (q, o),
        }
    }

    /// Every (GGUF base name, HF module path) pair of a layer.
    pub fn gguf_names(&self) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
        self.gguf_tensors.iter().flat_map(|g| g.iter())
    }

    /// What the decoder adds to every RMSNorm weight (Gemma's `x̂·(1 + w)`).
    pub fn norm_offset(&self) -> f32 {
        if self.gemma_norms {
            1.0
        } else {
            0.0
        }
    }

    /// What the decoder multiplies the embeddings by. transformers: `hidden * tensor(hidden_size**0.5,
    /// dtype=hidden.dtype)`.
    pub fn embedding_scale(&self, hidden_size: usize) -> Option<f32> {
        self.gemma_norms.then(|| (hidden_size as f64).sqrt() as f32)
    }
}

/// The `{arch}.*` metadata of a GGUF being written.
pub struct Hparams {
    arch: &'static str,
    file_type: u32,
    pub out: Vec<(String, MetaValue)>,
}

impl Hparams {
    /// For a file of llama.cpp architecture `arch` and `general.file_type` `file_type`.
    pub fn new(arch: &'static str, file_type: u32) -> Self {
        Hparams {
            arch,
            file_type,
            out: Vec::new(),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    /// `{arch}.name` = x as u32 (`what` names the config field in the error when it does not fit).
    pub fn u32(&mut self, name: &str, x: usize, what: &str) -> Result<()> {
        let v = u32::try_from(x)
            .map_err(|_| Error::Export(format!("{what} = {x} does not fit GGUF's u32")))?;
        let k = self.key(name);
        self.out.push((k, MetaValue::U32(v)));
        Ok(())
    }

    /// `{arch}.name` = x as f32.
    pub fn f32(&mut self, name: &str, x: f64) {
        let k = self.key(name);
        self.out.push((k, MetaValue::F32(x as f32)));
    }

    /// `{arch}.name` = a string.
    pub fn str(&mut self, name: &str, x: &str) {
        let k = self.key(name);
        self.out.push((k, MetaValue::String(x.to_string())));
    }

    /// `general.file_type` (where the converter writes it among the architecture's keys).
    pub fn file_type(&mut self) {
        self.out
            .push(("general.file_type".into(), MetaValue::U32(self.file_type)));
    }

    /// The sizes every architecture writes, in the converter's order for the llama family.
    pub fn llama_sizes(&mut self, cfg: &ModelConfig) -> Result<()> {
        self.u32("block_count", cfg.num_hidden_layers, "num_hidden_layers")?;
        self.u32(
            "context_length",
            cfg.max_position_embeddings,
            "max_position_embeddings",
        )?;
        self.u32("embedding_length", cfg.hidden_size, "hidden_size")?;
        self.u32(
            "feed_forward_length",
            cfg.intermediate_size,
            "intermediate_size",
        )?;
        self.heads(cfg)
    }

    /// `attention.head_count` and `attention.head_count_kv`.
    pub fn heads(&mut self, cfg: &ModelConfig) -> Result<()> {
        self.u32(
            "attention.head_count",
            cfg.num_attention_heads,
            "num_attention_heads",
        )?;
        self.u32(
            "attention.head_count_kv",
            cfg.num_key_value_heads,
            "num_key_value_heads",
        )
    }

    /// `attention.layer_norm_rms_epsilon`.
    pub fn eps(&mut self, cfg: &ModelConfig) {
        self.f32("attention.layer_norm_rms_epsilon", cfg.rms_norm_eps);
    }

    /// `attention.key_length` and `attention.value_length`.
    pub fn head_dim(&mut self, cfg: &ModelConfig) -> Result<()> {
        self.u32("attention.key_length", cfg.head_dim, "head_dim")?;
        self.u32("attention.value_length", cfg.head_dim, "head_dim")
    }

    /// `rope.scaling.type` + `rope.scaling.factor` for linear scaling.
    pub fn rope_scaling(&mut self, cfg: &ModelConfig) {
        if let RopeScaling::Linear { factor } = cfg.rope.scaling {
            self.str("rope.scaling.type", "linear");
            self.f32("rope.scaling.factor", factor);
        }
    }
}

/// What llama.cpp's converter writes for llama, mistral, qwen2 and qwen3: `block_count`, `context_length`,
/// `embedding_length`, `feed_forward_length`, head counts, `rope.scaling.*` (linear scaling), `rope.freq_base`,
/// `attention.layer_norm_rms_epsilon`, `attention.key_length` + `value_length` (when config.json has
/// `head_dim`), `general.file_type`; the `llama` architecture also `vocab_size` and `rope.dimension_count`.
fn llama_gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    h.llama_sizes(cfg)?;
    h.rope_scaling(cfg);
    h.f32("rope.freq_base", cfg.rope.theta);
    h.eps(cfg);
    if let Some(moe) = cfg.moe {
        h.u32("expert_count", moe.experts, "num_local_experts")?;
        h.u32("expert_used_count", moe.top_k, "num_experts_per_tok")?;
    }
    let head_dim_in_config = cfg.raw_get("head_dim").is_some()
        || cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size;
    if head_dim_in_config {
        h.head_dim(cfg)?;
    }
    h.file_type();
    if cfg.family.rules().gguf_architecture == "llama" {
        h.u32("vocab_size", cfg.vocab_size, "vocab_size")?;
        h.u32("rope.dimension_count", cfg.head_dim, "head_dim")?;
    }
    Ok(())
}

/// The windows rule of families llama.cpp runs without sliding-window attention: a note when the model has one.
pub fn windows_ignored_by_llamacpp(cfg: &ModelConfig) -> std::result::Result<Vec<String>, String> {
    let arch = cfg.family.rules().gguf_architecture;
    Ok(match cfg.layer_windows.iter().flatten().min() {
        Some(w) if *w < cfg.max_position_embeddings => vec![format!(
            "llama.cpp's {arch} has no sliding-window attention: the GGUF attends to the whole context, so it matches this model only for contexts of up to {w} tokens"
        )],
        _ => Vec::new(),
    })
}

/// llama.cpp's per-layer tensor names (GGUF base name, HF module path), in the groups the families share.
pub type GgufNames = &'static [(&'static str, &'static str)];

/// Llama's model-level tensors (as llama.cpp names them, then HF).
pub const LLAMA_GGUF_GLOBALS: GgufNames = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// The norm before attention.
pub const GGUF_INPUT_NORM: GgufNames = &[("attn_norm", "input_layernorm")];
/// Separate q, k, v and o projections.
pub const GGUF_ATTENTION: GgufNames = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
];
/// The norm before the MLP (Llama's `post_attention_layernorm`).
pub const GGUF_MLP_NORM: GgufNames = &[("ffn_norm", "post_attention_layernorm")];
/// Separate gate, up and down projections.
pub const GGUF_MLP: GgufNames = &[
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];
/// Mixtral's router (its experts are stacked tensors: see `gguf::tensors`).
pub const GGUF_ROUTER: GgufNames = &[("ffn_gate_inp", "block_sparse_moe.gate")];
/// The Llama module layout.
pub const LLAMA_GGUF_TENSORS: &[GgufNames] =
    &[GGUF_INPUT_NORM, GGUF_ATTENTION, GGUF_MLP_NORM, GGUF_MLP];
