//! Llama (Llama 2/3/3.1/3.2, SmolLM2): transformers' `LlamaForCausalLM`, llama.cpp's `llama`.
//!
//! `attention_bias` and `mlp_bias` may add biases; Llama 3 rope scaling is stored in GGUF as a `rope_freqs`
//! tensor; llama.cpp permutes the q/k rows of this architecture for its interleaved RoPE.

use super::{Family, Rules};

pub const RULES: Rules = Rules {
    mlp_bias: true,
    gguf_permutes_qk: true,
    gguf_rope_freqs: true,
    ..Rules::llama_like(Family::Llama, "LlamaForCausalLM", "llama", "llama")
};
