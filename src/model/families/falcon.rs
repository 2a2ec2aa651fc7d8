//! Falcon: transformers' `FalconForCausalLM` with rotary embeddings (the ALiBi variants are refused). LayerNorms
//! with bias, one fused `query_key_value` whose output is grouped per key/value head (each group: its query heads,
//! then its key, then its value — multi-query Falcon-7B is one group), a non-gated GELU MLP (`dense_h_to_4h`,
//! `dense_4h_to_h`), attention and MLP in parallel off the same residual (Falcon-7B: one shared LayerNorm;
//! `new_decoder_architecture`, Falcon-40B/180B: `ln_attn` and `ln_mlp`), module paths under `transformer.`.
//! Falcon3 is a Llama architecture and loads through the Llama family.

use super::{AttentionBias, Family, Hparams, Rules};
use crate::error::Result;
use crate::kernels::Activation;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    activation_keys: &["activation"],
    default_activation: Activation::Gelu,
    tie_word_embeddings: true,
    rms_norm_eps: 1e-5,
    attention_bias: AttentionBias::None,
    falcon: true,
    fused_projections: true,
    default_lora_targets: &["query_key_value"],
    layer_prefix: "transformer.h.",
    gguf_globals: &[
        ("token_embd", "transformer.word_embeddings"),
        ("output_norm", "transformer.ln_f"),
        ("output", "lm_head"),
    ],
    // llama.cpp: `attn_norm` feeds the MLP (and attention too when it is the only one); `attn_norm_2`, when
    // present, feeds attention — so Falcon-40B's ln_mlp is `attn_norm` and its ln_attn `attn_norm_2`.
    gguf_tensors: &[&[
        ("attn_norm", "input_layernorm"),
        ("attn_norm", "ln_mlp"),
        ("attn_norm_2", "ln_attn"),
        ("attn_qkv", "self_attention.query_key_value"),
        ("attn_output", "self_attention.dense"),
        ("ffn_up", "mlp.dense_h_to_4h"),
        ("ffn_down", "mlp.dense_4h_to_h"),
    ]],
    gguf_hyperparameters,
    llamacpp_windows: llamacpp_layout,
    ..Rules::llama_like(Family::Falcon, "FalconForCausalLM", "falcon", "falcon")
};

/// What llama.cpp's converter writes for `falcon`: a fixed `context_length` 2048, `tensor_data_layout` "jploski"
/// (query_key_value rows regrouped q|k|v), `feed_forward_length` 4·hidden, block and head counts, the LayerNorm
/// epsilon, `general.file_type`.
fn gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    h.u32("context_length", 2048, "context_length")?;
    h.str("tensor_data_layout", "jploski");
    h.u32("embedding_length", cfg.hidden_size, "hidden_size")?;
    h.u32(
        "feed_forward_length",
        cfg.intermediate_size,
        "ffn_hidden_size",
    )?;
    h.u32("block_count", cfg.num_hidden_layers, "num_hidden_layers")?;
    h.heads(cfg)?;
    h.f32("attention.layer_norm_epsilon", cfg.rms_norm_eps);
    h.file_type();
    Ok(())
}

/// llama.cpp's `falcon` runs parallel attention + MLP with bias-free linears and an MLP of 4·hidden (its converter
/// writes 4·hidden whatever `ffn_hidden_size` says); other layouts would run differently, so they are refused.
fn llamacpp_layout(cfg: &ModelConfig) -> std::result::Result<Vec<String>, String> {
    let Some(f) = cfg.falcon else {
        return Ok(Vec::new());
    };
    if !f.parallel {
        return Err("llama.cpp's falcon runs attention and the MLP in parallel; this model (parallel_attn: false) runs them one after the other".into());
    }
    if f.bias {
        return Err("llama.cpp's falcon has no linear biases; this model has `bias: true`".into());
    }
    if cfg.intermediate_size != 4 * cfg.hidden_size {
        return Err(format!(
            "llama.cpp's falcon assumes an MLP of 4·hidden_size = {}, this model's is {} (`ffn_hidden_size`)",
            4 * cfg.hidden_size,
            cfg.intermediate_size
        ));
    }
    Ok(Vec::new())
}
