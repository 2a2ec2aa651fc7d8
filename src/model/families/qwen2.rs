//! Qwen2 / Qwen2.5: transformers' `Qwen2ForCausalLM`, llama.cpp's `qwen2`. Biases on q/k/v (never on o); an
//! optional sliding window from `max_window_layers` on, which llama.cpp does not apply.

use super::{AttentionBias, Family, Rules, Windows};

pub const RULES: Rules = Rules {
    attention_bias: AttentionBias::QkvOnly,
    windows: Windows::FromMaxWindowLayers,
    layer_types_gate: Some("use_sliding_window"),
    ..Rules::llama_like(Family::Qwen2, "Qwen2ForCausalLM", "qwen2", "qwen2")
};
