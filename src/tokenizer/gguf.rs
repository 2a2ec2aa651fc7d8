//! Building a `tokenizers::Tokenizer` from GGUF metadata (`tokenizer.ggml.*`), the way transformers' GGUF loader
//! (`integrations/gguf/gguf_tokenizer_mapping.py`) builds it, so that ids match transformers on the same file.
//!
//! * `tokenizer.ggml.model = gpt2`: byte-level BPE from `tokens` + `merges`. The pre-tokenizer follows
//!   `tokenizer.ggml.pre` (llama.cpp's `llama-vocab.cpp` names): `smollm` splits every digit off and then applies
//!   GPT-2's byte-level regex (as SmolLM2's own tokenizer.json does); `llama-bpe` (Llama 3) and `qwen2` split with
//!   their regexes, then map bytes; `default` / `gpt-2` use GPT-2's regex. For `llama-bpe` the BPE model ignores
//!   merges for words that are whole vocabulary entries (`ignore_merges`), like Meta's tokenizer.json and llama.cpp.
//! * `tokenizer.ggml.model = llama`: SentencePiece-style BPE with byte fallback; merges come from the file or are
//!   rebuilt from `scores` (transformers' `generate_merges`). `▁` replaces spaces and a `▁` is prepended
//!   (`add_space_prefix`, default on). Architecture `phi3` prepends through a normalizer, `gemma*` never prepends
//!   and orders its rebuilt merges by token position, as transformers does.
//!
//! Control tokens (`token_type` 3) become special added tokens, user-defined ones (4) plain added tokens, and the
//! bos/eos/unk/pad tokens special added tokens.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::{template_processing, LoadedTokenizer};
use crate::error::{Error, Result};
use crate::gguf::MetaValue;

/// Pre-tokenizer names (`tokenizer.ggml.pre`) this module understands.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
    "default",
    "gpt-2",
];

/// Llama 3's split regex (its tokenizer.json; llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
pub(crate) const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Qwen2's split regex: like Llama 3's but single digits.
pub(crate) const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PreKind {
    Smollm,
    Llama3,
    Qwen2,
    Gpt2,
}

fn pre_kind(pre: Option<&str>) -> Result<PreKind> {
    match pre {
        Some("smollm") => Ok(PreKind::Smollm),
        Some("llama-bpe" | "llama3" | "llama-v3") => Ok(PreKind::Llama3),
        Some("qwen2" | "deepseek-r1-qwen") => Ok(PreKind::Qwen2),
        Some("default" | "gpt-2") | None => Ok(PreKind::Gpt2),
        Some(other) => Err(Error::Tokenizer(format!(
            "GGUF metadata `tokenizer.ggml.pre` = `{other}` is not supported; supported pre-tokenizers: {} \
             (or load the model from a Hugging Face folder with its tokenizer.json)",
            SUPPORTED_PRE_TOKENIZERS.join(", ")
        ))),
    }
}

/// Build the tokenizer a GGUF file describes from its metadata (`general.architecture`, `tokenizer.ggml.*`,
/// `tokenizer.chat_template`).
pub fn tokenizer_from_gguf_metadata(meta: &BTreeMap<String, MetaValue>) -> Result<LoadedTokenizer> {
    let model = get_str(meta, "tokenizer.ggml.model")?.ok_or_else(|| {
        Error::Tokenizer(
            "GGUF metadata has no `tokenizer.ggml.model`: this file carries no tokenizer; load the tokenizer \
             from the model's Hugging Face folder instead"
                .into(),
        )
    })?;
    let tokens = get_str_array(meta, "tokenizer.ggml.tokens")?.ok_or_else(|| {
        Error::Tokenizer("GGUF metadata has no `tokenizer.ggml.tokens` (the vocabulary)".into())
    })?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(Error::Tokenizer(format!(
            "GGUF metadata `tokenizer.ggml.tokens` has {} entries; expected between 1 and 2^32",
            tokens.len()
        )));
    }
    let token_types = match get_int_array(meta, "tokenizer.ggml.token_type")? {
        Some(t) if t.len() != tokens.len() => {
            return Err(Error::Tokenizer(format!(
                "GGUF metadata `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                t.len(),
                tokens.len()
            )))
        }
        Some(t) => t,
        None => vec![1; tokens.len()],
    };
    let arch = get_str(meta, "general.architecture")?.unwrap_or("");
    let pre = get_str(meta, "tokenizer.ggml.pre")?;

    let special_id = |key: &str| -> Result<Option<u32>> {
        let full = format!("tokenizer.ggml.{key}");
        match meta.get(&full) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "GGUF metadata `{full}` is a {}, expected an integer",
                        v.type_name()
                    ))
                })?;
                if id >= tokens.len() as u64 {
                    return Err(Error::Tokenizer(format!(
                        "GGUF metadata `{full}` = {id} is outside the vocabulary ({} tokens)",
                        tokens.len()
                    )));
                }
                Ok(Some(id as u32))
            }
        }
    };
    let bos_id = special_id("bos_token_id")?;
    let eos_id = special_id("eos_token_id")?;
    let unk_id = special_id("unknown_token_id")?;
    let pad_id = special_id("padding_token_id")?;
    let eot_id = special_id("eot_token_id")?;
    let eom_id = special_id("eom_token_id")?;

    let (mut tokenizer, builder_defaults, byte_level) = match model {
        "gpt2" => {
            let kind = pre_kind(pre)?;
            (build_byte_level(meta, &tokens, kind)?, &["<|endoftext|>"][..], true)
        }
        "llama" => {
            let add_space_prefix = get_bool(meta, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let gemma = arch.starts_with("gemma");
            let t = build_sentencepiece(meta, &tokens, arch, add_space_prefix)?;
            let defaults: &[&str] = if gemma {
                &["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
            } else {
                &["<unk>", "<s>", "</s>"]
            };
            (t, defaults, false)
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF metadata `tokenizer.ggml.model` = `{other}` is not supported; supported: gpt2 (byte-level \
                 BPE), llama (SentencePiece-style BPE)"
            )))
        }
    };

    // Added tokens, in transformers' order: the builder class's default special tokens that the vocabulary has,
    // control tokens (special), user-defined tokens (not special), then the named bos/eos/unk/pad tokens.
    let vocab = tokenizer.get_vocab(true);
    let alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
    let mut specials: Vec<AddedToken> = Vec::new();
    for d in builder_defaults {
        if vocab.contains_key(*d) {
            specials.push(AddedToken::from(d.to_string(), true).normalized(false));
        }
    }
    for (tok, ty) in tokens.iter().zip(&token_types) {
        if *ty == TOKEN_TYPE_CONTROL && (!byte_level || tok.chars().all(|c| alphabet.contains(&c)))
        {
            specials.push(AddedToken::from(tok.to_string(), true).normalized(false));
        }
    }
    add_special(&mut tokenizer, specials)?;
    let vocab = tokenizer.get_vocab(true);
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(tok, ty)| **ty == TOKEN_TYPE_USER_DEFINED && vocab.contains_key(**tok))
        .map(|(tok, _)| AddedToken::from(tok.to_string(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        tokenizer
            .add_tokens(user)
            .map_err(|e| Error::TokenizerBuild {
                what: "GGUF tokenizer: adding user-defined tokens".into(),
                source: e,
            })?;
    }
    let named = |id: Option<u32>| id.map(|i| (tokens[i as usize].to_string(), i));
    let bos = named(bos_id);
    let eos = named(eos_id);
    let unk = named(unk_id);
    let pad = named(pad_id);
    let already: HashSet<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let mut extra_named = Vec::new();
    for (content, _) in [&bos, &eos, &unk, &pad].into_iter().flatten() {
        if !already.contains(content)
            && !extra_named
                .iter()
                .any(|t: &AddedToken| &t.content == content)
        {
            extra_named.push(AddedToken::from(content.clone(), true).normalized(false));
        }
    }
    add_special(&mut tokenizer, extra_named)?;
    // A token added as special and then again as plain (a builder default the file marks user-defined, like
    // Phi-3's `</s>`) stays special for decoding in `tokenizers`; make its flag say so, so that tokenizer.json
    // written by `to_hf_files` behaves the same after reloading.
    let relabel: Vec<AddedToken> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .filter(|t| {
            !t.special
                && tokenizer
                    .get_added_vocabulary()
                    .is_special_token(&t.content)
        })
        .map(|t| AddedToken::from(t.content.clone(), true).normalized(t.normalized))
        .collect();
    add_special(&mut tokenizer, relabel)?;

    // BOS: the file's flag; without one, llama.cpp's default (on for SentencePiece and Llama 3 vocabularies).
    let add_bos = match get_bool(meta, "tokenizer.ggml.add_bos_token")? {
        Some(true) if bos.is_none() => {
            return Err(Error::Tokenizer(
                "GGUF metadata sets `tokenizer.ggml.add_bos_token` but has no `tokenizer.ggml.bos_token_id`".into(),
            ))
        }
        Some(b) => b,
        None => bos.is_some() && (model == "llama" || matches!(pre_kind(pre), Ok(PreKind::Llama3))),
    };
    let add_eos = match get_bool(meta, "tokenizer.ggml.add_eos_token")? {
        Some(true) if eos.is_none() => {
            return Err(Error::Tokenizer(
                "GGUF metadata sets `tokenizer.ggml.add_eos_token` but has no `tokenizer.ggml.eos_token_id`".into(),
            ))
        }
        Some(b) => b,
        None => false,
    };
    tokenizer.with_post_processor(Some(template_processing(
        add_bos.then_some(()).and(bos.as_ref()),
        add_eos.then_some(()).and(eos.as_ref()),
    )?));

    let chat_template = get_str(meta, "tokenizer.chat_template")?.map(str::to_string);
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
    let mut extra: Vec<u32> = [eot_id, eom_id].into_iter().flatten().collect();
    extra.extend(loaded.template_end_of_turn_ids());
    loaded.set_extra_eos_ids(extra);
    Ok(loaded)
}

fn add_special(tokenizer: &mut Tokenizer, tokens: Vec<AddedToken>) -> Result<()> {
    if tokens.is_empty() {
        return Ok(());
    }
    tokenizer
        .add_special_tokens(tokens)
        .map(|_| ())
        .map_err(|source| Error::TokenizerBuild {
            what: "GGUF tokenizer: adding special tokens".into(),
            source,
        })
}

/// GPT-2's byte → printable-character table (`bytes_to_unicode`): printable Latin-1 bytes map to themselves,
/// the others to U+0100 onwards in byte order. Index = byte.
pub(crate) fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 0x100u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('\u{fffd}')
            } else {
                let c = char::from_u32(next).unwrap_or('\u{fffd}');
                next += 1;
                c
            }
        })
        .collect()
}

fn build_byte_level(
    meta: &BTreeMap<String, MetaValue>,
    tokens: &[&str],
    kind: PreKind,
) -> Result<Tokenizer> {
    let table = byte_alphabet();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    // Tokens already written in the byte alphabet stay; others (llama.cpp stores some as raw text) are respelled.
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, tok) in tokens.iter().enumerate() {
        let spelled = if tok.chars().all(|c| alphabet.contains(&c)) {
            tok.to_string()
        } else {
            tok.bytes().map(|b| table[b as usize]).collect()
        };
        vocab.insert(spelled, i as u32);
    }
    let merges = get_str_array(meta, "tokenizer.ggml.merges")?.ok_or_else(|| {
        Error::Tokenizer("GGUF metadata has no `tokenizer.ggml.merges`, which a `gpt2` (byte-level BPE) tokenizer needs".into())
    })?;
    let merges = parse_merges(&merges, &vocab)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .ignore_merges(kind == PreKind::Llama3)
        .build()
        .map_err(|source| Error::TokenizerBuild {
            what: "GGUF tokenizer: building the BPE model".into(),
            source,
        })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|source| Error::TokenizerBuild {
            what: "pre-tokenizer regex".into(),
            source,
        })
    };
    let pre: PreTokenizerWrapper = match kind {
        PreKind::Smollm => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreKind::Llama3 => PreSequence::new(vec![
            split(LLAMA3_SPLIT)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        PreKind::Qwen2 => PreSequence::new(vec![
            split(QWEN2_SPLIT)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        PreKind::Gpt2 => ByteLevel::new(false, true, true).into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(DecoderWrapper::from(ByteLevel::new(true, true, true))));
    Ok(tokenizer)
}

fn parse_merges(merges: &[&str], vocab: &HashMap<String, u32>) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut parts = m.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if vocab.contains_key(a) && vocab.contains_key(b) => {
                    Ok((a.to_string(), b.to_string()))
                }
                (Some(_), Some(_), None) => Err(Error::Tokenizer(format!(
                    "GGUF metadata `tokenizer.ggml.merges`[{i}] = {m:?} merges a token that is not in the vocabulary"
                ))),
                _ => Err(Error::Tokenizer(format!(
                    "GGUF metadata `tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space"
                ))),
            }
        })
        .collect()
}

fn build_sentencepiece(
    meta: &BTreeMap<String, MetaValue>,
    tokens: &[&str],
    arch: &str,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let gemma = arch.starts_with("gemma");
    // Gemma files store runs of spaces with real spaces; its tokenizer looks them up as `▁`s.
    let tokens: Vec<String> = tokens
        .iter()
        .map(|t| {
            if gemma && t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.to_string()
            }
        })
        .collect();
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let merges = match get_str_array(meta, "tokenizer.ggml.merges")? {
        Some(m) => parse_merges(&m, &vocab)?,
        None if gemma => {
            let positions: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
            generate_merges(&tokens, &positions, &vocab)
        }
        None => {
            let scores = get_float_array(meta, "tokenizer.ggml.scores")?.ok_or_else(|| {
                Error::Tokenizer(
                    "GGUF metadata has neither `tokenizer.ggml.merges` nor `tokenizer.ggml.scores`; a `llama` \
                     (SentencePiece) tokenizer needs one of them"
                        .into(),
                )
            })?;
            if scores.len() != tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "GGUF metadata `tokenizer.ggml.scores` has {} entries but `tokenizer.ggml.tokens` has {}",
                    scores.len(),
                    tokens.len()
                )));
            }
            generate_merges(&tokens, &scores, &vocab)
        }
    };
    let mut builder = BPE::builder()
        .vocab_and_merges(
            vocab
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<Vocab>(),
            merges,
        )
        .fuse_unk(true)
        .byte_fallback(true);
    if gemma && vocab.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".to_string());
    }
    let bpe = builder.build().map_err(|source| Error::TokenizerBuild {
        what: "GGUF tokenizer: building the BPE model".into(),
        source,
    })?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = |from: &str, to: &str| -> Result<Replace> {
        Replace::new(from, to).map_err(|source| Error::TokenizerBuild {
            what: "tokenizer normalizer".into(),
            source,
        })
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("\u{2581}", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if gemma {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::from(replace(" ", "\u{2581}")?)))
            .map_err(|source| Error::TokenizerBuild {
                what: "tokenizer normalizer".into(),
                source,
            })?;
        let split = Split::new(
            " ".to_string(),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|source| Error::TokenizerBuild {
            what: "pre-tokenizer".into(),
            source,
        })?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::from(split)));
    } else if arch == "phi3" {
        let mut norms: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            norms.push(Prepend::new("\u{2581}".to_string()).into());
        }
        norms.push(replace(" ", "\u{2581}")?.into());
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::from(NormalizerSequence::new(
                norms,
            ))))
            .map_err(|source| Error::TokenizerBuild {
                what: "tokenizer normalizer".into(),
                source,
            })?;
        tokenizer.with_pre_tokenizer(None::<PreTokenizerWrapper>);
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    } else {
        let scheme = if add_space_prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::from(Metaspace::new(
            '\u{2581}', scheme, false,
        ))));
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    tokenizer.with_decoder(Some(DecoderWrapper::from(DecoderSequence::new(decoders))));
    Ok(tokenizer)
}

/// Merges implied by a vocabulary and a score per token (transformers' `generate_merges`): every split of every
/// token into two vocabulary entries, best score first; ties by shorter left part, then shorter right part, then
/// the order found (token order, then the parts' ids).
fn generate_merges(
    tokens: &[String],
    scores: &[f64],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    // Python's dict(zip(tokens, scores)): first position of a token, last score given to it.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), *s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for tok in order {
        let score = score_of.get(tok).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, u32, u32)> = Vec::new();
        for (idx, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(idx);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((l, r, li, ri));
            }
        }
        local.sort_by_key(|&(_, _, li, ri)| (li, ri));
        merges.extend(
            local
                .into_iter()
                .map(|(l, r, _, _)| (l, r, score, l.chars().count(), r.chars().count())),
        );
    }
    // Python's sorted(..., key=(score, len(l), len(r)), reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

fn get_str<'a>(meta: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<Option<&'a str>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            Error::Tokenizer(format!(
                "GGUF metadata `{key}` is a {}, expected a string",
                v.type_name()
            ))
        }),
    }
}

fn get_bool(meta: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<bool>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            Error::Tokenizer(format!(
                "GGUF metadata `{key}` is a {}, expected a bool",
                v.type_name()
            ))
        }),
    }
}

fn get_array<'a>(
    meta: &'a BTreeMap<String, MetaValue>,
    key: &str,
) -> Result<Option<&'a [MetaValue]>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.as_array().map(Some).ok_or_else(|| {
            Error::Tokenizer(format!(
                "GGUF metadata `{key}` is a {}, expected an array",
                v.type_name()
            ))
        }),
    }
}

/// A metadata array whose elements `conv` reads (`what` names the expected type in the error).
fn get_typed_array<'a, T>(
    meta: &'a BTreeMap<String, MetaValue>,
    key: &str,
    what: &str,
    conv: impl Fn(&'a MetaValue) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(arr) = get_array(meta, key)? else {
        return Ok(None);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            conv(v).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "GGUF metadata `{key}`[{i}] is a {}, expected {what}",
                    v.type_name()
                ))
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_str_array<'a>(
    meta: &'a BTreeMap<String, MetaValue>,
    key: &str,
) -> Result<Option<Vec<&'a str>>> {
    get_typed_array(meta, key, "a string", MetaValue::as_str)
}

fn get_int_array(meta: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<Vec<i64>>> {
    get_typed_array(meta, key, "an integer", MetaValue::as_i64)
}

fn get_float_array(meta: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<Vec<f64>>> {
    get_typed_array(meta, key, "a number", MetaValue::as_f64)
}
