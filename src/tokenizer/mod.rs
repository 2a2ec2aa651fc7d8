//! Tokenizers (tokenizer.json or GGUF metadata) and HF chat templates.
//!
//! [`LoadedTokenizer`] bundles a `tokenizers::Tokenizer` with what transformers keeps next to it: the special
//! tokens, whether a BOS is added, the chat template and the end-of-turn ids that stop generation.
//! Sources: a Hugging Face folder ([`LoadedTokenizer::from_hf_dir`]) or GGUF metadata
//! ([`tokenizer_from_gguf_metadata`]); [`LoadedTokenizer::to_hf_files`] writes the Hugging Face files back.

pub mod chat_template;
pub mod gguf;

use std::path::Path;

use serde_json::{json, Value as Json};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{PostProcessorWrapper, Tokenizer};

pub use chat_template::{ChatTemplate, Message, BUILTIN_TEMPLATES};
pub use gguf::{tokenizer_from_gguf_metadata, SUPPORTED_PRE_TOKENIZERS};

use crate::error::{read_to_string, Error, Result};

/// Token ids with each token's byte range in the text.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// A tokenizer plus its special tokens, BOS policy and chat template.
#[derive(Clone)]
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    /// `(text, id)` of the beginning-of-sequence token.
    pub bos: Option<(String, u32)>,
    /// `(text, id)` of the end-of-sequence token.
    pub eos: Option<(String, u32)>,
    /// `(text, id)` of the padding token.
    pub pad: Option<(String, u32)>,
    /// `(text, id)` of the unknown token.
    pub unk: Option<(String, u32)>,
    /// Whether `encode(text, true)` puts BOS in front.
    pub add_bos: bool,
    /// Whether `encode(text, true)` puts EOS at the end.
    pub add_eos: bool,
    /// The model's own Jinja chat template, if it has one.
    pub chat_template: Option<String>,
    /// Ids besides `eos` that end generation: the template's end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`,
    /// `<end_of_turn>`, `<|end|>`, ...), `generation_config.json`'s `eos_token_id`s, GGUF `eot`/`eom` ids.
    pub extra_eos_ids: Vec<u32>,
}

impl std::fmt::Debug for LoadedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vocabulary is left out: it can hold hundreds of thousands of entries.
        f.debug_struct("LoadedTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .field("extra_eos_ids", &self.extra_eos_ids)
            .finish()
    }
}

impl LoadedTokenizer {
    /// Load `tokenizer.json` from a Hugging Face model folder, with `tokenizer_config.json` (special tokens,
    /// `add_bos_token`/`add_eos_token`, `chat_template`), `chat_template.jinja` (preferred over the config's
    /// template, as transformers 5 does), `special_tokens_map.json` (fallback for special tokens) and
    /// `generation_config.json` (`eos_token_id`, an id or a list) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::Tokenizer(format!(
                "{}: not found; a Hugging Face model folder needs tokenizer.json (a folder with only the \
                 SentencePiece tokenizer.model is not supported: convert it with transformers' \
                 `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)",
                tok_path.display()
            )));
        }
        let mut tokenizer = crate::error::catch_panic(|| Tokenizer::from_file(&tok_path))
            .map_err(|p| Error::Tokenizer(format!("{}: malformed ({p})", tok_path.display())))?
            .map_err(|e| Error::Tokenizer(format!("{}: cannot load: {e}", tok_path.display())))?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
        let config_path = dir.join("tokenizer_config.json");

        let lookup = |key: &str| -> Result<Option<(String, u32)>> {
            let from = |doc: &Option<Json>, file: &str| -> Result<Option<String>> {
                match doc.as_ref().and_then(|d| d.get(key)) {
                    None | Some(Json::Null) => Ok(None),
                    Some(Json::String(s)) => Ok(Some(s.clone())),
                    Some(Json::Object(o)) => match o.get("content") {
                        Some(Json::String(s)) => Ok(Some(s.clone())),
                        _ => Err(Error::Tokenizer(format!(
                            "{}: `{key}` is an object without a string `content`",
                            dir.join(file).display()
                        ))),
                    },
                    Some(other) => Err(Error::Tokenizer(format!(
                        "{}: `{key}` must be a string or {{\"content\": ...}}, got {other}",
                        dir.join(file).display()
                    ))),
                }
            };
            let text = match from(&config, "tokenizer_config.json")? {
                Some(t) => Some(t),
                None => from(&special_map, "special_tokens_map.json")?,
            };
            match text {
                None => Ok(None),
                Some(t) => match tokenizer.token_to_id(&t) {
                    Some(id) => Ok(Some((t, id))),
                    None => Err(Error::Tokenizer(format!(
                        "{}: `{key}` = {t:?} is not in tokenizer.json's vocabulary",
                        config_path.display()
                    ))),
                },
            }
        };
        let bos = lookup("bos_token")?;
        let eos = lookup("eos_token")?;
        let pad = lookup("pad_token")?;
        let unk = lookup("unk_token")?;

        let flag = |key: &str| -> Result<Option<bool>> {
            match config.as_ref().and_then(|c| c.get(key)) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(Error::Tokenizer(format!(
                    "{}: `{key}` must be true or false, got {other}",
                    config_path.display()
                ))),
            }
        };
        let (cfg_bos, cfg_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
        let (add_bos, add_eos) =
            if cfg_bos.is_some() || cfg_eos.is_some() || tokenizer.get_post_processor().is_none() {
                // transformers rebuilds the post-processor from these flags (`update_post_processor`).
                let add_bos = cfg_bos.unwrap_or(false) && bos.is_some();
                let add_eos = cfg_eos.unwrap_or(false) && eos.is_some();
                tokenizer.with_post_processor(Some(template_processing(
                    add_bos.then_some(()).and(bos.as_ref()),
                    add_eos.then_some(()).and(eos.as_ref()),
                )?));
                (add_bos, add_eos)
            } else {
                // Otherwise tokenizer.json's post-processor decides; read what it does.
                let with = encode_guarded(&tokenizer, "a", true)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
                let ids = with.get_ids();
                let add_bos = matches!((&bos, ids.first()), (Some((_, b)), Some(f)) if b == f);
                let add_eos = ids.len() > 1
                    && matches!((&eos, ids.last()), (Some((_, e)), Some(l)) if e == l);
                (add_bos, add_eos)
            };

        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(read_to_string(&jinja)?)
        } else {
            match config.as_ref().and_then(|c| c.get("chat_template")) {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => {
                    // Older multi-template form: [{"name": ..., "template": ...}]; transformers uses "default".
                    let mut names = Vec::new();
                    let mut found = None;
                    for item in list {
                        let name = item.get("name").and_then(Json::as_str).unwrap_or("");
                        names.push(name.to_string());
                        if name == "default" {
                            found = item
                                .get("template")
                                .and_then(Json::as_str)
                                .map(str::to_string);
                        }
                    }
                    Some(found.ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "{}: `chat_template` lists templates {names:?} but none is named \"default\"; set \
                             `chat_template` in the loratune config to the one to use",
                            config_path.display()
                        ))
                    })?)
                }
                Some(other) => {
                    return Err(Error::Tokenizer(format!(
                        "{}: `chat_template` must be a string, got {other}",
                        config_path.display()
                    )))
                }
            }
        };

        let mut loaded = LoadedTokenizer {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            add_bos,
            add_eos,
            chat_template,
            extra_eos_ids: Vec::new(),
        };
        let mut extra = loaded.template_end_of_turn_ids();
        let gen_path = dir.join("generation_config.json");
        if let Some(gen) = read_json_opt(&gen_path)? {
            match gen.get("eos_token_id") {
                None | Some(Json::Null) => {}
                Some(v) => {
                    let list: Vec<&Json> = match v {
                        Json::Array(a) => a.iter().collect(),
                        other => vec![other],
                    };
                    for item in list {
                        let id = item
                            .as_u64()
                            .and_then(|i| u32::try_from(i).ok())
                            .ok_or_else(|| {
                                Error::Tokenizer(format!(
                                "{}: `eos_token_id` must be a token id or a list of ids, got {v}",
                                gen_path.display()
                            ))
                            })?;
                        extra.push(id);
                    }
                }
            }
        }
        loaded.set_extra_eos_ids(extra);
        Ok(loaded)
    }

    /// Token ids of `text`. `add_special` adds BOS/EOS as the tokenizer is configured to ([`Self::add_bos`]);
    /// special-token text inside `text` (e.g. `<|im_start|>`) always maps to its id.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = encode_guarded(&self.tokenizer, text, add_special)
            .map_err(|e| Error::Tokenizer(format!("tokenizing {:?}: {e}", preview(text))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text` (for mapping chat-template spans, such as
    /// [`ChatTemplate::render_with_spans`]'s, to tokens). Tokens added by the post-processor (BOS/EOS) get `(0, 0)`.
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<IdsAndOffsets> {
        let enc = encode_guarded(&self.tokenizer, text, add_special)
            .map_err(|e| Error::Tokenizer(format!("tokenizing {:?}: {e}", preview(text))))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Token ids of text rendered by a chat template, with exactly one BOS when the tokenizer uses one: if the
    /// text already starts with the BOS token (templates usually write `{{ bos_token }}`) no special tokens are
    /// added, otherwise they are added as for [`Self::encode`] with `add_special = true`.
    ///
    /// transformers' `apply_chat_template(tokenize=True)` never adds special tokens; the two agree whenever the
    /// template writes BOS itself or the tokenizer adds none (SmolLM2, Llama 3, Qwen2, Gemma, Mistral, Phi-3).
    pub fn encode_templated(&self, rendered: &str) -> Result<Vec<u32>> {
        let starts_with_bos = self
            .bos
            .as_ref()
            .is_some_and(|(b, _)| !b.is_empty() && rendered.starts_with(b.as_str()));
        self.encode(rendered, !starts_with_bos)
    }

    /// Text of `ids`; `skip_special` drops special tokens. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(Error::Tokenizer(format!(
                "cannot decode token id {bad}: the vocabulary has {n} tokens"
            )));
        }
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decoding {} ids: {e}", ids.len())))
    }

    /// Number of token ids (vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The model's chat template, compiled with its bos/eos tokens.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "this model has no chat template; set `chat_template` in the loratune config to a built-in one ({}) \
                 or to a Jinja template, or use a non-chat dataset format",
                BUILTIN_TEMPLATES.join(", ")
            ))
        })?;
        ChatTemplate::new(
            source,
            self.bos.as_ref().map(|(t, _)| t.as_str()),
            self.eos.as_ref().map(|(t, _)| t.as_str()),
        )
    }

    /// `eos` followed by [`Self::extra_eos_ids`]: every id that ends generation (the `eos_token_id` list for
    /// `generation_config.json`).
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.eos.iter().map(|(_, id)| *id).collect();
        for id in &self.extra_eos_ids {
            if !out.contains(id) {
                out.push(*id);
            }
        }
        out
    }

    /// Write `tokenizer.json`, `tokenizer_config.json` (special tokens, add_bos/eos flags, `chat_template`) and
    /// `special_tokens_map.json` into `dir` (created if missing), readable by transformers and by
    /// [`Self::from_hf_dir`].
    pub fn to_hf_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tok_path = dir.join("tokenizer.json");
        let text = self
            .tokenizer
            .to_string(false)
            .map_err(|source| Error::TokenizerBuild {
                what: "serialising the tokenizer".into(),
                source,
            })?;
        std::fs::write(&tok_path, text).map_err(|e| Error::io(&tok_path, e))?;

        let tok = |t: &Option<(String, u32)>| {
            t.as_ref()
                .map(|(s, _)| Json::String(s.clone()))
                .unwrap_or(Json::Null)
        };
        let mut added = serde_json::Map::new();
        let mut decoder: Vec<(u32, tokenizers::AddedToken)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        decoder.sort_by_key(|(id, _)| *id);
        for (id, t) in decoder {
            added.insert(
                id.to_string(),
                json!({
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }),
            );
        }
        let mut config = serde_json::Map::new();
        config.insert("add_bos_token".into(), self.add_bos.into());
        config.insert("add_eos_token".into(), self.add_eos.into());
        config.insert("added_tokens_decoder".into(), Json::Object(added));
        config.insert("bos_token".into(), tok(&self.bos));
        config.insert("eos_token".into(), tok(&self.eos));
        config.insert("pad_token".into(), tok(&self.pad));
        config.insert("unk_token".into(), tok(&self.unk));
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), Json::String(t.clone()));
        }
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        config.insert(
            "model_max_length".into(),
            json!(1_000_000_000_000_000_000u64),
        );
        config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        write_json(&dir.join("tokenizer_config.json"), &Json::Object(config))?;

        let mut map = serde_json::Map::new();
        for (key, t) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
        ] {
            if let Some((s, _)) = t {
                map.insert(key.into(), Json::String(s.clone()));
            }
        }
        write_json(&dir.join("special_tokens_map.json"), &Json::Object(map))?;
        Ok(())
    }

    /// Ids of the chat template's end-of-turn tokens that are in the vocabulary.
    fn template_end_of_turn_ids(&self) -> Vec<u32> {
        let Some(src) = &self.chat_template else {
            return Vec::new();
        };
        // Only the literal tokens: eos itself is already the main stop id.
        chat_template::KNOWN_END_OF_TURN
            .iter()
            .filter(|t| src.contains(*t))
            .filter_map(|t| self.tokenizer.token_to_id(t))
            .collect()
    }

    /// Store `ids` minus `eos` and duplicates, in order.
    fn set_extra_eos_ids(&mut self, ids: Vec<u32>) {
        let eos = self.eos.as_ref().map(|(_, id)| *id);
        let mut out = Vec::new();
        for id in ids {
            if Some(id) != eos && !out.contains(&id) {
                out.push(id);
            }
        }
        self.extra_eos_ids = out;
    }
}

/// transformers' `update_post_processor`: `[bos] $A [eos]`, pair `[bos] $A [eos] [bos] $B [eos]`.
pub(crate) fn template_processing(
    bos: Option<&(String, u32)>,
    eos: Option<&(String, u32)>,
) -> Result<PostProcessorWrapper> {
    let mut single: Vec<String> = Vec::new();
    let mut pair_tail: Vec<String> = Vec::new();
    let mut specials: Vec<(String, u32)> = Vec::new();
    if let Some((b, id)) = bos {
        single.push(format!("{b}:0"));
        pair_tail.push(format!("{b}:1"));
        specials.push((b.clone(), *id));
    }
    single.push("$A:0".into());
    pair_tail.push("$B:1".into());
    if let Some((e, id)) = eos {
        single.push(format!("{e}:0"));
        pair_tail.push(format!("{e}:1"));
        if !specials.iter().any(|(t, _)| t == e) {
            specials.push((e.clone(), *id));
        }
    }
    let pair: Vec<String> = single.iter().cloned().chain(pair_tail).collect();
    let tp = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|source| Error::TokenizerBuild {
            what: "building the BOS/EOS post-processor".into(),
            source: source.into(),
        })?
        .special_tokens(specials)
        .build()
        .map_err(|source| Error::TokenizerBuild {
            what: "building the BOS/EOS post-processor".into(),
            source: Box::new(source),
        })?;
    Ok(tp.into())
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// The one way loratune runs a `tokenizers` encode: its errors and its panics (Oniguruma gives up on a regex that
/// backtracks without bound, and the crate panics) both come back as the message.
pub(crate) fn encode_guarded(
    tokenizer: &Tokenizer,
    text: &str,
    add_special: bool,
) -> std::result::Result<tokenizers::Encoding, String> {
    match crate::error::catch_panic(|| tokenizer.encode(text, add_special)) {
        Ok(Ok(enc)) => Ok(enc),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "the tokenizer failed ({p}); a regex in tokenizer.json's pre-tokenizer or normalizer may backtrack \
             without bound — check the tokenizer files"
        )),
    }
}

fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(60).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests;

/// The tokenizer that belongs to a model location: `tokenizer.json` & co. in an HF folder, or the
/// `tokenizer.ggml.*` metadata of a `.gguf` file.
pub fn load_for_model(path: &Path) -> Result<LoadedTokenizer> {
    if crate::gguf::is_gguf_file(path) {
        let f = crate::gguf::GgufFile::open(path)?;
        return tokenizer_from_gguf_metadata(f.metadata())
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())));
    }
    LoadedTokenizer::from_hf_dir(path)
}

impl LoadedTokenizer {
    /// Every id that should end generation: eos, the extra eos ids, and the chat template's end-of-turn tokens.
    pub fn generation_stop_ids(&self) -> Vec<u32> {
        let mut ids = self.stop_ids();
        if let Ok(t) = self.chat_template() {
            for tok in t.end_of_turn_tokens() {
                if let Some(id) = self.token_to_id(&tok) {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
        ids
    }
}
