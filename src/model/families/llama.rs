//! Llama (Llama 2/3/3.1/3.2, SmolLM2): transformers' `LlamaForCausalLM`, llama.cpp's `llama`.
//!
//! `attention_bias` and `mlp_bias` may add biases; Llama 3 rope scaling is stored in GGUF as a `rope_freqs`
//! tensor; llama.cpp permutes the q/k rows of this architecture for its interleaved RoPE.

use super::{
    windows_ignored_by_llamacpp, AttentionBias, Family, Hparams, Rules, Windows, LLAMA_GGUF_TENSORS,
};
use crate::error::Result;
use crate::kernels::Activation;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    family: Family::Llama,
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    activation_keys: &["hidden_act"],
    default_activation: Activation::Silu,
    gelu_means_tanh: false,
    tie_word_embeddings: false,
    rms_norm_eps: 1e-6,
    attention_bias: AttentionBias::Configurable,
    mlp_bias: true,
    windows: Windows::None,
    layer_types_gate: None,
    softcapping: None,
    query_pre_attn_scalar: false,
    qk_norm: false,
    gemma_norms: false,
    sandwich_norms: false,
    fused_projections: false,
    default_lora_targets: &["q_proj", "v_proj"],
    gguf_architecture: "llama",
    reads_gguf: true,
    gguf_tensors: LLAMA_GGUF_TENSORS,
    gguf_permutes_qk: true,
    gguf_partial_rotary: false,
    gguf_rope_freqs: true,
    gguf_hyperparameters,
    llamacpp_windows: windows_ignored_by_llamacpp,
};

/// What llama.cpp's converter writes for llama, mistral, qwen2 and qwen3: `block_count`, `context_length`,
/// `embedding_length`, `feed_forward_length`, head counts, `rope.scaling.*` (linear scaling), `rope.freq_base`,
/// `attention.layer_norm_rms_epsilon`, `attention.key_length` + `value_length` (when config.json has
/// `head_dim`), `general.file_type`; the `llama` architecture also `vocab_size` and `rope.dimension_count`.
pub(super) fn gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    h.llama_sizes(cfg)?;
    h.rope_scaling(cfg);
    h.f32("rope.freq_base", cfg.rope.theta);
    h.eps(cfg);
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
