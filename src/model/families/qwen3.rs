//! Qwen3: transformers' `Qwen3ForCausalLM`, llama.cpp's `qwen3`. Per-head RMSNorm on q and k before RoPE, an
//! explicit head_dim, `attention_bias`.

use super::{Family, Rules, Windows};

pub const RULES: Rules = Rules {
    windows: Windows::FromMaxWindowLayers,
    layer_types_gate: Some("use_sliding_window"),
    qk_norm: true,
    gguf_tensors: &[
        super::GGUF_INPUT_NORM,
        super::GGUF_ATTENTION,
        &[
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
        ],
        super::GGUF_MLP_NORM,
        super::GGUF_MLP,
    ],
    ..Rules::llama_like(Family::Qwen3, "Qwen3ForCausalLM", "qwen3", "qwen3")
};
