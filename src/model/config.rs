//! Hugging Face `config.json` → [`ModelConfig`]: one description of the decoder with per-family switches.
//!
//! Both the transformers v4 form (top-level `rope_theta` + `rope_scaling`) and the v5 form
//! (`rope_parameters: {rope_theta, rope_type, ...}`) are read. Anything we cannot run exactly is an error
//! that lists what is supported, never a silent default.

use std::path::Path;

use serde_json::{Map, Value};

use super::families::{AttentionBias, Rules, Windows};
use crate::error::{Error, Result};

pub use super::families::Family;
pub use crate::kernels::Activation;

impl Activation {
    /// Parse a config.json activation name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_tanh" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(Error::Config(format!(
                    "unsupported activation `{other}`; supported: silu, gelu_pytorch_tanh (gelu_new), gelu"
                )))
            }
        })
    }

    /// The name written back into config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
            Activation::Gelu => "gelu",
        }
    }
}

/// RoPE frequency scaling variants we implement exactly as transformers does.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    Default,
    /// Position interpolation: inverse frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Fraction of head_dim that is rotated (Phi-3 family: `partial_rotary_factor`).
    pub partial_rotary_factor: f64,
}

/// Which supported rope types we list in errors.
pub const SUPPORTED_ROPE_TYPES: &str = "default, linear, llama3";

/// Everything the decoder needs to know, whatever the family.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding-window size per layer (`None` = full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    /// Gemma2: tanh soft-capping of attention scores.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma2: tanh soft-capping of the final logits.
    pub final_logit_softcapping: Option<f64>,
    /// Attention scale = 1/√query_pre_attn_scalar (Gemma2), else 1/√head_dim.
    pub query_pre_attn_scalar: Option<f64>,
    /// A sparse mixture-of-experts MLP in every layer (Mixtral); `intermediate_size` is one expert's.
    pub moe: Option<MoeConfig>,
    /// The Falcon block (LayerNorms with bias, grouped fused q/k/v, non-gated MLP, parallel residual).
    pub falcon: Option<FalconLayout>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Dtype named by the checkpoint (`torch_dtype` / `dtype`), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
    /// The original config.json, kept so merged exports preserve fields we do not interpret.
    pub raw: Option<Map<String, Value>>,
}

/// A sparse mixture-of-experts MLP: `experts` SwiGLU experts per layer, `top_k` of them run per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    /// config.json `num_local_experts`.
    pub experts: usize,
    /// config.json `num_experts_per_tok`.
    pub top_k: usize,
}

/// How a Falcon layer is laid out (config.json `new_decoder_architecture`, `parallel_attn`,
/// `num_ln_in_parallel_attn`, `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FalconLayout {
    /// Attention and MLP both read the layer input and are added to it together (`parallel_attn`, always with
    /// `new_decoder_architecture`); otherwise the MLP follows the attention (Llama's order).
    pub parallel: bool,
    /// Parallel with one LayerNorm (`input_layernorm`) read by both; else `ln_attn` + `ln_mlp` (parallel) or
    /// `input_layernorm` + `post_attention_layernorm` (sequential).
    pub shared_norm: bool,
    /// Every linear (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) has a bias (`bias`).
    pub bias: bool,
}

impl ModelConfig {
    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::error::read_to_string(path)?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&value).map_err(|e| match e {
            Error::UnsupportedArchitecture {
                what,
                name,
                supported,
                ..
            } => Error::UnsupportedArchitecture {
                what,
                name,
                origin: Some(path.to_path_buf()),
                supported,
            },
            other => Error::Config(format!("{}: {other}", path.display())),
        })
    }

    /// Parse a config.json value.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::Config("config.json must be a JSON object".into()))?;
        let c = Reader { obj };
        let family = detect_family(obj)?;

        let hidden_size = c.req_usize("hidden_size")?;
        let num_attention_heads = c.req_usize("num_attention_heads")?;
        let falcon = if family.rules().falcon {
            Some(falcon_layout(&c)?)
        } else {
            None
        };
        let num_key_value_heads = match &falcon {
            Some(_) => falcon_kv_heads(&c, num_attention_heads)?,
            None => c
                .opt_usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
        };
        let head_dim = match c.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(Error::Config(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads {num_attention_heads} must be a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let num_hidden_layers = c.req_usize("num_hidden_layers")?;
        let max_position_embeddings = c.opt_usize("max_position_embeddings")?.unwrap_or(2048);

        let rules = family.rules();
        let mut act_name = None;
        for k in rules.activation_keys {
            if let Some(s) = c.opt_str(k)? {
                act_name = Some(s);
                break;
            }
        }
        let hidden_act = match act_name {
            Some(s) => Activation::parse(s)?,
            None => rules.default_activation,
        };
        let hidden_act = if rules.gelu_means_tanh && hidden_act == Activation::Gelu {
            Activation::GeluTanh
        } else {
            hidden_act
        };

        let tie_word_embeddings = c
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(rules.tie_word_embeddings);

        let attention_bias = c.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = rules.attention_biases(attention_bias, attention_bias);
        let mlp_bias = rules.mlp_bias && c.opt_bool("mlp_bias")?.unwrap_or(false);

        let rope = parse_rope(obj)?;
        let layer_windows = parse_windows(&c, rules, num_hidden_layers)?;
        let eps_key = if falcon.is_some() {
            "layer_norm_epsilon"
        } else {
            "rms_norm_eps"
        };
        let rms_norm_eps = c.opt_f64(eps_key)?.unwrap_or(rules.rms_norm_eps);

        let (attn_logit_softcapping, final_logit_softcapping) = match rules.softcapping {
            Some(_) => (
                c.opt_f64("attn_logit_softcapping")?,
                c.opt_f64("final_logit_softcapping")?,
            ),
            None => (None, None),
        };
        let query_pre_attn_scalar = if rules.query_pre_attn_scalar {
            Some(
                c.opt_f64("query_pre_attn_scalar")?
                    .unwrap_or(head_dim as f64),
            )
        } else {
            None
        };

        let moe = if rules.moe {
            Some(MoeConfig {
                experts: c.req_usize("num_local_experts")?,
                top_k: c.opt_usize("num_experts_per_tok")?.unwrap_or(2),
            })
        } else {
            None
        };

        let torch_dtype = c
            .opt_str("torch_dtype")?
            .or(c.opt_str("dtype")?)
            .map(str::to_string);

        let cfg = ModelConfig {
            family,
            vocab_size: c.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: match falcon {
                Some(_) => c.opt_usize("ffn_hidden_size")?.unwrap_or(4 * hidden_size),
                None => c.req_usize("intermediate_size")?,
            },
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope,
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
            bos_token_id: c.opt_u32("bos_token_id")?,
            eos_token_ids: c.id_list("eos_token_id")?,
            pad_token_id: c.opt_u32("pad_token_id")?,
            torch_dtype,
            raw: Some(obj.clone()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Sanity checks shared by every way of building a config (config.json, GGUF metadata).
    pub fn validate(&self) -> Result<()> {
        let nz = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (k, v) in nz {
            if v == 0 {
                return Err(Error::Config(format!("`{k}` must be positive")));
            }
            crate::limits::check_model_field(k, v as u64).map_err(Error::Config)?;
        }
        crate::limits::check_model_field(
            "max_position_embeddings",
            self.max_position_embeddings as u64,
        )
        .map_err(Error::Config)?;
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if self.layer_windows.len() != self.num_hidden_layers {
            return Err(Error::Config(format!(
                "{} per-layer attention types given for {} layers",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        if let Some(m) = self.moe {
            if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
                return Err(Error::Config(format!(
                    "num_experts_per_tok = {} must be between 1 and num_local_experts = {}",
                    m.top_k, m.experts
                )));
            }
            crate::limits::check_model_field("num_local_experts", m.experts as u64)
                .map_err(Error::Config)?;
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            return Err(Error::Config(format!(
                "rope_theta must be a positive number, got {}",
                self.rope.theta
            )));
        }
        Ok(())
    }

    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family.rules().qk_norm
    }

    /// Added to every RMSNorm weight: 1 for Gemma's `x̂·(1 + w)`, else 0.
    pub fn norm_offset(&self) -> f32 {
        self.family.rules().norm_offset()
    }

    /// What the embeddings are multiplied by (Gemma: √hidden_size).
    pub fn embedding_scale(&self) -> Option<f32> {
        self.family.rules().embedding_scale(self.hidden_size)
    }

    /// Norms after attention and after the MLP as well as before them (Gemma 2).
    pub fn sandwich_norms(&self) -> bool {
        self.family.rules().sandwich_norms
    }

    /// `qkv_proj` / `gate_up_proj` fused in the checkpoint (Phi-3), kept fused.
    pub fn fused_projections(&self) -> bool {
        self.family.rules().fused_projections
    }

    /// A key of the original config.json (None when absent, null, or the config came from a GGUF).
    pub fn raw_get(&self, key: &str) -> Option<&Value> {
        self.raw
            .as_ref()
            .and_then(|r| r.get(key))
            .filter(|v| !v.is_null())
    }

    /// The module layout `architectures[0]` string.
    pub fn architecture(&self) -> &'static str {
        self.family.architecture()
    }

    /// Number of q heads per kv head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Rotated dimensions per head (all of head_dim unless partial rotary).
    pub fn rotary_dim(&self) -> usize {
        let d = (self.head_dim as f64 * self.rope.partial_rotary_factor) as usize;
        d - d % 2
    }

    /// Attention score scale.
    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    /// Output features of the attention q / k / v projections.
    pub fn q_out(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_out(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Falcon's fused `query_key_value` output is grouped per key/value head (each group: its query heads, its key,
    /// its value). The columns that make it q|k|v, or `None` when it already is (one group: multi-query Falcon-7B;
    /// or not Falcon). Applied to the linear's output, so the weights and adapters stay in the checkpoint's layout.
    pub fn fused_qkv_order(&self) -> Option<Vec<i32>> {
        self.falcon?;
        let (nh, nkv, hd) = (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        );
        if nkv <= 1 {
            return None;
        }
        let per = nh / nkv;
        let group = (per + 2) * hd;
        let cols = |g: usize, head: usize| (0..hd).map(move |d| (g * group + head * hd + d) as i32);
        let q = (0..nkv).flat_map(|g| (0..per).flat_map(move |j| cols(g, j)));
        let k = (0..nkv).flat_map(|g| cols(g, per));
        let v = (0..nkv).flat_map(|g| cols(g, per + 1));
        Some(q.chain(k).chain(v).collect())
    }

    /// Inverse RoPE frequencies for the rotated half, computed as transformers does (in f32).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim();
        let base = self.rope.theta as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
            .collect();
        match &self.rope.scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, lff, hff, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
                );
                let low_wl = old / lff;
                let high_wl = old / hff;
                inv.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        // transformers: ~(wl < high) & ~(wl > low); no NaN can occur here.
                        if wl >= high_wl && wl <= low_wl {
                            let smooth = (old / wl - lff) / (hff - lff);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// Total parameter count of the base model (tied lm_head counted once).
    pub fn num_parameters(&self) -> usize {
        super::tree::expected_tensors(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// A config.json for this model: the original one (if any) with dtype fields updated, or one synthesised
    /// from the fields (GGUF imports).
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut obj = match &self.raw {
            Some(raw) => raw.clone(),
            None => self.synthesise_json(),
        };
        obj.insert("torch_dtype".into(), Value::String(dtype.into()));
        obj.insert("dtype".into(), Value::String(dtype.into()));
        obj.insert(
            "tie_word_embeddings".into(),
            Value::Bool(self.tie_word_embeddings),
        );
        Value::Object(obj)
    }

    fn synthesise_json(&self) -> Map<String, Value> {
        use serde_json::json;
        let mut o = Map::new();
        let mut put = |k: &str, v: Value| {
            o.insert(k.to_string(), v);
        };
        put("architectures", json!([self.architecture()]));
        put("model_type", json!(self.family.model_type()));
        put("vocab_size", json!(self.vocab_size));
        put("hidden_size", json!(self.hidden_size));
        put("intermediate_size", json!(self.intermediate_size));
        put("num_hidden_layers", json!(self.num_hidden_layers));
        put("num_attention_heads", json!(self.num_attention_heads));
        put("num_key_value_heads", json!(self.num_key_value_heads));
        put("head_dim", json!(self.head_dim));
        put(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        put("rms_norm_eps", json!(self.rms_norm_eps));
        put("rope_theta", json!(self.rope.theta));
        let scaling = match &self.rope.scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        };
        put("rope_scaling", scaling);
        if self.rope.partial_rotary_factor != 1.0 {
            put(
                "partial_rotary_factor",
                json!(self.rope.partial_rotary_factor),
            );
        }
        let rules = self.family.rules();
        put(rules.activation_keys[0], json!(self.hidden_act.hf_name()));
        if rules.attention_bias == AttentionBias::Configurable {
            put("attention_bias", json!(self.qkv_bias));
        }
        if rules.mlp_bias {
            put("mlp_bias", json!(self.mlp_bias));
        }
        let window = self.layer_windows.iter().flatten().copied().max();
        match rules.windows {
            Windows::EveryLayer => put("sliding_window", json!(window)),
            Windows::Alternating { default } => {
                put("sliding_window", json!(window.unwrap_or(default)));
                let types: Vec<&str> = self
                    .layer_windows
                    .iter()
                    .map(|w| {
                        if w.is_some() {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                put("layer_types", json!(types));
            }
            Windows::FromMaxWindowLayers => {
                put("use_sliding_window", json!(window.is_some()));
                if let Some(w) = window {
                    put("sliding_window", json!(w));
                    let first = self
                        .layer_windows
                        .iter()
                        .position(|w| w.is_some())
                        .unwrap_or(self.num_hidden_layers);
                    put("max_window_layers", json!(first));
                }
            }
            Windows::None => {}
        }
        if let Some(v) = self.attn_logit_softcapping {
            put("attn_logit_softcapping", json!(v));
        }
        if let Some(v) = self.final_logit_softcapping {
            put("final_logit_softcapping", json!(v));
        }
        if let Some(v) = self.query_pre_attn_scalar {
            put("query_pre_attn_scalar", json!(v));
        }
        if let Some(b) = self.bos_token_id {
            put("bos_token_id", json!(b));
        }
        match self.eos_token_ids.len() {
            0 => {}
            1 => put("eos_token_id", json!(self.eos_token_ids[0])),
            _ => put("eos_token_id", json!(self.eos_token_ids)),
        }
        if let Some(p) = self.pad_token_id {
            put("pad_token_id", json!(p));
        }
        o
    }
}

/// Falcon's layout keys; ALiBi variants refused.
fn falcon_layout(c: &Reader) -> Result<FalconLayout> {
    if c.opt_bool("alibi")?.unwrap_or(false) {
        return Err(Error::Config(
            "`alibi: true`: Falcon models with ALiBi position biases (Falcon-RW) are not supported; the rotary Falcon \
             models (Falcon-7B/40B/180B) are"
                .into(),
        ));
    }
    let new_arch = c.opt_bool("new_decoder_architecture")?.unwrap_or(false);
    let parallel_attn = c.opt_bool("parallel_attn")?.unwrap_or(true);
    if new_arch && !parallel_attn {
        return Err(Error::Config(
            "`new_decoder_architecture: true` with `parallel_attn: false` is not a layout transformers can run"
                .into(),
        ));
    }
    let two_norms = new_arch && c.opt_usize("num_ln_in_parallel_attn")?.unwrap_or(2) == 2;
    Ok(FalconLayout {
        parallel: new_arch || parallel_attn,
        shared_norm: (new_arch || parallel_attn) && !two_norms,
        bias: c.opt_bool("bias")?.unwrap_or(false),
    })
}

/// Falcon's key/value heads: `num_kv_heads` with the new architecture, one with `multi_query` (the default), else
/// one per attention head.
fn falcon_kv_heads(c: &Reader, heads: usize) -> Result<usize> {
    if c.opt_bool("new_decoder_architecture")?.unwrap_or(false) {
        return Ok(c.opt_usize("num_kv_heads")?.unwrap_or(heads));
    }
    Ok(if c.opt_bool("multi_query")?.unwrap_or(true) {
        1
    } else {
        heads
    })
}

fn detect_family(obj: &Map<String, Value>) -> Result<Family> {
    let unsupported = |what: &'static str, name: &str| Error::UnsupportedArchitecture {
        what,
        name: name.to_string(),
        origin: None,
        supported: Family::supported_architectures(),
    };
    match obj.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => {
            let name = a[0]
                .as_str()
                .ok_or_else(|| Error::Config("`architectures[0]` must be a string".to_string()))?;
            Family::from_architecture(name).ok_or_else(|| unsupported("architecture", name))
        }
        _ => {
            // Some configs carry only model_type.
            let mt = obj.get("model_type").and_then(Value::as_str).ok_or_else(|| {
                Error::Config(format!(
                    "config.json has neither `architectures` nor `model_type`; supported architectures: {}",
                    Family::supported_architectures()
                ))
            })?;
            Family::from_model_type(mt).ok_or_else(|| unsupported("model_type", mt))
        }
    }
}

fn parse_rope(obj: &Map<String, Value>) -> Result<RopeConfig> {
    // v5: rope_parameters {rope_theta, rope_type, ...}; v4: rope_theta + rope_scaling {type|rope_type, ...}.
    let params = obj.get("rope_parameters").filter(|v| !v.is_null());
    let scaling = obj.get("rope_scaling").filter(|v| !v.is_null());
    if let Some(p) = params {
        if !p.is_object() {
            return Err(Error::Config("`rope_parameters` must be an object".into()));
        }
        if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() {
            return Err(Error::Config(
                "per-layer-type `rope_parameters` are not supported for this architecture".into(),
            ));
        }
    }
    let top_theta = match obj.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| Error::Config("`rope_theta` must be a number".into()))?,
        ),
    };
    let param_theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64);
    // transformers' own default when a checkpoint names no theta at all.
    let theta = param_theta.or(top_theta).unwrap_or(10_000.0);

    let spec = params.or(scaling);
    let partial_rotary_factor = params
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .or_else(|| obj.get("partial_rotary_factor").and_then(Value::as_f64))
        .unwrap_or(1.0);
    if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
        return Err(Error::Config(format!(
            "partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}"
        )));
    }

    let scaling = match spec {
        None => RopeScaling::Default,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                s.get(k).and_then(Value::as_f64).ok_or_else(|| {
                    Error::Config(format!("rope scaling `{kind}` needs a numeric `{k}`"))
                })
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear {
                    factor: num("factor")?,
                },
                "llama3" => {
                    let original = match s.get("original_max_position_embeddings") {
                        Some(v) if v.is_number() => v.as_f64().unwrap_or(0.0),
                        _ => obj
                            .get("original_max_position_embeddings")
                            .or_else(|| obj.get("max_position_embeddings"))
                            .and_then(Value::as_f64)
                            .ok_or_else(|| {
                                Error::Config(
                                    "llama3 rope scaling needs `original_max_position_embeddings`"
                                        .into(),
                                )
                            })?,
                    };
                    RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: original,
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "unsupported rope type `{other}`; supported: {SUPPORTED_ROPE_TYPES}"
                    )))
                }
            }
        }
    };
    Ok(RopeConfig {
        theta,
        scaling,
        partial_rotary_factor,
    })
}

fn parse_windows(c: &Reader, rules: &Rules, n_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = c.opt_usize("sliding_window")?;
    // Explicit per-layer types win (transformers v5 writes them).
    if let Some(types) = c.obj.get("layer_types").filter(|v| !v.is_null()) {
        let arr = types
            .as_array()
            .ok_or_else(|| Error::Config("`layer_types` must be a list".into()))?;
        if arr.len() != n_layers {
            return Err(Error::Config(format!(
                "`layer_types` has {} entries for {n_layers} layers",
                arr.len()
            )));
        }
        let use_window = match rules.layer_types_gate {
            Some(key) => c.opt_bool(key)?.unwrap_or(false),
            None => true,
        };
        return arr
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => {
                    if !use_window {
                        return Ok(None);
                    }
                    window.map(Some).ok_or_else(|| {
                        Error::Config(format!(
                            "layer_types[{i}] is sliding_attention but `sliding_window` is not set"
                        ))
                    })
                }
                _ => Err(Error::Config(format!(
                    "layer_types[{i}] = {t}: expected \"full_attention\" or \"sliding_attention\""
                ))),
            })
            .collect();
    }
    Ok(match rules.windows {
        Windows::EveryLayer => vec![window; n_layers],
        Windows::Alternating { default } => (0..n_layers)
            .map(|i| (i % 2 == 0).then_some(window.unwrap_or(default)))
            .collect(),
        Windows::FromMaxWindowLayers => {
            let used = c.opt_bool("use_sliding_window")?.unwrap_or(false);
            let max_window_layers = c.opt_usize("max_window_layers")?.unwrap_or(28);
            (0..n_layers)
                .map(|i| {
                    if used && i >= max_window_layers {
                        window
                    } else {
                        None
                    }
                })
                .collect()
        }
        Windows::None => vec![None; n_layers],
    })
}

/// Typed access to config keys with errors that name the key.
struct Reader<'a> {
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }
    fn req_usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?
            .ok_or_else(|| Error::Config(format!("missing required key `{k}`")))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_u64().ok_or_else(|| {
                    Error::Config(format!("`{k}` must be a non-negative integer, got {v}"))
                })?;
                crate::limits::check_model_field(k, x)
                    .map(Some)
                    .map_err(Error::Config)
            }
        }
    }
    fn opt_u32(&self, k: &str) -> Result<Option<u32>> {
        match self.opt_usize(k)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| Error::Config(format!("`{k}` = {x} does not fit a token id"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::Config(format!("`{k}` must be a number, got {v}"))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Error::Config(format!("`{k}` must be true or false, got {v}"))),
        }
    }
    fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Error::Config(format!("`{k}` must be a string, got {v}"))),
        }
    }
    fn id_list(&self, k: &str) -> Result<Vec<u32>> {
        match self.get(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| Error::Config(format!("`{k}` entries must be token ids")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(|x| vec![x])
                .ok_or_else(|| Error::Config(format!("`{k}` must be a token id or a list"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": true,
            "max_position_embeddings": 8192
        })
    }

    /// tiiuae/falcon-7b's config.json (RW-era keys as transformers 5 reads them): multi-query, parallel attention,
    /// no biases, tied head; 6,921,720,704 parameters as transformers reports them.
    #[test]
    fn falcon_7b_config() {
        let c = ModelConfig::from_json(&json!({
            "architectures": ["FalconForCausalLM"], "model_type": "falcon", "vocab_size": 65024,
            "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71, "multi_query": true,
            "new_decoder_architecture": false, "parallel_attn": true, "bias": false, "alibi": false,
            "layer_norm_epsilon": 1e-5, "bos_token_id": 11, "eos_token_id": 11
        }))
        .unwrap();
        assert_eq!(c.family, Family::Falcon);
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.intermediate_size),
            (1, 64, 18176)
        );
        assert_eq!(c.num_parameters(), 6_921_720_704);
        assert_eq!(c.fused_qkv_order(), None);
        let f = c.falcon.unwrap();
        assert!(f.parallel && f.shared_norm && !f.bias);
        assert!(c.tie_word_embeddings);
        // ALiBi Falcons are refused by name
        let e = ModelConfig::from_json(&json!({
            "architectures": ["FalconForCausalLM"], "vocab_size": 65024, "hidden_size": 2048,
            "num_hidden_layers": 24, "num_attention_heads": 32, "alibi": true
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("alibi") && e.contains("Falcon-RW"), "{e}");
    }

    /// Falcon-40B's new decoder architecture: 8 key/value groups of 16 query heads; query_key_value's output columns
    /// regrouped to q|k|v (hand-checked on the first and last columns of each part).
    #[test]
    fn falcon_40b_grouped_qkv() {
        let c = ModelConfig::from_json(&json!({
            "architectures": ["FalconForCausalLM"], "model_type": "falcon", "vocab_size": 65024,
            "hidden_size": 8192, "num_hidden_layers": 60, "num_attention_heads": 128, "num_kv_heads": 8,
            "new_decoder_architecture": true, "parallel_attn": true, "bias": false, "alibi": false
        }))
        .unwrap();
        let f = c.falcon.unwrap();
        assert!(f.parallel && !f.shared_norm);
        let o: Vec<usize> = c
            .fused_qkv_order()
            .unwrap()
            .into_iter()
            .map(|x| x as usize)
            .collect();
        let (hd, group) = (64, (16 + 2) * 64);
        assert_eq!(o.len(), (128 + 16) * 64);
        assert_eq!(o[0], 0); // q head 0 of group 0
        assert_eq!(o[16 * hd], group); // q head 16 = group 1's first
        assert_eq!(o[128 * hd], 16 * hd); // k of group 0
        assert_eq!(o[128 * hd + hd], group + 16 * hd); // k of group 1
        assert_eq!(o[136 * hd], 17 * hd); // v of group 0
        assert_eq!(*o.last().unwrap(), 8 * group - 1); // v of group 7, last dim
    }

    /// Falcon3 is a Llama architecture (tiiuae/Falcon3-7B-Instruct's config.json): it loads as Llama.
    #[test]
    fn falcon3_is_llama() {
        let c = ModelConfig::from_json(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 131072,
            "hidden_size": 3072, "intermediate_size": 23040, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 4, "head_dim": 256, "rope_theta": 1000042, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "tie_word_embeddings": false, "attention_bias": false,
            "mlp_bias": false, "hidden_act": "silu"
        }))
        .unwrap();
        assert_eq!(c.family, Family::Llama);
        assert!(c.falcon.is_none());
        assert_eq!((c.head_dim, c.num_key_value_heads), (256, 4));
    }

    #[test]
    fn smollm2_rope_theta_is_read_not_defaulted() {
        let c = ModelConfig::from_json(&llama()).unwrap();
        assert_eq!(c.rope.theta, 100000.0);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.gqa_groups(), 3);
        assert!(c.tie_word_embeddings);
        // 134,515,008 is SmolLM2-135M's parameter count as transformers reports it.
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn v5_rope_parameters_are_read() {
        let mut v = llama();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.rope.theta, 500000.0);
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let mut v = llama();
        v["architectures"] = json!(["GPTNeoXForCausalLM"]);
        let e = ModelConfig::from_json(&v).unwrap_err();
        assert!(
            matches!(&e, Error::UnsupportedArchitecture { what: "architecture", name, .. } if name == "GPTNeoXForCausalLM"),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(
            e.contains("GPTNeoXForCausalLM") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let mut v = llama();
        v["rope_scaling"] = json!({"type": "dynamic", "factor": 2.0});
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("dynamic") && e.contains("llama3"), "{e}");
    }

    #[test]
    fn llama3_inv_freq_matches_hand_computation() {
        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        v["rope_theta"] = json!(500000.0);
        let c = ModelConfig::from_json(&v).unwrap();
        let f = c.rope_inv_freq();
        // Highest frequency (i = 0): wavelength 2π < 2048 → unchanged.
        assert_eq!(f[0], 1.0);
        // Lowest frequency: wavelength far above 8192 → divided by 8.
        let raw_last = 1.0f32 / 500000f32.powf(62.0 / 64.0);
        assert!((f[31] - raw_last / 8.0).abs() < 1e-12);
    }

    #[test]
    fn gemma2_alternates_sliding_layers() {
        let v = json!({"architectures": ["Gemma2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "sliding_window": 16, "query_pre_attn_scalar": 4});
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.layer_windows, vec![Some(16), None, Some(16), None]);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(c.attn_scale(), 0.5);
    }

    #[test]
    fn bad_types_name_the_key() {
        let mut v = llama();
        v["hidden_size"] = json!("576");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
