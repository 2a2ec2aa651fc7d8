//! GGUF exports for llama.cpp and Ollama: a merged model (`--format gguf`) and a LoRA adapter
//! (`--format gguf-adapter`).
//!
//! What llama.cpp's converter (`convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` and gguf-py, as vendored in
//! llama-cpp-python 0.3.36) writes, and therefore what these exports write:
//!
//! - Tensor names from [`crate::gguf::tensors`]; `llama`-architecture q/k rows (weights and biases) permuted for
//!   llama.cpp's interleaved RoPE; Gemma / Gemma 2 RMSNorm weights stored as `w + 1`; Llama 3 rope scaling as a
//!   `rope_freqs.weight` tensor of per-frequency divisors (computed in f32 like the converter's torch code).
//! - Tensor types (the converter's rule): 1-D tensors and `*_norm.weight` are always F32; other weights take the
//!   requested type, and fall back to F16 when a row is not a whole number of quantisation blocks.
//! - Hyperparameters `{arch}.*` per architecture, key for key: see [`hyperparameters`].
//! - Tokenizer metadata: copied verbatim from a GGUF base; converted from `tokenizer.json` for a Hugging Face
//!   folder (byte-level BPE, see [`hf_tokenizer_metadata`]).
//!
//! For a GGUF base, tensors the adapter does not touch are copied unchanged when the output type equals the
//! stored type (bit-identical), otherwise dequantised and re-encoded; merged weights get `scale·B·A` added in f32
//! in llama.cpp's layout. Data is streamed one tensor at a time into an atomically renamed file.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use sha2::{Digest, Sha256};

use super::hf::{merged_tensors, HostTensor};
use super::merge::{check_adapter_fits, delta, merged_host_tensors};
use crate::error::{Error, Result};
use crate::gguf::tensors::{
    expert_of, gguf_architecture, gguf_name, hf_name, permute_rope_rows, stacked_expert_names,
};
use crate::gguf::writer::WriteSummary;
use crate::gguf::{GgmlType, GgufFile, GgufWriter, MetaValue, TensorPayload};
use crate::lora::peft::PeftAdapter;
use crate::model::families::Hparams;
use crate::model::{CausalLm, ModelConfig, OpenedModel, RopeScaling};
use crate::tokenizer::gguf::{LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::tokenizer::{tokenizer_from_gguf_metadata, LoadedTokenizer, SUPPORTED_PRE_TOKENIZERS};

/// `general.quantization_version` (gguf-py's `GGML_QUANT_VERSION`).
pub const GGML_QUANT_VERSION: u32 = 2;

/// The tokenizer's keys, then `general.quantization_version`, as the converter orders them after the
/// hyperparameters.
fn tokenizer_and_version(w: &mut GgufWriter, tokenizer: Vec<(String, MetaValue)>) -> Result<()> {
    for (k, v) in tokenizer {
        w.set(k, v)?;
    }
    w.set(
        "general.quantization_version",
        MetaValue::U32(GGML_QUANT_VERSION),
    )
}

/// Output tensor types of a GGUF export (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
}

impl GgufType {
    /// Parse `f32`, `f16`, `bf16`, `q8_0`, `q4_0` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufType::F32,
            "f16" => GgufType::F16,
            "bf16" => GgufType::BF16,
            "q8_0" => GgufType::Q8_0,
            "q4_0" => GgufType::Q4_0,
            other => {
                return Err(Error::Export(format!(
                    "unknown GGUF type `{other}`; use f32, f16, bf16, q8_0 or q4_0"
                )))
            }
        })
    }

    /// The ggml type of quantisable weights.
    pub fn ggml(self) -> GgmlType {
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::BF16 => GgmlType::BF16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// `general.file_type` (gguf-py's `LlamaFileType`).
    pub fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q8_0 => 7,
            GgufType::BF16 => 32,
        }
    }

    /// Lower-case name (`q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::BF16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
        }
    }
}

/// The ggml type llama.cpp's converter gives a tensor: F32 for 1-D tensors, `*_norm.weight`, and anything that
/// is not a `.weight` / `.lora_a` / `.lora_b`; the requested type otherwise, F16 when the rows (`shape`'s last
/// dimension) are not whole quantisation blocks. Q4_0 (which the converter does not offer) keeps
/// `token_embd.weight` and `output.weight` at Q8_0, as llama-quantize keeps the output matrix at a higher precision
/// (it uses Q6_K, which loratune does not write).
pub fn tensor_type(out: GgufType, gguf_name: &str, shape: &[usize]) -> GgmlType {
    if out == GgufType::Q4_0
        && (gguf_name == "token_embd.weight" || gguf_name == "output.weight")
        && shape.len() == 2
    {
        return tensor_type(GgufType::Q8_0, gguf_name, shape);
    }
    if shape.len() <= 1
        || gguf_name.ends_with("_norm.weight")
        || !(gguf_name.ends_with(".weight")
            || gguf_name.ends_with(".lora_a")
            || gguf_name.ends_with(".lora_b"))
    {
        return GgmlType::F32;
    }
    let t = out.ggml();
    let row = shape.last().copied().unwrap_or(1);
    if row % t.block_size() != 0 {
        GgmlType::F16
    } else {
        t
    }
}

/// Options shared by the GGUF exports.
#[derive(Debug, Clone)]
pub struct GgufExportOptions {
    /// Tensor type of the weights.
    pub out_type: GgufType,
    /// `general.name`; default: the base's name.
    pub name: Option<String>,
}

impl Default for GgufExportOptions {
    fn default() -> Self {
        GgufExportOptions {
            out_type: GgufType::F16,
            name: None,
        }
    }
}

/// What an export wrote, and what the user should know about it.
#[derive(Debug, Clone)]
pub struct GgufExportReport {
    pub summary: WriteSummary,
    /// Compatibility notes (e.g. a sliding window llama.cpp does not apply, F16 fallbacks).
    pub notes: Vec<String>,
}

fn export_err(msg: String) -> Error {
    Error::Export(msg)
}

fn s(v: &str) -> MetaValue {
    MetaValue::String(v.to_string())
}

/// llama.cpp's size label (`135M`, `12K`): gguf-py's `model_weight_count_rounded_notation` with 2 digits.
pub fn size_label(n_params: u64) -> String {
    let n = n_params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let r = scaled.round_ties_even() as u64;
    let digits = if r == 0 { 0 } else { r.to_string().len() };
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// Checks that llama.cpp runs this model as loratune does. Hard mismatches are errors; approximations are
/// returned as notes.
pub fn llamacpp_compat(cfg: &ModelConfig) -> Result<Vec<String>> {
    let rules = cfg.family.rules();
    let arch = rules.gguf_architecture;
    let refuse = |m: String| {
        Err(export_err(format!(
            "cannot export this {arch} model to GGUF: {m}"
        )))
    };
    if cfg.hidden_act != rules.default_activation {
        return refuse(format!(
            "llama.cpp's {arch} uses {} but this model uses {}",
            rules.default_activation.hf_name(),
            cfg.hidden_act.hf_name()
        ));
    }
    if let RopeScaling::Llama3 { .. } = cfg.rope.scaling {
        if !rules.gguf_rope_freqs {
            return refuse(
                "Llama 3 rope scaling is only stored (as rope_freqs) for the llama architecture"
                    .into(),
            );
        }
    }
    (rules.llamacpp_windows)(cfg).or_else(refuse)
}

/// The `{arch}.*` hyperparameters llama.cpp's converter writes for an HF config (plus `general.file_type`), as
/// the family's rules say.
pub fn hyperparameters(cfg: &ModelConfig, file_type: u32) -> Result<Vec<(String, MetaValue)>> {
    let rules = cfg.family.rules();
    let mut h = Hparams::new(rules.gguf_architecture, file_type);
    (rules.gguf_hyperparameters)(cfg, &mut h)?;
    Ok(h.out)
}

/// Llama 3 rope scaling as llama.cpp's converter stores it: one divisor per rotary frequency, computed with the
/// converter's torch float32 operations (reciprocal-then-multiply for scalar divisions by a tensor).
pub fn llama3_rope_freqs(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope.scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let base = cfg.rope.theta as f32;
    let (factor, low, high, old) = (
        factor as f32,
        low_freq_factor as f32,
        high_freq_factor as f32,
        original_max_position_embeddings as f32,
    );
    let low_wl = (original_max_position_embeddings / low_freq_factor) as f32;
    let high_wl = (original_max_position_embeddings / high_freq_factor) as f32;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    Some(
        (0..dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
                let wavelen = (1.0f32 / freq) * two_pi;
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    factor
                } else {
                    let smooth = ((1.0f32 / wavelen) * old - low) / (high - low);
                    1.0f32 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect(),
    )
}

/// HF-layout f32 values of `hf` → llama.cpp layout (q/k rows permuted for `llama`, Gemma norms + 1).
fn to_gguf_layout(
    cfg: &ModelConfig,
    hf: &str,
    shape: &[usize],
    mut v: Vec<f32>,
) -> Result<Vec<f32>> {
    let rules = cfg.family.rules();
    if rules.gguf_permutes_qk {
        let heads = if hf.contains(".self_attn.q_proj.") {
            Some(cfg.num_attention_heads)
        } else if hf.contains(".self_attn.k_proj.") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        if let Some(n) = heads {
            let rows = shape.first().copied().unwrap_or(1);
            let cols = shape.iter().skip(1).product::<usize>();
            v = permute_rope_rows(&v, rows, cols, n)
                .map_err(|e| export_err(format!("tensor `{hf}`: {e}")))?;
        }
    }
    if rules.gemma_norms && hf.ends_with("norm.weight") {
        for x in &mut v {
            *x += 1.0;
        }
    }
    if hf.contains(".query_key_value.") {
        if let Some(order) = cfg.fused_qkv_order() {
            let cols = shape.iter().skip(1).product::<usize>();
            v = crate::gguf::tensors::falcon_qkv_rows(&v, cols, &order, true)
                .map_err(|e| export_err(format!("tensor `{hf}`: {e}")))?;
        }
    }
    Ok(v)
}

/// Tokenizer keys copied from a GGUF file: every `tokenizer.*` key (empty arrays, which carry no data, left out).
pub fn gguf_tokenizer_metadata(file: &GgufFile) -> Vec<(String, MetaValue)> {
    const ORDER: &[&str] = &[
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ];
    let meta = file.metadata();
    let keep = |v: &MetaValue| !matches!(v, MetaValue::Array(a) if a.is_empty());
    let mut out: Vec<(String, MetaValue)> = ORDER
        .iter()
        .filter_map(|k| {
            meta.get(*k)
                .filter(|v| keep(v))
                .map(|v| (k.to_string(), v.clone()))
        })
        .collect();
    for (k, v) in meta {
        if k.starts_with("tokenizer.") && !ORDER.contains(&k.as_str()) && keep(v) {
            out.push((k.clone(), v.clone()));
        }
    }
    out
}

/// The string llama.cpp's converter tokenizes to identify a BPE pre-tokenizer (`get_vocab_base_pre`'s `chktxt`);
/// its UTF-8 sha256 is `a36179c1…` (checked in the tests).
pub const PRE_TOKENIZER_CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫\u{fe0f} (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន\u{17cb}តែព\u{17b7}សេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// sha256 of `str(tokenizer.encode(chktxt))` → `tokenizer.ggml.pre`, for the pre-tokenizers loratune's GGUF
/// reader implements (hashes from llama.cpp's `convert_hf_to_gguf.py`, llama-cpp-python 0.3.36).
pub const KNOWN_PRE_TOKENIZER_HASHES: &[(&str, &str)] = &[
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ), // HuggingFaceTB/SmolLM-135M
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ), // meta-llama/Meta-Llama-3-8B
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ), // Qwen/Qwen1.5-7B
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ), // Qwen/Qwen3-Embedding-0.6B
    (
        "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5",
        "deepseek-r1-qwen",
    ), // DeepSeek-R1-Distill-Qwen-1.5B
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ), // openai-community/gpt2
    (
        "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
        "gpt-2",
    ), // evilfreelancer/ruGPT3XL
];

/// The converter's hash of a token id list: sha256 of Python's `str(list)` (`[1, 2, 3]`).
pub fn pre_tokenizer_hash(ids: &[u32]) -> String {
    let text = format!(
        "[{}]",
        ids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `tokenizer.ggml.pre` from the structure of tokenizer.json's `pre_tokenizer` (used when the hash is not in
/// [`KNOWN_PRE_TOKENIZER_HASHES`], e.g. a retrained vocabulary with a known pre-tokenizer):
///
/// | pre_tokenizer | name |
/// |---------------|------|
/// | `Sequence[Digits(individual_digits), ByteLevel(use_regex)]` | `smollm` |
/// | `ByteLevel(use_regex)` | `gpt-2` |
/// | `Sequence[Split(Llama 3 regex), ByteLevel(use_regex=false)]` | `llama-bpe` |
/// | `Sequence[Split(Qwen2 regex), ByteLevel(use_regex=false)]` | `qwen2` |
pub fn pre_tokenizer_from_structure(pre: &serde_json::Value) -> Option<&'static str> {
    fn ty(v: &serde_json::Value) -> &str {
        v.get("type").and_then(|t| t.as_str()).unwrap_or("")
    }
    let flag = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_bool());
    let byte_level = |v: &serde_json::Value, regex: bool| {
        ty(v) == "ByteLevel" && flag(v, "use_regex").unwrap_or(true) == regex
    };
    match ty(pre) {
        "ByteLevel" if byte_level(pre, true) => Some("gpt-2"),
        "Sequence" => {
            let items = pre.get("pretokenizers")?.as_array()?;
            match items.as_slice() {
                [d, b]
                    if ty(d) == "Digits"
                        && flag(d, "individual_digits") == Some(true)
                        && byte_level(b, true) =>
                {
                    Some("smollm")
                }
                [sp, b] if ty(sp) == "Split" && byte_level(b, false) => {
                    let re = sp.get("pattern")?.get("Regex")?.as_str()?;
                    if re == LLAMA3_SPLIT {
                        Some("llama-bpe")
                    } else if re == QWEN2_SPLIT {
                        Some("qwen2")
                    } else {
                        None
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Token types (gguf-py `TokenType`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::error::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// Tokenizer metadata for a Hugging Face folder, as llama.cpp's converter builds it for byte-level BPE
/// (`_set_vocab_gpt2` + `SpecialVocab`): `tokenizer.ggml.model = gpt2`, `pre` (by hash, see
/// [`KNOWN_PRE_TOKENIZER_HASHES`], else [`pre_tokenizer_from_structure`]), `tokens` (padded to the model's
/// vocab_size with `[PADi]`, type UNUSED), `token_type` (added tokens CONTROL when special or special-looking,
/// else USER_DEFINED), `merges`, bos/eos/unk/pad ids (tokenizer_config.json first, then config.json's
/// `*_token_id`), `add_bos_token` / `add_eos_token`, `chat_template`, and for `llama` `add_space_prefix` from
/// tokenizer_config.json's `add_prefix_space`.
///
/// The result is checked by rebuilding a tokenizer from it with loratune's GGUF tokenizer reader and comparing
/// the token ids of the converter's test string: a mismatch is an error, never a silently different tokenizer.
/// SentencePiece tokenizers are refused (export from the model's GGUF, which carries them).
pub fn hf_tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, MetaValue)>> {
    let tok_path = dir.join("tokenizer.json");
    let tok = LoadedTokenizer::from_hf_dir(dir)?;
    let json = read_json(&tok_path)?
        .ok_or_else(|| Error::Tokenizer(format!("{}: not found", tok_path.display())))?;
    let model = json.get("model").cloned().unwrap_or_default();
    let model_type = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    if model_type != "BPE" || byte_fallback {
        return Err(Error::Tokenizer(format!(
            "{}: a {} tokenizer{}: loratune converts byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2/3) to GGUF; \
             for SentencePiece models export from the model's GGUF file (it carries the tokenizer), or convert the \
             merged Hugging Face folder with llama.cpp's convert_hf_to_gguf.py",
            tok_path.display(),
            if model_type.is_empty() { "non-BPE" } else { model_type },
            if byte_fallback { " with byte fallback (SentencePiece-style)" } else { "" }
        )));
    }
    let cfg_json = read_json(&dir.join("tokenizer_config.json"))?;

    // Tokens and types.
    let n = cfg.vocab_size;
    let vocab = tok.tokenizer.get_vocab(true);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (t, id) in &vocab {
        let i = *id as usize;
        if i >= n {
            return Err(Error::Tokenizer(format!(
                "{}: token {t:?} has id {i}, outside the model's vocabulary of {n} (config.json vocab_size)",
                tok_path.display()
            )));
        }
        tokens[i] = Some(t.clone());
    }
    let added = tok.tokenizer.get_added_tokens_decoder();
    let mut types = vec![TOKEN_NORMAL; n];
    let mut texts = Vec::with_capacity(n);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            None => {
                texts.push(MetaValue::String(format!("[PAD{i}]")));
                types[i] = TOKEN_UNUSED;
            }
            Some(t) => {
                let mut text = t;
                if let Some(a) = added.get(&(i as u32)) {
                    if a.special || looks_special(&text) {
                        types[i] = TOKEN_CONTROL;
                    } else {
                        text = text.replace('\u{2581}', " ");
                        types[i] = TOKEN_USER_DEFINED;
                    }
                }
                texts.push(MetaValue::String(text));
            }
        }
    }

    // Merges: strings ("a b") or pairs (["a", "b"], spaces inside parts written as U+0120 like the converter).
    let mut merges = Vec::new();
    if let Some(list) = model.get("merges").and_then(|m| m.as_array()) {
        for (i, m) in list.iter().enumerate() {
            let merged = match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(p) if p.len() == 2 && p.iter().all(|x| x.is_string()) => p
                    .iter()
                    .filter_map(|x| x.as_str())
                    .map(|x| x.replace(' ', "\u{120}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                other => {
                    return Err(Error::Tokenizer(format!(
                        "{}: model.merges[{i}] = {other} is neither \"a b\" nor [\"a\", \"b\"]",
                        tok_path.display()
                    )))
                }
            };
            merges.push(MetaValue::String(merged));
        }
    }
    if merges.is_empty() {
        return Err(Error::Tokenizer(format!(
            "{}: the BPE model has no merges",
            tok_path.display()
        )));
    }

    // Pre-tokenizer.
    let check_ids = tok.encode(PRE_TOKENIZER_CHECK_TEXT, true)?;
    let hash = pre_tokenizer_hash(&check_ids);
    let pre = KNOWN_PRE_TOKENIZER_HASHES
        .iter()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| *name)
        .or_else(|| json.get("pre_tokenizer").and_then(pre_tokenizer_from_structure))
        .ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: llama.cpp would not recognise this BPE pre-tokenizer (check hash {hash}); loratune knows {} \
                 — export from the model's GGUF, or convert with llama.cpp's convert_hf_to_gguf.py",
                tok_path.display(),
                SUPPORTED_PRE_TOKENIZERS.join(", ")
            ))
        })?;

    let mut out: Vec<(String, MetaValue)> = Vec::new();
    if gguf_architecture(cfg.family) == "llama" {
        if let Some(b) = cfg_json
            .as_ref()
            .and_then(|c| c.get("add_prefix_space"))
            .and_then(|b| b.as_bool())
        {
            out.push(("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(b)));
        }
    }
    out.push(("tokenizer.ggml.model".into(), s("gpt2")));
    out.push(("tokenizer.ggml.pre".into(), s(pre)));
    out.push(("tokenizer.ggml.tokens".into(), MetaValue::Array(texts)));
    out.push((
        "tokenizer.ggml.token_type".into(),
        MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
    ));
    out.push(("tokenizer.ggml.merges".into(), MetaValue::Array(merges)));
    let scalar_id = |key: &str| -> Option<u32> {
        cfg.raw_get(key)
            .and_then(|v| v.as_u64())
            .and_then(|x| u32::try_from(x).ok())
    };
    for (kind, from_tok, cfg_key) in [
        ("bos", &tok.bos, "bos_token_id"),
        ("eos", &tok.eos, "eos_token_id"),
        ("unknown", &tok.unk, "unk_token_id"),
        ("padding", &tok.pad, "pad_token_id"),
    ] {
        let id = from_tok
            .as_ref()
            .map(|(_, id)| *id)
            .or_else(|| scalar_id(cfg_key));
        if let Some(id) = id.filter(|&i| (i as usize) < n) {
            out.push((
                format!("tokenizer.ggml.{kind}_token_id"),
                MetaValue::U32(id),
            ));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(tok.add_bos),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(tok.add_eos),
    ));
    if let Some(t) = &tok.chat_template {
        out.push((
            "tokenizer.chat_template".into(),
            MetaValue::String(t.clone()),
        ));
    }

    // Self-check with loratune's GGUF tokenizer reader: same ids for the converter's test string and a chat turn.
    if SUPPORTED_PRE_TOKENIZERS.contains(&pre) {
        let mut meta: BTreeMap<String, MetaValue> = out.iter().cloned().collect();
        meta.insert(
            "general.architecture".into(),
            s(gguf_architecture(cfg.family)),
        );
        let back = tokenizer_from_gguf_metadata(&meta).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: the converted GGUF tokenizer does not load: {e}",
                tok_path.display()
            ))
        })?;
        let mut samples = vec![PRE_TOKENIZER_CHECK_TEXT.to_string()];
        if let Ok(t) = tok.chat_template() {
            use crate::tokenizer::Message;
            if let Ok(r) = t.render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "What is 12+30? Answer in one word."),
                ],
                true,
            ) {
                samples.push(r);
            }
        }
        for text in &samples {
            let (a, b) = (tok.encode(text, false)?, back.encode(text, false)?);
            if a != b {
                return Err(Error::Tokenizer(format!(
                    "{}: the tokenizer converted for GGUF (pre-tokenizer `{pre}`) tokenizes {:?} differently from tokenizer.json ({} vs {} ids); refusing to write a GGUF with a different tokenizer",
                    tok_path.display(),
                    text.chars().take(40).collect::<String>(),
                    b.len(),
                    a.len()
                )));
            }
        }
    }
    Ok(out)
}

/// A merged (or, without an adapter, converted) GGUF of the model at `model_path`, with its tokenizer's metadata.
pub fn export_gguf_from(
    model_path: &Path,
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let tok = tokenizer_metadata(model_path, &base.config)?;
    export_gguf(base, adapter, tok, dest, opts)
}

/// Tokenizer metadata for a model location: copied from a `.gguf`, converted from an HF folder.
pub fn tokenizer_metadata(
    model_path: &Path,
    cfg: &ModelConfig,
) -> Result<Vec<(String, MetaValue)>> {
    if is_gguf(model_path) {
        Ok(gguf_tokenizer_metadata(&GgufFile::open(model_path)?))
    } else {
        hf_tokenizer_metadata(model_path, cfg)
    }
}

fn is_gguf(p: &Path) -> bool {
    crate::gguf::is_gguf_file(p)
}

fn default_name(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".to_string())
}

fn refuse_non_model_tokenizer(tokenizer: &[(String, MetaValue)]) -> Result<()> {
    if let Some((k, _)) = tokenizer.iter().find(|(k, _)| !k.starts_with("tokenizer.")) {
        return Err(export_err(format!(
            "tokenizer metadata may only hold `tokenizer.*` keys, got `{k}`"
        )));
    }
    Ok(())
}

/// Write a merged model (`base` + optional `adapter`) as a GGUF file at `dest`, with `tokenizer` metadata
/// (from [`tokenizer_metadata`]).
pub fn export_gguf(
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    tokenizer: Vec<(String, MetaValue)>,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    refuse_non_model_tokenizer(&tokenizer)?;
    let adapter = crate::lora::peft::portable_opt(adapter, base)?;
    let adapter = adapter.as_deref();
    if is_gguf(&base.path) {
        return export_from_gguf(base, adapter, tokenizer, dest, opts);
    }
    let tensors = merged_host_tensors(base, adapter)?;
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| default_name(&base.path));
    let cfg = super::merge::merged_config(base, adapter);
    write_from_hf(&cfg, tensors, tokenizer, &name, dest, opts)
}

/// Write an in-memory model (adapters merged in f32) as a GGUF file.
pub fn export_gguf_model<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: Vec<(String, MetaValue)>,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    refuse_non_model_tokenizer(&tokenizer)?;
    super::hf::refuse_saved_copies(model)?;
    let tensors: Vec<HostTensor> = merged_tensors(model)
        .into_iter()
        .map(|t| HostTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            make: Box::new(move || t.values()),
        })
        .collect();
    let name = opts.name.clone().unwrap_or_else(|| "model".to_string());
    write_from_hf(&model.config, tensors, tokenizer, &name, dest, opts)
}

fn general_header(w: &mut GgufWriter, arch: &str, kind: &str, name: &str) -> Result<()> {
    w.set("general.architecture", s(arch))?;
    w.set("general.type", s(kind))?;
    if !name.is_empty() {
        w.set("general.name", s(name))?;
    }
    Ok(())
}

fn write_from_hf(
    cfg: &ModelConfig,
    tensors: Vec<HostTensor<'_>>,
    tokenizer: Vec<(String, MetaValue)>,
    name: &str,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let mut notes = llamacpp_compat(cfg)?;
    let arch = gguf_architecture(cfg.family);
    let mut w = GgufWriter::new();
    general_header(&mut w, arch, "model", name)?;
    let rope_freqs = llama3_rope_freqs(cfg);
    let tensors = stack_experts(cfg, tensors)?;
    let n_params: u64 = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum::<u64>()
        + rope_freqs.as_ref().map_or(0, |r| r.len() as u64);
    // gguf-py labels a mixture of experts "<experts>x<shared + one expert's parameters>".
    let label = match cfg.moe {
        Some(moe) => {
            let expert: u64 = tensors
                .iter()
                .filter(|t| expert_of(&t.name).is_some())
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum();
            let one = n_params - expert + expert / moe.experts as u64;
            format!("{}x{}", moe.experts, size_label(one))
        }
        None => size_label(n_params),
    };
    w.set("general.size_label", s(&label))?;
    for (k, v) in hyperparameters(cfg, opts.out_type.file_type())? {
        w.set(k, v)?;
    }
    tokenizer_and_version(&mut w, tokenizer)?;

    if let Some(r) = rope_freqs {
        let n = r.len();
        w.add_tensor(
            "rope_freqs.weight",
            &[n],
            GgmlType::F32,
            TensorPayload::F32(Box::new(move || Ok(r))),
        )?;
    }
    let mut fallbacks = Vec::new();
    for t in tensors {
        let g = gguf_name(cfg.family, &t.name).ok_or_else(|| {
            export_err(format!(
                "tensor `{}` has no llama.cpp name for the {arch} architecture",
                t.name
            ))
        })?;
        let ty = tensor_type(opts.out_type, &g, &t.shape);
        if ty != opts.out_type.ggml() && ty == GgmlType::F16 {
            fallbacks.push(g.clone());
        }
        let shape = t.shape.clone();
        let hf = t.name.clone();
        let make = t.make;
        w.add_tensor(
            g,
            &shape.clone(),
            ty,
            TensorPayload::F32(Box::new(move || to_gguf_layout(cfg, &hf, &shape, make()?))),
        )?;
    }
    if !fallbacks.is_empty() {
        notes.push(fallback_note(opts.out_type, &fallbacks));
    }
    let summary = w.write(dest)?;
    Ok(GgufExportReport { summary, notes })
}

/// Split an adapter's modules (in model order) into the ones written pair by pair and the experts' pairs, grouped
/// by the stacked GGUF tensor they adapt (in model order). llama.cpp's LoRA converter can only stack a layer's
/// experts when every expert's w1, w2 and w3 carries an adapter of one rank; anything else is refused here.
#[allow(clippy::type_complexity)]
fn expert_adapter_stacks(
    cfg: &ModelConfig,
    adapter: &PeftAdapter,
    order: Vec<String>,
) -> Result<(Vec<String>, Vec<(String, Vec<String>)>)> {
    let Some(moe) = cfg.moe else {
        return Ok((order, Vec::new()));
    };
    let mut plain = Vec::new();
    let mut stacks: Vec<(String, Vec<String>)> = Vec::new();
    let mut layers = std::collections::BTreeSet::new();
    for m in order {
        match expert_of(&format!("{m}.weight")) {
            None => plain.push(m),
            Some((layer, _, _)) => {
                layers.insert(layer);
            }
        }
    }
    for layer in layers {
        let mut ranks = std::collections::BTreeSet::new();
        for module in ["w1", "w3", "w2"] {
            let names: Vec<String> = (0..moe.experts)
                .map(|e| format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{module}"))
                .collect();
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !adapter.modules.contains_key(*n))
                .collect();
            if !missing.is_empty() {
                return Err(Error::Lora(format!(
                    "llama.cpp's GGUF LoRA adapters hold a layer's experts stacked, so every expert's w1, w2 and w3 must be adapted, but `{}` is not; \
                     target all of w1, w2, w3 (or none), or export a merged model (`--format gguf`)",
                    missing[0]
                )));
            }
            ranks.extend(names.iter().map(|n| adapter.modules[n].0[0]));
            let g = gguf_name(cfg.family, &format!("{}.weight", names[0]))
                .ok_or_else(|| export_err(format!("`{}` has no llama.cpp name", names[0])))?;
            stacks.push((g, names));
        }
        if ranks.len() > 1 {
            return Err(Error::Lora(format!(
                "layer {layer}'s experts use LoRA ranks {ranks:?}: llama.cpp stacks them into one tensor, which needs one rank; \
                 export a merged model (`--format gguf`) instead"
            )));
        }
    }
    Ok((plain, stacks))
}

/// Mixtral's experts as llama.cpp's converter writes them: per layer and projection one `[experts, out, in]`
/// tensor (named after expert 0's weight, which [`gguf_name`] maps to the stacked name), in place of the first
/// expert's; every other tensor as it comes.
fn stack_experts<'a>(
    cfg: &ModelConfig,
    tensors: Vec<HostTensor<'a>>,
) -> Result<Vec<HostTensor<'a>>> {
    let Some(moe) = cfg.moe else {
        return Ok(tensors);
    };
    let mut out: Vec<HostTensor<'a>> = Vec::new();
    let mut groups: BTreeMap<(usize, &'static str), Vec<Option<HostTensor<'a>>>> = BTreeMap::new();
    let mut slot: BTreeMap<(usize, &'static str), usize> = BTreeMap::new();
    for t in tensors {
        let Some((layer, e, base)) = expert_of(&t.name) else {
            out.push(t);
            continue;
        };
        let key = (layer, base);
        if let std::collections::btree_map::Entry::Vacant(v) = slot.entry(key) {
            v.insert(out.len());
            out.push(HostTensor {
                name: String::new(),
                shape: Vec::new(),
                make: Box::new(|| Ok(Vec::new())),
            });
        }
        let group = groups
            .entry(key)
            .or_insert_with(|| (0..moe.experts).map(|_| None).collect());
        if e >= moe.experts {
            return Err(export_err(format!(
                "tensor `{}`: expert {e} of a model with {} experts",
                t.name, moe.experts
            )));
        }
        group[e] = Some(t);
    }
    for (key, group) in groups {
        let experts: Vec<HostTensor<'a>> = group
            .into_iter()
            .enumerate()
            .map(|(e, t)| {
                t.ok_or_else(|| {
                    export_err(format!(
                        "layer {}: expert {e}'s `{}` weight is missing",
                        key.0, key.1
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let inner = experts[0].shape.clone();
        if let Some(t) = experts.iter().find(|t| t.shape != inner) {
            return Err(export_err(format!(
                "tensor `{}` has shape {:?}, expert 0's {inner:?}: experts must match to be stacked",
                t.name, t.shape
            )));
        }
        let name = experts[0].name.clone();
        let mut shape = vec![moe.experts];
        shape.extend(&inner);
        out[slot[&key]] = HostTensor {
            name,
            shape,
            make: Box::new(move || {
                let mut all = Vec::new();
                for t in &experts {
                    all.extend((t.make)()?);
                }
                Ok(all)
            }),
        };
    }
    Ok(out)
}

fn fallback_note(t: GgufType, names: &[String]) -> String {
    format!(
        "{} tensor(s) have rows that are not whole {} blocks and were written as F16, as llama.cpp's converter does: {}{}",
        names.len(),
        t.name(),
        names.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
        if names.len() > 4 { ", ..." } else { "" }
    )
}

/// The adapter delta for a GGUF tensor, in llama.cpp's layout.
fn gguf_delta(
    cfg: &ModelConfig,
    hf_weight: &str,
    entry: &(Vec<usize>, Vec<f32>, Vec<usize>, Vec<f32>, f64),
) -> Result<Vec<f32>> {
    let (ash, av, bsh, bv, scale) = entry;
    let d = delta(
        &(ash.clone(), av.clone()),
        &(bsh.clone(), bv.clone()),
        *scale,
    )?;
    to_gguf_layout(cfg, hf_weight, &[bsh[0], ash[1]], d)
}

fn export_from_gguf(
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    tokenizer: Vec<(String, MetaValue)>,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let cfg = &base.config;
    if let Some(a) = adapter {
        check_adapter_fits(base, a)?;
        if !a.magnitudes.is_empty() {
            return Err(Error::Lora(
                "merging a DoRA adapter straight into a GGUF base's blocks is not supported: merge it into a Hugging \
                 Face folder first (`loratune merge`, or `merge_lora: true`), then export that folder to GGUF"
                    .into(),
            ));
        }
        if !a.saved.is_empty() {
            return Err(Error::Lora(
                "this adapter trains embed_tokens / lm_head in full (modules_to_save); writing them straight into a \
                 GGUF base's blocks is not supported: merge it into a Hugging Face folder first (`loratune merge`, or \
                 `merge_lora: true`), then export that folder to GGUF"
                    .into(),
            ));
        }
    }
    let file = GgufFile::open(&base.path)?;
    let arch = file.architecture()?.to_string();
    let mut w = GgufWriter::new();
    let name = opts
        .name
        .clone()
        .or_else(|| {
            file.get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| default_name(&base.path));
    general_header(&mut w, &arch, "model", &name)?;
    const REGENERATED: &[&str] = &[
        "general.architecture",
        "general.type",
        "general.name",
        "general.file_type",
        "general.quantization_version",
        "general.alignment",
    ];
    let arch_prefix = format!("{arch}.");
    let keep = |v: &MetaValue| !matches!(v, MetaValue::Array(a) if a.is_empty());
    for (k, v) in file.metadata() {
        if k.starts_with("general.") && !REGENERATED.contains(&k.as_str()) && keep(v) {
            w.set(k.clone(), v.clone())?;
        }
    }
    for (k, v) in file.metadata() {
        if k.starts_with(&arch_prefix) && keep(v) {
            w.set(k.clone(), v.clone())?;
        }
    }
    w.set(
        "general.file_type",
        MetaValue::U32(opts.out_type.file_type()),
    )?;
    let mut other = Vec::new();
    for k in file.metadata().keys() {
        if !(k.starts_with("general.")
            || k.starts_with(&arch_prefix)
            || k.starts_with("tokenizer."))
        {
            other.push(k.clone());
        }
    }
    if !other.is_empty() {
        return Err(export_err(format!(
            "{}: metadata keys {other:?} are neither general.*, {arch}.* nor tokenizer.*; a split or unusual GGUF cannot be re-exported",
            base.path.display()
        )));
    }
    tokenizer_and_version(&mut w, tokenizer)?;

    let modules = adapter.map(|a| &a.modules);
    let mut fallbacks = Vec::new();
    let mut copied = 0usize;
    for info in file.tensor_infos() {
        let g = info.name.clone();
        let shape = info.shape();
        let ty = tensor_type(opts.out_type, &g, &shape);
        if ty != opts.out_type.ggml() && ty == GgmlType::F16 {
            fallbacks.push(g.clone());
        }
        let hf = hf_name(cfg.family, &g);
        let entry = hf
            .as_deref()
            .and_then(|h| h.strip_suffix(".weight"))
            .and_then(|m| modules.and_then(|ms| ms.get(m)));
        let file_ref = &file;
        // A stacked expert tensor: the adapted experts' deltas go into their rows.
        let expert_deltas: Vec<(usize, String, _)> = stacked_expert_names(cfg, &g)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(e, hf)| {
                let m = modules?.get(hf.strip_suffix(".weight")?)?;
                Some((e, hf, m))
            })
            .collect();
        let payload = match entry {
            None if !expert_deltas.is_empty() => {
                let g2 = g.clone();
                TensorPayload::F32(Box::new(move || {
                    let mut v = file_ref.dequantize(&g2)?;
                    let per = v.len() / cfg.moe.map_or(1, |m| m.experts);
                    for (e, hf, entry) in &expert_deltas {
                        let d = gguf_delta(cfg, hf, entry)?;
                        if d.len() != per {
                            return Err(export_err(format!(
                                "tensor `{g2}`: the adapter delta of expert {e} has {} values for {per}",
                                d.len()
                            )));
                        }
                        for (x, y) in v[e * per..(e + 1) * per].iter_mut().zip(d) {
                            *x += y;
                        }
                    }
                    Ok(v)
                }))
            }
            None if info.ggml_type == ty => {
                copied += 1;
                TensorPayload::Raw(Box::new(move || Ok(file_ref.tensor_bytes(&g)?.to_vec())))
            }
            None => {
                let g2 = g.clone();
                TensorPayload::F32(Box::new(move || file_ref.dequantize(&g2)))
            }
            Some(e) => {
                let g2 = g.clone();
                let hf = hf.clone().unwrap_or_default();
                TensorPayload::F32(Box::new(move || {
                    let mut v = file_ref.dequantize(&g2)?;
                    let d = gguf_delta(cfg, &hf, e)?;
                    if d.len() != v.len() {
                        return Err(export_err(format!(
                            "tensor `{g2}`: the adapter delta has {} values for {}",
                            d.len(),
                            v.len()
                        )));
                    }
                    for (x, y) in v.iter_mut().zip(d) {
                        *x += y;
                    }
                    Ok(v)
                }))
            }
        };
        w.add_tensor(info.name.clone(), &shape, ty, payload)?;
    }
    let mut notes = Vec::new();
    if !fallbacks.is_empty() {
        notes.push(fallback_note(opts.out_type, &fallbacks));
    }
    let n = file.tensor_infos().len();
    if copied < n {
        let src_types: Vec<String> = {
            let mut t: Vec<String> = file
                .tensor_infos()
                .iter()
                .map(|i| i.ggml_type.name().to_string())
                .collect();
            t.sort();
            t.dedup();
            t
        };
        notes.push(format!(
            "{copied} of {n} tensors copied bit for bit; the others were dequantised from {} and re-encoded{}",
            src_types.join("/"),
            if adapter.is_some() { " (merged weights included)" } else { "" }
        ));
    }
    let summary = w.write(dest)?;
    Ok(GgufExportReport { summary, notes })
}

/// Write `adapter` (for `base`) as a llama.cpp LoRA adapter GGUF:
///
/// - metadata: `general.architecture` (the base's), `general.type = adapter`, `adapter.type = lora`,
///   `adapter.lora.alpha` (f32), `general.name`, `general.quantization_version` (as `convert_lora_to_gguf.py`);
/// - tensors `<base tensor>.lora_a` = A (`[r, in]`, ggml dims `[in, r]`) and `.lora_b` = B (`[out, r]`, ggml
///   dims `[r, out]`); for `llama`, B's rows of q/k permuted like the base weights.
///
/// llama.cpp scales every pair by `alpha / r` with `r` the pair's rank. `alpha` is chosen as `scale·r` of the
/// first module (= `lora_alpha`, or `lora_alpha·√r` for rsLoRA); modules whose own `scale·r` differs
/// (`rank_pattern` / `alpha_pattern`) get that ratio folded into B, so every module keeps its exact scale.
/// Adapters on embeddings or lm_head are refused (llama.cpp does not apply them to tied or embedding tensors).
pub fn export_gguf_adapter(
    base: &OpenedModel,
    adapter: &PeftAdapter,
    dest: &Path,
    opts: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let cfg = &base.config;
    let adapter = &*crate::lora::peft::portable(adapter, base)?;
    if !adapter.magnitudes.is_empty() {
        return Err(Error::Lora(
            "this is a DoRA adapter (use_dora): llama.cpp's GGUF LoRA adapters hold only lora_a / lora_b, so the \
             magnitudes would be lost; export the merged model instead (`--format gguf`, or merge_lora: true)"
                .into(),
        ));
    }
    if let Some(m) = adapter.saved.keys().next() {
        return Err(Error::Lora(format!(
            "the adapter trains `{}` in full (modules_to_save): llama.cpp's GGUF LoRA adapters hold only lora_a / \
             lora_b pairs and cannot carry a whole weight; export the merged model instead (`--format gguf`, from a \
             merged Hugging Face folder)",
            m.name()
        )));
    }
    for path in adapter.modules.keys() {
        if path == "lm_head" || path.ends_with(".lm_head") || path.contains("embed_tokens") {
            return Err(Error::Lora(format!(
                "the adapter trains `{path}`: llama.cpp's GGUF LoRA adapters cannot change embeddings or lm_head; \
                 export a merged model instead (`--format gguf`), or retrain without `{path}` in lora_target_modules"
            )));
        }
    }
    if adapter.modules.is_empty() {
        return Err(Error::Lora("the adapter has no LoRA modules".into()));
    }
    check_adapter_fits(base, adapter)?;
    let arch = gguf_architecture(cfg.family);
    if is_gguf(&base.path) {
        let f = GgufFile::open(&base.path)?;
        let a = f.architecture()?;
        if a != arch {
            return Err(export_err(format!(
                "{}: general.architecture `{a}` but loratune maps this model to `{arch}`",
                base.path.display()
            )));
        }
    }
    // Modules in model order (expected tensor order), with their GGUF names.
    let order: Vec<String> = crate::model::loader::expected_tensors(cfg)
        .into_iter()
        .filter_map(|(n, _)| n.strip_suffix(".weight").map(str::to_string))
        .filter(|m| adapter.modules.contains_key(m))
        .collect();
    let first = order
        .first()
        .and_then(|m| adapter.modules.get(m))
        .ok_or_else(|| Error::Lora("the adapter has no module of this model".into()))?;
    let r0 = first.0[0] as f64;
    let mut alpha = first.4 * r0;
    if alpha == 0.0 {
        alpha = r0;
    }
    let mut w = GgufWriter::new();
    let name = opts.name.clone().unwrap_or_else(|| "lora".to_string());
    general_header(&mut w, arch, "adapter", &name)?;
    w.set("adapter.type", s("lora"))?;
    w.set("adapter.lora.alpha", MetaValue::F32(alpha as f32))?;
    w.set(
        "general.quantization_version",
        MetaValue::U32(GGML_QUANT_VERSION),
    )?;
    let mut folded = Vec::new();
    let mut fallbacks = Vec::new();
    let (order, stacks) = expert_adapter_stacks(cfg, adapter, order)?;
    for (g, experts) in stacks {
        // llama.cpp's convert_lora_to_gguf.py stacks the experts' pairs: lora_a [experts, r, in], lora_b
        // [experts, out, r]; each expert's own scale ratio is folded into its B.
        let (ash, _, bsh, _, _) = &adapter.modules[&experts[0]];
        let (r, (ins, outs)) = (ash[0], (ash[1], bsh[0]));
        let mut a_all = Vec::with_capacity(experts.len() * r * ins);
        let mut b_all = Vec::with_capacity(experts.len() * outs * r);
        for m in &experts {
            let (_, av, _, bv, scale) = &adapter.modules[m];
            let ratio = scale * r as f64 / alpha;
            if (ratio - 1.0).abs() > 1e-12 {
                folded.push(m.clone());
            }
            a_all.extend_from_slice(av);
            b_all.extend(bv.iter().map(|x| (*x as f64 * ratio) as f32));
        }
        let (na, nb) = (format!("{g}.lora_a"), format!("{g}.lora_b"));
        let (sa, sb) = (vec![experts.len(), r, ins], vec![experts.len(), outs, r]);
        let (ta, tb) = (
            tensor_type(opts.out_type, &na, &sa),
            tensor_type(opts.out_type, &nb, &sb),
        );
        for (n, t) in [(&na, ta), (&nb, tb)] {
            if t != opts.out_type.ggml() && t == GgmlType::F16 {
                fallbacks.push(n.clone());
            }
        }
        w.add_tensor(na, &sa, ta, TensorPayload::F32(Box::new(move || Ok(a_all))))?;
        w.add_tensor(nb, &sb, tb, TensorPayload::F32(Box::new(move || Ok(b_all))))?;
    }
    for m in &order {
        let Some((ash, av, bsh, bv, scale)) = adapter.modules.get(m) else {
            continue;
        };
        let hf = format!("{m}.weight");
        let g = gguf_name(cfg.family, &hf).ok_or_else(|| {
            export_err(format!(
                "adapter module `{m}` has no llama.cpp name for {arch}"
            ))
        })?;
        let r = ash[0] as f64;
        let ratio = scale * r / alpha;
        if (ratio - 1.0).abs() > 1e-12 {
            folded.push(m.clone());
        }
        let (na, nb) = (format!("{g}.lora_a"), format!("{g}.lora_b"));
        let ta = tensor_type(opts.out_type, &na, ash);
        let tb = tensor_type(opts.out_type, &nb, bsh);
        for (n, t) in [(&na, ta), (&nb, tb)] {
            if t != opts.out_type.ggml() && t == GgmlType::F16 {
                fallbacks.push(n.clone());
            }
        }
        let a_vals = av.clone();
        w.add_tensor(
            na,
            ash,
            ta,
            TensorPayload::F32(Box::new(move || Ok(a_vals))),
        )?;
        let bshape = bsh.clone();
        w.add_tensor(
            nb,
            bsh,
            tb,
            TensorPayload::F32(Box::new(move || {
                let b: Vec<f32> = if (ratio - 1.0).abs() > 1e-12 {
                    bv.iter().map(|x| (*x as f64 * ratio) as f32).collect()
                } else {
                    bv.clone()
                };
                // B's rows are the weight's output rows: permute them like the weight.
                to_gguf_layout(cfg, &hf, &bshape, b)
            })),
        )?;
    }
    let mut notes = Vec::new();
    if adapter.settings.use_rslora {
        notes.push(format!(
            "rsLoRA: adapter.lora.alpha = lora_alpha·√r = {alpha} so that llama.cpp's alpha/r equals lora_alpha/√r"
        ));
    }
    if !folded.is_empty() {
        notes.push(format!(
            "{} module(s) use another alpha/r than the first (rank_pattern / alpha_pattern); their scale ratio was folded into lora_b: {}",
            folded.len(),
            folded.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if !fallbacks.is_empty() {
        notes.push(fallback_note(opts.out_type, &fallbacks));
    }
    let summary = w.write(dest)?;
    Ok(GgufExportReport { summary, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_text_is_the_converters() {
        let digest = Sha256::digest(PRE_TOKENIZER_CHECK_TEXT.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
        assert_eq!(PRE_TOKENIZER_CHECK_TEXT.chars().count(), 350);
        // Python's str([1, 2, 3]).
        let h = pre_tokenizer_hash(&[1, 2, 3]);
        let expect: String = Sha256::digest(b"[1, 2, 3]")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(h, expect);
    }

    #[test]
    fn size_labels_like_gguf_py() {
        // Values printed by gguf-py 0.19.0's `size_label(n, 0, 0, 0)`.
        assert_eq!(size_label(12_288), "12K");
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(1_235_814_400), "1.2B");
        assert_eq!(size_label(494_032_768), "494M");
        assert_eq!(size_label(9_600), "10K");
        assert_eq!(size_label(400), "0.40K");
    }

    #[test]
    fn tensor_types_follow_the_converter() {
        let t = |o, n: &str, s: &[usize]| tensor_type(o, n, s);
        assert_eq!(
            t(GgufType::Q8_0, "blk.0.attn_q.weight", &[64, 64]),
            GgmlType::Q8_0
        );
        assert_eq!(
            t(GgufType::Q8_0, "blk.0.attn_norm.weight", &[64]),
            GgmlType::F32
        );
        assert_eq!(t(GgufType::F16, "blk.0.attn_q.bias", &[64]), GgmlType::F32);
        assert_eq!(
            t(GgufType::Q8_0, "token_embd.weight", &[100, 48]),
            GgmlType::F16
        );
        assert_eq!(t(GgufType::BF16, "rope_freqs.weight", &[4]), GgmlType::F32);
        assert_eq!(
            t(GgufType::Q4_0, "blk.0.attn_q.weight.lora_b", &[64, 8]),
            GgmlType::F16
        );
        assert_eq!(
            t(GgufType::Q4_0, "blk.0.attn_q.weight.lora_a", &[8, 64]),
            GgmlType::Q4_0
        );
        assert_eq!(GgufType::parse("Q8_0").unwrap(), GgufType::Q8_0);
        assert!(GgufType::parse("q4_k")
            .unwrap_err()
            .to_string()
            .contains("q4_0"));
    }

    #[test]
    fn structural_pre_tokenizers() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]}"#,
        )
        .unwrap();
        assert_eq!(pre_tokenizer_from_structure(&v), Some("smollm"));
        let l3 = serde_json::json!({"type":"Sequence","pretokenizers":[
            {"type":"Split","pattern":{"Regex": LLAMA3_SPLIT},"behavior":"Isolated","invert":false},
            {"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false}]});
        assert_eq!(pre_tokenizer_from_structure(&l3), Some("llama-bpe"));
        let q = serde_json::json!({"type":"Sequence","pretokenizers":[
            {"type":"Split","pattern":{"Regex": QWEN2_SPLIT},"behavior":"Isolated","invert":false},
            {"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}]});
        assert_eq!(pre_tokenizer_from_structure(&q), Some("qwen2"));
        assert_eq!(
            pre_tokenizer_from_structure(&serde_json::json!({"type":"ByteLevel","use_regex":true})),
            Some("gpt-2")
        );
        assert_eq!(
            pre_tokenizer_from_structure(&serde_json::json!({"type":"Metaspace"})),
            None
        );
    }
}
