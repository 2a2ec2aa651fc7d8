//! The YAML training config: error messages (with line/column and suggestions), defaults, overrides, the
//! resolved config and its hash, the later model/data checks, and every example in `configs/`.

use loratune::config::{
    Bf16, ChatTemplateChoice, ChatTemplateName, ConfigErrors, DataFacts, DataFormat, DatasetConfig,
    Device, FileKind, LoadOptions, LoraInit, ModelFacts, Optimizer, ScheduleKind, TargetSpec,
    TrainConfig, TrainOnEos, Truncation, ValSplit,
};
use std::path::{Path, PathBuf};

/// A folder with the data files the test configs name.
fn data_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("train.jsonl"), "{\"messages\": []}\n").unwrap();
    std::fs::write(d.path().join("eval.jsonl"), "{\"messages\": []}\n").unwrap();
    std::fs::write(d.path().join("alpaca.csv"), "instruction,input,output\n").unwrap();
    std::fs::create_dir(d.path().join("shards")).unwrap();
    std::fs::write(d.path().join("shards/a.parquet"), b"PAR1").unwrap();
    std::fs::write(d.path().join("shards/b.parquet"), b"PAR1").unwrap();
    std::fs::write(d.path().join("model.gguf"), b"GGUF").unwrap();
    d
}

fn load_in(dir: &Path, yaml: &str, sets: &[&str]) -> Result<TrainConfig, ConfigErrors> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_yaml_str(
        yaml,
        "test.yaml",
        &sets,
        &LoadOptions {
            check_files: true,
            base_dir: Some(dir.to_path_buf()),
            ..LoadOptions::default()
        },
    )
}

fn errors(dir: &Path, yaml: &str, sets: &[&str]) -> Vec<String> {
    match load_in(dir, yaml, sets) {
        Ok(_) => panic!("expected the config to be rejected:\n{yaml}"),
        Err(e) => e.issues.iter().map(|i| i.to_string()).collect(),
    }
}

fn assert_has(errs: &[String], want: &str) {
    assert!(
        errs.iter().any(|e| e == want),
        "no error equal to\n  {want}\ngot:\n  {}",
        errs.join("\n  ")
    );
}

fn assert_contains(errs: &[String], parts: &[&str]) {
    assert!(
        errs.iter().any(|e| parts.iter().all(|p| e.contains(p))),
        "no error containing all of {parts:?}; got:\n  {}",
        errs.join("\n  ")
    );
}

const GOOD: &str = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_template
learning_rate: 2e-4
num_epochs: 1
";

#[test]
fn unknown_key_has_line_column_and_suggestion() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_template
learning_rate: 2e-4
num_epochs: 1
lora_alpah: 32
";
    let errs = errors(d.path(), yaml, &[]);
    assert_eq!(
        errs,
        vec!["unknown key `lora_alpah` at line 7 column 1; did you mean `lora_alpha`?".to_string()]
    );
    // The whole message names the file.
    let e = load_in(d.path(), yaml, &[]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.yaml: unknown key `lora_alpah` at line 7 column 1; did you mean `lora_alpha`?"
    );
    // Converted into the library error for the CLI.
    let lib: loratune::Error = e.into();
    assert!(lib.to_string().contains("line 7 column 1"));
}

#[test]
fn unknown_key_inside_a_dataset_entry() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_template
    feild_messages: conversations
  - {path: alpaca.csv, type: alpaca, field_instrution: q}
learning_rate: 2e-4
num_epochs: 1
";
    let errs = errors(d.path(), yaml, &[]);
    assert_has(
        &errs,
        "unknown key `feild_messages` at line 5 column 5; did you mean `field_messages`?",
    );
    assert_has(
        &errs,
        "unknown key `field_instrution` at line 6 column 38; did you mean `field_instruction`?",
    );
}

#[test]
fn wrong_types_name_the_expected_type() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_template
    roles_to_train: assistant
learning_rate: fast
num_epochs: 1
lora_r: sixteen
micro_batch_size: -2
sample_packing: maybe
bf16: sometimes
lora_target_modules: 7
";
    let errs = errors(d.path(), yaml, &[]);
    assert_has(&errs, "invalid `datasets.0.roles_to_train` at line 5 column 21; invalid type: string \"assistant\", expected a list");
    assert_has(
        &errs,
        "invalid `learning_rate` at line 6 column 16; expected a number, found string `fast`",
    );
    assert_has(&errs, "invalid `lora_r` at line 8 column 9; invalid type: string \"sixteen\", expected a whole number ≥ 0");
    assert_has(&errs, "invalid `micro_batch_size` at line 9 column 19; invalid value: integer `-2`, expected a whole number ≥ 0");
    assert_has(&errs, "invalid `sample_packing` at line 10 column 17; invalid type: string \"maybe\", expected a boolean");
    assert_has(
        &errs,
        "invalid `bf16` at line 11 column 7; expected true, false or auto, found `sometimes`",
    );
    assert_contains(
        &errs,
        &[
            "invalid `lora_target_modules` at line 12 column 22",
            "a list of module names or one string",
        ],
    );
    assert_eq!(errs.len(), 7, "{errs:#?}");
    // Reported in file order.
    let lines: Vec<usize> = load_in(d.path(), yaml, &[])
        .unwrap_err()
        .issues
        .iter()
        .map(|i| i.pos.unwrap().line)
        .collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn unknown_names_list_what_is_supported() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_templat
learning_rate: 2e-4
num_epochs: 1
lr_scheduler: cosine_with_restarts
optimizer: lion_8bit
chat_template: chatlm
adapter: llama-adapter
device: gpu:1
";
    let errs = errors(d.path(), yaml, &[]);
    assert_has(
        &errs,
        "invalid `datasets.0.type` at line 4 column 11; unknown dataset type `chat_templat`; supported: alpaca, alpaca:chat, alpaca:chatml, alpaca:phi, chat_template, completion, text (also accepted: chat); did you mean `chat_template`?",
    );
    assert_has(
        &errs,
        "invalid `lr_scheduler` at line 7 column 15; unknown learning-rate scheduler `cosine_with_restarts`; supported: constant, linear, cosine (also accepted: constant_with_warmup)",
    );
    assert_has(
        &errs,
        "invalid `optimizer` at line 8 column 12; unknown optimizer `lion_8bit`; supported: adamw_torch (also accepted: adamw, adamw_hf, adamw_torch_fused, adamw_bnb_8bit, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, paged_adamw, adamw_torch_4bit, adamw_torch_8bit)",
    );
    assert_contains(
        &errs,
        &[
            "invalid `chat_template` at line 9 column 16",
            "supported: tokenizer_default, chatml, llama3, mistral, gemma, phi3, qwen2_5, qwen3, alpaca, jinja",
            "did you mean `chatml`?",
        ],
    );
    assert_has(
        &errs,
        "invalid `adapter` at line 10 column 10; adapter `llama-adapter` is not supported: only `adapter: lora` and `adapter: qlora` are implemented",
    );
    assert_contains(
        &errs,
        &[
            "invalid `device` at line 11 column 9",
            "supported: cpu, cuda, cuda:N",
        ],
    );
}

#[test]
fn semantic_errors_are_collected_with_positions() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: missing.jsonl
    type: chat_template
  - path: shards/*.csv
    type: alpaca
learning_rate: 0
lora_r: 0
lora_alpha: -16
lora_dropout: 1.0
micro_batch_size: 0
warmup_steps: 10
warmup_ratio: 0.1
val_set_size: 1.5
save_total_limit: 0
";
    let errs = errors(d.path(), yaml, &[]);
    let dir = d.path().display();
    assert_has(&errs, &format!("invalid `datasets.0.path` at line 3 column 11; dataset file `{dir}/missing.jsonl` not found"));
    assert_has(&errs, &format!("invalid `datasets.1.path` at line 5 column 11; the glob `{dir}/shards/*.csv` matches no files"));
    assert_has(&errs, "invalid `learning_rate` at line 7 column 16; must be greater than 0, got 0 (typical for LoRA: 1e-4 to 3e-4)");
    assert_has(&errs, "invalid `lora_r` at line 8 column 9; the LoRA rank must be at least 1, got 0 (typical: 8–64)");
    assert_has(&errs, "invalid `lora_alpha` at line 9 column 13; must be greater than 0, got -16 (a common choice is 2 × lora_r)");
    assert_has(
        &errs,
        "invalid `lora_dropout` at line 10 column 15; must be in [0, 1), got 1 (typical: 0.0–0.1)",
    );
    assert_has(
        &errs,
        "invalid `micro_batch_size` at line 11 column 19; must be at least 1, got 0",
    );
    assert_has(
        &errs,
        "`warmup_steps` and `warmup_ratio` are both set at line 13 column 1; keep one of them",
    );
    assert_has(
        &errs,
        "invalid `val_set_size` at line 14 column 15; 1.5 is neither a fraction below 1 nor a whole number of samples; use e.g. 0.05 or 2",
    );
    assert_has(
        &errs,
        "invalid `save_total_limit` at line 15 column 19; 0 would delete every checkpoint; use at least 1, or remove the key to keep all",
    );
    // No length given: neither num_epochs nor max_steps.
    assert_has(
        &errs,
        "missing required key `num_epochs`; set `num_epochs` (e.g. 1) or `max_steps` (e.g. 300) so the run has a length",
    );
    assert_eq!(errs.len(), 11, "{errs:#?}");
}

#[test]
fn absurd_sizes_are_refused_naming_the_bound() {
    // `lora_r: 1000000000` once passed validation and aborted in `attach` on a 256 GB allocation.
    let d = data_dir();
    let yaml = GOOD.to_string()
        + "lora_r: 1000000000\nsequence_len: 100000000\nmicro_batch_size: 1000000\n";
    let errs = errors(d.path(), &yaml, &[]);
    assert_contains(&errs, &["invalid `lora_r`", "1000000000", "4096"]);
    assert_contains(&errs, &["invalid `sequence_len`", "100000000", "1048576"]);
    assert_contains(&errs, &["invalid `micro_batch_size`", "1000000", "65536"]);
}

#[test]
fn missing_required_keys() {
    let d = data_dir();
    let errs = errors(d.path(), "num_epochs: 1\n", &[]);
    assert_contains(&errs, &["missing required key `base_model`", "Hub repo id"]);
    assert_contains(&errs, &["missing required key `datasets`"]);
    assert_contains(&errs, &["missing required key `learning_rate`", "2e-4"]);
    let errs = errors(d.path(), "", &[]);
    assert_eq!(errs.len(), 4, "{errs:#?}");
    let errs = errors(
        d.path(),
        "base_model: model.gguf\nlearning_rate: 1e-4\nmax_steps: 5\ndatasets: []\n",
        &[],
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("`datasets` is empty at line 4 column 11; add at least one entry"),
        "{}",
        errs[0]
    );
    let errs = errors(
        d.path(),
        "base_model: model.gguf\nlearning_rate: 1e-4\nmax_steps: 5\ndatasets:\n  - type: alpaca\n  - path: train.jsonl\n",
        &[],
    );
    assert_has(&errs, "dataset entry `datasets.0` has no `path` at line 5 column 5; add `path:` with a file, a folder or a glob such as data/*.jsonl");
    assert_has(&errs, "dataset entry `datasets.1` has no `type` at line 6 column 5; add `type:` with one of alpaca, alpaca:chat, alpaca:chatml, alpaca:phi, chat_template, completion, text");
}

#[test]
fn yaml_syntax_error_has_position() {
    let d = data_dir();
    let errs = errors(
        d.path(),
        "base_model: x\ndatasets: [\n  - a\nlora_r: 8\n",
        &[],
    );
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("invalid YAML at line "), "{}", errs[0]);
    let errs = errors(d.path(), "lora_r: 8\nlora_r: 16\n", &[]);
    assert_eq!(errs, ["duplicate key `lora_r` at line 2 column 1; a key may appear only once in a mapping; keep one of them"]);
    let errs = errors(
        d.path(),
        "datasets:\n  - path: a.jsonl\n    type: text\n    path: b.jsonl\n",
        &[],
    );
    assert_eq!(errs, ["duplicate key `path` at line 4 column 5; a key may appear only once in a mapping; keep one of them"]);
    let errs = errors(d.path(), "- a\n- b\n", &[]);
    assert_contains(&errs, &["the config must be a mapping", "a list"]);
}

#[test]
fn defaults_are_axolotl_and_transformers_defaults() {
    let d = data_dir();
    let c = load_in(d.path(), GOOD, &[]).unwrap();
    // Axolotl defaults
    assert_eq!(c.sequence_len, 512);
    assert_eq!(c.micro_batch_size, 1);
    assert_eq!(c.gradient_accumulation_steps, 1);
    assert_eq!(c.lr_scheduler, ScheduleKind::Cosine);
    assert_eq!(c.bf16, Bf16::Auto);
    assert_eq!(c.val_set_size, 0.0);
    assert_eq!(c.output_dir, PathBuf::from("./model-out"));
    assert_eq!(c.chat_template, ChatTemplateName::TokenizerDefault);
    assert_eq!(c.truncation, Truncation::Drop);
    assert!(
        !c.train_on_inputs
            && !c.sample_packing
            && !c.gradient_checkpointing.is_on()
            && !c.merge_lora
    );
    // transformers / PEFT defaults
    assert_eq!((c.lora_r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
    assert_eq!(c.lora_init, LoraInit::Kaiming);
    assert_eq!(c.lora_targets(), None);
    assert_eq!(
        (c.adam_beta1, c.adam_beta2, c.adam_epsilon),
        (0.9, 0.999, 1e-8)
    );
    assert_eq!((c.weight_decay, c.max_grad_norm), (0.0, 1.0));
    assert_eq!(c.optimizer, Optimizer::AdamW);
    assert_eq!(c.seed, 42);
    assert_eq!(c.device, Device::Auto);
    assert_eq!(c.merged_shard_size.bytes, 5_000_000_000);
    assert_eq!(c.revision(), "main");
    assert_eq!(c.val_split(), ValSplit::None);
    assert_eq!(c.learning_rate, 2e-4);
    // Dataset defaults for chat_template (Axolotl's).
    let ds = &c.datasets[0];
    assert_eq!(ds.ds_type, Some(FileKind::Jsonl));
    assert_eq!(ds.field_messages.as_deref(), Some("messages"));
    let m = ds.message_property_mappings.as_ref().unwrap();
    assert_eq!(
        (m["role"].as_str(), m["content"].as_str()),
        ("role", "content")
    );
    assert_eq!(
        ds.roles_to_train.as_deref(),
        Some(&["assistant".to_string()][..])
    );
    assert_eq!(ds.train_on_eos, Some(TrainOnEos::Turn));
    assert_eq!(
        ds.roles.as_ref().unwrap()["user"],
        vec!["human".to_string(), "user".to_string()]
    );
    assert_eq!(
        ds.roles.as_ref().unwrap()["assistant"],
        vec!["gpt".to_string(), "assistant".to_string()]
    );
    assert!(ds.field_instruction.is_none());
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn dataset_types_get_their_field_defaults() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
learning_rate: 1e-4
max_steps: 10
datasets:
  - path: alpaca.csv
    type: alpaca
    field_output: answer
  - path: shards
    type: completion
    ds_type: parquet
  - path: shards/*.parquet
    type: text
    field: body
  - path: train.jsonl
    type: chat
    field_messages: conversations
    message_property_mappings: {role: from, content: value}
    roles_to_train: [assistant, tool]
    train_on_eos: all
";
    let c = load_in(d.path(), yaml, &[]).unwrap();
    let [a, comp, text, chat] = &c.datasets[..] else {
        panic!()
    };
    assert_eq!(a.kind, DataFormat::Alpaca);
    assert_eq!(a.ds_type, Some(FileKind::Csv));
    assert_eq!(
        (
            a.field_instruction.as_deref(),
            a.field_input.as_deref(),
            a.field_output.as_deref(),
            a.field_system.as_deref()
        ),
        (
            Some("instruction"),
            Some("input"),
            Some("answer"),
            Some("system")
        )
    );
    assert_eq!(
        (
            comp.field_prompt.as_deref(),
            comp.field_completion.as_deref()
        ),
        (Some("prompt"), Some("completion"))
    );
    assert_eq!(text.field_text.as_deref(), Some("body"));
    assert_eq!(text.ds_type, Some(FileKind::Parquet));
    assert_eq!(chat.kind, DataFormat::Chat);
    assert_eq!(chat.field_messages.as_deref(), Some("conversations"));
    let m = chat.message_property_mappings.as_ref().unwrap();
    assert_eq!(
        (m["role"].as_str(), m["content"].as_str()),
        ("from", "value")
    );
    assert_eq!(chat.train_on_eos, Some(TrainOnEos::All));
    // A folder and a glob expand to their files, sorted.
    let files = c.dataset_files(comp).unwrap();
    assert_eq!(
        files,
        vec![
            d.path().join("shards/a.parquet"),
            d.path().join("shards/b.parquet")
        ]
    );
    assert_eq!(c.dataset_files(text).unwrap().len(), 2);
}

#[test]
fn dataset_field_mistakes() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
learning_rate: 1e-4
max_steps: 10
datasets:
  - path: train.jsonl
    type: chat_template
    roles_to_train: [asistant]
    roles: {assistent: [gpt]}
    split: test
    field_instruction: q
  - path: data.txt
    type: text
  - path: someone/some-dataset
    type: alpaca
    ds_type: json
  - path: train.jsonl
    type: sharegpt
";
    let errs = errors(d.path(), yaml, &[]);
    assert_has(
        &errs,
        "invalid `datasets.0.roles_to_train.0` at line 7 column 22; roles_to_train names target roles: system, user, assistant, tool; did you mean `assistant`?",
    );
    assert_has(
        &errs,
        "unknown target role `assistent` at line 8 column 13; roles map onto system, user, assistant, tool; did you mean `assistant`?",
    );
    assert_has(
        &errs,
        "invalid `datasets.0.split` at line 9 column 12; local files have only the `train` split (got `test`); point `path` at the file you want, or slice it: train[:20%], train[100:200]",
    );
    assert_contains(
        &errs,
        &[
            "invalid `datasets.1.path` at line 11 column 11",
            "cannot tell the file format of `data.txt`",
            "ds_type",
        ],
    );
    assert_contains(
        &errs,
        &[
            "invalid `datasets.2.path` at line 13 column 11",
            "Hugging Face Hub is not supported",
        ],
    );
    assert_contains(
        &errs,
        &[
            "invalid `datasets.3.type` at line 17 column 11",
            "field_messages: conversations",
            "{role: from, content: value}",
        ],
    );
    // field_instruction on a chat dataset is a warning (it would be silently ignored otherwise).
    let ok = load_in(d.path(), "base_model: model.gguf\nlearning_rate: 1e-4\nmax_steps: 1\ndatasets:\n  - path: train.jsonl\n    type: chat_template\n    field_instruction: q\n", &[]).unwrap();
    let w: Vec<String> = ok.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(w, vec!["`datasets.0.field_instruction` has no effect at line 7 column 5; it does not apply to `type: chat_template`"]);
}

/// `use_tensorboard` / `report_to` turn the event files on; other trackers warn; an unknown one is an error.
#[test]
fn tensorboard_keys() {
    let d = data_dir();
    let c = load_in(d.path(), &format!("{GOOD}use_tensorboard: true\n"), &[]).unwrap();
    assert!(c.tensorboard());
    assert!(!load_in(d.path(), GOOD, &[]).unwrap().tensorboard());
    let c = load_in(
        d.path(),
        &format!("{GOOD}report_to: [wandb, tensorboard]\n"),
        &[],
    )
    .unwrap();
    assert!(c.tensorboard());
    let w: Vec<String> = c.warnings().iter().map(|w| w.to_string()).collect();
    assert_contains(
        &w,
        &[
            "`report_to` has no effect",
            "for wandb: only tensorboard is written",
        ],
    );
    let c = load_in(d.path(), &format!("{GOOD}report_to: none\n"), &[]).unwrap();
    assert!(!c.tensorboard() && c.warnings().is_empty());
    let errs = errors(d.path(), &format!("{GOOD}report_to: tensorbord\n"), &[]);
    assert_contains(
        &errs,
        &["invalid `report_to`", "unknown tracker `tensorbord`"],
    );
}

#[test]
fn axolotl_keys_loratune_does_not_implement() {
    let d = data_dir();
    let yaml = format!(
        "{GOOD}gptq: false\nstrict: false\nwandb_project: demo\nflash_attention: true\nrevision_of_model: v1.0\npeft_layers_to_transform: [0, 1]\n"
    );
    let c = load_in(d.path(), &yaml, &[]).unwrap();
    assert_eq!(c.base_model_revision.as_deref(), Some("v1.0"));
    assert_eq!(c.lora_layers_to_transform.as_ref().unwrap().0, vec![0, 1]);
    let w: Vec<String> = c.warnings().iter().map(|w| w.to_string()).collect();
    // Every Axolotl key without effect is named in one grouped line (the reasons are in configs/README.md); other
    // warnings stay on their own lines.
    assert_eq!(w.len(), 2, "{w:?}");
    assert_contains(
        &w,
        &["ignored: 4 Axolotl keys without effect in loratune: gptq, strict, wandb_project, flash_attention (configs/README.md says why for each)"],
    );
    assert_contains(&w, &["`base_model_revision` is ignored", "local path"]);

    let yaml =
        format!("{GOOD}gptq: true\nfp16: true\nlora_modules_to_save: [embed_tokens, norm]\n");
    let errs = errors(d.path(), &yaml, &[]);
    assert_contains(
        &errs,
        &[
            "unsupported key `gptq` at line 7 column 1",
            "GPTQ",
            "remove it",
        ],
    );
    assert_contains(
        &errs,
        &["unsupported key `fp16` at line 8 column 1", "bf16: true"],
    );
    assert_contains(
        &errs,
        &[
            "invalid `lora_modules_to_save.1` at line 9 column 38",
            "`norm` cannot be trained in full",
            "embed_tokens and lm_head",
        ],
    );
}

#[test]
fn overrides_apply_before_validation_and_are_named_in_errors() {
    let d = data_dir();
    let c = load_in(
        d.path(),
        GOOD,
        &[
            "lora_r=32",
            "lora_target_modules=[q_proj, v_proj]",
            "datasets.0.path=eval.jsonl",
            "bf16=false",
            "device=cpu",
        ],
    )
    .unwrap();
    assert_eq!(c.lora_r, 32);
    assert_eq!(
        c.lora_targets(),
        Some(TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()]))
    );
    assert_eq!(c.datasets[0].path, "eval.jsonl");
    assert_eq!(c.bf16, Bf16::False);
    assert_eq!(c.device, Device::Cpu);

    let errs = errors(
        d.path(),
        GOOD,
        &["lora_alpah=3", "lora_r=0", "datasets.0.path=nope.jsonl"],
    );
    assert_has(
        &errs,
        "unknown key `lora_alpah` (from --set lora_alpah=3); did you mean `lora_alpha`?",
    );
    assert_has(&errs, "invalid `lora_r` (from --set lora_r=0); the LoRA rank must be at least 1, got 0 (typical: 8–64)");
    assert_has(
        &errs,
        &format!("invalid `datasets.0.path` (from --set datasets.0.path=nope.jsonl); dataset file `{}/nope.jsonl` not found", d.path().display()),
    );
    // A new dataset appended by --set without a type.
    let errs = errors(d.path(), GOOD, &["datasets.1.path=eval.jsonl"]);
    assert_contains(
        &errs,
        &["dataset entry `datasets.1` has no `type` (from --set datasets.1.path=eval.jsonl)"],
    );
    // Malformed overrides.
    let errs = errors(d.path(), GOOD, &["lora_r"]);
    assert_contains(&errs, &["invalid override", "expected key=value"]);
    let errs = errors(d.path(), GOOD, &["datasets.7.path=x.jsonl"]);
    assert_contains(&errs, &["--set `datasets.7.path=x.jsonl`", "has 1 entries"]);
}

#[test]
fn resolved_config_round_trips_and_hash_is_stable() {
    let d = data_dir();
    let yaml = format!(
        "{GOOD}lora_target_modules: [q_proj, v_proj]\nlora_layers_to_transform: 1\nlora_init: gaussian\ntest_datasets:\n  - path: eval.jsonl\n    type: chat_template\nspecial_tokens:\n  pad_token: \"<pad>\"\nmerged_shard_size: 2GB\nwarmup_ratio: 0.05\n"
    );
    let c = load_in(d.path(), &yaml, &["seed=7"]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let written = c.write_resolved(out.path()).unwrap();
    assert_eq!(written, out.path().join("config.yaml"));
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(
        text.contains(&format!("# config_hash: {}", c.config_hash())),
        "{text}"
    );
    assert!(text.contains("# --set seed=7"));
    // Every key is written, defaults included.
    for k in [
        "sequence_len: 512",
        "lr_scheduler: cosine",
        "adam_beta2: 0.999",
        "seed: 7",
        "lora_init: gaussian",
        "merged_shard_size: 2GB",
    ] {
        assert!(text.contains(k), "resolved config lacks `{k}`:\n{text}");
    }
    // Loading the resolved file gives the same settings and hash.
    let again = load_in(d.path(), &text, &[]).unwrap();
    assert_eq!(again.to_yaml().unwrap(), c.to_yaml().unwrap());
    assert_eq!(again.config_hash(), c.config_hash());
    assert_eq!(again.datasets, c.datasets);
    assert!(again.warnings().is_empty(), "{:?}", again.warnings());

    // The hash follows the training settings but not where outputs go or how often they are written.
    let h = c.config_hash();
    assert_eq!(h.len(), 16);
    let same = load_in(
        d.path(),
        &yaml,
        &[
            "seed=7",
            "output_dir=elsewhere",
            "save_steps=5",
            "logging_steps=3",
            "device=cpu",
        ],
    )
    .unwrap();
    assert_eq!(same.config_hash(), h);
    for change in [
        "seed=8",
        "lora_r=9",
        "learning_rate=1e-4",
        "datasets.0.path=eval.jsonl",
        "max_steps=100",
    ] {
        let other = load_in(d.path(), &yaml, &["seed=7", change]).unwrap();
        assert_ne!(other.config_hash(), h, "{change} must change the hash");
    }
}

#[test]
fn chat_template_choices() {
    let d = data_dir();
    std::fs::write(
        d.path().join("tpl.jinja"),
        "{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let c = load_in(
        d.path(),
        &format!("{GOOD}chat_template_jinja: tpl.jinja\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.chat_template, ChatTemplateName::Jinja);
    assert_eq!(
        c.chat_template_choice(),
        ChatTemplateChoice::Jinja("{% for m in messages %}{{ m.content }}{% endfor %}".into())
    );
    let c = load_in(d.path(), &format!("{GOOD}chat_template: chatml\n"), &[]).unwrap();
    assert_eq!(
        c.chat_template_for(&c.datasets[0]),
        ChatTemplateChoice::Builtin(ChatTemplateName::Chatml)
    );
    let errs = errors(d.path(), &format!("{GOOD}chat_template: jinja\n"), &[]);
    assert_contains(
        &errs,
        &["`chat_template: jinja` needs `chat_template_jinja` at line 7 column 16"],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}chat_template: llama3\nchat_template_jinja: \"{{{{ x }}}}\"\n"),
        &[],
    );
    assert_contains(
        &errs,
        &["`chat_template_jinja` conflicts with `chat_template: llama3` at line 8 column 1"],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}chat_template_jinja: missing.jinja\n"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "invalid `chat_template_jinja` at line 7 column 22",
            "missing.jinja` not found",
        ],
    );
}

#[test]
fn learning_rate_forms_and_other_values() {
    let d = data_dir();
    // PyYAML reads 2e-4 as a string; Axolotl converts it, and so do we (quoted or not).
    for lr in ["2e-4", "\"2e-4\"", "0.0002", "2.0e-4"] {
        let c = load_in(
            d.path(),
            &GOOD.replace("learning_rate: 2e-4", &format!("learning_rate: {lr}")),
            &[],
        )
        .unwrap();
        assert!((c.learning_rate - 2e-4).abs() < 1e-18, "{lr}");
    }
    let c = load_in(d.path(), &format!("{GOOD}val_set_size: 0.1\n"), &[]).unwrap();
    assert_eq!(c.val_split(), ValSplit::Fraction(0.1));
    let c = load_in(
        d.path(),
        &format!("{GOOD}val_set_size: 200\ndevice: cpu\nbf16: true\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.val_split(), ValSplit::Count(200));
    assert_eq!(c.bf16, Bf16::True);
    let errs = errors(d.path(), &format!("{GOOD}val_set_size: 0.1\ntest_datasets:\n  - path: eval.jsonl\n    type: chat_template\n"), &[]);
    assert_contains(
        &errs,
        &["`test_datasets` and `val_set_size` are both set at line 8 column 1"],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}early_stopping_patience: 3\n"),
        &[],
    );
    assert_contains(
        &errs,
        &["`early_stopping_patience` needs an evaluation set at line 7 column 1"],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}lora_target_modules: \"(q|v_proj\"\n"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "invalid `lora_target_modules` at line 7 column 22",
            "not a valid regex",
        ],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}resume_from_checkpoint: runs/x/checkpoint-10\n"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "invalid `resume_from_checkpoint` at line 7 column 25",
            "does not exist",
        ],
    );
    let errs = errors(d.path(), &format!("{GOOD}merged_shard_size: 2 gigs\n"), &[]);
    assert_contains(
        &errs,
        &[
            "invalid `merged_shard_size` at line 7 column 20",
            "invalid size `2 gigs`",
        ],
    );
    let errs = errors(
        d.path(),
        &GOOD.replace("model.gguf", "models/absent.gguf"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "invalid `base_model` at line 1 column 13",
            "absent.gguf` not found",
        ],
    );
}

#[test]
fn model_and_data_checks_point_at_the_config() {
    let d = data_dir();
    let yaml = "\
base_model: model.gguf
datasets:
  - path: train.jsonl
    type: chat_template
learning_rate: 2e-4
num_epochs: 1
micro_batch_size: 8
gradient_accumulation_steps: 4
lora_target_modules:
  - q_proj
  - v_prj
  - gate
lora_layers_to_transform: [0, 5]
val_set_size: 10
";
    let c = load_in(d.path(), yaml, &[]).unwrap();
    let facts = ModelFacts {
        linear_modules: (0..2)
            .flat_map(|l| {
                [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                ]
                .map(|m| format!("model.layers.{l}.{m}"))
            })
            .collect(),
        num_layers: 2,
        max_position_embeddings: Some(128),
        has_chat_template: false,
    };
    let e = c.check_model(&facts).unwrap_err();
    let errs: Vec<String> = e.issues.iter().map(|i| i.to_string()).collect();
    assert_has(
        &errs,
        "invalid `lora_target_modules.1` at line 11 column 5; no module named `v_prj` in the model; this model's linear modules are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj; did you mean `v_proj`?",
    );
    assert_contains(
        &errs,
        &[
            "invalid `lora_target_modules.2` at line 12 column 5",
            "no module named `gate`",
            "did you mean `gate_proj`?",
        ],
    );
    assert_has(&errs, "invalid `lora_layers_to_transform` at line 13 column 27; layer 5 does not exist: the model has 2 layers (0..=1)");
    assert_contains(&errs, &["the base model has no chat template", "chatml"]);
    assert_eq!(errs.len(), 4, "{errs:#?}");

    // Good targets pass; the long sequence_len only warns.
    let ok = load_in(
        d.path(),
        yaml,
        &[
            "lora_target_modules=[q_proj, v_proj]",
            "lora_layers_to_transform=[1]",
            "chat_template=chatml",
        ],
    )
    .unwrap();
    let w = ok.check_model(&facts).unwrap();
    assert_eq!(w.len(), 1);
    assert!(
        w[0].to_string()
            .contains("`sequence_len` 512 is longer than the model's context (128)"),
        "{}",
        w[0]
    );
    // A regex must match full paths (PEFT's fullmatch).
    let re = load_in(
        d.path(),
        yaml,
        &[
            r"lora_target_modules=.*\.(q|v)_proj",
            "lora_layers_to_transform=[1]",
            "chat_template=chatml",
        ],
    )
    .unwrap();
    assert!(re.check_model(&facts).is_ok());
    let re = load_in(
        d.path(),
        yaml,
        &[
            "lora_target_modules=q_proj",
            "lora_layers_to_transform=[1]",
            "chat_template=chatml",
        ],
    )
    .unwrap();
    let e = re.check_model(&facts).unwrap_err().to_string();
    assert!(
        e.contains("the regex `q_proj` matches no module")
            && e.contains("(from --set lora_target_modules=q_proj)"),
        "{e}"
    );

    // Data: the batch is larger than the data, the eval split takes everything.
    let e = c
        .check_data(&DataFacts {
            train_samples: 5,
            eval_samples: 0,
            samples_before_split: 10,
            ..Default::default()
        })
        .unwrap_err();
    let errs: Vec<String> = e.issues.iter().map(|i| i.to_string()).collect();
    assert_has(
        &errs,
        "invalid `micro_batch_size` at line 7 column 19; micro_batch_size 8 is larger than the training set (5 samples); lower it to at most 5",
    );
    assert_has(&errs, "invalid `val_set_size` at line 14 column 15; 10 evaluation samples leave none for training: the dataset has 10 samples");
    let e = c
        .check_data(&DataFacts {
            train_samples: 20,
            eval_samples: 10,
            samples_before_split: 30,
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs micro_batch_size × gradient_accumulation_steps = 32 samples, but the training set has 20; lower gradient_accumulation_steps to at most 2"), "{e}");
    assert!(c
        .check_data(&DataFacts {
            train_samples: 40,
            eval_samples: 10,
            samples_before_split: 50,
            ..Default::default()
        })
        .is_ok());
}

/// Every example config parses and validates (files are not required: the models are fetched or downloaded
/// separately), so the examples never rot.
#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let opts = LoadOptions {
            check_files: false,
            base_dir: None,
            ..LoadOptions::default()
        };
        let c = TrainConfig::load_with(&path, &[], &opts).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            c.warnings().is_empty(),
            "{}: {:?}",
            path.display(),
            c.warnings()
        );
        assert!(!c.datasets.is_empty());
        for ds in &c.datasets {
            assert!(
                ds.path.starts_with("datasets/"),
                "{}: examples use the shipped dataset",
                path.display()
            );
        }
    }
    assert!(
        n >= 7,
        "expected the quickstart and six model configs in configs/, found {n}"
    );
}

/// configs/README.md documents every key (a test so the list cannot fall behind the struct).
#[test]
fn every_key_is_documented() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/README.md"))
            .unwrap();
    for k in TrainConfig::known_keys()
        .iter()
        .chain(DatasetConfig::known_keys())
    {
        assert!(
            readme.contains(&format!("`{k}`")),
            "configs/README.md does not document `{k}`"
        );
    }
}

/// The library keeps a config's problems structured: `TrainConfig::load` fails with `Error::ConfigFile`, every
/// issue with its key and position.
#[test]
fn config_errors_keep_their_structure() {
    let d = data_dir();
    let p = d.path().join("bad.yaml");
    let good = GOOD
        .replace(
            "model.gguf",
            &d.path().join("model.gguf").display().to_string(),
        )
        .replace(
            "train.jsonl",
            &d.path().join("train.jsonl").display().to_string(),
        );
    std::fs::write(&p, format!("{good}lora_alpah: 16\n")).unwrap();
    match TrainConfig::load(&p, &[]) {
        Err(loratune::Error::ConfigFile(e)) => {
            assert_eq!(e.issues.len(), 1, "{e}");
            assert_eq!(e.issues[0].key, "lora_alpah");
            assert!(e.issues[0].pos.is_some());
            assert!(e.to_string().contains("did you mean `lora_alpha`?"), "{e}");
        }
        other => panic!("expected Error::ConfigFile, got {other:?}"),
    }
}

#[test]
fn gradient_checkpointing_values() {
    use loratune::config::Checkpointing;
    let d = data_dir();
    for (v, want) in [
        ("true", Checkpointing::Layers),
        ("false", Checkpointing::Off),
        ("offload", Checkpointing::Offload),
    ] {
        let c = load_in(d.path(), GOOD, &[&format!("gradient_checkpointing={v}")]).unwrap();
        assert_eq!(c.gradient_checkpointing, want, "{v}");
    }
    let errs = errors(d.path(), GOOD, &["gradient_checkpointing=sometimes"]);
    assert_contains(
        &errs,
        &[
            "gradient_checkpointing",
            "expected true, false or offload, found `sometimes`",
        ],
    );
}

/// QLoRA keys: `adapter: qlora` and `load_in_4bit` give an NF4 base (double quantization by default, as
/// Axolotl's QLoRA), `load_in_8bit` int8 blocks, `base_quantization: dequantize` drops stored quantization;
/// contradictions and FP4 are errors naming the key.
#[test]
fn quantized_base_keys_resolve_to_a_load_plan() {
    use loratune::quant::{BasePlan, QuantScheme};
    let d = data_dir();
    let c = load_in(d.path(), GOOD, &[]).unwrap();
    assert_eq!(c.base_plan(), BasePlan::KEEP);
    let c = load_in(d.path(), &format!("{GOOD}adapter: qlora\n"), &[]).unwrap();
    let nf4 = |double| BasePlan {
        keep_stored: true,
        quantize: Some(QuantScheme::Nf4 { double }),
    };
    assert_eq!(c.base_plan(), nf4(true));
    let c = load_in(
        d.path(),
        &format!("{GOOD}load_in_4bit: true\nbnb_4bit_use_double_quant: false\nbnb_4bit_compute_dtype: bfloat16\nbnb_4bit_quant_type: nf4\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.base_plan(), nf4(false));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let c = load_in(
        d.path(),
        &format!("{GOOD}load_in_8bit: true\nbase_quantization: dequantize\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        c.base_plan(),
        BasePlan {
            keep_stored: false,
            quantize: Some(QuantScheme::Int8)
        }
    );
    let c = load_in(
        d.path(),
        &format!("{GOOD}bnb_4bit_use_double_quant: false\n"),
        &[],
    )
    .unwrap();
    let w: Vec<String> = c.warnings().iter().map(|w| w.to_string()).collect();
    assert_contains(
        &w,
        &[
            "`bnb_4bit_use_double_quant` has no effect",
            "not loaded in 4-bit",
        ],
    );

    let errs = errors(
        d.path(),
        &format!("{GOOD}adapter: qlora\nload_in_8bit: true\nbnb_4bit_quant_type: fp4\nbase_quantization: squash\n"),
        &[],
    );
    assert_contains(&errs, &["`load_in_8bit`", "remove `load_in_8bit`"]);
    assert_contains(&errs, &["`bnb_4bit_quant_type`", "FP4 is not implemented"]);
    assert_contains(
        &errs,
        &["`base_quantization`", "supported: keep, dequantize"],
    );
}

/// Axolotl keys loratune maps onto its own settings: what they become, and one note each.
#[test]
fn axolotl_mapped_keys_become_loratune_settings_with_a_note() {
    let d = data_dir();
    let yaml = format!(
        "{GOOD}optimizer: adamw_bnb_8bit\nattn_implementation: flash_attention_2\nbfloat16: true\n\
         micro_batch_size: 2\nbatch_size: 8\nadam_eps: 1.0e-5\nmodel_config:\n  output_router_logits: true\n\
         lora_r:\nlora_alpha:\nevals_per_epoch: 4\nsaves_per_epoch: 1\n"
    );
    let c = load_in(d.path(), &yaml, &["num_epochs=2"]).unwrap();
    assert_eq!(c.gradient_accumulation_steps, 4);
    assert_eq!(c.adam_epsilon, 1e-5);
    assert_eq!(c.bf16, loratune::config::Bf16::True);
    // Empty keys are unset: PEFT's defaults.
    assert_eq!((c.lora_r, c.lora_alpha), (8, 8.0));
    // Mixtral's default coefficient unless the model's config.json says otherwise.
    assert_eq!(c.router_aux_coef(None), Some(0.001));
    assert_eq!(c.router_aux_coef(Some(0.02)), Some(0.02));
    // 40 steps over 2 epochs: evaluate every ceil(40 / 8) = 5 steps, checkpoint every ceil(40 / 2) = 20.
    assert_eq!(c.eval_interval(40, 20), 5);
    assert_eq!(c.save_interval(40, 20), 20);
    let notes = c.notes().join("\n");
    for part in [
        "optimizer: adamw_bnb_8bit runs as exact AdamW",
        "attn_implementation: flash_attention_2 → loratune's own attention kernel",
        "bfloat16: true → bf16: true",
        "batch_size: 8 → gradient_accumulation_steps: 4",
        "output_router_logits: true → the router load-balancing loss",
    ] {
        assert!(notes.contains(part), "{part} not in\n{notes}");
    }
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    // Mistakes in mapped keys are errors at the key.
    let errs = errors(
        d.path(),
        &format!("{GOOD}attn_implementation: flash_attention2\nbatch_size: 3\nmicro_batch_size: 2\nmodel_config:\n  rope_theta: 1.0\nevals_per_epoch: 2\neval_steps: 5\n"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "invalid `attn_implementation`",
            "did you mean `flash_attention_2`?",
        ],
    );
    assert_contains(
        &errs,
        &["invalid `batch_size`", "multiple of micro_batch_size 2"],
    );
    assert_contains(
        &errs,
        &[
            "invalid `model_config`",
            "`rope_theta`",
            "only `output_router_logits",
        ],
    );
    assert_contains(&errs, &["`evals_per_epoch` and `eval_steps` are exclusive"]);
}

/// `--set key=null` removes a key (its default applies), and an unknown key points at the documented key list.
#[test]
fn set_null_removes_a_key_and_unknown_keys_point_at_the_docs() {
    let d = data_dir();
    let c = load_in(d.path(), &format!("{GOOD}lora_r: 32\n"), &["lora_r=null"]).unwrap();
    assert_eq!(c.lora_r, 8);
    let errs = errors(d.path(), &format!("{GOOD}frobnicate_the_weights: 3\n"), &[]);
    assert_contains(
        &errs,
        &["unknown key `frobnicate_the_weights`", "configs/README.md"],
    );
    let errs = errors(d.path(), &format!("{GOOD}lora_alpah: 3\n"), &[]);
    assert_contains(
        &errs,
        &["unknown key `lora_alpah`", "did you mean `lora_alpha`?"],
    );
}

/// LoRA+: each parameter's learning rate and weight decay equal the groups of PEFT's `create_loraplus_optimizer`
/// (tests/fixtures/adapters/loraplus_groups.json, scripts/reference/loraplus_fixture.py) for LoRA on every linear
/// layer of the tiny Llama.
#[test]
fn loraplus_groups_are_pefts() {
    use loratune::lora::adapter::{attach, lora_params};
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture("adapters/loraplus_groups.json")).unwrap(),
    )
    .unwrap();
    let d = data_dir();
    let c = load_in(
        d.path(),
        &format!("{GOOD}loraplus_lr_ratio: 16\nweight_decay: 0.01\nlora_target_linear: true\nlora_r: 4\n"),
        &["learning_rate=2.0e-4"],
    )
    .unwrap();
    let dir = crate::common::fixture("models/llama");
    let cfg = loratune::model::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = loratune::model::SafetensorsSource::open(&dir).unwrap();
    let mut m = loratune::model::CausalLm::<burn::backend::Flex>::load(
        cfg.clone(),
        &src,
        &Default::default(),
        burn::tensor::DType::F32,
    )
    .unwrap();
    attach(&mut m, &c.lora_settings(cfg.family)).unwrap();
    let keys: Vec<String> = lora_params(&m).into_iter().map(|(k, _)| k).collect();
    let params = want["params"].as_object().unwrap();
    assert_eq!(keys.len(), params.len());
    for (k, mult) in keys.iter().zip(c.lr_multipliers(&keys)) {
        let g = &params[k.as_str()];
        let lr = c.learning_rate * mult;
        assert!(
            (lr - g["lr"].as_f64().unwrap()).abs() < 1e-12,
            "{k}: {lr} vs {g}"
        );
        assert_eq!(
            c.adamw().weight_decay,
            g["weight_decay"].as_f64().unwrap(),
            "{k}"
        );
    }
    assert!(
        c.notes()
            .iter()
            .any(|n| n.contains("weight_decay 0.01 is not applied")),
        "{:?}",
        c.notes()
    );
}

/// `peft_layers_pattern` (PEFT's `layers_pattern`) must name the model's layer list, and needs
/// `peft_layers_to_transform`.
#[test]
fn layers_pattern_names_the_models_layer_list() {
    let d = data_dir();
    let facts = |prefix: &str| ModelFacts {
        linear_modules: (0..2)
            .flat_map(|l| {
                ["self_attn.q_proj", "mlp.down_proj"].map(|m| format!("{prefix}.{l}.{m}"))
            })
            .collect(),
        num_layers: 2,
        max_position_embeddings: Some(2048),
        has_chat_template: true,
    };
    let c = load_in(
        d.path(),
        &format!("{GOOD}peft_layers_to_transform: [1]\npeft_layers_pattern: layers\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.lora_layers_pattern, Some(vec!["layers".to_string()]));
    assert!(c.check_model(&facts("model.layers")).is_ok());
    let err = c
        .check_model(&facts("transformer.h"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("this model's layer list is `h`, not `layers`"),
        "{err}"
    );
    let c = load_in(
        d.path(),
        &format!("{GOOD}peft_layers_to_transform: [1]\npeft_layers_pattern: [h, layers]\n"),
        &[],
    )
    .unwrap();
    assert!(c.check_model(&facts("transformer.h")).is_ok());
    let errs = errors(
        d.path(),
        &format!("{GOOD}peft_layers_pattern: layers\n"),
        &[],
    );
    assert_contains(
        &errs,
        &["`peft_layers_pattern` needs `lora_layers_to_transform`"],
    );
}

#[test]
fn pissa_and_olora_keys() {
    use loratune::config::BaseQuantization;
    let d = data_dir();
    // PEFT's and Axolotl's spellings; pissa_niter_K reads as pissa; a stored-quantized base is dequantized.
    for (yaml, want) in [
        ("lora_init: pissa\n", LoraInit::Pissa),
        ("peft_init_lora_weights: olora\n", LoraInit::Olora),
        ("init_lora_weights: pissa_niter_4\n", LoraInit::Pissa),
        ("lora_init: gaussian\n", LoraInit::Gaussian),
    ] {
        let c = load_in(d.path(), &format!("{GOOD}{yaml}"), &[]).unwrap();
        assert_eq!(c.lora_init, want, "{yaml}");
        let dense = want.is_principal();
        assert_eq!(
            c.base_quantization == BaseQuantization::Dequantize,
            dense,
            "{yaml}"
        );
    }
    let errs = errors(
        d.path(),
        &format!("{GOOD}lora_init: pissa\nbase_quantization: keep\n"),
        &[],
    );
    assert_contains(&errs, &["base_quantization", "W − s·B·A", "dequantize"]);
    let errs = errors(
        d.path(),
        &format!("{GOOD}peft_init_lora_weights: olora\nload_in_4bit: true\n"),
        &[],
    );
    assert_contains(&errs, &["peft_init_lora_weights", "olora", "load_in_4bit"]);
    let errs = errors(
        d.path(),
        &format!("{GOOD}lora_init: pissa\npeft_use_dora: true\n"),
        &[],
    );
    assert_contains(&errs, &["lora_init", "DoRA", "choose one"]);
    let errs = errors(d.path(), &format!("{GOOD}lora_init: loftq\n"), &[]);
    assert_contains(&errs, &["lora_init", "loftq", "pissa", "olora"]);
}

#[test]
fn eval_generate_block() {
    let d = data_dir();
    std::fs::write(
        d.path().join("held.jsonl"),
        "{\"question\": \"q\", \"expected_facts\": [\"a\"]}\n",
    )
    .unwrap();
    let c = load_in(
        d.path(),
        &format!("{GOOD}eval_generate:\n  path: held.jsonl\n  metrics: [exact, regex]\n  at_eval_steps: true\n"),
        &[],
    )
    .unwrap();
    let eg = c.eval_generate.clone().unwrap();
    assert_eq!(eg.metrics.len(), 2);
    assert!(eg.at_eval_steps);
    assert_eq!(
        (eg.prompt_field.as_str(), eg.answer_field.as_str()),
        ("question", "expected_facts")
    );
    assert_eq!((eg.max_new_tokens, eg.batch_size), (128, 8));
    // Mistakes inside the block name the nested key.
    let errs = errors(
        d.path(),
        &format!("{GOOD}eval_generate:\n  path: held.jsonl\n  max_new_tokenz: 4\n"),
        &[],
    );
    assert_contains(
        &errs,
        &[
            "`max_new_tokenz` at line 9 column 3",
            "did you mean `max_new_tokens`",
        ],
    );
    let errs = errors(
        d.path(),
        &format!("{GOOD}eval_generate:\n  path: missing.jsonl\n  metrics: []\n"),
        &[],
    );
    assert_contains(&errs, &["eval_generate.path", "missing.jsonl", "not found"]);
    assert_contains(&errs, &["eval_generate.metrics", "empty"]);
    let errs = errors(
        d.path(),
        &format!("{GOOD}eval_generate:\n  path: held.jsonl\n  metrics: [bleu]\n"),
        &[],
    );
    assert_contains(&errs, &["eval_generate.metrics", "bleu"]);
    let errs = errors(
        d.path(),
        &format!("{GOOD}eval_generate:\n  metrics: [f1]\n"),
        &[],
    );
    assert_contains(&errs, &["eval_generate.path"]);
    let errs = errors(d.path(), &format!("{GOOD}eval_generate: held.jsonl\n"), &[]);
    assert_contains(
        &errs,
        &["eval_generate", "expected a mapping such as `path: "],
    );
    // Written with nothing under it: unset.
    let c = load_in(d.path(), &format!("{GOOD}eval_generate:\n"), &[]).unwrap();
    assert!(c.eval_generate.is_none());
}
