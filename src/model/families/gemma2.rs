//! Gemma 2: transformers' `Gemma2ForCausalLM`, llama.cpp's `gemma2`. Gemma's norms plus sandwich norms (after
//! attention and after the MLP too), tanh soft-capping of the attention scores and the final logits, sliding-window
//! attention on even layers, `query_pre_attn_scalar`.

use super::{Family, Hparams, Rules, Softcapping, Windows};
use crate::error::{Error, Result};
use crate::kernels::Activation;
use crate::model::ModelConfig;

pub const RULES: Rules = Rules {
    activation_keys: &["hidden_activation", "hidden_act"],
    default_activation: Activation::GeluTanh,
    tie_word_embeddings: true,
    windows: Windows::Alternating { default: 4096 },
    softcapping: Some(Softcapping {
        gguf_attn_default: 50.0,
        gguf_final_default: 30.0,
        llamacpp_query_scalar,
    }),
    query_pre_attn_scalar: true,
    gemma_norms: true,
    sandwich_norms: true,
    gguf_tensors: &[
        super::GGUF_INPUT_NORM,
        super::GGUF_ATTENTION,
        &[
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ],
        super::GGUF_MLP,
    ],
    gguf_hyperparameters,
    llamacpp_windows,
    ..Rules::llama_like(Family::Gemma2, "Gemma2ForCausalLM", "gemma2", "gemma2")
};

/// llama.cpp does not store the attention scale: it uses 1/√(hidden/heads) for the 46-layer 27B model and
/// 1/√head_dim otherwise, which matches every published Gemma 2 checkpoint's `query_pre_attn_scalar`.
fn llamacpp_query_scalar(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> f64 {
    if layers == 46 {
        hidden as f64 / heads as f64
    } else {
        head_dim as f64
    }
}

/// Gemma's keys plus `attn_logit_softcapping`, `final_logit_softcapping`, `attention.sliding_window`.
fn gguf_hyperparameters(cfg: &ModelConfig, h: &mut Hparams) -> Result<()> {
    super::gemma::gemma_sizes(cfg, h)?;
    let cap = |x: Option<f64>, what: &str| {
        x.ok_or_else(|| Error::Export(format!("gemma2 needs `{what}`")))
    };
    h.f32(
        "attn_logit_softcapping",
        cap(cfg.attn_logit_softcapping, "attn_logit_softcapping")?,
    );
    h.f32(
        "final_logit_softcapping",
        cap(cfg.final_logit_softcapping, "final_logit_softcapping")?,
    );
    let w = cfg
        .layer_windows
        .iter()
        .flatten()
        .next()
        .copied()
        .unwrap_or(4096);
    h.u32("attention.sliding_window", w, "sliding_window")?;
    super::gemma::gemma_rope(cfg, h);
    Ok(())
}

/// llama.cpp's gemma2: a sliding window on even layers and full attention on odd ones, its fixed attention scale,
/// both soft-caps.
fn llamacpp_windows(cfg: &ModelConfig) -> std::result::Result<Vec<String>, String> {
    let windows = &cfg.layer_windows;
    let w = windows.first().copied().flatten();
    let pattern_ok = w.is_some()
        && windows
            .iter()
            .enumerate()
            .all(|(i, x)| if i % 2 == 0 { *x == w } else { x.is_none() });
    if !pattern_ok {
        return Err(format!(
            "llama.cpp's gemma2 uses a sliding window on even layers and full attention on odd ones, but the layers use {windows:?}"
        ));
    }
    let expect = llamacpp_query_scalar(
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim,
    );
    if let Some(q) = cfg.query_pre_attn_scalar {
        if (q - expect).abs() > 1e-9 {
            return Err(format!(
                "query_pre_attn_scalar is {q}, but llama.cpp's gemma2 scales attention by 1/sqrt({expect}) (the value is not stored in GGUF)"
            ));
        }
    }
    if cfg.attn_logit_softcapping.is_none() || cfg.final_logit_softcapping.is_none() {
        return Err(
            "attn_logit_softcapping and final_logit_softcapping must both be set (llama.cpp's gemma2 always soft-caps)".into(),
        );
    }
    Ok(Vec::new())
}
