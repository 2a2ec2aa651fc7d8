//! GGUF metadata (`general.architecture` + `{arch}.*` keys) → [`ModelConfig`].
//!
//! Keys as llama.cpp's converter writes them (gguf-py 0.19.0 `Keys`): `{arch}.block_count`,
//! `embedding_length`, `feed_forward_length`, `context_length`, `attention.head_count`,
//! `attention.head_count_kv`, `attention.key_length` / `value_length`, `attention.layer_norm_rms_epsilon`,
//! `rope.freq_base`, `rope.dimension_count`, `rope.scaling.type` / `factor`, `attention.sliding_window`,
//! gemma2's `attn_logit_softcapping` / `final_logit_softcapping`, `vocab_size`. Llama 3 frequency scaling is
//! not stored as keys: the converter writes a `rope_freqs` tensor of per-frequency divisors, from which we
//! recover the HF `rope_scaling` parameters (or refuse).

use super::reader::GgufFile;
use super::value::MetaValue;
use crate::error::{Error, Result};
use crate::model::families::Windows;
use crate::model::{Family, ModelConfig, RopeConfig, RopeScaling};

/// GGUF `{arch}.*` count keys and the `config.json` fields they become (whose bounds apply).
const GGUF_TO_HF: &[(&str, &str)] = &[
    ("block_count", "num_hidden_layers"),
    ("embedding_length", "hidden_size"),
    ("feed_forward_length", "intermediate_size"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.key_length", "head_dim"),
    ("attention.value_length", "head_dim"),
    ("rope.dimension_count", "head_dim"),
    ("context_length", "max_position_embeddings"),
    ("attention.sliding_window", "sliding_window"),
    ("vocab_size", "vocab_size"),
];

/// Typed access to metadata keys, with errors that name the file and key.
struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Gguf(format!("{}: {msg}", self.file.path().display()))
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn get(&self, full: &str) -> Option<&MetaValue> {
        self.file.get(full)
    }

    fn opt_usize_full(&self, full: &str) -> Result<Option<usize>> {
        match self.get(full) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) if x <= u32::MAX as u64 * 16 => Ok(Some(x as usize)),
                _ => Err(self.err(format!(
                    "metadata `{full}` must be a non-negative integer, found {} {}",
                    v.type_name(),
                    short(v)
                ))),
            },
        }
    }

    /// An `{arch}.k` count, checked against the bound of the `config.json` field it becomes.
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        let full = self.key(k);
        let v = self.opt_usize_full(&full)?;
        match (v, GGUF_TO_HF.iter().find(|(g, _)| *g == k)) {
            (Some(x), Some((_, hf))) => crate::limits::check_model_field(hf, x as u64)
                .map(Some)
                .map_err(|e| self.err(format!("metadata `{full}`: {e}"))),
            _ => Ok(v),
        }
    }

    fn req_usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?
            .ok_or_else(|| self.err(format!("missing required metadata key `{}`", self.key(k))))
    }

    /// A float key; f32 values are widened through their shortest decimal form so that `1e-5` stored as
    /// f32 comes back as `1e-5`, not `9.999999747e-6`.
    fn opt_f64_full(&self, full: &str) -> Result<Option<f64>> {
        match self.get(full) {
            None => Ok(None),
            Some(MetaValue::F32(x)) => Ok(Some(x.to_string().parse::<f64>().unwrap_or(*x as f64))),
            Some(v) => match v.as_f64() {
                Some(x) => Ok(Some(x)),
                None => Err(self.err(format!(
                    "metadata `{full}` must be a number, found {} {}",
                    v.type_name(),
                    short(v)
                ))),
            },
        }
    }

    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        self.opt_f64_full(&self.key(k))
    }

    fn opt_str(&self, full: &str) -> Result<Option<&str>> {
        match self.get(full) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(format!(
                "metadata `{full}` must be a string, found {}",
                v.type_name()
            ))),
        }
    }

    fn opt_u32_full(&self, full: &str) -> Result<Option<u32>> {
        match self.opt_usize_full(full)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| self.err(format!("metadata `{full}` = {x} does not fit a token id"))),
        }
    }
}

fn short(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => format!("(array of {})", a.len()),
        MetaValue::String(s) if s.chars().count() > 40 => {
            format!("{:?}...", s.chars().take(40).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

/// Build the model configuration from a GGUF file's metadata (and its tensor list: tied embeddings, biases,
/// Llama 3 `rope_freqs`).
pub fn model_config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file.architecture()?;
    let family =
        Family::from_gguf_architecture(arch).ok_or_else(|| Error::UnsupportedArchitecture {
            what: "GGUF architecture",
            name: arch.to_string(),
            origin: Some(file.path().to_path_buf()),
            supported: Family::supported_gguf_architectures(),
        })?;
    let m = Meta { file, arch };
    let path = file.path().display();

    // llama.cpp writes Mixtral as its `llama` architecture with `expert_count` / `expert_used_count`.
    let experts = m.opt_usize("expert_count")?.filter(|&n| n > 0);
    let (family, moe) = match experts {
        None => (family, None),
        Some(n) if family == Family::Llama => {
            let k = m.opt_usize("expert_used_count")?.ok_or_else(|| {
                m.err(format!(
                    "`{arch}.expert_count` = {n} but `{arch}.expert_used_count` (experts per token) is missing"
                ))
            })?;
            (
                Family::Mixtral,
                Some(crate::model::MoeConfig {
                    experts: n,
                    top_k: k,
                }),
            )
        }
        Some(n) => {
            return Err(m.err(format!(
                "`{arch}.expert_count` = {n}: mixture-of-experts models of the {arch} architecture are not supported (Mixtral, as llama.cpp's `llama` architecture, is)"
            )))
        }
    };
    let rules = family.rules();

    // llama.cpp's falcon: always parallel; `attn_norm_2` means ln_attn + ln_mlp (new_decoder_architecture).
    let falcon = rules.falcon.then(|| crate::model::FalconLayout {
        parallel: true,
        shared_norm: file.tensor_info("blk.0.attn_norm_2.weight").is_none(),
        bias: file.tensor_info("blk.0.attn_qkv.bias").is_some(),
    });
    let num_hidden_layers = m.req_usize("block_count")?;
    let hidden_size = m.req_usize("embedding_length")?;
    let intermediate_size = m.req_usize("feed_forward_length")?;
    let num_attention_heads = m.req_usize("attention.head_count")?;
    let num_key_value_heads = m
        .opt_usize("attention.head_count_kv")?
        .unwrap_or(num_attention_heads);
    let max_position_embeddings = m.req_usize("context_length")?;
    let eps_key = if falcon.is_some() {
        "attention.layer_norm_epsilon"
    } else {
        "attention.layer_norm_rms_epsilon"
    };
    let rms_norm_eps = m
        .opt_f64(eps_key)?
        .ok_or_else(|| m.err(format!("missing required metadata key `{arch}.{eps_key}`")))?;
    if num_attention_heads == 0 || num_key_value_heads == 0 {
        return Err(m.err(format!(
            "`{arch}.attention.head_count` ({num_attention_heads}) and `head_count_kv` ({num_key_value_heads}) must be positive"
        )));
    }
    let head_dim = match m.opt_usize("attention.key_length")? {
        Some(d) => d,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(m.err(format!(
                    "embedding_length {hidden_size} is not divisible by head_count {num_attention_heads} and `{arch}.attention.key_length` is absent"
                )));
            }
            hidden_size / num_attention_heads
        }
    };
    if let Some(v) = m.opt_usize("attention.value_length")? {
        if v != head_dim {
            return Err(m.err(format!(
                "`{arch}.attention.value_length` {v} differs from the key length {head_dim}; not supported"
            )));
        }
    }

    // Rotary dimensions: all of head_dim, except phi3's partial rotary.
    let partial_rotary_factor = match m.opt_usize("rope.dimension_count")? {
        None => 1.0,
        Some(r) if r == head_dim => 1.0,
        Some(r) if rules.gguf_partial_rotary && r > 0 && r < head_dim && r % 2 == 0 => {
            r as f64 / head_dim as f64
        }
        Some(r) => {
            return Err(m.err(format!(
                "`{arch}.rope.dimension_count` {r} differs from head_dim {head_dim}; partial rotary embeddings are only supported for phi3"
            )))
        }
    };
    let theta = m.opt_f64("rope.freq_base")?.unwrap_or(10_000.0);
    let scaling = rope_scaling(&m, family, theta, head_dim, partial_rotary_factor)?;

    let vocab_size = vocab_size(&m)?;

    let has = |n: &str| file.tensor_info(n).is_some();
    let tie_word_embeddings = !has("output.weight");
    let (qkv_bias, o_bias) =
        rules.attention_biases(has("blk.0.attn_q.bias"), has("blk.0.attn_output.bias"));
    let mlp_bias = rules.mlp_bias && has("blk.0.ffn_up.bias");
    let hidden_act = rules.default_activation;

    let window = m.opt_usize("attention.sliding_window")?.filter(|&w| w > 0);
    let layer_windows: Vec<Option<usize>> = match rules.windows {
        // llama.cpp's gemma2: sliding-window attention on even layers (swa pattern 2).
        Windows::Alternating { default } => (0..num_hidden_layers)
            .map(|i| (i % 2 == 0).then_some(window.unwrap_or(default)))
            .collect(),
        // phi3 writes 0 for "no window" (Phi-4); otherwise every layer uses it.
        Windows::EveryLayer => vec![window; num_hidden_layers],
        // llama.cpp runs llama/qwen2/qwen3/gemma without a window.
        Windows::FromMaxWindowLayers | Windows::None => vec![None; num_hidden_layers],
    };

    let (attn_logit_softcapping, final_logit_softcapping) = match rules.softcapping {
        Some(sc) => (
            Some(
                m.opt_f64("attn_logit_softcapping")?
                    .unwrap_or(sc.gguf_attn_default),
            ),
            Some(
                m.opt_f64("final_logit_softcapping")?
                    .unwrap_or(sc.gguf_final_default),
            ),
        ),
        None => (None, None),
    };
    let query_pre_attn_scalar = rules.softcapping.map(|sc| {
        (sc.llamacpp_query_scalar)(
            num_hidden_layers,
            hidden_size,
            num_attention_heads,
            head_dim,
        )
    });

    let bos_token_id = m.opt_u32_full("tokenizer.ggml.bos_token_id")?;
    let eos_token_ids: Vec<u32> = m
        .opt_u32_full("tokenizer.ggml.eos_token_id")?
        .into_iter()
        .collect();
    let pad_token_id = m.opt_u32_full("tokenizer.ggml.padding_token_id")?;

    let cfg = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings,
        rms_norm_eps,
        rope: RopeConfig {
            theta,
            scaling,
            partial_rotary_factor,
        },
        hidden_act,
        tie_word_embeddings,
        qkv_bias,
        o_bias,
        mlp_bias,
        layer_windows,
        attn_logit_softcapping,
        final_logit_softcapping,
        query_pre_attn_scalar,
        moe,
        falcon,
        bos_token_id,
        eos_token_ids,
        pad_token_id,
        torch_dtype: None,
        raw: None,
    };
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(m.err(format!(
            "head_count {num_attention_heads} must be a multiple of head_count_kv {num_key_value_heads}"
        )));
    }
    cfg.validate()
        .map_err(|e| Error::Gguf(format!("{path}: invalid model hyperparameters: {e}")))?;
    Ok(cfg)
}

fn vocab_size(m: &Meta) -> Result<usize> {
    let from_key = m.opt_usize("vocab_size")?;
    let from_tokens = m
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(<[MetaValue]>::len);
    // token_embd is [vocab, hidden] in torch order: ne[1] = vocab.
    let from_tensor = m.file.tensor_info("token_embd.weight").and_then(|t| {
        if t.dims.len() == 2 {
            Some(t.dims[1] as usize)
        } else {
            None
        }
    });
    let v = from_key.or(from_tensor).or(from_tokens).ok_or_else(|| {
        m.err(format!(
            "cannot tell the vocabulary size: no `{}`, no `token_embd.weight` and no `tokenizer.ggml.tokens`",
            m.key("vocab_size")
        ))
    })?;
    if let Some(t) = from_tensor {
        if t != v {
            return Err(m.err(format!(
                "`{}` says {v} tokens but `token_embd.weight` has {t} rows",
                m.key("vocab_size")
            )));
        }
    }
    Ok(v)
}

fn rope_scaling(
    m: &Meta,
    family: Family,
    theta: f64,
    head_dim: usize,
    partial: f64,
) -> Result<RopeScaling> {
    let file = m.file;
    if file.tensor_info("rope_factors_long.weight").is_some()
        || file.tensor_info("rope_factors_short.weight").is_some()
    {
        return Err(m.err(
            "this model uses LongRoPE (`rope_factors_long` / `rope_factors_short`, e.g. Phi-3 128k); supported rope types: default, linear, llama3".into(),
        ));
    }
    let kind = m.opt_str(&m.key("rope.scaling.type"))?;
    let factor = match m.opt_f64("rope.scaling.factor")? {
        Some(f) => Some(f),
        None => m.opt_f64("rope.scale_linear")?,
    };
    // llama.cpp: type defaults to linear, and a factor of 0 or 1 means no scaling.
    let scaled = factor.filter(|&f| f != 0.0 && f != 1.0);
    let keyed = match (kind.unwrap_or("linear"), scaled) {
        ("none", _) | ("linear", None) => RopeScaling::Default,
        ("linear", Some(f)) => {
            if !(f.is_finite() && f > 0.0) {
                return Err(m.err(format!("`{}` = {f} is not a valid scaling factor", m.key("rope.scaling.factor"))));
            }
            RopeScaling::Linear { factor: f }
        }
        (other, _) => {
            return Err(m.err(format!(
                "unsupported rope scaling type `{other}` (`{}`); supported: none, linear, and Llama 3 scaling via `rope_freqs`",
                m.key("rope.scaling.type")
            )))
        }
    };
    let Some(info) = file.tensor_info("rope_freqs.weight") else {
        return Ok(keyed);
    };
    if !family.rules().gguf_rope_freqs {
        return Err(m.err(format!(
            "`rope_freqs.weight` in a {} model is not supported",
            family.rules().gguf_architecture
        )));
    }
    if keyed != RopeScaling::Default {
        return Err(m.err(
            "both `rope_freqs.weight` and linear rope scaling are set; not supported".into(),
        ));
    }
    let rot = (head_dim as f64 * partial) as usize;
    if info.n_elements() != rot / 2 {
        return Err(m.err(format!(
            "`rope_freqs.weight` has {} values, expected {} (half the rotary dimension)",
            info.n_elements(),
            rot / 2
        )));
    }
    let values = file.dequantize("rope_freqs.weight")?;
    llama3_from_rope_freqs(&values, theta, rot).ok_or_else(|| {
        m.err(format!(
            "`rope_freqs.weight` does not match Llama 3 rope scaling with low_freq_factor 1, high_freq_factor 4 and a power-of-two original context (values {:?}...); this rope scaling is not supported",
            &values[..values.len().min(4)]
        ))
    })
}

/// llama.cpp's converter stores, per rotary frequency, the divisor Llama 3 scaling applies to it. The HF
/// parameters (factor, low/high_freq_factor, original context) are not stored. Every published Llama 3.x
/// checkpoint uses low_freq_factor 1 and high_freq_factor 4; we take the largest divisor as the factor and
/// accept the first power-of-two original context for which the converter's formula reproduces every stored
/// divisor (to 1e-5 relative). `None` when nothing matches.
pub fn llama3_from_rope_freqs(values: &[f32], theta: f64, rot_dim: usize) -> Option<RopeScaling> {
    if values.is_empty() || values.iter().any(|v| !(v.is_finite() && *v >= 1.0 - 1e-6)) {
        return None;
    }
    let factor = values.iter().copied().fold(1.0f32, f32::max) as f64;
    if factor <= 1.0 + 1e-6 {
        return values
            .iter()
            .all(|v| (v - 1.0).abs() < 1e-6)
            .then_some(RopeScaling::Default);
    }
    let (low, high) = (1.0f64, 4.0f64);
    for exp in 10..=20 {
        let original = (1u64 << exp) as f64;
        let expect = llama3_divisors(theta, rot_dim, factor, low, high, original);
        let ok = expect
            .iter()
            .zip(values)
            .all(|(e, &v)| ((v as f64) - e).abs() <= 1e-5 * e.abs().max(1.0));
        if ok {
            return Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            });
        }
    }
    None
}

/// The per-frequency divisors of Llama 3 scaling (as llama.cpp's converter computes them, in f32 for the
/// frequencies like torch does).
pub fn llama3_divisors(
    theta: f64,
    rot_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f64> {
    let low_wl = original / low;
    let high_wl = original / high;
    (0..rot_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / (theta as f32).powf(i as f32 / rot_dim as f32);
            let wl = 2.0 * std::f64::consts::PI / freq as f64;
            if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor
            } else {
                let smooth = (original / wl - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_reconstruction_accepts_its_own_divisors_and_rejects_others() {
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192.
        let d: Vec<f32> = llama3_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0)
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert!(
            d.iter().any(|&x| x > 1.0 && x < 8.0),
            "smooth region present"
        );
        match llama3_from_rope_freqs(&d, 500000.0, 128) {
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                assert_eq!(factor, 8.0);
                assert_eq!((low_freq_factor, high_freq_factor), (1.0, 4.0));
                assert_eq!(original_max_position_embeddings, 8192.0);
            }
            other => panic!("{other:?}"),
        }
        // high_freq_factor 2 cannot be reproduced with our candidates.
        let odd: Vec<f32> = llama3_divisors(500000.0, 128, 8.0, 1.0, 2.0, 8192.0)
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(llama3_from_rope_freqs(&odd, 500000.0, 128), None);
        assert_eq!(
            llama3_from_rope_freqs(&[1.0; 64], 500000.0, 128),
            Some(RopeScaling::Default)
        );
        assert_eq!(llama3_from_rope_freqs(&[0.5; 64], 500000.0, 128), None);
    }
}
