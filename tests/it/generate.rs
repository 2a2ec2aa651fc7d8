//! SmolLM2-135M-Instruct end to end: GGUF → tokenizer + chat template → KV-cached greedy decoding gives exactly
//! transformers' token ids (tests/fixtures/generate/smollm2_greedy.json, scripts/reference/generate_reference.py),
//! and `convert` to an HF folder reloads with identical logits.

use burn::tensor::DType;
use loratune::export::hf::MergedExportOptions;
use loratune::generate::{generate, generate_greedy_batch, GenerateOptions};
use loratune::model::{self, CausalLm, TokenBatch};
use loratune::quant::BasePlan;
use loratune::tokenizer::{load_for_model, Message};

use crate::common::*;

#[test]
fn smollm2_greedy_chat_equals_transformers() {
    let path = smollm2_gguf();
    let opened = model::open(&path).unwrap();
    let device = Default::default();
    // Dequantized at load, and kept in its Q4_1 / Q8_0 blocks (decoded tile by tile in every product).
    for plan in [BasePlan::DENSE, BasePlan::KEEP] {
        let m = CausalLm::<B>::load_with(
            opened.config.clone(),
            opened.source.as_ref(),
            &device,
            DType::F32,
            plan,
        )
        .unwrap();
        assert_eq!(
            m.linears()[0].1.weight.quant().is_some(),
            plan.keep_stored,
            "{plan:?}"
        );
        greedy_cases(&m, &path);
    }
}

fn greedy_cases(m: &CausalLm<B>, path: &std::path::Path) {
    let tok = load_for_model(path).unwrap();
    let template = tok.chat_template().unwrap();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("generate/smollm2_greedy.json")).unwrap(),
    )
    .unwrap();
    let mut prompts = Vec::new();
    let mut wanted = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want_prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let want_gen: Vec<u32> = serde_json::from_value(case["generated_ids"].clone()).unwrap();
        let text = template
            .render(&[Message::new("user", prompt)], true)
            .unwrap();
        let ids = tok.encode_templated(&text).unwrap();
        assert_eq!(
            ids, want_prompt,
            "{prompt}: prompt ids differ from transformers'"
        );
        let opts = GenerateOptions {
            max_new_tokens: 48,
            stop_ids: tok.generation_stop_ids(),
            ..Default::default()
        };
        let (got, _) = generate(m, &ids, &opts, &mut |_| {}).unwrap();
        assert_eq!(
            got,
            want_gen,
            "{prompt}: greedy ids differ\n ours: {:?}\n  ref: {:?}",
            tok.decode(&got, true),
            case["text"]
        );
        prompts.push(ids);
        wanted.push(want_gen);
    }
    // All prompts at once (left-padded, one batch): each row equals transformers' ids too.
    assert!(
        prompts.iter().any(|p| p.len() != prompts[0].len()),
        "prompts of different lengths"
    );
    let batched = generate_greedy_batch(m, &prompts, 48, &tok.generation_stop_ids()).unwrap();
    for ((got, _), want) in batched.iter().zip(&wanted) {
        assert_eq!(
            got,
            want,
            "batched greedy ids differ: {:?}",
            tok.decode(got, true)
        );
    }
}

#[test]
fn smollm2_convert_to_hf_folder_reloads_identically() {
    let path = smollm2_gguf();
    let opened = model::open(&path).unwrap();
    let tok = load_for_model(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let opts = MergedExportOptions {
        extra_eos_ids: tok.generation_stop_ids(),
        ..Default::default()
    };
    loratune::export::merge::merge_to_folder(&opened, None, &out, &opts, &|d| tok.to_hf_files(d))
        .unwrap();
    let device = Default::default();
    let a = CausalLm::<B>::load(
        opened.config.clone(),
        opened.source.as_ref(),
        &device,
        DType::F32,
    )
    .unwrap();
    let conv = model::open(&out).unwrap();
    assert_eq!(conv.config.rope.theta, 100000.0);
    assert!(conv.config.tie_word_embeddings);
    let b = CausalLm::<B>::load(conv.config, conv.source.as_ref(), &device, DType::F32).unwrap();
    let tok2 = load_for_model(&out).unwrap();
    let ids = tok2
        .encode("The quick brown fox jumps over the lazy dog. 12345", false)
        .unwrap();
    assert_eq!(
        ids,
        tok.encode("The quick brown fox jumps over the lazy dog. 12345", false)
            .unwrap()
    );
    let batch = TokenBatch::from_rows(&[ids], None);
    assert_eq!(
        to_vec(a.forward(&batch)),
        to_vec(b.forward(&batch)),
        "converted folder changed the logits"
    );
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["eos_token_id"], serde_json::json!(2));
    assert!(std::fs::read_to_string(out.join("tokenizer_config.json"))
        .unwrap()
        .contains("chat_template"));
}
