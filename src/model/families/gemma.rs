//! Gemma: transformers' `GemmaForCausalLM`, llama.cpp's `gemma`. `(1 + w)` RMSNorm (llama.cpp stores the norms
//! as `w + 1`), embeddings scaled by √hidden, gelu-tanh, tied embeddings.

use super::{Family, Hparams, Rules};
use crate::error::Result;
use crate::kernels::Activation;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    activation_keys: &["hidden_act", "hidden_activation"],
    default_activation: Activation::GeluTanh,
    gelu_means_tanh: true,
    tie_word_embeddings: true,
    gemma_norms: true,
    gguf_hyperparameters,
    ..Rules::llama_like(Family::Gemma, "GemmaForCausalLM", "gemma", "gemma")
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
