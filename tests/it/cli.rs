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
