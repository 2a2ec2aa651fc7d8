//! Phi-3 / Phi-3.5: transformers' `Phi3ForCausalLM`, llama.cpp's `phi3`. `qkv_proj` and `gate_up_proj` are fused in
//! the checkpoints and stay fused (PEFT targets them by those names); partial rotary embeddings; one sliding
//! window on every layer.

use super::{AttentionBias, Family, Hparams, Rules, Windows};
use crate::error::Result;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    rms_norm_eps: 1e-5,
    attention_bias: AttentionBias::None,
    windows: Windows::EveryLayer,
    fused_projections: true,
    default_lora_targets: &["qkv_proj"],
    gguf_tensors: &[
        super::GGUF_INPUT_NORM,
        &[
            ("attn_qkv", "self_attn.qkv_proj"),
            ("attn_output", "self_attn.o_proj"),
        ],
        super::GGUF_MLP_NORM,
        &[
            ("ffn_up", "mlp.gate_up_proj"),
            ("ffn_down", "mlp.down_proj"),
        ],
    ],
    gguf_partial_rotary: true,
    gguf_hyperparameters,
    llamacpp_windows,
    ..Rules::llama_like(Family::Phi3, "Phi3ForCausalLM", "phi3", "phi3")
};

/// `context_length`, `rope.scaling.original_context_length`, `embedding_length`, `feed_forward_length`,
/// `block_count`, head counts, epsilon, `rope.dimension_count` (rotated dims), `rope.freq_base`,
/// `attention.sliding_window` (0 = none).
fn gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    let original = cfg
        .raw_get("original_max_position_embeddings")
        .or_else(|| {
            ["rope_parameters", "rope_scaling"].iter().find_map(|r| {
                cfg.raw_get(r)
                    .and_then(|p| p.get("original_max_position_embeddings"))
            })
        })
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .unwrap_or(cfg.max_position_embeddings);
    h.u32(
        "context_length",
        cfg.max_position_embeddings,
        "max_position_embeddings",
    )?;
    h.u32(
        "rope.scaling.original_context_length",
        original,
        "original_max_position_embeddings",
    )?;
    h.u32("embedding_length", cfg.hidden_size, "hidden_size")?;
    h.u32(
        "feed_forward_length",
        cfg.intermediate_size,
        "intermediate_size",
    )?;
    h.u32("block_count", cfg.num_hidden_layers, "num_hidden_layers")?;
    h.heads(cfg)?;
    h.eps(cfg);
    h.u32(
        "rope.dimension_count",
        cfg.rotary_dim(),
        "rotary dimensions",
    )?;
    h.f32("rope.freq_base", cfg.rope.theta);
    h.rope_scaling(cfg);
    h.file_type();
    let w = cfg.layer_windows.first().copied().flatten().unwrap_or(0);
    h.u32("attention.sliding_window", w, "sliding_window")
}

/// llama.cpp's phi3 applies one sliding window to every layer.
fn llamacpp_windows(cfg: &ModelConfig) -> std::result::Result<Vec<String>, String> {
    let windows = &cfg.layer_windows;
    if windows
        .iter()
        .any(|w| *w != windows.first().copied().flatten())
    {
        return Err(format!(
            "phi3 in llama.cpp applies one sliding window to every layer, but the layers use {windows:?}"
        ));
    }
    Ok(Vec::new())
}
