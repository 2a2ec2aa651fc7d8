//! Mixtral: transformers' `MixtralForCausalLM` — Mistral's attention (a sliding window on every layer when
//! configured) with a sparse mixture-of-experts MLP: a router (`block_sparse_moe.gate`) picks
//! `num_experts_per_tok` of `num_local_experts` SwiGLU experts (`experts.{e}.w1` gate, `w3` up, `w2` down) per
//! token, their outputs weighted by the router's softmax renormalised over the chosen experts. llama.cpp converts
//! it to its `llama` architecture with `expert_count` / `expert_used_count`.

use super::{AttentionBias, Family, Rules, Windows};

pub const RULES: Rules = Rules {
    rms_norm_eps: 1e-5,
    attention_bias: AttentionBias::None,
    windows: Windows::EveryLayer,
    moe: true,
    gguf_tensors: &[
        super::GGUF_INPUT_NORM,
        super::GGUF_ATTENTION,
        super::GGUF_MLP_NORM,
        super::GGUF_ROUTER,
    ],
    reads_gguf: false,
    gguf_permutes_qk: true,
    ..Rules::llama_like(Family::Mixtral, "MixtralForCausalLM", "mixtral", "llama")
};
