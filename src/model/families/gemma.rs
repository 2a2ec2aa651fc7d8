//! Gemma: transformers' `GemmaForCausalLM`, llama.cpp's `gemma`. `(1 + w)` RMSNorm (llama.cpp stores the norms
//! as `w + 1`), embeddings scaled by √hidden, gelu-tanh, tied embeddings.

use super::{windows_ignored_by_llamacpp, AttentionBias, Family, Hparams, Rules, Windows};
use crate::error::Result;
use crate::kernels::Activation;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    family: Family::Gemma,
    architecture: "GemmaForCausalLM",
    model_type: "gemma",
    activation_keys: &["hidden_act", "hidden_activation"],
    default_activation: Activation::GeluTanh,
    gelu_means_tanh: true,
    tie_word_embeddings: true,
    rms_norm_eps: 1e-6,
    attention_bias: AttentionBias::Configurable,
    mlp_bias: false,
    windows: Windows::None,
    layer_types_gate: None,
    softcapping: None,
    query_pre_attn_scalar: false,
    qk_norm: false,
    gemma_norms: true,
    sandwich_norms: false,
    fused_projections: false,
    default_lora_targets: &["q_proj", "v_proj"],
    gguf_architecture: "gemma",
    reads_gguf: true,
    gguf_tensors: super::LLAMA_GGUF_TENSORS,
    gguf_permutes_qk: false,
    gguf_partial_rotary: false,
    gguf_rope_freqs: false,
    gguf_hyperparameters,
    llamacpp_windows: windows_ignored_by_llamacpp,
};

/// `context_length`, `embedding_length`, `block_count`, `feed_forward_length`, head counts, epsilon, key/value
/// length, `general.file_type` (no rope keys: llama.cpp's default base 10000; loratune adds `rope.freq_base` /
/// scaling keys only when the model deviates from that).
pub(super) fn gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    gemma_sizes(cfg, h)?;
    gemma_rope(cfg, h);
    Ok(())
}

pub(super) fn gemma_sizes(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    h.u32(
        "context_length",
        cfg.max_position_embeddings,
        "max_position_embeddings",
    )?;
    h.u32("embedding_length", cfg.hidden_size, "hidden_size")?;
    h.u32("block_count", cfg.num_hidden_layers, "num_hidden_layers")?;
    h.u32(
        "feed_forward_length",
        cfg.intermediate_size,
        "intermediate_size",
    )?;
    h.heads(cfg)?;
    h.eps(cfg);
    h.head_dim(cfg)?;
    h.file_type();
    Ok(())
}

/// Not written by the converter (llama.cpp then uses base 10000, no scaling); added when needed.
pub(super) fn gemma_rope(cfg: &ModelConfig, h: &mut Hparams) {
    if (cfg.rope.theta - 10000.0).abs() > 1e-6 {
        h.f32("rope.freq_base", cfg.rope.theta);
    }
    h.rope_scaling(cfg);
}
