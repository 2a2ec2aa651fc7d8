//! Mistral: transformers' `MistralForCausalLM`. llama.cpp converts it to its `llama` architecture (so a GGUF reads
//! back as Llama), which has no sliding window.

use super::{AttentionBias, Family, Rules, Windows};

pub const RULES: Rules = Rules {
    rms_norm_eps: 1e-5,
    attention_bias: AttentionBias::None,
    windows: Windows::EveryLayer,
    reads_gguf: false,
    gguf_permutes_qk: true,
    ..Rules::llama_like(Family::Mistral, "MistralForCausalLM", "mistral", "llama")
};
