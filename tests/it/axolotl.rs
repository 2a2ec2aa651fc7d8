//! Axolotl's own example configs run unchanged: every YAML under the example folders of the families loratune
//! supports, pinned at one Axolotl commit (`tests/fixtures/axolotl/README.md`), through the `loratune` binary. The
//! test only points `base_model` and the dataset paths at local fixtures (`--set`), and stops after 2 steps.
//!
//! Each config either trains (printing at most one warning line: the grouped list of Axolotl keys without effect)
//! or is refused with an error naming the key of the feature loratune lacks ([`REFUSED`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Configs loratune refuses, with the key the error must name. Everything else must train: 47 LoRA/QLoRA configs
/// minus the 4 below that need a method loratune lacks, plus the 7 full fine-tuning configs without an `adapter`
/// key, which train LoRA with a note saying so.
const REFUSED: &[(&str, &str)] = &[
    // LoRA / QLoRA configs that need a method loratune does not have.
    ("llama-2/gptq-lora.yml", "gptq"),
    ("llama-2/loftq.yml", "peft"),
    ("llama-2/relora.yml", "relora"),
    ("qwen3/30b-a3b-nvfp4-lora.yaml", "lora_target_parameters"),
    // Not supervised LoRA fine-tuning: preference / reward training, pre-training, QAT, fp8, diffusion, LISA,
    // partial full-parameter training.
    ("tiny-llama/pretrain.yml", "pretraining_dataset"),
    ("gemma2/reward-model.yaml", "num_labels"),
    ("llama-2/lisa.yml", "lisa_n_layers"),
    ("llama-3/3b-fp8-fsdp2.yaml", "fp8"),
    ("llama-3/3b-qat-fsdp2.yaml", "qat"),
    ("llama-3/3b-qat-mxfp4.yaml", "qat"),
    ("llama-3/3b-qat-nvfp4.yaml", "qat"),
    ("llama-3/diffusion/pretrain-1b.yaml", "diffusion"),
    ("llama-3/diffusion/sft-1b.yaml", "diffusion"),
    ("llama-3/instruct-dpo-lora-8b.yml", "rl"),
    ("llama-3/lora-1b-deduplicate-dpo.yml", "rl"),
    ("llama-3/qlora-1b-gdpo.yaml", "rl"),
    ("llama-3/qlora-1b-kto.yaml", "rl"),
    ("llama-3/sparse-finetuning.yaml", "llmcompressor"),
    (
        "mistral/bigstral/bigstral-ds-zero3.yaml",
        "unfrozen_parameters",
    ),
    ("mistral/dpo/mistral-dpo-qlora.yml", "rl"),
    ("mistral/mixtral/mixtral_22.yml", "unfrozen_parameters"),
    ("mistral/orpo/mistral-qlora-orpo.yml", "rl"),
    ("qwen2/adamw-pretrain-fsdp2.yaml", "reinit_weights"),
    ("qwen2/dpo.yaml", "rl"),
    ("qwen2/muon-pretrain-fsdp2.yaml", "reinit_weights"),
    ("qwen2/prm.yaml", "num_labels"),
    ("qwen2/reward-model.yaml", "num_labels"),
    ("qwen3/8b-qat-fsdp2.yml", "qat"),
    ("qwen3/reward-model.yaml", "num_labels"),
];

fn examples() -> Vec<PathBuf> {
    let root = fixture("axolotl/examples");
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn rel(p: &Path) -> String {
    let s = p
        .strip_prefix(fixture("axolotl/examples"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    s.strip_prefix("archived/").map(str::to_string).unwrap_or(s)
}

/// The `--set` arguments that point a config at the local fixtures: the model, each dataset entry's file (by the
/// shape its type reads), and 2 steps.
fn local_overrides(text: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    let mut sets = vec![
        format!("base_model={}", fixture("axolotl/model").display()),
        "max_steps=2".to_string(),
    ];
    for list in ["datasets", "test_datasets"] {
        let Some(entries) = doc.get(list).and_then(|d| d.as_sequence()) else {
            continue;
        };
        for (i, e) in entries.iter().enumerate() {
            let kind = e.get("type").and_then(|t| t.as_str()).unwrap_or("");
            let file = if kind.starts_with("alpaca") {
                "alpaca.jsonl"
            } else if e.get("field_messages").and_then(|f| f.as_str()) == Some("conversations") {
                "conversations.jsonl"
            } else {
                "messages.jsonl"
            };
            sets.push(format!(
                "{list}.{i}.path={}",
                fixture(&format!("axolotl/data/{file}")).display()
            ));
            if e.get("data_files").is_some() {
                // A file inside the Hub dataset: part of the path.
                sets.push(format!("{list}.{i}.data_files=null"));
            }
        }
    }
    sets
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(config: &Path) -> Outcome {
    let text = std::fs::read_to_string(config).unwrap();
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("config.yml");
    std::fs::write(&copy, &text).unwrap();
    let mut args = vec!["train".to_string(), copy.to_string_lossy().into_owned()];
    for s in local_overrides(&text) {
        args.push("--set".into());
        args.push(s);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(&args)
        .current_dir(work.path())
        .env("XDG_CACHE_HOME", work.path().join("cache"))
        .output()
        .unwrap();
    Outcome {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn every_axolotl_example_config_trains_or_is_refused_naming_the_key() {
    let configs = examples();
    assert_eq!(configs.len(), 80, "the pinned example set");
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for c in &configs {
        let name = rel(c);
        let o = run(c);
        let all = format!("{}{}", o.stdout, o.stderr);
        let warnings = all.lines().filter(|l| l.starts_with("warning:")).count();
        report.push(format!(
            "{name}: {} ({warnings} warning lines)",
            if o.ok { "trained" } else { "refused" }
        ));
        match REFUSED.iter().find(|(n, _)| *n == name) {
            Some((_, key)) => {
                if o.ok || !o.stderr.contains(&format!("`{key}`")) {
                    failures.push(format!(
                        "{name}: expected a refusal naming `{key}`, got:\n{all}"
                    ));
                }
            }
            None => {
                if !o.ok || warnings > 1 || !all.contains("finished after 2/2 steps") {
                    failures.push(format!(
                        "{name}: expected 2 steps and ≤ 1 warning line, got:\n{all}"
                    ));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        configs.len(),
        failures.join("\n\n")
    );
}

/// `loss_watchdog_threshold` / `loss_watchdog_patience` (Axolotl's LossWatchDogCallback): a run whose logged loss
/// stays above the threshold stops after `patience` logged steps, and still writes its adapter.
#[test]
fn loss_watchdog_stops_a_run_whose_loss_stays_high() {
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("watchdog.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nlearning_rate: 1.0e-4\nmax_steps: 10\n\
             logging_steps: 1\nloss_watchdog_threshold: 0.5\nloss_watchdog_patience: 3\noutput_dir: out\n",
            fixture("axolotl/model").display(),
            fixture("axolotl/data/messages.jsonl").display()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(["train", cfg.to_str().unwrap()])
        .current_dir(work.path())
        .env("XDG_CACHE_HOME", work.path().join("cache"))
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{all}");
    assert!(
        all.contains("step 3: the loss")
            && all.contains("above loss_watchdog_threshold 0.5 for 3 logged steps"),
        "{all}"
    );
    let metrics = std::fs::read_to_string(work.path().join("out/metrics.jsonl")).unwrap();
    let steps = metrics.lines().filter(|l| l.contains("\"loss\"")).count();
    assert_eq!(steps, 3, "{metrics}");
    assert!(work
        .path()
        .join("out/adapter/adapter_model.safetensors")
        .is_file());
}
