//! Data path × model: packed rows must give every sample exactly the logits and loss it gets alone.

use std::path::Path;
use std::sync::Arc;

use loratune::data::{
    Batch, DataFormat, DataOptions, DataPipeline, DatasetSource, SampleBuilder, SpecialToken,
    TemplateRenderer, TextTokenizer,
};
use loratune::model::{NoDropout, TokenBatch};
use loratune::tokenizer::ChatTemplate;
use loratune::train::loss::lm_loss_sum;

use crate::common::{fixture, load_fixture_model, max_abs_diff, to_vec, B};

fn builder() -> SampleBuilder {
    let t = tokenizers::Tokenizer::from_file(fixture("tokenizer/tokenizer.json")).unwrap();
    let src = std::fs::read_to_string(fixture(
        "templates/HuggingFaceTB-SmolLM2-135M-Instruct.jinja",
    ))
    .unwrap();
    SampleBuilder {
        tok: TextTokenizer {
            tokenizer: Arc::new(t),
            bos: None,
            eos: Some(SpecialToken {
                text: "<|im_end|>".into(),
                id: 2,
            }),
            pad_id: 3,
            add_bos: false,
            end_of_turn_ids: vec![2],
        },
        template: Some(Arc::new(TemplateRenderer::new(
            ChatTemplate::new(&src, None, Some("<|im_end|>")).unwrap(),
        ))),
        train_on_inputs: false,
        train_on_eos: Default::default(),
    }
}

/// Short chat records (short enough that several share a 64-token row with the fixture tokenizer).
fn write_data(dir: &Path) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..12 {
        let rec = serde_json::json!({"messages": [
            {"role": "system", "content": "Hi."},
            {"role": "user", "content": format!("q{i}")},
            {"role": "assistant", "content": format!("a {}", "xy".repeat(i % 4))},
        ]});
        s.push_str(&rec.to_string());
        s.push('\n');
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn row_slice(t: &[f32], row: usize, seq: usize, vocab: usize, from: usize, len: usize) -> Vec<f32> {
    t[(row * seq + from) * vocab..(row * seq + from + len) * vocab].to_vec()
}

#[test]
fn packed_samples_see_only_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let opts = DataOptions {
        sample_packing: true,
        sequence_len: 64,
        micro_batch_size: 2,
        ..Default::default()
    };
    let p = DataPipeline::new(
        vec![DatasetSource::new(data.to_string_lossy(), DataFormat::Chat)],
        vec![],
        opts,
        builder(),
        dir.path().join("cache"),
    )
    .unwrap();
    let prep = p.prepared().unwrap();
    let plan = prep.epoch_plan(0);
    let device = Default::default();
    // llama: full attention; mistral: sliding window 5; gemma2: soft-capping + alternating window.
    for arch in ["llama", "mistral", "gemma2"] {
        let model = load_fixture_model::<B>(&fixture(&format!("models/{arch}")), &device);
        let vocab = model.config.vocab_size;
        let mut packed_rows = 0;
        for b in 0..plan.batches() {
            let rows = plan.batch_rows(b);
            let batch: Batch = prep
                .make_batch(&prep.train_cache, &rows, 0, b as u64)
                .unwrap();
            let tb = &batch.tokens;
            let logits = to_vec(model.forward(tb));
            // The same grid without segment ids: what leaking attention would compute.
            let leaky = TokenBatch {
                segment_ids: None,
                ..tb.clone()
            };
            let leaky_logits = to_vec(model.forward(&leaky));
            let (packed_loss, packed_n) = lm_loss_sum(&model, tb, &batch.labels, &mut NoDropout);
            let packed_loss: f32 = to_vec(packed_loss)[0];
            assert_eq!(packed_n, batch.trained_tokens);
            let mut alone_loss = 0f32;
            let mut alone_n = 0usize;
            for (r, row) in rows.iter().enumerate() {
                packed_rows += (row.len() > 1) as usize;
                let mut at = 0usize;
                for (k, &s) in row.iter().enumerate() {
                    let single = prep
                        .make_batch(&prep.train_cache, &[&[s][..]], 0, 0)
                        .unwrap();
                    let n = single.tokens.seq;
                    let alone = to_vec(model.forward(&single.tokens));
                    let got = row_slice(&logits, r, tb.seq, vocab, at, n);
                    let d = max_abs_diff(&got, &alone);
                    assert!(
                        d < 1e-4,
                        "{arch}: sample {s} (#{k} in row {r}) differs from its solo logits by {d}"
                    );
                    if k > 0 {
                        let leak = max_abs_diff(
                            &row_slice(&leaky_logits, r, tb.seq, vocab, at, n),
                            &alone,
                        );
                        assert!(
                            leak > 1e-2,
                            "{arch}: leaking attention would change logits by only {leak}"
                        );
                    }
                    let (l, c) =
                        lm_loss_sum(&model, &single.tokens, &single.labels, &mut NoDropout);
                    alone_loss += to_vec(l)[0];
                    alone_n += c;
                    at += n;
                }
            }
            assert_eq!(packed_n, alone_n, "{arch}: loss targets");
            let rel = (packed_loss - alone_loss).abs() / alone_loss.abs().max(1e-6);
            assert!(
                rel < 1e-5,
                "{arch}: packed loss {packed_loss} vs samples alone {alone_loss}"
            );
        }
        assert!(
            packed_rows >= 2,
            "{arch}: the test needs rows holding several samples"
        );
    }
}

fn loratune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(args)
        .current_dir(crate::common::root())
        .output()
        .unwrap()
}

#[test]
fn cli_preview_and_stats_on_the_shipped_dataset() {
    let tok = fixture("tokenizer");
    let tok = tok.to_str().unwrap();
    let out = loratune(&[
        "data",
        "preview",
        "--dataset",
        "datasets/nimbrel/support_chat.jsonl",
        "--tokenizer",
        tok,
        "-n",
        "2",
        "--no-color",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("support_chat.jsonl line 1")
            && stdout.contains("support_chat.jsonl line 2"),
        "{stdout}"
    );
    // The first record's assistant reply and its end-of-turn token are marked, nothing else.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(crate::common::root().join("datasets/nimbrel/support_chat.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let reply = first["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap();
    assert!(stdout.contains(&format!("⟦{reply}<|im_end|>⟧")), "{stdout}");
    let body = stdout.split_once('\n').unwrap().1; // after the legend line
    assert_eq!(body.matches('⟦').count(), 2, "{stdout}");

    let cache = tempfile::tempdir().unwrap();
    let out = loratune(&[
        "data",
        "stats",
        "--dataset",
        "datasets/nimbrel/support_chat.jsonl",
        "--tokenizer",
        tok,
        "--cache-dir",
        cache.path().to_str().unwrap(),
        "--sample-packing",
        "--sequence-len",
        "1024",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lines =
        std::fs::read_to_string(crate::common::root().join("datasets/nimbrel/support_chat.jsonl"))
            .unwrap()
            .lines()
            .count() as u64;
    assert_eq!(st["train_counts"]["records"], lines);
    assert_eq!(st["train_counts"]["samples"], lines);
    assert!(st["epoch0"]["rows"].as_u64().unwrap() < lines, "packed");
    assert!(st["lengths"]["p50"].as_u64().unwrap() > 10);

    // A bad record stops `data stats` with the file, line and field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"x\"}]}\n").unwrap();
    let out = loratune(&[
        "data",
        "stats",
        "--dataset",
        bad.to_str().unwrap(),
        "--tokenizer",
        tok,
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jsonl line 1") && stderr.contains("messages[1].role"),
        "{stderr}"
    );
    assert!(stderr.contains("roles: {assistant: [bot]}"), "{stderr}");
}

#[test]
fn cli_stats_from_a_training_config() {
    let dir = tempfile::tempdir().unwrap();
    let root = crate::common::root();
    let cfg = dir.path().join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nval_set_size: 10\n\
             sequence_len: 1024\nsample_packing: true\nmicro_batch_size: 2\nlearning_rate: 1e-4\nnum_epochs: 1\n\
             dataset_prepared_path: {}\n",
            fixture("models/llama").display(),
            root.join("datasets/nimbrel/support_chat.jsonl").display(),
            dir.path().join("prepared").display()
        ),
    )
    .unwrap();
    let out = loratune(&["data", "stats", cfg.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = std::fs::read_to_string(root.join("datasets/nimbrel/support_chat.jsonl"))
        .unwrap()
        .lines()
        .count() as u64;
    assert_eq!(st["train_counts"]["records"], n);
    assert_eq!(st["eval_samples"], 10);
    assert_eq!(st["train_samples"].as_u64().unwrap(), n - 10);
    assert_eq!(st["micro_batch_size"], 2);
    assert!(st["sample_packing"].as_bool().unwrap());
    assert!(st["cache"]
        .as_str()
        .unwrap()
        .starts_with(dir.path().join("prepared").to_str().unwrap()));
}

/// A config for the data commands only: no learning_rate, no run length.
fn data_only_config(dir: &Path, data: &str, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("data.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {data}\n    type: text\nsequence_len: 64\n\
             dataset_prepared_path: {}\n{extra}",
            fixture("models/llama").display(),
            dir.join("prepared").display()
        ),
    )
    .unwrap();
    cfg
}

fn run_ok(args: &[&str]) -> String {
    let out = loratune(args);
    assert!(
        out.status.success(),
        "loratune {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `data stats|preview CONFIG` need only the data keys: a config without `learning_rate` / `num_epochs` works (and
/// `train` still refuses it).
#[test]
fn data_commands_accept_a_config_without_training_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("t.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"hello there\"}\n{\"text\": \"general kenobi\"}\n",
    )
    .unwrap();
    let cfg = data_only_config(dir.path(), data.to_str().unwrap(), "");
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["data", "stats", cfg.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(st["train_counts"]["records"], 2);
    let preview = run_ok(&["data", "preview", cfg.to_str().unwrap(), "--no-color"]);
    assert!(preview.contains("llo there<|im_end|>⟧"), "{preview}");
    let out = loratune(&["train", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing required key `learning_rate`"),
        "{err}"
    );
}

/// `data stats|preview CONFIG` apply `special_tokens` exactly as `train` does: the text format appends the
/// overridden EOS, and `data stats` fills the very cache `train`'s data pipeline reads.
#[test]
fn data_commands_apply_special_tokens_like_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("t.jsonl");
    std::fs::write(&data, "{\"text\": \"hello there\"}\n").unwrap();
    let plain = data_only_config(dir.path(), data.to_str().unwrap(), "");
    let preview = run_ok(&["data", "preview", plain.to_str().unwrap(), "--no-color"]);
    assert!(
        preview.contains("<|im_end|>⟧") && !preview.contains("<pad>"),
        "{preview}"
    );
    let cfg = data_only_config(
        dir.path(),
        data.to_str().unwrap(),
        "special_tokens:\n  eos_token: \"<pad>\"\n",
    );
    let preview = run_ok(&["data", "preview", cfg.to_str().unwrap(), "--no-color"]);
    assert!(
        preview.contains("<pad>⟧") && !preview.contains("<|im_end|>"),
        "{preview}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&run_ok(&["data", "stats", cfg.to_str().unwrap(), "--json"])).unwrap();
    // What `train` builds from the same config.
    let opts = loratune::config::LoadOptions {
        purpose: loratune::config::Purpose::Data,
        ..Default::default()
    };
    let c = loratune::config::TrainConfig::load_with(&cfg, &[], &opts).unwrap();
    let tok = c.tokenizer(&c.base_model_path().unwrap()).unwrap();
    assert_eq!(tok.eos.as_ref().map(|e| e.0.as_str()), Some("<pad>"));
    let train_stats = c.data_pipeline(&tok).unwrap().stats().unwrap();
    assert_eq!(
        st["cache"].as_str().unwrap(),
        train_stats.cache.to_str().unwrap()
    );
}

/// A bad row's error names the key that skips such rows, and that key is accepted: `skip_bad_rows: true`.
#[test]
fn bad_row_error_names_a_key_the_config_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("t.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"fine\"}\n{\"text\": 5}\n{\"text\": \"also fine\"}\n",
    )
    .unwrap();
    let cfg = data_only_config(dir.path(), data.to_str().unwrap(), "");
    let out = loratune(&["data", "stats", cfg.to_str().unwrap(), "--json"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("t.jsonl line 2"),
        "{err}"
    );
    let key = "skip_bad_rows: true";
    assert!(err.contains(key), "{err}");
    let st: serde_json::Value = serde_json::from_str(&run_ok(&[
        "data",
        "stats",
        cfg.to_str().unwrap(),
        "--json",
        "--set",
        &key.replace(": ", "="),
    ]))
    .unwrap();
    assert_eq!(st["train_counts"]["samples"], 2);
}
