//! Qwen2 / Qwen2.5: transformers' `Qwen2ForCausalLM`, llama.cpp's `qwen2`. Biases on q/k/v (never on o); an
//! optional sliding window from `max_window_layers` on, which llama.cpp does not apply.

use super::{
    windows_ignored_by_llamacpp, AttentionBias, Family, Rules, Windows, LLAMA_GGUF_TENSORS,
};
use crate::kernels::Activation;

pub const RULES: Rules = Rules {
    family: Family::Qwen2,
    architecture: "Qwen2ForCausalLM",
    model_type: "qwen2",
    activation_keys: &["hidden_act"],
    default_activation: Activation::Silu,
    gelu_means_tanh: false,
    tie_word_embeddings: false,
    rms_norm_eps: 1e-6,
    attention_bias: AttentionBias::QkvOnly,
    mlp_bias: false,
    windows: Windows::FromMaxWindowLayers,
    layer_types_gate: Some("use_sliding_window"),
    softcapping: None,
    query_pre_attn_scalar: false,
    qk_norm: false,
    gemma_norms: false,
    sandwich_norms: false,
    fused_projections: false,
    default_lora_targets: &["q_proj", "v_proj"],
    gguf_architecture: "qwen2",
    reads_gguf: true,
    gguf_tensors: LLAMA_GGUF_TENSORS,
    gguf_permutes_qk: false,
    gguf_partial_rotary: false,
    gguf_rope_freqs: false,
    gguf_hyperparameters: super::llama::gguf_hyperparameters,
    llamacpp_windows: windows_ignored_by_llamacpp,
};
