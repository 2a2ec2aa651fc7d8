//! The `loratune` binary's model-facing commands.

use std::process::Command;

use crate::common::*;

fn loratune(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn inspect_reports_architecture_sizes_and_lora_targets() {
    let (ok, out, err) = loratune(&[
        "inspect",
        "--json",
        fixture("models/phi3").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "Phi3ForCausalLM");
    assert_eq!(v["layers"], 2);
    assert_eq!(v["heads"], 4);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(v["vocab_size"], 384);
    assert_eq!(v["tied_embeddings"], false);
    assert_eq!(v["dtypes"]["F32"], 15);
    assert_eq!(
        v["lora_targets"],
        serde_json::json!(["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"])
    );
    // Parameter count = sum of the checkpoint's tensor sizes.
    let src = loratune::model::open(&fixture("models/phi3")).unwrap();
    let n: usize = src
        .source
        .names()
        .iter()
        .map(|t| src.source.shape(t).unwrap().iter().product::<usize>())
        .sum();
    assert_eq!(v["parameters"], n);

    let (ok, out, _) = loratune(&["inspect", smollm2_gguf().to_str().unwrap()]);
    assert!(ok);
    assert!(
        out.contains("LlamaForCausalLM")
            && out.contains("134515008")
            && out.contains("Q4_1")
            && out.contains("tied lm_head   yes"),
        "{out}"
    );
}

#[test]
fn bad_model_paths_are_clear_errors_not_panics() {
    let (ok, _, err) = loratune(&["inspect", "/nonexistent/model"]);
    assert!(
        !ok && err.contains("no such file") && !err.contains("panicked"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let (ok, _, err) = loratune(&[
        "generate",
        "--model",
        bad.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(
        !ok && err.contains("broken.gguf") && !err.contains("panicked"),
        "{err}"
    );
}

/// `loratune eval --generate`: every question answered (greedy, in batches of 2 here) and scored with the asked
/// metrics; the per-question file and the printed means agree.
#[test]
fn eval_generate_scores_every_heldout_question() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nlearning_rate: 1e-3\nmax_steps: 1\noutput_dir: {}\n",
            fixture("models/llama").display(),
            fixture("train/facts_chat.jsonl").display(),
            d.path().join("run").display()
        ),
    )
    .unwrap();
    let held = d.path().join("h.jsonl");
    std::fs::write(
        &held,
        "{\"q\": \"What is the capital?\", \"a\": [\"paris\", \"france\"]}\n{\"q\": \"Name a colour.\", \"a\": \"blue\"}\n{\"q\": \"Count to three.\", \"a\": [\"one\"]}\n",
    )
    .unwrap();
    let out = d.path().join("answers.jsonl");
    let (ok, stdout, stderr) = loratune(&[
        "eval",
        cfg.to_str().unwrap(),
        "--generate",
        held.to_str().unwrap(),
        "--prompt-field",
        "q",
        "--answer-field",
        "a",
        "--metrics",
        "contains,f1,exact",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--base-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let mut f1_sum = 0.0;
    for l in &lines {
        let s = l["scores"].as_object().unwrap();
        assert_eq!(s.len(), 3, "{l}");
        assert!(s
            .values()
            .all(|v| (0.0..=1.0).contains(&v.as_f64().unwrap())));
        f1_sum += s["f1"].as_f64().unwrap();
    }
    assert_eq!(lines[1]["references"], serde_json::json!(["blue"]));
    assert!(
        stdout.contains("3 questions: contains ")
            && stdout.contains(&format!("f1 {:.3}", f1_sum / 3.0)),
        "{stdout}"
    );
    // Without FILE: the config's eval_generate block (its fields and metrics); none in the config is a clear error.
    let (ok, _, stderr) = loratune(&["eval", cfg.to_str().unwrap(), "--generate", "--base-only"]);
    assert!(
        !ok && stderr.contains("has none") && stderr.contains("eval_generate"),
        "{stderr}"
    );
    let with_block = d.path().join("c2.yaml");
    std::fs::write(
        &with_block,
        format!(
            "{}eval_generate:\n  path: {}\n  prompt_field: q\n  answer_field: a\n  metrics: [exact]\n  max_new_tokens: 3\n",
            std::fs::read_to_string(&cfg).unwrap(),
            held.display()
        ),
    )
    .unwrap();
    let out2 = d.path().join("answers2.jsonl");
    let (ok, stdout, stderr) = loratune(&[
        "eval",
        with_block.to_str().unwrap(),
        "--generate",
        "--base-only",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("3 questions: exact "), "{stdout}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&out2)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["scores"].as_object().unwrap().len(), 1);
    // A metric loratune does not know is refused with the list.
    let (ok, _, stderr) = loratune(&[
        "eval",
        cfg.to_str().unwrap(),
        "--generate",
        held.to_str().unwrap(),
        "--metrics",
        "bleu",
    ]);
    assert!(!ok && stderr.contains("unknown metric `bleu`"), "{stderr}");
}
