//! Mistral: transformers' `MistralForCausalLM`. llama.cpp converts it to its `llama` architecture (so a GGUF reads
//! back as Llama), which has no sliding window.

use super::{
    windows_ignored_by_llamacpp, AttentionBias, Family, Rules, Windows, LLAMA_GGUF_TENSORS,
};
use crate::kernels::Activation;

pub const RULES: Rules = Rules {
    family: Family::Mistral,
    architecture: "MistralForCausalLM",
    model_type: "mistral",
    activation_keys: &["hidden_act"],
    default_activation: Activation::Silu,
    gelu_means_tanh: false,
    tie_word_embeddings: false,
    rms_norm_eps: 1e-5,
    attention_bias: AttentionBias::None,
    mlp_bias: false,
    windows: Windows::EveryLayer,
    layer_types_gate: None,
    softcapping: None,
    query_pre_attn_scalar: false,
    qk_norm: false,
    gemma_norms: false,
    sandwich_norms: false,
    fused_projections: false,
    default_lora_targets: &["q_proj", "v_proj"],
    gguf_architecture: "llama",
    reads_gguf: false,
    gguf_tensors: LLAMA_GGUF_TENSORS,
    gguf_permutes_qk: true,
    gguf_partial_rotary: false,
    gguf_rope_freqs: false,
    gguf_hyperparameters: super::llama::gguf_hyperparameters,
    llamacpp_windows: windows_ignored_by_llamacpp,
};
