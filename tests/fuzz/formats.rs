//! The formats: where each one's seed inputs come from, how they are mutated, and which library entry points a
//! case drives. A case returns `Ok(())` or the typed error's message; anything else (a panic, an abort, a hang,
//! an allocation over the bound) is counted against the suite by the harness.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::DType;
use loratune::backend::Cpu;
use loratune::config::{LoadOptions, Purpose, TrainConfig};
use loratune::data::{DataFormat, DataOptions, DataSpec, DatasetSource, OnBadRow};
use loratune::generate::{generate, GenerateOptions};
use loratune::gguf::{GgufFile, MetaValue};
use loratune::model::{self, CausalLm, Family, ModelConfig, SafetensorsSource};
use loratune::tokenizer::{self, ChatTemplate, LoadedTokenizer, Message};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::mutate;

/// One seed input: a file's bytes, the folder it came from (for the files a case needs beside it), and what it
/// is (`kind`: which file of a folder, which dataset format, ...).
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
    pub aux: PathBuf,
    pub kind: String,
    /// Bytes at the start that most mutations go to (a binary file's header).
    pub hot: usize,
}

pub struct Format {
    pub name: &'static str,
    load: fn() -> Vec<Seed>,
    cell: OnceLock<Vec<Seed>>,
    pub mutate: fn(&mut ChaCha8Rng, &Seed) -> Vec<u8>,
    pub run: fn(&Seed, &[u8], &Path) -> Result<(), String>,
}

impl Format {
    pub fn seeds(&self) -> &[Seed] {
        self.cell.get_or_init(|| {
            let s = (self.load)();
            assert!(!s.is_empty(), "{}: no seed inputs", self.name);
            s
        })
    }
}

const fn format(
    name: &'static str,
    load: fn() -> Vec<Seed>,
    mutate: fn(&mut ChaCha8Rng, &Seed) -> Vec<u8>,
    run: fn(&Seed, &[u8], &Path) -> Result<(), String>,
) -> Format {
    Format {
        name,
        load,
        cell: OnceLock::new(),
        mutate,
        run,
    }
}

pub static ALL: [Format; 8] = [
    format(
        "safetensors",
        safetensors_seeds,
        safetensors_mutate,
        safetensors_run,
    ),
    format("gguf", gguf_seeds, gguf_mutate, gguf_run),
    format("config-json", config_seeds, json_mutate, config_run),
    format(
        "tokenizer-json",
        tokenizer_seeds,
        tokenizer_mutate,
        tokenizer_run,
    ),
    format(
        "gguf-tokenizer",
        gguf_tokenizer_seeds,
        json_mutate,
        gguf_tokenizer_run,
    ),
    format(
        "chat-template",
        template_seeds,
        template_mutate,
        template_run,
    ),
    format("yaml-config", yaml_seeds, yaml_mutate, yaml_run),
    format("dataset-rows", rows_seeds, rows_mutate, rows_run),
];

pub fn by_name(name: &str) -> Option<&'static Format> {
    ALL.iter().find(|f| f.name == name)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

const MODELS: &[&str] = &[
    "llama",
    "llama-bf16",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
];

fn seed_file(name: &str, path: &Path, kind: &str) -> Seed {
    Seed {
        name: name.to_string(),
        bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        aux: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        kind: kind.to_string(),
        hot: usize::MAX,
    }
}

/// Every `*.ext` file of a folder as a seed named by its stem (kind `ext`), sorted by name.
fn dir_seeds(dir: &Path, ext: &str) -> Vec<Seed> {
    let mut v: Vec<Seed> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            seed_file(&name, &p, ext)
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// A text format's mutation: line-level with probability `p_lines` (dictionary lines inserted, values replaced),
/// else byte-level with the same dictionary.
fn text_mutate(rng: &mut ChaCha8Rng, s: &Seed, dict: &[&str], p_lines: f64) -> Vec<u8> {
    if rng.random_bool(p_lines) {
        let text = String::from_utf8_lossy(&s.bytes);
        return mutate::lines(rng, &text, dict).into_bytes();
    }
    let dict: Vec<&[u8]> = dict.iter().map(|s| s.as_bytes()).collect();
    let mut b = s.bytes.clone();
    mutate::bytes(rng, &mut b, usize::MAX, &dict);
    b
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Strings that JSON mutations put in: regexes that backtrack, special tokens, control characters, templates.
const STRINGS: &[&str] = &[
    "",
    " ",
    "(a+)+$",
    "((a*)*)*b",
    "(?=a)(?<=a)a",
    "(\\p{L}+|\\s+)*x",
    "[",
    "(",
    "\\",
    "\u{0}",
    "\u{feff}",
    "<s>",
    "</s>",
    "<|im_end|>",
    "<unk>",
    "{{ raise_exception('x') }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    "🦀",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Ġ",
    "▁",
    "<0xFF>",
    "<0x",
    "a b",
    "a b c",
    "llama",
    "gpt2",
    "BPE",
    "Unigram",
    "WordPiece",
    "Split",
    "ByteLevel",
    "Metaspace",
    "Sequence",
    "F32",
    "F16",
    "BF16",
    "I64",
    "LlamaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "llama3",
    "yarn",
    "dynamic",
    "longrope",
    "sliding_attention",
    "full_attention",
    "gelu_pytorch_tanh",
    "silu",
    "user",
    "assistant",
    "system",
    "tool",
];

fn tiny_conversation() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab 日本語 🦀"),
        Message::new("assistant", "Done."),
    ]
}

const TEXTS: &[&str] = &[
    "Hello, world!",
    "  leading spaces\tand\ttabs\r\ntrailing  ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab!",
    "日本語のテキスト 🦀 émoji ½ 12345678901234567890",
    "<|im_start|>user\nhi<|im_end|>",
    "",
];

/// What every loaded tokenizer goes through: encode, decode, the chat template, the stop ids.
fn exercise(tok: &LoadedTokenizer) -> Result<(), String> {
    for t in TEXTS {
        let ids = tok.encode(t, true).map_err(e)?;
        tok.decode(&ids, false).map_err(e)?;
    }
    let _ = tok.generation_stop_ids();
    let t = tok.chat_template().map_err(e)?;
    let text = t.render(&tiny_conversation(), true).map_err(e)?;
    tok.encode_templated(&text).map_err(e)?;
    Ok(())
}

/// Load a model on the CPU and generate one token after a 3-token prompt.
fn load_and_generate(cfg: ModelConfig, src: &dyn model::TensorSource) -> Result<(), String> {
    let device = Default::default();
    let m = CausalLm::<Cpu>::load(cfg, src, &device, DType::F32).map_err(e)?;
    let v = m.config.vocab_size as u32;
    let prompt: Vec<u32> = [1u32, 2, 3].iter().map(|i| i % v.max(1)).collect();
    let opts = GenerateOptions {
        max_new_tokens: 1,
        ..Default::default()
    };
    generate(&m, &prompt, &opts, &mut |_| {}).map_err(e)?;
    Ok(())
}

fn json_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    if rng.random_bool(0.8) {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&s.bytes) {
            mutate::json(rng, &mut v, STRINGS);
            let mut out = serde_json::to_vec(&v).unwrap_or_default();
            if rng.random_bool(0.1) {
                mutate::bytes(rng, &mut out, usize::MAX, &[]);
            }
            return out;
        }
    }
    let mut b = s.bytes.clone();
    mutate::bytes(
        rng,
        &mut b,
        usize::MAX,
        &[b"\"", b"{", b"}", b"[", b"]", b",", b":", b"null", b"1e999"],
    );
    b
}

// ------------------------------------------------------------------------------------------- safetensors

fn safetensors_seeds() -> Vec<Seed> {
    MODELS
        .iter()
        .map(|m| {
            let mut s = seed_file(
                m,
                &fixtures().join("models").join(m).join("model.safetensors"),
                "model",
            );
            let n = u64::from_le_bytes(s.bytes[..8].try_into().unwrap()) as usize;
            s.hot = 8 + n;
            s
        })
        .collect()
}

fn safetensors_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    if rng.random_bool(0.7) {
        // Structural: the JSON header mutated and re-serialised, its length sometimes misstated.
        let header = &s.bytes[8..s.hot];
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(header) {
            mutate::json(rng, &mut v, STRINGS);
            let mut h = serde_json::to_vec(&v).unwrap_or_default();
            while h.len() % 8 != 0 {
                h.push(b' ');
            }
            let mut n = h.len() as i64;
            if rng.random_bool(0.2) {
                n += rng.random_range(-9..=9);
            }
            let mut out = (n.max(0) as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&s.bytes[s.hot..]);
            return out;
        }
    }
    let mut b = s.bytes.clone();
    mutate::bytes(
        rng,
        &mut b,
        s.hot,
        &[
            b"\"F16\"",
            b"\"I64\"",
            b"[1,2]",
            b"\"shape\"",
            b"\"data_offsets\"",
        ],
    );
    b
}

fn safetensors_run(s: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let m = dir.join("m");
    std::fs::create_dir_all(&m).map_err(e)?;
    std::fs::copy(s.aux.join("config.json"), m.join("config.json")).map_err(e)?;
    std::fs::write(m.join("model.safetensors"), bytes).map_err(e)?;
    let opened = model::open(&m).map_err(e)?;
    load_and_generate(opened.config.clone(), opened.source.as_ref())
}

// -------------------------------------------------------------------------------------------------- gguf

fn gguf_seeds() -> Vec<Seed> {
    let mut v = vec![seed_file(
        "dequant",
        &fixtures().join("gguf/dequant.gguf"),
        "tensors",
    )];
    for m in [
        "llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
    ] {
        v.push(seed_file(
            m,
            &fixtures().join("gguf/families").join(format!("{m}.gguf")),
            "model",
        ));
    }
    for s in &mut v {
        s.hot = loratune::gguf::reader::parse_header(&s.bytes, Path::new(&s.name))
            .map(|h| h.data_offset as usize)
            .unwrap_or(s.bytes.len());
    }
    v
}

fn gguf_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    let mut b = s.bytes.clone();
    mutate::bytes(
        rng,
        &mut b,
        s.hot,
        &[b"GGUF", b"general.alignment", b"tokenizer.chat_template"],
    );
    b
}

fn gguf_run(s: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let p = dir.join("m.gguf");
    std::fs::write(&p, bytes).map_err(e)?;
    let f = GgufFile::open(&p).map_err(e)?;
    let mut first_err = None;
    for t in f.tensor_infos() {
        if let Err(x) = f.dequantize(&t.name) {
            first_err.get_or_insert(x.to_string());
        }
    }
    if s.kind == "model" {
        let opened = model::open(&p).map_err(e)?;
        load_and_generate(opened.config.clone(), opened.source.as_ref())?;
        if let Ok(tok) = tokenizer::load_for_model(&p) {
            exercise(&tok)?;
        }
    }
    match first_err {
        Some(x) => Err(x),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------------------------- config.json

fn config_seeds() -> Vec<Seed> {
    MODELS
        .iter()
        .map(|m| {
            seed_file(
                m,
                &fixtures().join("models").join(m).join("config.json"),
                "config",
            )
        })
        .collect()
}

fn config_run(s: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let p = dir.join("config.json");
    std::fs::write(&p, bytes).map_err(e)?;
    let cfg = ModelConfig::from_file(&p).map_err(e)?;
    let src = SafetensorsSource::open(&s.aux).map_err(e)?;
    load_and_generate(cfg, &src)
}

// ---------------------------------------------------------------------------------------- tokenizer.json

fn tokenizer_seeds() -> Vec<Seed> {
    let mut dirs: Vec<(String, PathBuf)> = ["llama", "qwen2", "phi3", "gemma2", "mistral"]
        .iter()
        .map(|m| (m.to_string(), fixtures().join("models").join(m)))
        .collect();
    dirs.push(("fixture".into(), fixtures().join("tokenizer")));
    let mut v = Vec::new();
    for (name, d) in dirs {
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            v.push(seed_file(&format!("{name}-{file}"), &d.join(file), file));
        }
    }
    v
}

/// Regular expressions that backtrack exponentially on a run of `a`s followed by something else, or are not
/// valid at all.
const REGEXES: &[&str] = &[
    "(a+)+$",
    "(a|a)+$",
    "((a*)*)*b",
    "(a|aa)+$",
    "(\\p{L}+)+$",
    "(?:a*)*$",
    "(?<=a+)b",
    "(?=(a+))\\1b",
    "[",
    "(?P<x>a)(?P<x>a)",
    "\\",
    "",
];

/// A pathological regex put in front of the tokenizer's pre-tokenizer (a `Split`) or normaliser (a `Replace`), or
/// a structural mutation.
fn tokenizer_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    if s.kind == "tokenizer.json" && rng.random_bool(0.3) {
        if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&s.bytes) {
            let re = *mutate::pick(rng, REGEXES);
            let pattern = serde_json::json!({ "Regex": re });
            if rng.random_bool(0.7) {
                let old = v["pre_tokenizer"].take();
                v["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": pattern, "behavior": "Isolated", "invert": false}, old]});
            } else {
                let old = v["normalizer"].take();
                v["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
                    {"type": "Replace", "pattern": pattern, "content": "x"}, old]});
            }
            return serde_json::to_vec(&v).unwrap_or_default();
        }
    }
    json_mutate(rng, s)
}

fn tokenizer_run(s: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let other = if s.kind == "tokenizer.json" {
        "tokenizer_config.json"
    } else {
        "tokenizer.json"
    };
    std::fs::write(dir.join(&s.kind), bytes).map_err(e)?;
    std::fs::copy(s.aux.join(other), dir.join(other)).map_err(e)?;
    let tok = tokenizer::load_for_model(dir).map_err(e)?;
    exercise(&tok)
}

// ------------------------------------------------------------------------------- GGUF tokenizer metadata

fn gguf_tokenizer_seeds() -> Vec<Seed> {
    let dir = fixtures().join("tokenizer/gguf_small");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            Seed {
                bytes: serde_json::to_vec(&v["metadata"]).unwrap(),
                aux: dir.clone(),
                kind: "metadata".into(),
                hot: usize::MAX,
                name,
            }
        })
        .collect()
}

/// A metadata value from the fixtures' `[type, value]` form; a mutated pair that no longer fits its type keeps
/// what it can (a string of its JSON), as a hostile file could hold any type under any key.
fn meta_value(ty: &str, v: &serde_json::Value) -> MetaValue {
    use serde_json::Value as J;
    if let (Some(sub), J::Array(items)) = (ty.strip_prefix("array:"), v) {
        return MetaValue::Array(items.iter().map(|x| meta_value(sub, x)).collect());
    }
    match (ty, v) {
        ("string", J::String(s)) => MetaValue::String(s.clone()),
        ("bool", J::Bool(b)) => MetaValue::Bool(*b),
        ("float32", J::Number(n)) => MetaValue::F32(n.as_f64().unwrap_or(0.0) as f32),
        ("float64", J::Number(n)) => MetaValue::F64(n.as_f64().unwrap_or(0.0)),
        (_, J::Number(n)) if n.as_i64().is_some() => match ty {
            "uint8" => MetaValue::U8(n.as_i64().unwrap_or(0) as u8),
            "int8" => MetaValue::I8(n.as_i64().unwrap_or(0) as i8),
            "uint16" => MetaValue::U16(n.as_i64().unwrap_or(0) as u16),
            "int16" => MetaValue::I16(n.as_i64().unwrap_or(0) as i16),
            "uint32" => MetaValue::U32(n.as_i64().unwrap_or(0) as u32),
            "int32" => MetaValue::I32(n.as_i64().unwrap_or(0) as i32),
            "int64" => MetaValue::I64(n.as_i64().unwrap_or(0)),
            _ => MetaValue::U64(n.as_u64().unwrap_or(0)),
        },
        (_, J::Number(n)) => MetaValue::U64(n.as_u64().unwrap_or(u64::MAX)),
        (_, J::Bool(b)) => MetaValue::Bool(*b),
        (_, J::String(s)) => MetaValue::String(s.clone()),
        (_, J::Array(a)) => MetaValue::Array(a.iter().map(|x| meta_value("string", x)).collect()),
        (_, other) => MetaValue::String(other.to_string()),
    }
}

fn gguf_tokenizer_run(_: &Seed, bytes: &[u8], _: &Path) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(e)?;
    let obj = v.as_object().ok_or("metadata is not an object")?;
    let mut meta = BTreeMap::new();
    for (k, pair) in obj {
        let value = match pair {
            serde_json::Value::Array(p) if p.len() == 2 => {
                meta_value(p[0].as_str().unwrap_or("string"), &p[1])
            }
            other => meta_value("?", other),
        };
        meta.insert(k.clone(), value);
    }
    let tok = tokenizer::tokenizer_from_gguf_metadata(&meta).map_err(e)?;
    exercise(&tok)
}

// ------------------------------------------------------------------------------------------ chat templates

const JINJA: &[&str] = &[
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{{ 'a' * 1000000000 }}",
    "{{ messages * 100000000 }}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
    "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
    "{{ raise_exception('boom') }}",
    "{{ messages[99999].content }}",
    "{{ messages[-1]['content'][::-1] }}",
    "{{ (messages|length) / 0 }}",
    "{{ 1 // 0 }}",
    "{% generation %}",
    "{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}",
    "{{ strftime_now('%Y-%m-%d %H') }}",
    "{{ strftime_now('%') }}",
    "{% include 'x' %}",
    "{% extends 'x' %}",
    "{% import 'x' as y %}",
    "{{ '%s %d' % (messages, 1) }}",
    "{{ 9223372036854775807 + 1 }}",
    "{{ -9223372036854775808 - 1 }}",
    "{{ 1e308 * 10 }}",
    "{{ range(10)|join('') * 99999999 }}",
    "{{ messages|tojson(indent=1000000) }}",
    "{{ message.content.split('')|length }}",
    "{{ message['content'] | replace('', 'xxxxxxxxxxxxxxxx') }}",
    "{{ 'x'.ljust(2000000000) }}",
    "{{ 'x'.center(2000000000) }}",
    "{{ 'x'|indent(2000000000) }}",
    "{{ 'x'|wordwrap(0) }}",
    "{{ '{0:>2000000000}'.format(1) }}",
    "{{ bos_token }}",
    "{{ eos_token }}",
    "{% if %}",
    "{%- endif -%}",
    "{% endfor %}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "{% raw %}",
    "{% set x = [] %}{% for i in range(100000) %}{% set _ = x.append(x) %}{% endfor %}",
    "{{ namespace() }}",
    "{{ cycler(1,2).next() }}",
    "{{ loop.index }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
];

fn template_seeds() -> Vec<Seed> {
    dir_seeds(&fixtures().join("templates"), "jinja")
}

fn template_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    text_mutate(rng, s, JINJA, 0.5)
}

fn template_run(_: &Seed, bytes: &[u8], _: &Path) -> Result<(), String> {
    let src = std::str::from_utf8(bytes).map_err(e)?;
    let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).map_err(e)?;
    let conv = tiny_conversation();
    let mut first_err = None;
    for gen in [true, false] {
        if let Err(x) = t.render(&conv, gen) {
            first_err.get_or_insert(x.to_string());
        }
    }
    if let Err(x) = t.render_with_spans(&conv, false) {
        first_err.get_or_insert(x.to_string());
    }
    let _ = t.end_of_turn_tokens();
    match first_err {
        Some(x) => Err(x),
        None => Ok(()),
    }
}

// -------------------------------------------------------------------------------------------- YAML configs

const YAML: &[&str] = &[
    "a: &a [1, 2]",
    "b: *a",
    "c: &x {d: *x}",
    "lora_r: 1000000000",
    "sequence_len: 18446744073709551615",
    "sequence_len: 18446744073709551616",
    "learning_rate: .nan",
    "learning_rate: 1e30",
    "learning_rate: -.inf",
    "num_epochs: -1",
    "max_steps: 0",
    "micro_batch_size: 4294967296",
    "datasets: [{path: /etc/passwd, type: alpaca}]",
    "datasets:\n  - path: x.jsonl\n    type: chat_template\n    field_messages: 7",
    "chat_template: jinja\nchat_template_jinja: '{{ raise_exception(1) }}'",
    "base_model: ../../../../etc",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{",
    "!!binary aGVsbG8=",
    "? complex\n: key",
    "%TAG ! tag:x,2000:",
    "---",
    "...",
    "\t",
    "key: \"unterminated",
    "lora_target_modules: '(a+)+$'",
    "lora_target_modules: '['",
    "special_tokens: {pad_token: ''}",
    "val_set_size: 1e400",
    "save_steps: 0",
    "warmup_ratio: 2",
    "lora_layers_to_transform: [0, 0, 18446744073709551615]",
    "test_datasets: [{path: a.jsonl, type: text}]",
    "roles: {assistant: [gpt, gpt]}",
    "gradient_accumulation_steps: 99999999999",
    "optimizer: adamw_bnb_8bit",
    "lr_scheduler: cosine_with_restarts",
    "seed: -1",
];

fn yaml_seeds() -> Vec<Seed> {
    dir_seeds(&root().join("configs"), "yaml")
}

fn yaml_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    text_mutate(rng, s, YAML, 0.6)
}

fn yaml_run(_: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let p = dir.join("config.yaml");
    std::fs::write(&p, bytes).map_err(e)?;
    let opts = LoadOptions {
        check_files: false,
        base_dir: Some(dir.to_path_buf()),
        purpose: Purpose::Train,
    };
    let cfg = TrainConfig::load_with(&p, &[], &opts).map_err(e)?;
    let _ = cfg.lora_settings(Family::Llama);
    let _ = cfg.data_spec();
    let total = cfg.total_steps(100);
    let _ = cfg.schedule(total);
    let _ = cfg.adamw();
    let _ = cfg.warnings();
    Ok(())
}

// -------------------------------------------------------------------------------------------- dataset rows

const CSV: &[&str] = &[
    ",",
    "\"",
    "\"\"",
    "\r\n",
    "\r",
    "\t",
    "\u{feff}",
    "a,b,c,d,e,f,g",
    "\"unterminated",
    ",,,,,,",
];

fn first_lines(p: &Path, n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut s: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
    s.push('\n');
    s.into_bytes()
}

fn rows_seeds() -> Vec<Seed> {
    let data = root().join("datasets/nimbrel");
    let mk = |name: &str, bytes: Vec<u8>, kind: &str| Seed {
        name: name.to_string(),
        bytes,
        aux: data.clone(),
        kind: kind.to_string(),
        hot: usize::MAX,
    };
    vec![
        mk("support_chat", first_lines(&data.join("support_chat.jsonl"), 6), "chat_template.jsonl"),
        mk("heldout", first_lines(&data.join("heldout.jsonl"), 4), "chat_template.jsonl"),
        mk("policies", first_lines(&data.join("policies_alpaca.csv"), 7), "alpaca.csv"),
        mk(
            "facts",
            first_lines(&fixtures().join("train/facts_chat.jsonl"), 6),
            "chat_template.jsonl",
        ),
        mk(
            "sharegpt",
            b"{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Hello\"}]}\n\
              {\"conversations\": [{\"from\": \"system\", \"value\": \"Be terse\"}, {\"from\": \"human\", \"value\": \"2+2?\"}, {\"from\": \"gpt\", \"value\": \"4\"}]}\n"
                .to_vec(),
            "chat_template.jsonl",
        ),
        mk(
            "completion",
            b"{\"prompt\": \"The capital of France is\", \"completion\": \" Paris.\"}\n{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n"
                .to_vec(),
            "completion.jsonl",
        ),
        mk(
            "text",
            "{\"text\": \"Plain pre-training text.\"}\n{\"text\": \"Another line of text with 日本語.\"}\n"
                .as_bytes()
                .to_vec(),
            "text.jsonl",
        ),
        mk(
            "alpaca-array",
            b"[{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"Hi\"}, {\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}]"
                .to_vec(),
            "alpaca.json",
        ),
    ]
}

fn rows_mutate(rng: &mut ChaCha8Rng, s: &Seed) -> Vec<u8> {
    let text = String::from_utf8_lossy(&s.bytes).to_string();
    if s.kind.ends_with(".jsonl") && rng.random_bool(0.6) {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let k = rng.random_range(1..=2);
        for _ in 0..k {
            let i = rng.random_range(0..lines.len());
            if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&lines[i]) {
                mutate::json(rng, &mut v, STRINGS);
                lines[i] = v.to_string();
            }
        }
        return (lines.join("\n") + "\n").into_bytes();
    }
    if s.kind.ends_with(".json") && rng.random_bool(0.6) {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) {
            mutate::json(rng, &mut v, STRINGS);
            return v.to_string().into_bytes();
        }
    }
    if s.kind.ends_with(".csv") && rng.random_bool(0.5) {
        return mutate::lines(rng, &text, CSV).into_bytes();
    }
    let dict: Vec<&[u8]> = CSV.iter().map(|s| s.as_bytes()).collect();
    let mut b = s.bytes.clone();
    mutate::bytes(rng, &mut b, usize::MAX, &dict);
    b
}

thread_local! {
    static ROW_TOKENIZER: LoadedTokenizer =
        tokenizer::load_for_model(&fixtures().join("models/llama")).expect("fixture tokenizer");
}

fn rows_run(s: &Seed, bytes: &[u8], dir: &Path) -> Result<(), String> {
    let (format, ext) = s.kind.split_once('.').unwrap_or(("text", "jsonl"));
    let format = DataFormat::parse(format).map_err(e)?;
    let p = dir.join(format!("data.{ext}"));
    std::fs::write(&p, bytes).map_err(e)?;
    let mut first_err = None;
    for on_bad_row in [OnBadRow::Skip, OnBadRow::Error] {
        let spec = DataSpec {
            train: vec![DatasetSource::new(p.to_string_lossy(), format)],
            eval: vec![],
            options: DataOptions {
                sequence_len: 1024,
                on_bad_row,
                ..Default::default()
            },
            cache_dir: dir.join(format!("cache-{on_bad_row:?}")),
        };
        let r = ROW_TOKENIZER.with(|tok| -> Result<(), String> {
            let pipeline = spec.pipeline(tok).map_err(e)?;
            let _ = pipeline.preview(3);
            pipeline.stats().map_err(e)?;
            Ok(())
        });
        if let Err(x) = r {
            first_err.get_or_insert(x);
        }
    }
    match first_err {
        Some(x) => Err(x),
        None => Ok(()),
    }
}
