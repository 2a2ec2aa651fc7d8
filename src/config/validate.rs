//! Defaults that depend on other keys, and the semantic checks that run before any model is loaded, plus
//! the later checks that need the model ([`TrainConfig::check_model`]) or the data ([`TrainConfig::check_data`]).

use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::issues::{finalize, Issue, LoadOptions, Purpose};
use super::suggest::did_you_mean;
use super::yaml::{KeyPath, Target};
use super::{
    ChatTemplateName, ConfigErrors, ConfigIssue, DataFormat, DatasetConfig, FileKind, TargetSpec,
    TrainConfig, TrainOnEos, ValSplit,
};
use crate::data::{DataFacts, DataOptions};
use crate::lora::LoraSettings;

/// The target roles a chat dataset can map to.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

fn present(doc: &Mapping, key: &str) -> bool {
    doc.get(key).is_some_and(|v| !v.is_null())
}

fn k(key: &str) -> KeyPath {
    KeyPath::root().key(key)
}

fn finite(x: f64) -> bool {
    x.is_finite()
}

/// Above this learning rate a config gets a warning (not a refusal): AdamW's step is ~lr per weight, so at
/// 1e-1 a LoRA factor moves by its own magnitude every step.
pub(crate) const IMPLAUSIBLE_LR: f64 = 0.1;

/// Fill type-dependent defaults and check every value. `doc` is the document after overrides (to tell
/// "absent" from "default"); issues on keys that already failed the schema check are filtered by the caller.
pub(crate) fn resolve_and_validate(
    cfg: &mut TrainConfig,
    doc: &Mapping,
    opts: &LoadOptions,
    issues: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) {
    let base = |p: &str| -> PathBuf {
        let p = Path::new(p);
        match &opts.base_dir {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        }
    };

    // ---------------------------------------------------------------------------------------- model
    if !present(doc, "base_model") || cfg.base_model.trim().is_empty() {
        issues.push(Issue::missing(
            k("base_model"),
            "set it to a Hub repo id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), a local model folder, a .gguf file or an Ollama model (ollama://llama3.2:1b)",
        ));
    } else {
        match crate::hub::BaseModelRef::classify(
            &cfg.base_model,
            opts.base_dir.as_deref(),
            opts.check_files,
        ) {
            Ok(r) => {
                let why = match r {
                    crate::hub::BaseModelRef::Hub { .. } => None,
                    crate::hub::BaseModelRef::Ollama(_) => {
                        Some("base_model is an Ollama model; its tag picks the version")
                    }
                    _ => Some("base_model is a local path, not a Hub repo id"),
                };
                if let (Some(why), true) = (why, cfg.base_model_revision.is_some()) {
                    warnings.push(Issue::key(
                        k("base_model_revision"),
                        "`base_model_revision` is ignored",
                        Some(why.into()),
                    ));
                }
            }
            Err(msg) => issues.push(Issue::invalid(k("base_model"), msg)),
        }
    }
    if let Some(rev) = &cfg.base_model_revision {
        if rev.trim().is_empty() {
            let key = if doc.contains_key("revision_of_model") {
                "revision_of_model"
            } else {
                "base_model_revision"
            };
            issues.push(Issue::invalid(
                k(key),
                "the revision is empty; remove the key to use `main`",
            ));
        }
    }

    // ------------------------------------------------------------------------------------- datasets
    let example = "add at least one entry, e.g.\n      datasets:\n        - path: data/train.jsonl\n          type: chat_template";
    if !present(doc, "datasets") {
        issues.push(Issue::missing(k("datasets"), example));
    } else if cfg.datasets.is_empty() {
        issues.push(Issue::value(k("datasets"), "`datasets` is empty", example));
    }
    let raw_entries = |key: &str| -> Vec<Mapping> {
        match doc.get(key) {
            Some(Value::Sequence(s)) => s
                .iter()
                .map(|e| match e {
                    Value::Mapping(m) => m.clone(),
                    _ => Mapping::new(),
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    for (list_key, list) in [
        ("datasets", raw_entries("datasets")),
        ("test_datasets", raw_entries("test_datasets")),
    ] {
        let entries = if list_key == "datasets" {
            &mut cfg.datasets
        } else {
            &mut cfg.test_datasets
        };
        for (i, ds) in entries.iter_mut().enumerate() {
            let raw = list.get(i).cloned().unwrap_or_default();
            let p = k(list_key).index(i);
            validate_dataset(ds, &raw, &p, opts, &base, issues, warnings);
        }
    }
    if let Err(m) = ValSplit::from_size(cfg.val_set_size) {
        issues.push(Issue::invalid(k("val_set_size"), m));
    }
    if cfg.val_set_size > 0.0 && present(doc, "test_datasets") && !cfg.test_datasets.is_empty() {
        issues.push(Issue::key(
            k("test_datasets"),
            "`test_datasets` and `val_set_size` are both set",
            Some("use one evaluation set: remove val_set_size (or set it to 0) to evaluate on test_datasets".into()),
        ));
    }

    // -------------------------------------------------------------------------------- chat template
    resolve_template(
        &mut cfg.chat_template,
        &mut cfg.chat_template_jinja,
        doc.get("chat_template").is_some_and(|v| !v.is_null()),
        &KeyPath::root(),
        opts,
        &base,
        issues,
    );

    if let Err(m) = DataOptions::check_sequence_len(cfg.sequence_len) {
        issues.push(Issue::invalid(k("sequence_len"), m));
    }
    for (key, tok) in [
        ("bos_token", &cfg.special_tokens.bos_token),
        ("eos_token", &cfg.special_tokens.eos_token),
        ("pad_token", &cfg.special_tokens.pad_token),
        ("unk_token", &cfg.special_tokens.unk_token),
    ] {
        if tok.as_deref().is_some_and(str::is_empty) {
            issues.push(Issue::invalid(
                k("special_tokens").key(key),
                "the token text is empty; remove the key to keep the tokenizer's",
            ));
        }
    }

    // ------------------------------------------------------------------------------------------ LoRA
    for (key, check) in [
        ("lora_r", LoraSettings::check_rank(cfg.lora_r)),
        ("lora_alpha", LoraSettings::check_alpha(cfg.lora_alpha)),
        (
            "lora_dropout",
            LoraSettings::check_dropout(cfg.lora_dropout),
        ),
    ] {
        if let Err(m) = check {
            issues.push(Issue::invalid(k(key), m));
        }
    }
    for (i, m) in cfg.lora_modules_to_save.iter().enumerate() {
        if crate::lora::adapter::SavedModule::parse(m).is_none() {
            issues.push(Issue::invalid(
                k("lora_modules_to_save").index(i),
                format!(
                    "`{m}` cannot be trained in full: loratune's modules_to_save are embed_tokens and lm_head (train                      other modules with LoRA: lora_target_modules)"
                ),
            ));
        }
    }
    if cfg.lora_init.is_principal() {
        let key = ["peft_init_lora_weights", "init_lora_weights"]
            .into_iter()
            .find(|a| present(doc, a))
            .unwrap_or("lora_init");
        let name = cfg.lora_init.name();
        if let Err(m) = LoraSettings::check_init(cfg.lora_init, cfg.peft_use_dora) {
            issues.push(Issue::invalid(k(key), m));
        }
        if cfg.base_plan().quantize.is_some() {
            issues.push(Issue::invalid(
                k(key),
                format!(
                    "{name} replaces each adapted base weight by W − s·B·A, which a 4/8-bit base cannot hold; drop \
                     load_in_4bit / load_in_8bit / adapter: qlora, or use lora_init: true"
                ),
            ));
        }
        // A base stored quantized (GGUF, NF4) is dequantized at load: the residual must be dense.
        if !present(doc, "base_quantization") {
            cfg.base_quantization = super::BaseQuantization::Dequantize;
        } else if cfg.base_quantization == super::BaseQuantization::Keep {
            issues.push(Issue::invalid(
                k("base_quantization"),
                format!(
                    "keep: {name} replaces each adapted base weight by W − s·B·A, which a quantized format cannot \
                     hold; use base_quantization: dequantize (the default with {name}) or lora_init: true"
                ),
            ));
        }
    }
    match &cfg.lora_target_modules {
        Some(super::TargetModules::List(v)) => {
            if v.is_empty() {
                issues.push(Issue::invalid(
                    k("lora_target_modules"),
                    "the list is empty; name modules (e.g. [q_proj, v_proj]), or use lora_target_linear: true",
                ));
            }
            for (i, name) in v.iter().enumerate() {
                if name.trim().is_empty() {
                    issues.push(Issue::invalid(
                        k("lora_target_modules").index(i),
                        "empty module name",
                    ));
                }
            }
        }
        Some(super::TargetModules::Pattern(p)) if !p.eq_ignore_ascii_case("all-linear") => {
            if let Err(e) = regex::Regex::new(&format!("^(?:{p})$")) {
                issues.push(Issue::invalid(
                    k("lora_target_modules"),
                    format!("a single string is `all-linear` or a regular expression, and this is not a valid regex: {e}"),
                ));
            }
        }
        _ => {}
    }
    if cfg.lora_target_linear && cfg.lora_target_modules.is_some() {
        warnings.push(Issue::key(
            k("lora_target_modules"),
            "`lora_target_modules` has no effect",
            Some("lora_target_linear: true already adapts every linear layer".into()),
        ));
    }
    if let Some(layers) = &cfg.lora_layers_to_transform {
        let key = if doc.contains_key("peft_layers_to_transform") {
            "peft_layers_to_transform"
        } else {
            "lora_layers_to_transform"
        };
        if layers.0.is_empty() {
            issues.push(Issue::invalid(
                k(key),
                "the list is empty; remove the key to adapt every layer",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for l in &layers.0 {
            if !seen.insert(*l) {
                issues.push(Issue::invalid(k(key), format!("layer {l} is listed twice")));
            }
        }
    }

    // -------------------------------------------------------------------------------------- training
    map_axolotl(cfg, doc, issues);
    for (key, n) in [
        ("micro_batch_size", cfg.micro_batch_size),
        (
            "gradient_accumulation_steps",
            cfg.gradient_accumulation_steps,
        ),
    ] {
        if let Err(m) = DataOptions::check_count(n) {
            issues.push(Issue::invalid(k(key), m));
        }
    }
    let training = opts.purpose == Purpose::Train;
    match (cfg.num_epochs, cfg.max_steps) {
        (None, None) if training => issues.push(Issue::missing(
            k("num_epochs"),
            "set `num_epochs` (e.g. 1) or `max_steps` (e.g. 300) so the run has a length",
        )),
        (Some(e), _) if !(e > 0.0 && finite(e)) => issues.push(Issue::invalid(
            k("num_epochs"),
            format!("must be greater than 0, got {e}"),
        )),
        _ => {}
    }
    // ------------------------------------------------------------------------------- quantized base
    let four_bit = cfg.load_in_4bit || cfg.adapter == crate::config::Adapter::Qlora;
    if cfg.load_in_8bit && four_bit {
        issues.push(Issue::key(
            k("load_in_8bit"),
            "`load_in_8bit` and a 4-bit base are both asked for",
            Some(if cfg.adapter == crate::config::Adapter::Qlora {
                "`adapter: qlora` loads the base in 4-bit NF4; remove `load_in_8bit` (or use `adapter: lora` with it)".into()
            } else {
                "keep one of `load_in_4bit` and `load_in_8bit`".into()
            }),
        ));
    }
    if !four_bit {
        // A resolved config lists every key with its default: only a changed setting is worth a warning.
        let d = TrainConfig::default();
        for (key, changed) in [
            (
                "bnb_4bit_quant_type",
                cfg.bnb_4bit_quant_type != d.bnb_4bit_quant_type,
            ),
            (
                "bnb_4bit_use_double_quant",
                cfg.bnb_4bit_use_double_quant != d.bnb_4bit_use_double_quant,
            ),
            (
                "bnb_4bit_compute_dtype",
                cfg.bnb_4bit_compute_dtype.is_some(),
            ),
        ] {
            if present(doc, key) && changed {
                warnings.push(Issue::key(
                    k(key),
                    format!("`{key}` has no effect"),
                    Some("the base is not loaded in 4-bit (`load_in_4bit: true` or `adapter: qlora`)".into()),
                ));
            }
        }
    }
    if cfg.max_steps == Some(0) {
        issues.push(Issue::invalid(k("max_steps"), "must be at least 1, got 0"));
    }
    if let Some(r) = &cfg.report_to {
        for name in r.names() {
            if !super::ReportTo::KNOWN.contains(&name) {
                issues.push(Issue::invalid(
                    k("report_to"),
                    format!(
                        "unknown tracker `{name}`; use tensorboard (event files in output_dir/runs) or none"
                    ),
                ));
            }
        }
        let others: Vec<&str> = r
            .names()
            .filter(|n| !["tensorboard", "all", "none"].contains(n))
            .collect();
        if !others.is_empty() {
            warnings.push(Issue::key(
                k("report_to"),
                "`report_to` has no effect",
                Some(format!(
                    "for {}: only tensorboard is written (output_dir/runs); metrics also go to output_dir/metrics.jsonl",
                    others.join(", ")
                )),
            ));
        }
    }
    if cfg.num_epochs.is_some() && cfg.max_steps.is_some() {
        warnings.push(Issue::key(
            k("num_epochs"),
            "`num_epochs` has no effect",
            Some("max_steps is also set and takes precedence (as in transformers)".into()),
        ));
    }
    if !present(doc, "learning_rate") {
        if training {
            issues.push(Issue::missing(
                k("learning_rate"),
                "set the peak learning rate, e.g. 2e-4 for LoRA",
            ));
        }
    } else if !(cfg.learning_rate > 0.0 && finite(cfg.learning_rate)) {
        issues.push(Issue::invalid(
            k("learning_rate"),
            format!(
                "must be greater than 0, got {} (typical for LoRA: 1e-4 to 3e-4)",
                cfg.learning_rate
            ),
        ));
    } else if cfg.learning_rate > IMPLAUSIBLE_LR {
        warnings.push(Issue::value(
            k("learning_rate"),
            "the learning rate is implausibly high",
            format!(
                "{} is above {IMPLAUSIBLE_LR}: AdamW at this rate usually diverges, or drives the loss to ln(vocab) \
                 and the gradients to 0 (typical for LoRA: 1e-4 to 3e-4); training goes on as asked",
                cfg.learning_rate
            ),
        ));
    }
    if cfg.warmup_steps.is_some() && cfg.warmup_ratio.is_some() {
        issues.push(Issue::key(
            k("warmup_ratio"),
            "`warmup_steps` and `warmup_ratio` are both set",
            Some("keep one of them".into()),
        ));
    }
    if let Some(r) = cfg.warmup_ratio {
        if !(0.0..1.0).contains(&r) {
            issues.push(Issue::invalid(
                k("warmup_ratio"),
                format!("must be in [0, 1), got {r}"),
            ));
        }
    }
    if let (Some(w), Some(m)) = (cfg.warmup_steps, cfg.max_steps) {
        if w >= m && m > 0 {
            warnings.push(Issue::value(
                k("warmup_steps"),
                "`warmup_steps` covers the whole run",
                format!(
                    "{w} warmup steps ≥ max_steps {m}: the learning rate never reaches its peak"
                ),
            ));
        }
    }
    if let Some(r) = cfg.cosine_min_lr_ratio {
        if !(0.0..=1.0).contains(&r) {
            issues.push(Issue::invalid(
                k("cosine_min_lr_ratio"),
                format!("must be in [0, 1], got {r}"),
            ));
        } else if cfg.lr_scheduler != super::ScheduleKind::Cosine {
            warnings.push(Issue::key(
                k("cosine_min_lr_ratio"),
                "`cosine_min_lr_ratio` has no effect",
                Some(format!(
                    "lr_scheduler is `{}`, not `cosine`",
                    cfg.lr_scheduler
                )),
            ));
        }
    }
    if !(cfg.weight_decay >= 0.0 && finite(cfg.weight_decay)) {
        issues.push(Issue::invalid(
            k("weight_decay"),
            format!("must be ≥ 0, got {}", cfg.weight_decay),
        ));
    }
    if !(cfg.max_grad_norm >= 0.0 && finite(cfg.max_grad_norm)) {
        issues.push(Issue::invalid(
            k("max_grad_norm"),
            format!(
                "must be ≥ 0 (0 disables clipping), got {}",
                cfg.max_grad_norm
            ),
        ));
    }
    if let Some(c) = cfg.router_aux_loss_coef {
        if !(c >= 0.0 && finite(c)) {
            issues.push(Issue::invalid(
                k("router_aux_loss_coef"),
                format!("must be ≥ 0 (0 turns the balancing loss off), got {c}"),
            ));
        }
    }
    for (key, b) in [
        ("adam_beta1", cfg.adam_beta1),
        ("adam_beta2", cfg.adam_beta2),
    ] {
        if !(0.0..1.0).contains(&b) {
            issues.push(Issue::invalid(
                k(key),
                format!("must be in [0, 1), got {b}"),
            ));
        }
    }
    if !(cfg.adam_epsilon > 0.0 && finite(cfg.adam_epsilon)) {
        issues.push(Issue::invalid(
            k("adam_epsilon"),
            format!("must be greater than 0, got {}", cfg.adam_epsilon),
        ));
    }
    if let Some(why) = cfg.device.unavailable() {
        issues.push(Issue::invalid(k("device"), why));
    }
    if let Some(d) = &cfg.devices {
        if let Some(why) = d.problem() {
            issues.push(Issue::invalid(k("devices"), why));
        }
        if present(doc, "device") && cfg.device != crate::config::Device::Auto {
            issues.push(Issue::invalid(
                k("device"),
                format!(
                    "`devices` lists where the peers run; remove `device: {}` (or set it to auto)",
                    cfg.device
                ),
            ));
        }
    }
    if cfg.nodes == 0 {
        issues.push(Issue::invalid(k("nodes"), "must be at least 1"));
    } else if cfg.node_rank >= cfg.nodes {
        issues.push(Issue::invalid(
            k("node_rank"),
            format!(
                "must be in 0..{} (nodes: {}), got {}",
                cfg.nodes, cfg.nodes, cfg.node_rank
            ),
        ));
    }
    match &cfg.coordinator {
        Some(c) => {
            if let Err(why) = crate::train::parallel::parse_host_port(c) {
                issues.push(Issue::invalid(k("coordinator"), why));
            }
        }
        None if cfg.nodes > 1 => issues.push(Issue::invalid(
            k("nodes"),
            "several nodes need `coordinator: host:port` (node 0's address and a free port; node 0 starts \
             burn-collective's orchestrator there)",
        )),
        None => {}
    }
    if cfg.ddp_timeout == 0 {
        issues.push(Issue::invalid(
            k("ddp_timeout"),
            "must be at least 1 second",
        ));
    }

    // ------------------------------------------------------------------------------ outputs & checkpoints
    for (key, v) in [
        ("save_steps", cfg.save_steps),
        ("eval_steps", cfg.eval_steps),
        ("logging_steps", cfg.logging_steps),
    ] {
        if v == Some(0) {
            issues.push(Issue::invalid(
                k(key),
                "must be at least 1, got 0 (remove the key for the default)",
            ));
        }
    }
    if cfg.save_total_limit == Some(0) {
        issues.push(Issue::invalid(
            k("save_total_limit"),
            "0 would delete every checkpoint; use at least 1, or remove the key to keep all",
        ));
    }
    if cfg.early_stopping_patience == Some(0) {
        issues.push(Issue::invalid(
            k("early_stopping_patience"),
            "must be at least 1, got 0",
        ));
    }
    if cfg.early_stopping_patience.is_some() && !cfg.has_eval_set() {
        issues.push(Issue::key(
            k("early_stopping_patience"),
            "`early_stopping_patience` needs an evaluation set",
            Some("set val_set_size (e.g. 0.05) or test_datasets".into()),
        ));
    }
    if cfg.eval_steps.is_some() && !cfg.has_eval_set() {
        warnings.push(Issue::key(
            k("eval_steps"),
            "`eval_steps` has no effect",
            Some(
                "there is no evaluation set (val_set_size is 0 and test_datasets is empty)".into(),
            ),
        ));
    }
    if cfg.output_dir.as_os_str().is_empty() {
        issues.push(Issue::invalid(k("output_dir"), "the path is empty"));
    } else if opts.check_files {
        let out = base(&cfg.output_dir.to_string_lossy());
        if out.is_file() {
            issues.push(Issue::invalid(
                k("output_dir"),
                format!("`{}` is a file; output_dir must be a folder", out.display()),
            ));
        }
    }
    if let Some(eg) = &cfg.eval_generate {
        let p = k("eval_generate");
        if eg.path.trim().is_empty() {
            issues.push(Issue::missing(
                p.key("path"),
                "set it to a JSONL file of held-out questions (e.g. datasets/nimbrel/heldout.jsonl)",
            ));
        } else if opts.check_files && !base(&eg.path).is_file() {
            issues.push(Issue::invalid(
                p.key("path"),
                format!("file `{}` not found", base(&eg.path).display()),
            ));
        }
        if eg.metrics.is_empty() {
            issues.push(Issue::invalid(
                p.key("metrics"),
                "the list is empty; name at least one of exact, contains, regex, f1",
            ));
        }
        for (key, v) in [
            ("max_new_tokens", eg.max_new_tokens),
            ("batch_size", eg.batch_size),
        ] {
            if v == 0 {
                issues.push(Issue::invalid(p.key(key), "must be at least 1"));
            }
        }
    }
    if let Some(ck) = &cfg.resume_from_checkpoint {
        let path = base(&ck.to_string_lossy());
        if opts.check_files && !path.is_dir() {
            issues.push(Issue::invalid(
                k("resume_from_checkpoint"),
                format!("checkpoint folder `{}` does not exist", path.display()),
            ));
        }
        if cfg.auto_resume_from_checkpoints {
            warnings.push(Issue::key(
                k("auto_resume_from_checkpoints"),
                "`auto_resume_from_checkpoints` has no effect",
                Some("resume_from_checkpoint names the checkpoint explicitly".into()),
            ));
        }
    }
}

/// transformers' `attn_implementation` values (and Axolotl's extra ones).
const ATTN_IMPLEMENTATIONS: &[&str] = &[
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "xformers",
    "s2",
    "sage",
];

/// Axolotl keys loratune maps onto its own settings ([`super::axolotl`]'s "mapped" class): apply them, check
/// them, and say in one note each what they became.
fn map_axolotl(cfg: &mut TrainConfig, doc: &Mapping, issues: &mut Vec<Issue>) {
    let mut notes = Vec::new();
    if !present(doc, "adapter") {
        notes.push(
            "no `adapter` key: Axolotl would fine-tune the whole model; loratune trains LoRA adapters (adapter: lora)"
                .into(),
        );
    }
    if let Some(name) = doc.get("optimizer").and_then(Value::as_str) {
        if super::names::LOW_BIT_ADAMW.contains(&name) {
            notes.push(format!(
                "optimizer: {name} runs as exact AdamW with f32 moments: LoRA's optimizer state is 8 bytes per \
                 trainable parameter (671 MB for r=32 on every linear layer of an 8B Llama, 84M parameters; \
                 8-bit moments would save 0.5 GB of it and round every update)"
            ));
        }
    }
    if let Some(a) = &cfg.attn_implementation {
        if ATTN_IMPLEMENTATIONS.contains(&a.as_str()) {
            notes.push(format!(
                "attn_implementation: {a} → loratune's own attention kernel (exact softmax attention, memory \
                 linear in the sequence length)"
            ));
        } else {
            let hint = match did_you_mean(a, ATTN_IMPLEMENTATIONS.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("one of {}", ATTN_IMPLEMENTATIONS.join(", ")),
            };
            issues.push(Issue::invalid(
                k("attn_implementation"),
                format!("unknown attention implementation `{a}`; {hint}"),
            ));
        }
    }
    if cfg.bfloat16 == Some(true) {
        cfg.bf16 = super::Bf16::True;
        notes.push("bfloat16: true → bf16: true (the frozen base kept in bf16)".into());
    }
    if cfg.activation_offloading == Some(true) {
        cfg.gradient_checkpointing = crate::train::recompute::Checkpointing::Offload;
        notes.push(
            "activation_offloading: true → gradient_checkpointing: offload (each layer's input kept in host memory, \
             the layer recomputed in the backward)"
                .into(),
        );
    }
    if let Some(kw) = &cfg.gradient_checkpointing_kwargs {
        for key in kw.keys().filter(|k| k.as_str() != "use_reentrant") {
            issues.push(Issue::invalid(
                k("gradient_checkpointing_kwargs"),
                format!("`{key}` is not a checkpointing option loratune knows; only `use_reentrant` is accepted"),
            ));
        }
        if cfg.gradient_checkpointing.is_on() && kw.contains_key("use_reentrant") {
            notes.push(
                "gradient_checkpointing_kwargs.use_reentrant picks one of PyTorch's two recompute implementations; \
                 loratune's layer recompute gives the same losses and gradients either way"
                    .into(),
            );
        }
    }
    if let Some(b) = cfg.batch_size {
        let mbs = cfg.micro_batch_size.max(1);
        if present(doc, "gradient_accumulation_steps") {
            if b != mbs * cfg.gradient_accumulation_steps {
                issues.push(Issue::invalid(
                    k("batch_size"),
                    format!(
                        "batch_size {b} ≠ micro_batch_size {mbs} × gradient_accumulation_steps {}; remove batch_size",
                        cfg.gradient_accumulation_steps
                    ),
                ));
            }
        } else if b == 0 || b % mbs != 0 {
            issues.push(Issue::invalid(
                k("batch_size"),
                format!("must be a positive multiple of micro_batch_size {mbs}, got {b}"),
            ));
        } else {
            cfg.gradient_accumulation_steps = b / mbs;
            notes.push(format!(
                "batch_size: {b} → gradient_accumulation_steps: {} (× micro_batch_size {mbs})",
                b / mbs
            ));
        }
    }
    if cfg.sample_packing_sequentially == Some(true) {
        notes.push(
            "sample_packing_sequentially: loratune always packs first-fit in the samples' order"
                .into(),
        );
    }
    if let Some(mc) = &cfg.model_config {
        for (key, v) in mc {
            match (key.as_str(), v.as_bool()) {
                ("output_router_logits", Some(on)) => {
                    if on && cfg.router_aux_loss_coef.is_none() {
                        notes.push(
                            "model_config.output_router_logits: true → the router load-balancing loss at the \
                             model's router_aux_loss_coef (a mixture of experts only; set router_aux_loss_coef to \
                             choose it)"
                                .into(),
                        );
                    }
                }
                _ => issues.push(Issue::invalid(
                    k("model_config"),
                    format!(
                        "`{key}`: only `output_router_logits: true|false` is understood; other config.json \
                         overrides would change the architecture loratune reads from the model"
                    ),
                )),
            }
        }
    }
    for (key, n, exclusive) in [
        (
            "evals_per_epoch",
            cfg.evals_per_epoch,
            cfg.eval_steps.is_some(),
        ),
        (
            "saves_per_epoch",
            cfg.saves_per_epoch,
            cfg.save_steps.is_some(),
        ),
    ] {
        if n.is_some_and(|n| n > 0) && exclusive {
            let other = key.replace("s_per_epoch", "_steps");
            issues.push(Issue::key(
                k(key),
                format!("`{key}` and `{other}` are exclusive"),
                Some("keep one of them (as in Axolotl)".to_string()),
            ));
        }
    }
    if cfg.loss_watchdog_patience == Some(0) {
        issues.push(Issue::invalid(
            k("loss_watchdog_patience"),
            "must be at least 1, got 0",
        ));
    }
    if let Some(t) = cfg.loss_watchdog_threshold {
        if !(t > 0.0 && finite(t)) {
            issues.push(Issue::invalid(
                k("loss_watchdog_threshold"),
                format!("must be a loss value > 0, got {t}"),
            ));
        }
    }
    if let Some(r) = cfg.loraplus_lr_ratio {
        if !(r > 0.0 && finite(r)) {
            issues.push(Issue::invalid(
                k("loraplus_lr_ratio"),
                format!("must be > 0 (the paper suggests 16), got {r}"),
            ));
        } else if cfg.weight_decay > 0.0 {
            notes.push(format!(
                "loraplus_lr_ratio: weight_decay {} is not applied: PEFT's LoRA+ optimizer gives every group its \
                 loraplus_weight_decay, 0 by default, and loratune does the same",
                cfg.weight_decay
            ));
        }
    }
    if cfg.loraplus_lr_embedding.is_some() {
        notes.push(
            "loraplus_lr_embedding has no effect: it is the learning rate of LoRA on embedding layers, and loratune \
             adapts linear layers only"
                .into(),
        );
    }
    if cfg.eval_batch_size == Some(0) {
        issues.push(Issue::invalid(
            k("eval_batch_size"),
            "must be at least 1, got 0",
        ));
    }
    if cfg.lora_layers_pattern.is_some() && cfg.lora_layers_to_transform.is_none() {
        let key = if present(doc, "peft_layers_pattern") {
            "peft_layers_pattern"
        } else {
            "lora_layers_pattern"
        };
        issues.push(Issue::key(
            k(key),
            format!("`{key}` needs `lora_layers_to_transform` (peft_layers_to_transform)"),
            Some("it names the layer list those indices select from; set both or neither (as in Axolotl)".into()),
        ));
    }
    if let Some(eot) = &cfg.eot_tokens {
        if eot.is_empty() || eot.iter().any(|t| t.is_empty()) {
            issues.push(Issue::invalid(
                k("eot_tokens"),
                "list the end-of-turn tokens (e.g. [\"<end_of_turn>\"]), or remove the key for the default",
            ));
        }
    }
    cfg.notes = notes;
}

/// Combine `chat_template` / `chat_template_jinja` (top level or per dataset) the way Axolotl does, and read
/// a `.jinja` file when the text is a path.
fn resolve_template(
    name: &mut ChatTemplateName,
    jinja: &mut Option<String>,
    name_given: bool,
    at: &KeyPath,
    opts: &LoadOptions,
    base: &dyn Fn(&str) -> PathBuf,
    issues: &mut Vec<Issue>,
) {
    let jkey = at.key("chat_template_jinja");
    if let Some(text) = jinja.clone() {
        let looks_like_path = !text.contains("{{") && !text.contains("{%") && !text.contains('\n');
        if looks_like_path {
            let path = base(text.trim());
            if path.is_file() {
                match std::fs::read_to_string(&path) {
                    Ok(t) => *jinja = Some(t),
                    Err(e) => issues.push(Issue::invalid(
                        jkey.clone(),
                        format!("cannot read `{}`: {e}", path.display()),
                    )),
                }
            } else if opts.check_files {
                issues.push(Issue::invalid(
                    jkey.clone(),
                    format!(
                        "this is neither Jinja template text (no `{{{{` or `{{%`) nor an existing file (`{}` not found)",
                        path.display()
                    ),
                ));
            }
        }
        if !name_given {
            *name = ChatTemplateName::Jinja;
        } else if *name != ChatTemplateName::Jinja {
            issues.push(Issue::key(
                jkey.clone(),
                format!("`{jkey}` conflicts with `chat_template: {name}`"),
                Some("set `chat_template: jinja` to use the Jinja text, or remove chat_template_jinja".into()),
            ));
        }
    } else if *name == ChatTemplateName::Jinja {
        issues.push(Issue::value(
            at.key("chat_template"),
            "`chat_template: jinja` needs `chat_template_jinja`",
            "add `chat_template_jinja:` with the template text or the path of a .jinja file",
        ));
    }
}

fn validate_dataset(
    ds: &mut DatasetConfig,
    raw: &Mapping,
    p: &KeyPath,
    opts: &LoadOptions,
    base: &dyn Fn(&str) -> PathBuf,
    issues: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) {
    let has = |key: &str| raw.get(key).is_some_and(|v| !v.is_null());
    let type_known = has("type");
    if !type_known {
        issues.push(Issue {
            path: p.clone(),
            target: Target::Value,
            what: format!("dataset entry `{p}` has no `type`"),
            detail: Some(format!(
                "add `type:` with one of {}",
                DataFormat::NAMES.join(", ")
            )),
        });
    }
    if !has("path") || ds.path.trim().is_empty() {
        issues.push(Issue {
            path: p.clone(),
            target: Target::Value,
            what: format!("dataset entry `{p}` has no `path`"),
            detail: Some("add `path:` with a file, a folder or a glob such as data/*.jsonl".into()),
        });
    } else {
        // Format from the extension when ds_type is absent.
        if ds.ds_type.is_none() {
            match FileKind::of_path(&ds.path) {
                Some(t) => ds.ds_type = Some(t),
                None if !is_dir_like(&ds.path, base) => issues.push(Issue::invalid(
                    p.key("path"),
                    format!(
                        "cannot tell the file format of `{}` from its extension; add `ds_type:` (jsonl, json, csv, tsv or parquet)",
                        ds.path
                    ),
                )),
                None => {}
            }
        }
        if opts.check_files {
            if let Err(msg) = expand_dataset_path(&ds.path, base) {
                issues.push(Issue::invalid(p.key("path"), msg));
            }
        }
    }
    if let Some(split) = &ds.split {
        if let Err(why) = crate::data::slice::RowSlice::parse(split) {
            issues.push(Issue::invalid(p.key("split"), why));
        }
    }

    // Type-dependent defaults; fields meant for other types are reported.
    let kind = ds.kind;
    let fill = |f: &mut Option<String>, d: &str| {
        if f.is_none() {
            *f = Some(d.to_string());
        }
    };
    let mut irrelevant: Vec<&str> = Vec::new();
    let chat_fields = [
        "field_messages",
        "message_property_mappings",
        "roles",
        "roles_to_train",
        "train_on_eos",
        "drop_system_message",
        "chat_template",
        "chat_template_jinja",
    ];
    let alpaca_fields = [
        "field_instruction",
        "field_input",
        "field_output",
        "field_system",
    ];
    let completion_fields = ["field_prompt", "field_completion"];
    let text_fields = ["field_text", "field"];
    let others: [&[&str]; 3] = match kind {
        DataFormat::Chat => [&alpaca_fields, &completion_fields, &text_fields],
        DataFormat::Alpaca
        | DataFormat::AlpacaChat
        | DataFormat::AlpacaChatml
        | DataFormat::AlpacaPhi => [&chat_fields, &completion_fields, &text_fields],
        DataFormat::Completion => [&chat_fields, &alpaca_fields, &text_fields],
        DataFormat::Text => [&chat_fields, &alpaca_fields, &completion_fields],
    };
    let set_on = |key: &str| {
        raw.get(key)
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
    };
    if type_known {
        for group in others {
            for f in group {
                if set_on(f) {
                    irrelevant.push(f);
                }
            }
        }
    }
    for f in irrelevant {
        warnings.push(Issue::key(
            p.key(f),
            format!("`{}` has no effect", p.key(f)),
            Some(format!("it does not apply to `type: {kind}`")),
        ));
    }
    match kind {
        DataFormat::Chat => {
            fill(&mut ds.field_messages, "messages");
            let m = ds
                .message_property_mappings
                .get_or_insert_with(BTreeMap::new);
            m.entry("role".into()).or_insert_with(|| "role".into());
            m.entry("content".into())
                .or_insert_with(|| "content".into());
            if ds.roles.is_none() {
                let mut r = BTreeMap::new();
                r.insert(
                    "user".to_string(),
                    vec!["human".to_string(), "user".to_string()],
                );
                r.insert(
                    "assistant".to_string(),
                    vec!["gpt".to_string(), "assistant".to_string()],
                );
                r.insert("system".to_string(), vec!["system".to_string()]);
                r.insert("tool".to_string(), vec!["tool".to_string()]);
                ds.roles = Some(r);
            } else if let Some(roles) = &ds.roles {
                for target in roles.keys() {
                    if !ROLES.contains(&target.as_str()) {
                        let mut d = format!("roles map onto {}", ROLES.join(", "));
                        if let Some(s) = did_you_mean(target, ROLES.iter().copied()) {
                            d.push_str(&format!("; did you mean `{s}`?"));
                        }
                        issues.push(Issue::key(
                            p.key("roles").key(target),
                            format!("unknown target role `{target}`"),
                            Some(d),
                        ));
                    }
                }
            }
            if ds.roles_to_train.is_none() {
                ds.roles_to_train = Some(vec!["assistant".to_string()]);
            }
            if let Some(rt) = &ds.roles_to_train {
                for (i, r) in rt.iter().enumerate() {
                    if !ROLES.contains(&r.as_str()) {
                        let mut d =
                            format!("roles_to_train names target roles: {}", ROLES.join(", "));
                        if let Some(s) = did_you_mean(r, ROLES.iter().copied()) {
                            d.push_str(&format!("; did you mean `{s}`?"));
                        }
                        issues.push(Issue::invalid(p.key("roles_to_train").index(i), d));
                    }
                }
            }
            if ds.train_on_eos.is_none() {
                ds.train_on_eos = Some(TrainOnEos::Turn);
            }
            if ds.chat_template.is_some() || ds.chat_template_jinja.is_some() {
                let mut name = ds.chat_template.unwrap_or(ChatTemplateName::Jinja);
                resolve_template(
                    &mut name,
                    &mut ds.chat_template_jinja,
                    ds.chat_template.is_some(),
                    p,
                    opts,
                    base,
                    issues,
                );
                ds.chat_template = Some(name);
            }
        }
        DataFormat::Alpaca
        | DataFormat::AlpacaChat
        | DataFormat::AlpacaChatml
        | DataFormat::AlpacaPhi => {
            fill(&mut ds.field_instruction, "instruction");
            fill(&mut ds.field_input, "input");
            fill(&mut ds.field_output, "output");
            fill(&mut ds.field_system, "system");
        }
        DataFormat::Completion => {
            fill(&mut ds.field_prompt, "prompt");
            fill(&mut ds.field_completion, "completion");
        }
        DataFormat::Text => fill(&mut ds.field_text, "text"),
    }
}

fn has_glob(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

fn is_dir_like(p: &str, base: &dyn Fn(&str) -> PathBuf) -> bool {
    p.ends_with('/') || base(p).is_dir()
}

/// The files a dataset `path` names: the file itself, every data file in a folder (sorted, non-recursive:
/// `.jsonl`, `.json`, `.csv`, `.parquet`), or every match of a glob (sorted). An error names the path when
/// nothing exists or nothing matches.
pub fn expand_dataset_path(
    path: &str,
    base: &dyn Fn(&str) -> PathBuf,
) -> Result<Vec<PathBuf>, String> {
    let full = base(path);
    if has_glob(path) {
        let pattern = full.to_string_lossy().to_string();
        let entries = glob::glob(&pattern).map_err(|e| format!("invalid glob `{path}`: {e}"))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!("the glob `{pattern}` matches no files"));
        }
        return Ok(files);
    }
    if full.is_file() {
        return Ok(vec![full]);
    }
    if full.is_dir() {
        let rd = std::fs::read_dir(&full)
            .map_err(|e| format!("cannot list `{}`: {e}", full.display()))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && FileKind::of_path(&p.to_string_lossy()).is_some())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(format!(
                "the folder `{}` holds no .jsonl, .json, .csv or .parquet files",
                full.display()
            ));
        }
        return Ok(files);
    }
    let looks_like_hub = !path.starts_with(['.', '/', '~'])
        && path.matches('/').count() == 1
        && Path::new(path).extension().is_none();
    if looks_like_hub {
        Err(format!(
            "dataset file `{}` not found (loading datasets from the Hugging Face Hub is not supported; download it and give the local path)",
            full.display()
        ))
    } else {
        Err(format!("dataset file `{}` not found", full.display()))
    }
}

impl TrainConfig {
    /// The files of a dataset entry (see [`expand_dataset_path`]), resolved against the config's base folder.
    pub fn dataset_files(&self, ds: &DatasetConfig) -> crate::Result<Vec<PathBuf>> {
        expand_dataset_path(&ds.path, &|p: &str| self.resolve_path(p)).map_err(|m| {
            crate::Error::Config(format!("{}: {m}", self.source_label().unwrap_or("config")))
        })
    }
}

// ---------------------------------------------------------------------------------- later checks (hooks)

/// What the training loop knows about the loaded model, for [`TrainConfig::check_model`].
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    /// Full paths of the linear modules LoRA can adapt (e.g. `model.layers.0.self_attn.q_proj`), as PEFT
    /// names them; include `lm_head` only if it may be targeted by name.
    pub linear_modules: Vec<String>,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// The model's context length, if known.
    pub max_position_embeddings: Option<usize>,
    /// Whether the tokenizer ships a chat template (for `chat_template: tokenizer_default`).
    pub has_chat_template: bool,
}

impl ModelFacts {
    /// The facts of a model config and its tokenizer: every linear that has its own weight (the linears, and
    /// `lm_head` only when it is not tied).
    pub fn of(cfg: &crate::model::ModelConfig, tok: &crate::tokenizer::LoadedTokenizer) -> Self {
        let layout = crate::model::tree::layout(cfg);
        ModelFacts {
            linear_modules: layout
                .linears()
                .into_iter()
                .filter(|l| !l.tied)
                .map(|l| l.path.clone())
                .collect(),
            num_layers: cfg.num_hidden_layers,
            max_position_embeddings: Some(cfg.max_position_embeddings),
            has_chat_template: tok.chat_template.is_some(),
        }
    }
}

impl TrainConfig {
    fn report(
        &self,
        errors: Vec<Issue>,
        warnings: Vec<Issue>,
    ) -> Result<Vec<ConfigIssue>, ConfigErrors> {
        let (source, overrides, label) = match &self.origin {
            Some(o) => (o.source.as_str(), o.overrides.as_slice(), o.label.clone()),
            None => ("", &[][..], "config".to_string()),
        };
        if errors.is_empty() {
            Ok(finalize(warnings, source, overrides))
        } else {
            Err(ConfigErrors {
                file: label,
                issues: finalize(errors, source, overrides),
            })
        }
    }

    /// Checks that need the model: every target module exists (listing the available names when not),
    /// a regex target matches something, `lora_layers_to_transform` is within the model, the chat template
    /// exists when chat data uses `tokenizer_default`. Errors carry the config's line/column; the `Ok`
    /// value holds warnings (e.g. `sequence_len` beyond the model's context).
    pub fn check_model(&self, m: &ModelFacts) -> Result<Vec<ConfigIssue>, ConfigErrors> {
        let mut issues = Vec::new();
        let mut warnings = Vec::new();
        let short_names: std::collections::BTreeSet<&str> = m
            .linear_modules
            .iter()
            .map(|p| p.rsplit('.').next().unwrap_or(p.as_str()))
            .collect();
        let available = short_names.iter().copied().collect::<Vec<_>>().join(", ");
        // The model's layer list: the path segment before the layer index (`layers`, Falcon's `h`).
        let container = m.linear_modules.iter().find_map(|p| {
            let segs: Vec<&str> = p.split('.').collect();
            segs.windows(2)
                .find(|w| w[1].parse::<usize>().is_ok())
                .map(|w| w[0].to_string())
        });
        if let (Some(pattern), Some(c)) = (&self.lora_layers_pattern, &container) {
            if !pattern.iter().any(|p| p == c) {
                issues.push(Issue::invalid(
                    k("lora_layers_pattern"),
                    format!(
                        "this model's layer list is `{c}`, not {}; use `{c}` or remove the key",
                        pattern
                            .iter()
                            .map(|p| format!("`{p}`"))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ),
                ));
            }
        }
        match self.lora_targets() {
            Some(TargetSpec::Names(names)) => {
                for (i, n) in names.iter().enumerate() {
                    let hit = m
                        .linear_modules
                        .iter()
                        .any(|p| p == n || p.ends_with(&format!(".{n}")));
                    if !hit {
                        let mut d = format!("this model's linear modules are: {available}");
                        if let Some(s) = did_you_mean(n, short_names.iter().copied()) {
                            d.push_str(&format!("; did you mean `{s}`?"));
                        }
                        issues.push(Issue::invalid(
                            k("lora_target_modules").index(i),
                            format!("no module named `{n}` in the model; {d}"),
                        ));
                    }
                }
            }
            Some(TargetSpec::Regex(re)) => {
                if let Ok(r) = regex::Regex::new(&format!("^(?:{re})$")) {
                    if !m.linear_modules.iter().any(|p| r.is_match(p)) {
                        issues.push(Issue::invalid(
                            k("lora_target_modules"),
                            format!(
                                "the regex `{re}` matches no module (it must match the full path, e.g. {}); linear modules: {available}",
                                m.linear_modules.first().map(String::as_str).unwrap_or("model.layers.0.self_attn.q_proj")
                            ),
                        ));
                    }
                }
            }
            Some(TargetSpec::AllLinear) | None => {}
        }
        if let Some(layers) = &self.lora_layers_to_transform {
            let key = self
                .origin
                .as_ref()
                .filter(|o| o.source.contains("peft_layers_to_transform"))
                .map_or("lora_layers_to_transform", |_| "peft_layers_to_transform");
            for l in &layers.0 {
                if *l >= m.num_layers {
                    issues.push(Issue::invalid(
                        k(key),
                        format!(
                            "layer {l} does not exist: the model has {} layers (0..={})",
                            m.num_layers,
                            m.num_layers.saturating_sub(1)
                        ),
                    ));
                }
            }
        }
        let uses_default_template = self.datasets.iter().chain(&self.test_datasets).any(|d| {
            d.kind == DataFormat::Chat
                && self.chat_template_for(d) == super::ChatTemplateChoice::TokenizerDefault
        });
        if uses_default_template && !m.has_chat_template {
            issues.push(Issue::value(
                k("chat_template"),
                "the base model has no chat template",
                "chat datasets use `chat_template: tokenizer_default`; choose a built-in one (chatml, llama3, mistral, gemma, phi3, alpaca) or give chat_template_jinja",
            ));
        }
        if let Some(ctx) = m.max_position_embeddings {
            if self.sequence_len > ctx {
                warnings.push(Issue::value(
                    k("sequence_len"),
                    format!(
                        "`sequence_len` {} is longer than the model's context ({ctx})",
                        self.sequence_len
                    ),
                    "positions beyond the trained context degrade quality",
                ));
            }
        }
        self.report(issues, warnings)
    }

    /// Checks that need the data: the training set fills at least one optimizer step
    /// (`micro_batch_size × gradient_accumulation_steps` samples), the `val_set_size` split leaves samples on
    /// both sides, and an eval set is not empty.
    pub fn check_data(&self, d: &DataFacts) -> Result<Vec<ConfigIssue>, ConfigErrors> {
        let mut issues = Vec::new();
        match self.val_split() {
            ValSplit::Count(n) if n >= d.samples_before_split => issues.push(Issue::invalid(
                k("val_set_size"),
                format!(
                    "{n} evaluation samples leave none for training: the dataset has {} samples",
                    d.samples_before_split
                ),
            )),
            ValSplit::Fraction(f) if d.samples_before_split > 0 && (f * d.samples_before_split as f64) < 1.0 => {
                issues.push(Issue::invalid(
                    k("val_set_size"),
                    format!(
                        "{f} of {} samples is less than one evaluation sample; use a larger fraction or a count",
                        d.samples_before_split
                    ),
                ))
            }
            _ => {}
        }
        // With packing a batch row holds several samples: count rows, and say so.
        let unit = if self.sample_packing {
            "packed rows"
        } else {
            "samples"
        };
        if d.train_samples == 0 {
            issues.push(Issue::missing(
                k("datasets"),
                "the training set is empty after filtering (all samples dropped or too long?); see `loratune data stats`",
            ));
        } else if d.train_samples < self.micro_batch_size {
            issues.push(Issue::invalid(
                k("micro_batch_size"),
                format!(
                    "micro_batch_size {} is larger than the training set ({} {unit}); lower it to at most {}",
                    self.micro_batch_size, d.train_samples, d.train_samples
                ),
            ));
        } else if d.train_samples < self.samples_per_step() {
            issues.push(Issue::invalid(
                k("gradient_accumulation_steps"),
                format!(
                    "one optimizer step needs micro_batch_size × gradient_accumulation_steps = {} {unit}, but the training set has {}; lower gradient_accumulation_steps to at most {}",
                    self.samples_per_step(),
                    d.train_samples,
                    (d.train_samples / self.micro_batch_size.max(1)).max(1)
                ),
            ));
        }
        if !self.test_datasets.is_empty() && d.eval_samples == 0 {
            issues.push(Issue::invalid(
                k("test_datasets"),
                "the evaluation datasets hold no usable samples",
            ));
        }
        self.report(issues, Vec::new())
    }
}
