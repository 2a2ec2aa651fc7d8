//! Tokenizer tests against transformers' ids (fixtures written by scripts/reference/tokenizer_reference.py).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::*;
use crate::gguf::MetaValue;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One value as gguf-py read it back: `[type, value]`, type e.g. "uint32", "string", "array:int32".
fn meta_value(ty: &str, v: &Json) -> MetaValue {
    if let Some(sub) = ty.strip_prefix("array:") {
        let items = v.as_array().unwrap_or_else(|| panic!("{ty}: not an array"));
        return MetaValue::Array(items.iter().map(|x| meta_value(sub, x)).collect());
    }
    let int = || {
        v.as_i64()
            .unwrap_or_else(|| panic!("{ty}: {v} not an integer"))
    };
    match ty {
        "string" => MetaValue::String(v.as_str().unwrap().to_string()),
        "bool" => MetaValue::Bool(v.as_bool().unwrap()),
        "uint8" => MetaValue::U8(int() as u8),
        "int8" => MetaValue::I8(int() as i8),
        "uint16" => MetaValue::U16(int() as u16),
        "int16" => MetaValue::I16(int() as i16),
        "uint32" => MetaValue::U32(int() as u32),
        "int32" => MetaValue::I32(int() as i32),
        "uint64" => MetaValue::U64(v.as_u64().unwrap()),
        "int64" => MetaValue::I64(int()),
        "float32" => MetaValue::F32(v.as_f64().unwrap() as f32),
        "float64" => MetaValue::F64(v.as_f64().unwrap()),
        other => panic!("unknown GGUF type {other}"),
    }
}

pub(crate) fn metadata_from_typed_json(meta: &Json) -> BTreeMap<String, MetaValue> {
    meta.as_object()
        .unwrap()
        .iter()
        .map(|(k, tv)| {
            let ty = tv[0].as_str().unwrap();
            (k.clone(), meta_value(ty, &tv[1]))
        })
        .collect()
}

/// Compare our ids/decodes with transformers' for every string of a fixture. Returns (strings whose ids and
/// decodes equal transformers', strings where transformers emitted a token past the vocabulary).
/// `n_tokens`: the GGUF vocabulary size.
pub(crate) fn check_cases(
    name: &str,
    tok: &LoadedTokenizer,
    cases: &[Json],
    n_tokens: usize,
) -> (usize, usize) {
    let mut failures = Vec::new();
    let mut beyond_vocab = 0;
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (want, want_special) = (ids("ids"), ids("ids_with_special"));
        if want
            .iter()
            .chain(&want_special)
            .any(|&i| i as usize >= n_tokens)
        {
            // transformers' converter added a token the model does not have (GPT2Tokenizer's default
            // `<|endoftext|>` on a Llama 3 vocabulary) and emitted its id, which is past the embedding matrix.
            // We keep the model's vocabulary: that text stays plain text.
            let got = tok.encode(text, false).unwrap();
            if got.iter().any(|&i| i as usize >= n_tokens)
                || tok.decode(&got, false).unwrap() != text
            {
                failures.push(format!(
                    "{name} {text:?}: expected plain-text tokens for an out-of-vocabulary token"
                ));
            }
            beyond_vocab += 1;
            continue;
        }
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{name} {text:?}:\n  want {want:?}\n  got  {got:?}"));
        }
        let got_special = tok.encode(text, true).unwrap();
        if got_special != want_special {
            failures.push(format!(
                "{name} {text:?} (special):\n  want {want_special:?}\n  got  {got_special:?}"
            ));
        }
        let dec = tok.decode(&want, false).unwrap();
        if dec != case["decode"].as_str().unwrap() {
            failures.push(format!(
                "{name} decode {text:?}: want {:?} got {dec:?}",
                case["decode"]
            ));
        }
        let dec = tok.decode(&want_special, true).unwrap();
        if dec != case["decode_skip_special"].as_str().unwrap() {
            failures.push(format!(
                "{name} decode(skip) {text:?}: want {:?} got {dec:?}",
                case["decode_skip_special"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    (cases.len() - beyond_vocab, beyond_vocab)
}

/// transformers' apply_chat_template ids == our template rendering + encode_templated.
pub(crate) fn check_chat_cases(name: &str, tok: &LoadedTokenizer, cases: &[Json]) -> usize {
    if cases.is_empty() {
        return 0;
    }
    let template = tok.chat_template().unwrap();
    for case in cases {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gp = case["add_generation_prompt"].as_bool().unwrap();
        let text = template.render(&messages, gp).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name}: rendered text"
        );
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode_templated(&text).unwrap(),
            want,
            "{name}: chat ids for {text:?}"
        );
    }
    cases.len()
}

fn small_fixture(name: &str) -> (Json, LoadedTokenizer, usize) {
    let fx = read_json(
        &fixture_dir()
            .join("gguf_small")
            .join(format!("{name}.json")),
    );
    let meta = metadata_from_typed_json(&fx["metadata"]);
    let n = meta["tokenizer.ggml.tokens"].as_array().unwrap().len();
    let tok = tokenizer_from_gguf_metadata(&meta).unwrap_or_else(|e| panic!("{name}: {e}"));
    (fx, tok, n)
}

const SMALL: &[&str] = &[
    "smollm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "llama-spm",
    "phi3-spm",
    "gemma2-spm",
];

#[test]
fn small_gguf_tokenizers_match_transformers() {
    let mut summary = Vec::new();
    for name in SMALL {
        let (fx, tok, n) = small_fixture(name);
        let exp = &fx["expected"];
        let text = |t: &Option<(String, u32)>| t.as_ref().map(|(s, _)| s.clone());
        assert_eq!(
            text(&tok.bos).as_deref(),
            exp["bos_token"].as_str(),
            "{name} bos"
        );
        assert_eq!(
            text(&tok.eos).as_deref(),
            exp["eos_token"].as_str(),
            "{name} eos"
        );
        assert_eq!(
            text(&tok.pad).as_deref(),
            exp["pad_token"].as_str(),
            "{name} pad"
        );
        assert_eq!(
            text(&tok.unk).as_deref(),
            exp["unk_token"].as_str(),
            "{name} unk"
        );
        assert_eq!(
            tok.add_bos,
            exp["add_bos_token"].as_bool().unwrap(),
            "{name} add_bos"
        );
        let mut special: Vec<String> = tok
            .tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        special.sort();
        let mut want_special: Vec<String> = exp["special_added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .filter(|t| tok.token_to_id(t).is_some_and(|id| (id as usize) < n))
            .collect();
        want_special.sort();
        let n_specials_only_in_transformers =
            exp["special_added_tokens"].as_array().unwrap().len() - want_special.len();
        assert_eq!(special, want_special, "{name}: special added tokens");
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 25, "{name}: only {} strings", cases.len());
        let (exact, beyond) = check_cases(name, &tok, cases, n);
        // Only the Llama 3 cut has a token transformers invents (`<|endoftext|>`), in one string.
        let want_beyond = usize::from(*name == "llama-bpe");
        assert_eq!(
            (beyond, n_specials_only_in_transformers),
            (want_beyond, want_beyond),
            "{name}"
        );
        let chats = check_chat_cases(name, &tok, fx["chat_cases"].as_array().unwrap());
        summary.push(format!(
            "{name}: {exact}/{} strings identical to transformers{}, {chats} chat conversations identical",
            cases.len(),
            if beyond > 0 {
                format!(" ({beyond} where transformers emits an id past the vocabulary; kept as text)")
            } else {
                String::new()
            }
        ));
    }
    eprintln!("{}", summary.join("\n"));
}

#[test]
fn to_hf_files_round_trip() {
    for name in SMALL {
        let (fx, tok, n) = small_fixture(name);
        let dir = tempfile::tempdir().unwrap();
        tok.to_hf_files(dir.path()).unwrap();
        let back = LoadedTokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(back.bos, tok.bos, "{name}");
        assert_eq!(back.eos, tok.eos, "{name}");
        assert_eq!(back.pad, tok.pad, "{name}");
        assert_eq!(back.unk, tok.unk, "{name}");
        assert_eq!(back.add_bos, tok.add_bos, "{name}");
        assert_eq!(back.chat_template, tok.chat_template, "{name}");
        assert_eq!(back.stop_ids(), tok.stop_ids(), "{name}");
        check_cases(name, &back, fx["cases"].as_array().unwrap(), n);
        check_chat_cases(name, &back, fx["chat_cases"].as_array().unwrap());
    }
}

/// Llama 3 (adds BOS) with its template (writes `{{ bos_token }}`): one BOS, not two.
#[test]
fn no_double_bos_llama3() {
    let (_, tok, _) = small_fixture("llama-bpe");
    let (bos_text, bos) = tok.bos.clone().unwrap();
    assert_eq!(bos_text, "<|begin_of_text|>");
    assert!(tok.add_bos);
    let msgs = vec![
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
    ];
    let text = tok.chat_template().unwrap().render(&msgs, false).unwrap();
    assert!(text.starts_with("<|begin_of_text|>"));
    let count = |ids: &[u32]| ids.iter().filter(|&&i| i == bos).count();
    let ids = tok.encode_templated(&text).unwrap();
    assert_eq!(ids[0], bos);
    assert_eq!(count(&ids), 1);
    // The bug this prevents: tokenizing template text with special tokens gives two.
    assert_eq!(count(&tok.encode(&text, true).unwrap()), 2);
    // Text that does not start with BOS gets the tokenizer's BOS.
    let plain = tok.encode_templated("Hello").unwrap();
    assert_eq!((plain[0], count(&plain)), (bos, 1));
}

/// SmolLM2's BOS is `<|im_start|>` and it adds none: templated ids equal the plain ids (what transformers gives).
#[test]
fn no_bos_added_for_smollm2_style_templates() {
    let (_, tok, _) = small_fixture("smollm");
    assert!(!tok.add_bos);
    let msgs = vec![Message::new("user", "Hi")];
    let text = tok.chat_template().unwrap().render(&msgs, true).unwrap();
    let ids = tok.encode_templated(&text).unwrap();
    assert_eq!(ids, tok.encode(&text, false).unwrap());
    assert_eq!(ids.first(), tok.bos.as_ref().map(|(_, id)| id));
}

#[test]
fn end_of_turn_ids() {
    let (_, smol, _) = small_fixture("smollm");
    // eos is <|im_end|>, which is also the template's end of turn.
    assert_eq!(
        smol.stop_ids(),
        vec![smol.token_to_id("<|im_end|>").unwrap()]
    );
    let (_, llama, _) = small_fixture("llama-bpe");
    assert_eq!(
        llama.stop_ids(),
        vec![
            llama.token_to_id("<|end_of_text|>").unwrap(),
            llama.token_to_id("<|eot_id|>").unwrap()
        ]
    );
    let (_, phi, _) = small_fixture("phi3-spm");
    assert_eq!(
        phi.stop_ids(),
        vec![
            phi.token_to_id("<|endoftext|>").unwrap(),
            phi.token_to_id("<|end|>").unwrap()
        ]
    );
}

fn base_meta() -> BTreeMap<String, MetaValue> {
    let fx = read_json(&fixture_dir().join("gguf_small/smollm.json"));
    metadata_from_typed_json(&fx["metadata"])
}

#[test]
fn gguf_errors_are_clear() {
    let err =
        |m: BTreeMap<String, MetaValue>| tokenizer_from_gguf_metadata(&m).unwrap_err().to_string();

    let mut m = base_meta();
    m.insert(
        "tokenizer.ggml.pre".into(),
        MetaValue::String("tekken".into()),
    );
    let e = err(m);
    assert!(
        e.contains("`tekken`") && e.contains("smollm, llama-bpe") && e.contains("qwen2"),
        "{e}"
    );

    let mut m = base_meta();
    m.insert(
        "tokenizer.ggml.model".into(),
        MetaValue::String("bert".into()),
    );
    let e = err(m);
    assert!(
        e.contains("`bert`") && e.contains("gpt2") && e.contains("llama"),
        "{e}"
    );

    let mut m = base_meta();
    m.remove("tokenizer.ggml.model");
    assert!(err(m).contains("tokenizer.ggml.model"));

    let mut m = base_meta();
    m.insert(
        "tokenizer.ggml.bos_token_id".into(),
        MetaValue::U32(5_000_000),
    );
    let e = err(m);
    assert!(
        e.contains("tokenizer.ggml.bos_token_id") && e.contains("5000000"),
        "{e}"
    );

    let mut m = base_meta();
    m.insert(
        "tokenizer.ggml.eos_token_id".into(),
        MetaValue::String("2".into()),
    );
    assert!(err(m).contains("tokenizer.ggml.eos_token_id` is a string"));

    let mut m = base_meta();
    if let Some(MetaValue::Array(merges)) = m.get_mut("tokenizer.ggml.merges") {
        merges[3] = MetaValue::String("nospace".into());
    }
    let e = err(m);
    assert!(
        e.contains("tokenizer.ggml.merges`[3]") && e.contains("nospace"),
        "{e}"
    );

    let mut m = base_meta();
    if let Some(MetaValue::Array(types)) = m.get_mut("tokenizer.ggml.token_type") {
        types.pop();
    }
    assert!(err(m).contains("token_type` has"));

    let mut m = base_meta();
    m.remove("tokenizer.ggml.merges");
    assert!(err(m).contains("tokenizer.ggml.merges"));
}

#[test]
fn decode_rejects_unknown_ids_and_no_template_is_explained() {
    let (_, mut tok, n) = small_fixture("gpt-2");
    let e = tok
        .decode(&[1, n as u32 + 10], false)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{}", n + 10)), "{e}");
    tok.chat_template = None;
    let e = tok.chat_template().unwrap_err().to_string();
    assert!(
        e.contains("no chat template") && e.contains("chat_template") && e.contains("chatml"),
        "{e}"
    );
}

#[test]
fn from_hf_dir_reads_config_variants() {
    let (fx, tok, n) = small_fixture("llama-spm");
    let dir = tempfile::tempdir().unwrap();
    tok.to_hf_files(dir.path()).unwrap();
    let p = dir.path();
    // tokenizer_config.json written by older transformers: AddedToken objects, no add_bos flag; the special
    // tokens only in special_tokens_map.json; chat_template.jinja next to it; generation_config eos list.
    let cfg = json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false},
        "chat_template": "{{ 'from config' }}",
    });
    std::fs::write(p.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        p.join("special_tokens_map.json"),
        json!({"eos_token": "</s>", "unk_token": "<unk>"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        p.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        p.join("generation_config.json"),
        json!({"eos_token_id": [2, 7]}).to_string(),
    )
    .unwrap();
    let back = LoadedTokenizer::from_hf_dir(p).unwrap();
    assert_eq!(back.bos, Some(("<s>".to_string(), 1)));
    assert_eq!(back.eos, Some(("</s>".to_string(), 2)));
    // tokenizer.json's post-processor adds BOS: add_bos is read off it.
    assert!(back.add_bos);
    assert_eq!(
        back.chat_template()
            .unwrap()
            .render(&[Message::new("user", "x")], false)
            .unwrap(),
        "<s>x"
    );
    assert_eq!(back.stop_ids(), vec![2, 7]);
    check_cases(
        "llama-spm via hf dir",
        &back,
        fx["cases"].as_array().unwrap(),
        n,
    );

    // add_bos_token=false in the config rebuilds the post-processor like transformers does.
    std::fs::write(
        p.join("tokenizer_config.json"),
        json!({"bos_token": "<s>", "add_bos_token": false}).to_string(),
    )
    .unwrap();
    let no_bos = LoadedTokenizer::from_hf_dir(p).unwrap();
    assert!(!no_bos.add_bos);
    assert_eq!(
        no_bos.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );

    // Errors name the file and key.
    std::fs::write(
        p.join("tokenizer_config.json"),
        json!({"eos_token": "<nope>"}).to_string(),
    )
    .unwrap();
    let e = LoadedTokenizer::from_hf_dir(p).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("eos_token") && e.contains("<nope>"),
        "{e}"
    );
    std::fs::write(p.join("tokenizer_config.json"), "{not json").unwrap();
    let e = LoadedTokenizer::from_hf_dir(p).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("invalid JSON"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = LoadedTokenizer::from_hf_dir(empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
}

/// Byte offsets map rendered-template spans to tokens: the `{% generation %}` span of an assistant turn covers
/// exactly the tokens of its text and end-of-turn token.
#[test]
fn offsets_map_generation_spans_to_tokens() {
    let (_, tok, _) = small_fixture("smollm");
    let src = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}\
{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}\
{% endif %}{{ '\\n' }}{% endfor %}";
    let t = ChatTemplate::new(src, None, None).unwrap();
    let msgs = vec![
        Message::new("user", "Über 42 ½?"),
        Message::new("assistant", "Ja, 42 — café 🦙!"),
    ];
    let (text, spans) = t.render_with_spans(&msgs, false).unwrap();
    assert_eq!(spans.len(), 1);
    let (ids, offsets) = tok.encode_with_offsets(&text, false).unwrap();
    assert_eq!(ids, tok.encode(&text, false).unwrap());
    assert_eq!(ids.len(), offsets.len());
    let span = spans[0].clone();
    let inside: Vec<u32> = ids
        .iter()
        .zip(&offsets)
        .filter(|(_, (a, b))| *a >= span.start && *b <= span.end && b > a)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        tok.decode(&inside, false).unwrap(),
        "Ja, 42 — café 🦙!<|im_end|>"
    );
    assert_eq!(inside.last(), tok.eos.as_ref().map(|(_, id)| id));
}

/// The real SmolLM2 GGUF (scripts/fetch-smollm2.sh). Fails (never skips) with the fix when it is absent.
fn smollm2_gguf() -> PathBuf {
    let p = std::env::var_os("LORATUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (or set LORATUNE_SMOLLM2_GGUF to the file)",
        p.display()
    );
    p
}

/// SmolLM2-135M-Instruct's own GGUF, read with the GGUF reader: ids, decodes and chat ids equal transformers'
/// (tests/fixtures/tokenizer/smollm2_ids.json), also after writing and re-reading the Hugging Face files.
#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let file = crate::gguf::GgufFile::open(&smollm2_gguf()).unwrap();
    let tok = tokenizer_from_gguf_metadata(file.metadata()).unwrap();
    let fx = read_json(&fixture_dir().join("smollm2_ids.json"));
    let n = 49152;
    assert_eq!(tok.vocab_size(), n);
    assert_eq!(
        tok.vocab_size() as u64,
        fx["expected"]["vocab_size_with_added"].as_u64().unwrap()
    );
    assert_eq!(tok.bos, Some(("<|im_start|>".to_string(), 1)));
    assert_eq!(tok.eos, Some(("<|im_end|>".to_string(), 2)));
    assert_eq!(tok.pad, Some(("<|im_end|>".to_string(), 2)));
    assert_eq!(tok.unk, Some(("<|endoftext|>".to_string(), 0)));
    assert!(!tok.add_bos);
    assert_eq!(tok.stop_ids(), vec![2]);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    assert_eq!(check_cases("smollm2", &tok, cases, n), (cases.len(), 0));
    let chats = check_chat_cases("smollm2", &tok, fx["chat_cases"].as_array().unwrap());
    assert_eq!(chats, 4);
    // The template writes `<|im_start|>` (SmolLM2's BOS) itself and the tokenizer adds none: nothing is prepended.
    let text = tok
        .chat_template()
        .unwrap()
        .render(
            &[Message::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tok.encode_templated(&text).unwrap();
    assert_eq!(ids, tok.encode(&text, false).unwrap());
    assert_eq!(&ids[..2], &[1, 9690]); // <|im_start|> system
    let dir = tempfile::tempdir().unwrap();
    tok.to_hf_files(dir.path()).unwrap();
    let back = LoadedTokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(
        (back.bos.clone(), back.eos.clone(), back.add_bos),
        (tok.bos.clone(), tok.eos.clone(), false)
    );
    assert_eq!(
        check_cases("smollm2 (HF files)", &back, cases, n),
        (cases.len(), 0)
    );
    check_chat_cases(
        "smollm2 (HF files)",
        &back,
        fx["chat_cases"].as_array().unwrap(),
    );
}

#[test]
fn a_template_that_loops_or_doubles_strings_stops_with_an_error() {
    // A hostile template (e.g. in a downloaded GGUF) could otherwise take all memory or run forever.
    let msgs = [Message::new("user", "hi")];
    for src in [
        "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 1000000000 }}",
        "{{ '{0:>2000000000}'.format(1) }}",
        "{{ 'ab'.replace('', 'x' * 100000000) }}",
        "{{ messages|tojson(indent=2000000000) }}",
        "{{ '%2000000000s'|format(1) }}",
        "{{ 'x\ny'|indent(2000000000) }}",
    ] {
        let t = ChatTemplate::new(src, None, None).unwrap();
        let e = t.render(&msgs, false).unwrap_err().to_string();
        assert!(
            e.contains("budget") || e.contains("too large") || e.contains("above"),
            "{src}: {e}"
        );
    }
    // Real templates stay far below the budget, even on a long conversation.
    let long: Vec<Message> = (0..200)
        .map(|i| {
            Message::new(
                if i % 2 == 0 { "user" } else { "assistant" },
                "word ".repeat(2000),
            )
        })
        .collect();
    let t = ChatTemplate::builtin("chatml").unwrap();
    assert!(t.render(&long, true).unwrap().len() > 2_000_000);
}

#[test]
fn a_malformed_decoder_is_an_error_not_a_panic() {
    // The tokenizers crate `expect`s inside its decoder deserialiser: a syntax error there panicked (found by
    // the fuzz suite). It is now an error naming the file.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
    let (head, tail) = text.split_once("\"decoder\": {").unwrap();
    let broken = format!("{head}\"decoder\": {{\"use_regex\": :rue,{tail}");
    std::fs::write(dir.path().join("tokenizer.json"), broken).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let e = LoadedTokenizer::from_hf_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("malformed"),
        "{e}"
    );
}

#[test]
fn a_pre_tokenizer_regex_that_backtracks_without_bound_is_an_error() {
    // Oniguruma gives up after its retry limit and the tokenizers crate panics; found by the fuzz suite.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let dir = tempfile::tempdir().unwrap();
    let mut v: Json =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let old = v["pre_tokenizer"].take();
    v["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false}, old]});
    std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = LoadedTokenizer::from_hf_dir(dir.path()).unwrap();
    assert!(tok.encode("aab", false).is_ok());
    let e = tok
        .encode(&format!("{}b", "a".repeat(64)), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("backtrack"), "{e}");
}
