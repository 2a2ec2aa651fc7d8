//! Template-mask parity with transformers: input ids and assistant masks of multi-turn conversations under real
//! chat templates, as `apply_chat_template(..., return_assistant_tokens_mask=True)` computes them on
//! `{% generation %}`-tagged twins of the templates (tests/fixtures/data/template_masks.json, written by
//! scripts/reference/data_reference.py). loratune renders the untagged templates and finds the turns from
//! conversation prefixes, so agreement checks the algorithm, not a shared implementation.

use std::sync::Arc;

use serde::Deserialize;
use tokenizers::AddedToken;

use super::tests::fixture;
use super::*;
use crate::tokenizer::ChatTemplate;

#[derive(Deserialize)]
struct Doc {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template_file: String,
    tokenizer: String,
    added_special_tokens: Vec<String>,
    added_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    conversations: Vec<Conv>,
    rejected: Vec<Rejected>,
}

#[derive(Deserialize)]
struct Conv {
    messages: serde_json::Value,
    text: String,
    input_ids: Vec<u32>,
    assistant_masks: Vec<u8>,
}

#[derive(Deserialize)]
struct Rejected {
    messages: serde_json::Value,
    raises: String,
}

fn load() -> Doc {
    let p = fixture("data/template_masks.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// The fixture BPE plus the case's special tokens, and the case's template.
fn builder(case: &Case) -> SampleBuilder {
    let mut t = tokenizers::Tokenizer::from_file(fixture("tokenizer/tokenizer.json")).unwrap();
    let added: Vec<AddedToken> = case
        .added_special_tokens
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(added).unwrap();
    for (s, &id) in case.added_special_tokens.iter().zip(&case.added_ids) {
        assert_eq!(t.token_to_id(s), Some(id), "{}: id of {s}", case.name);
    }
    let special = |s: &Option<String>| {
        s.as_ref().map(|text| SpecialToken {
            id: t
                .token_to_id(text)
                .unwrap_or_else(|| panic!("{}: {text} not in the vocabulary", case.name)),
            text: text.clone(),
        })
    };
    let (bos, eos) = (special(&case.bos_token), special(&case.eos_token));
    let src =
        std::fs::read_to_string(fixture(&format!("templates/{}", case.template_file))).unwrap();
    let template =
        ChatTemplate::new(&src, case.bos_token.as_deref(), case.eos_token.as_deref()).unwrap();
    let mut end_of_turn_ids: Vec<u32> = template
        .end_of_turn_tokens()
        .iter()
        .filter_map(|s| t.token_to_id(s))
        .collect();
    end_of_turn_ids.extend(eos.as_ref().map(|e| e.id));
    SampleBuilder {
        tok: TextTokenizer {
            tokenizer: Arc::new(t),
            bos,
            eos,
            pad_id: 3,
            add_bos: false,
            end_of_turn_ids,
        },
        template: Some(Arc::new(TemplateRenderer::new(template))),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    }
}

#[test]
fn template_masks_match_transformers() {
    let doc = load();
    let names: Vec<&str> = doc.cases.iter().map(|c| c.name.as_str()).collect();
    for want in ["smollm2", "llama3", "gemma2", "mistral", "phi3", "qwen2.5"] {
        assert!(names.contains(&want), "fixture lacks {want}: {names:?}");
    }
    let parser = RowParser::new(&DatasetSource::new("fixture", DataFormat::Chat)).unwrap();
    let mut checked = 0;
    for case in doc.cases.iter().filter(|c| c.tokenizer == "fixture") {
        let b = builder(case);
        for (k, conv) in case.conversations.iter().enumerate() {
            let ex = parser
                .parse(&serde_json::json!({"messages": conv.messages}), false)
                .unwrap();
            let rendered = b
                .render(&ex)
                .unwrap_or_else(|e| panic!("{} #{k}: {e:?}", case.name));
            assert_eq!(
                rendered.text, conv.text,
                "{} #{k}: rendered text",
                case.name
            );
            let s = b.build(&ex).unwrap();
            assert_eq!(s.ids, conv.input_ids, "{} #{k}: input ids", case.name);
            let want: Vec<bool> = conv.assistant_masks.iter().map(|&m| m != 0).collect();
            assert_eq!(
                s.trained, want,
                "{} #{k}: assistant mask\n{}",
                case.name, conv.text
            );
            assert_eq!(
                s.spans_without_end, 0,
                "{} #{k}: every trained turn ends with its end token",
                case.name
            );
            checked += 1;
        }
        for r in &case.rejected {
            let ex = parser
                .parse(&serde_json::json!({"messages": r.messages}), false)
                .unwrap();
            let e = b.build(&ex).unwrap_err();
            assert_eq!(e.kind, BadRowKind::TemplateError, "{}", case.name);
            assert!(
                e.problem.contains(&r.raises),
                "{}: {e:?} lacks {:?}",
                case.name,
                r.raises
            );
        }
    }
    assert!(checked >= 30, "{checked} conversations checked");
}

/// The real SmolLM2-135M-Instruct GGUF (fetched by scripts/fetch-smollm2.sh; CI runs it first).
fn smollm2_gguf() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("LORATUNE_SMOLLM2_GGUF") {
        return p.into();
    }
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (or set LORATUNE_SMOLLM2_GGUF)",
        p.display()
    );
    p
}

#[test]
fn smollm2_gguf_tokenizer_masks_match_transformers() {
    // The whole production path: tokenizer, special tokens and template from the GGUF, as training uses them.
    let doc = load();
    let case = doc
        .cases
        .iter()
        .find(|c| c.name == "smollm2-gguf")
        .expect("fixture lacks the smollm2-gguf case");
    let tok = crate::tokenizer::load_for_model(&smollm2_gguf()).unwrap();
    assert_eq!(
        tok.eos.as_ref().map(|e| e.0.as_str()),
        case.eos_token.as_deref()
    );
    let b = SampleBuilder::from_tokenizer(&tok, None, false).unwrap();
    assert_eq!(
        b.tok.pad_id,
        tok.eos.as_ref().unwrap().1,
        "SmolLM2's GGUF pads with EOS"
    );
    let parser = RowParser::new(&DatasetSource::new("fixture", DataFormat::Chat)).unwrap();
    assert_eq!(case.conversations.len(), 6);
    for (k, conv) in case.conversations.iter().enumerate() {
        let ex = parser
            .parse(&serde_json::json!({"messages": conv.messages}), false)
            .unwrap();
        let s = b.build(&ex).unwrap();
        assert_eq!(b.render(&ex).unwrap().text, conv.text, "#{k}");
        assert_eq!(s.ids, conv.input_ids, "#{k}: input ids");
        let want: Vec<bool> = conv.assistant_masks.iter().map(|&m| m != 0).collect();
        assert_eq!(s.trained, want, "#{k}: assistant mask");
        assert_eq!(s.spans_without_end, 0);
    }
}
