//! Qwen3: transformers' `Qwen3ForCausalLM`, llama.cpp's `qwen3`. Per-head RMSNorm on q and k before RoPE, an
//! explicit head_dim, `attention_bias`.

use super::{windows_ignored_by_llamacpp, AttentionBias, Family, Rules, Windows};
use crate::kernels::Activation;

pub const RULES: Rules = Rules {
    family: Family::Qwen3,
    architecture: "Qwen3ForCausalLM",
    model_type: "qwen3",
    activation_keys: &["hidden_act"],
    default_activation: Activation::Silu,
    gelu_means_tanh: false,
    tie_word_embeddings: false,
    rms_norm_eps: 1e-6,
    attention_bias: AttentionBias::Configurable,
    mlp_bias: false,
    windows: Windows::FromMaxWindowLayers,
    layer_types_gate: Some("use_sliding_window"),
    softcapping: None,
    query_pre_attn_scalar: false,
    qk_norm: true,
    gemma_norms: false,
    sandwich_norms: false,
    fused_projections: false,
    default_lora_targets: &["q_proj", "v_proj"],
    gguf_architecture: "qwen3",
    reads_gguf: true,
    gguf_tensors: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ],
    gguf_permutes_qk: false,
    gguf_partial_rotary: false,
    gguf_rope_freqs: false,
    gguf_hyperparameters: super::llama::gguf_hyperparameters,
    llamacpp_windows: windows_ignored_by_llamacpp,
};
