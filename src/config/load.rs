//! The loading pipeline: parse → overrides → schema check (unknown keys, types) → defaults and validation
//! ([`super::validate`]).

use serde::de::{self, DeserializeOwned, Visitor};
use serde_yaml::{Mapping, Value};
use std::cell::Cell;
use std::fmt;

use std::sync::Arc;

use super::issues::{finalize, Issue, LoadOptions, Origin};
use super::suggest::did_you_mean;
use super::yaml::{describe, KeyPath, Override, Pos};
use super::{ConfigErrors, ConfigIssue, DatasetConfig, SpecialTokens, TrainConfig};

pub(crate) fn load_str(
    text: &str,
    label: &str,
    overrides: &[String],
    opts: &LoadOptions,
) -> Result<TrainConfig, ConfigErrors> {
    let fail = |issues: Vec<ConfigIssue>| ConfigErrors {
        file: label.to_string(),
        issues,
    };

    // 1. YAML syntax.
    let mut doc: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            if let Some((key, pos)) = super::yaml::locate_duplicate_key(text) {
                return Err(fail(vec![ConfigIssue {
                    key: key.clone(),
                    pos: Some(pos),
                    from_override: None,
                    what: format!("duplicate key `{key}`"),
                    detail: Some(
                        "a key may appear only once in a mapping; keep one of them".into(),
                    ),
                }]));
            }
            let pos = e.location().map(|l| Pos {
                line: l.line(),
                column: l.column(),
            });
            return Err(fail(vec![ConfigIssue {
                key: String::new(),
                pos,
                from_override: None,
                what: "invalid YAML".to_string(),
                detail: Some(strip_location(&e.to_string())),
            }]));
        }
    };
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    if !doc.is_mapping() {
        return Err(fail(vec![ConfigIssue {
            key: String::new(),
            pos: Some(Pos { line: 1, column: 1 }),
            from_override: None,
            what: "the config must be a mapping of keys to values".to_string(),
            detail: Some(format!("found {} at the top level", describe(&doc))),
        }]));
    }

    // 2. Overrides.
    let mut parsed = Vec::new();
    let mut override_errors = Vec::new();
    for raw in overrides {
        match Override::parse(raw).and_then(|o| o.apply(&mut doc).map(|_| o)) {
            Ok(o) => parsed.push(o),
            Err(msg) => override_errors.push(ConfigIssue {
                key: String::new(),
                pos: None,
                from_override: None,
                what: "invalid override".to_string(),
                detail: Some(msg),
            }),
        }
    }
    if !override_errors.is_empty() {
        return Err(fail(override_errors));
    }

    // 3. Schema: unknown keys and wrong types; bad entries are pruned so the rest can still be checked.
    let root = match &doc {
        Value::Mapping(m) => m.clone(),
        _ => Mapping::new(),
    };
    let mut sink = Sink::default();
    let clean = check_top(&root, &mut sink);
    let Sink {
        mut issues,
        mut warnings,
        pruned,
    } = sink;

    let mut cfg: TrainConfig = match serde_yaml::from_value(Value::Mapping(clean)) {
        Ok(c) => c,
        Err(e) => {
            issues.push(Issue::invalid(
                KeyPath::root(),
                clean_serde_message(&e.to_string()),
            ));
            TrainConfig::default()
        }
    };

    // 4. Defaults and validation.
    let mut semantic = Vec::new();
    super::validate::resolve_and_validate(&mut cfg, &root, opts, &mut semantic, &mut warnings);
    issues.extend(semantic.into_iter().filter(|i| {
        !pruned
            .iter()
            .any(|p: &KeyPath| i.path.starts_with(p) || p.starts_with(&i.path) && !i.path.is_root())
    }));

    if !issues.is_empty() {
        return Err(fail(finalize(issues, text, &parsed)));
    }
    cfg.warnings = finalize(warnings, text, &parsed);
    cfg.origin = Some(Arc::new(Origin {
        label: label.to_string(),
        source: text.to_string(),
        overrides: parsed,
        base_dir: opts.base_dir.clone(),
    }));
    Ok(cfg)
}

/// yaml_serde appends " at line L column C" to its messages; we print positions ourselves.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Make serde's type names readable.
pub(crate) fn clean_serde_message(msg: &str) -> String {
    let mut m = strip_location(msg);
    for (from, to) in [
        ("expected usize", "expected a whole number ≥ 0"),
        ("expected u64", "expected a whole number ≥ 0"),
        ("expected u32", "expected a whole number ≥ 0"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a mapping"),
        ("expected a string", "expected a string (quote it)"),
    ] {
        m = m.replace(from, to);
    }
    m
}

// ------------------------------------------------------------------------------------------- schema walk

/// The field names (with aliases) serde accepts for a struct, read from its derived `Deserialize`.
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Grab<'a>(&'a Cell<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for Grab<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.set(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let cell = Cell::new(&[][..]);
    let _ = T::deserialize(Grab(&cell));
    cell.get()
}

/// How loratune treats an Axolotl key it does not implement.
#[derive(Clone, Copy)]
enum Policy {
    /// Accepted with a warning: it has no effect here and changes nothing about the result.
    Ignore,
    /// Accepted (with a warning) when it is off / empty; an error otherwise.
    OnlyIfOff,
}

/// Axolotl keys that loratune recognises but does not implement, with the explanation to show.
const AXOLOTL_TOP: &[(&str, Policy, &str)] = &[
    ("strict", Policy::Ignore, "loratune is always strict"),
    (
        "tf32",
        Policy::Ignore,
        "TF32 matmuls are a CUDA backend choice, not a config setting, in loratune",
    ),
    (
        "flash_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "sdp_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "xformers_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "flex_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "s2_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "eager_attention",
        Policy::Ignore,
        "loratune uses its own attention kernels",
    ),
    (
        "pad_to_sequence_len",
        Policy::Ignore,
        "batches are padded to their longest sample",
    ),
    (
        "group_by_length",
        Policy::Ignore,
        "not implemented; samples are shuffled uniformly",
    ),
    (
        "eval_sample_packing",
        Policy::Ignore,
        "evaluation follows `sample_packing`",
    ),
    (
        "tokenizer_type",
        Policy::Ignore,
        "the tokenizer is read from the model",
    ),
    (
        "model_type",
        Policy::Ignore,
        "the architecture is read from the model's config",
    ),
    (
        "is_llama_derived_model",
        Policy::Ignore,
        "the architecture is read from the model's config",
    ),
    (
        "is_mistral_derived_model",
        Policy::Ignore,
        "the architecture is read from the model's config",
    ),
    (
        "is_qwen_derived_model",
        Policy::Ignore,
        "the architecture is read from the model's config",
    ),
    (
        "wandb_project",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_entity",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_watch",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_name",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_log_model",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "wandb_run_id",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "use_tensorboard",
        Policy::Ignore,
        "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl",
    ),
    (
        "trust_remote_code",
        Policy::OnlyIfOff,
        "loratune never runs model code from the Hub",
    ),
    ("gptq", Policy::OnlyIfOff, "GPTQ bases are not supported"),
    (
        "fp16",
        Policy::OnlyIfOff,
        "fp16 mixed precision is not supported; use `bf16: true` (or `auto`)",
    ),
    (
        "peft_use_dora",
        Policy::OnlyIfOff,
        "DoRA is not supported (vLLM rejects DoRA adapters too)",
    ),
    (
        "lora_fan_in_fan_out",
        Policy::OnlyIfOff,
        "only fan_in_fan_out: false models are supported",
    ),
    (
        "lora_modules_to_save",
        Policy::OnlyIfOff,
        "modules_to_save is not supported (vLLM rejects such adapters)",
    ),
    (
        "deepspeed",
        Policy::OnlyIfOff,
        "DeepSpeed is a PyTorch library; loratune trains on one device",
    ),
    (
        "fsdp",
        Policy::OnlyIfOff,
        "FSDP is not supported; loratune trains on one device",
    ),
    (
        "fsdp_config",
        Policy::OnlyIfOff,
        "FSDP is not supported; loratune trains on one device",
    ),
    (
        "hub_model_id",
        Policy::OnlyIfOff,
        "pushing to the Hub is not supported; upload output_dir/adapter yourself",
    ),
    (
        "rl",
        Policy::OnlyIfOff,
        "only supervised fine-tuning is supported (no DPO/KTO/ORPO/GRPO)",
    ),
    (
        "lr_scheduler_kwargs",
        Policy::OnlyIfOff,
        "use warmup_steps/warmup_ratio and cosine_min_lr_ratio",
    ),
    (
        "batch_size",
        Policy::OnlyIfOff,
        "set micro_batch_size and gradient_accumulation_steps instead",
    ),
    (
        "saves_per_epoch",
        Policy::OnlyIfOff,
        "use save_steps (unset = a checkpoint at the end of each epoch)",
    ),
    (
        "evals_per_epoch",
        Policy::OnlyIfOff,
        "use eval_steps (unset = an evaluation at the end of each epoch)",
    ),
    (
        "lora_model_dir",
        Policy::OnlyIfOff,
        "to continue from a saved adapter use resume_from_checkpoint",
    ),
];

const AXOLOTL_DATASET: &[(&str, Policy, &str)] = &[
    (
        "message_field_role",
        Policy::OnlyIfOff,
        "deprecated in Axolotl; use `message_property_mappings: {role: <field>}`",
    ),
    (
        "message_field_content",
        Policy::OnlyIfOff,
        "deprecated in Axolotl; use `message_property_mappings: {content: <field>}`",
    ),
    (
        "data_files",
        Policy::OnlyIfOff,
        "list the files through `path` (a file, a folder or a glob such as data/*.jsonl)",
    ),
    (
        "name",
        Policy::OnlyIfOff,
        "Hub dataset configurations are not supported; use local files",
    ),
    (
        "revision",
        Policy::OnlyIfOff,
        "Hub datasets are not supported; use local files",
    ),
    (
        "shards",
        Policy::OnlyIfOff,
        "dataset sharding is not supported",
    ),
    (
        "trust_remote_code",
        Policy::OnlyIfOff,
        "loratune never runs dataset code from the Hub",
    ),
    (
        "conversation",
        Policy::OnlyIfOff,
        "use `type: chat_template` with `chat_template:`",
    ),
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    }
}

/// Report an unknown key (or a known-unsupported Axolotl key). Returns true when the key is merely ignored.
fn unknown_key(
    key: &str,
    value: &Value,
    path: &KeyPath,
    fields: &[&str],
    table: &[(&str, Policy, &str)],
    issues: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) {
    if let Some((_, policy, why)) = table.iter().find(|(k, _, _)| *k == key) {
        match policy {
            Policy::Ignore => warnings.push(Issue::key(
                path.clone(),
                format!("Axolotl key `{path}` is ignored"),
                Some((*why).to_string()),
            )),
            Policy::OnlyIfOff if is_off(value) => warnings.push(Issue::key(
                path.clone(),
                format!("Axolotl key `{path}` is ignored (it is off)"),
                Some((*why).to_string()),
            )),
            Policy::OnlyIfOff => issues.push(Issue::key(
                path.clone(),
                format!("unsupported key `{path}`"),
                Some(format!("{why}; remove it")),
            )),
        }
        return;
    }
    let detail = match did_you_mean(key, fields.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None if fields.len() <= 25 => format!("known keys here: {}", fields.join(", ")),
        None => "it is neither a loratune key nor an Axolotl key loratune knows (see the documented keys in \
                 configs/quickstart.yaml and src/config/mod.rs)"
            .to_string(),
    };
    let detail = Some(detail);
    issues.push(Issue::key(
        path.clone(),
        format!("unknown key `{key}`"),
        detail,
    ));
}

/// Where the schema walk records what it finds.
#[derive(Default)]
struct Sink {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
    /// Keys dropped from the document because they are unknown or invalid.
    pruned: Vec<KeyPath>,
}

/// Check one key/value against struct `T` by deserialising `{key: value}` alone (every other field takes
/// its default). Returns false (and records the issue) when the value has the wrong type or is invalid.
fn check_field<T: DeserializeOwned>(
    key: &Value,
    value: &Value,
    path: &KeyPath,
    sink: &mut Sink,
) -> bool {
    let mut one = Mapping::new();
    one.insert(key.clone(), value.clone());
    match serde_yaml::from_value::<T>(Value::Mapping(one)) {
        Ok(_) => true,
        Err(e) => {
            sink.issues.push(Issue::invalid(
                path.clone(),
                clean_serde_message(&e.to_string()),
            ));
            false
        }
    }
}

/// Checks a key whose value is itself a structure: returns the cleaned value, or `None` to drop the key.
type NestedCheck<'a> =
    &'a mut dyn FnMut(&str, &Value, &KeyPath, &mut Sink) -> Option<Option<Value>>;

/// Walk a mapping that should deserialise as struct `T`; returns the mapping without the bad entries.
fn check_struct<T: DeserializeOwned>(
    map: &Mapping,
    path: &KeyPath,
    table: &[(&str, Policy, &str)],
    sink: &mut Sink,
    nested: NestedCheck<'_>,
) -> Mapping {
    let fields = fields_of::<T>();
    let mut clean = Mapping::new();
    for (k, v) in map {
        let Some(name) = k.as_str() else {
            let shown = serde_yaml::to_string(k).unwrap_or_default();
            let p = path.key(shown.trim());
            sink.issues.push(Issue::key(
                p.clone(),
                format!("invalid key `{}`", shown.trim()),
                Some("keys must be strings".into()),
            ));
            sink.pruned.push(p);
            continue;
        };
        let p = path.key(name);
        if !fields.contains(&name) {
            unknown_key(
                name,
                v,
                &p,
                fields,
                table,
                &mut sink.issues,
                &mut sink.warnings,
            );
            sink.pruned.push(p);
            continue;
        }
        if let Some(result) = nested(name, v, &p, sink) {
            match result {
                Some(cleaned) => {
                    clean.insert(k.clone(), cleaned);
                }
                None => sink.pruned.push(p),
            }
            continue;
        }
        if check_field::<T>(k, v, &p, sink) {
            clean.insert(k.clone(), v.clone());
        } else {
            sink.pruned.push(p);
        }
    }
    clean
}

fn no_nested(_: &str, _: &Value, _: &KeyPath, _: &mut Sink) -> Option<Option<Value>> {
    None
}

fn check_dataset_list(v: &Value, p: &KeyPath, sink: &mut Sink) -> Option<Value> {
    let Value::Sequence(entries) = v else {
        if v.is_null() {
            return Some(Value::Sequence(Vec::new()));
        }
        sink.issues.push(Issue::invalid(
            p.clone(),
            format!(
                "expected a list of dataset entries (`- path: …`), found {}",
                describe(v)
            ),
        ));
        return None;
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ep = p.index(i);
        let Value::Mapping(m) = e else {
            sink.issues.push(Issue::invalid(
                ep.clone(),
                format!(
                    "a dataset entry must be a mapping with at least `path` and `type`, found {}",
                    describe(e)
                ),
            ));
            sink.pruned.push(ep);
            // keep the indices of later entries stable: an empty mapping (its issues are suppressed)
            out.push(Value::Mapping(Mapping::new()));
            continue;
        };
        let cleaned = check_struct::<DatasetConfig>(m, &ep, AXOLOTL_DATASET, sink, &mut no_nested);
        out.push(Value::Mapping(cleaned));
    }
    Some(Value::Sequence(out))
}

fn check_top(root: &Mapping, sink: &mut Sink) -> Mapping {
    let mut nested =
        |name: &str, v: &Value, p: &KeyPath, sink: &mut Sink| -> Option<Option<Value>> {
            match name {
                "datasets" | "test_datasets" => Some(check_dataset_list(v, p, sink)),
                "special_tokens" => Some(match v {
                    Value::Null => Some(Value::Mapping(Mapping::new())),
                    Value::Mapping(m) => Some(Value::Mapping(check_struct::<SpecialTokens>(
                        m,
                        p,
                        &[],
                        sink,
                        &mut no_nested,
                    ))),
                    other => {
                        sink.issues.push(Issue::invalid(
                            p.clone(),
                            format!(
                                "expected a mapping such as `pad_token: \"<pad>\"`, found {}",
                                describe(other)
                            ),
                        ));
                        None
                    }
                }),
                _ => None,
            }
        };
    check_struct::<TrainConfig>(root, &KeyPath::root(), AXOLOTL_TOP, sink, &mut nested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_introspection_includes_aliases() {
        let f = fields_of::<TrainConfig>();
        assert!(f.contains(&"lora_alpha"));
        assert!(f.contains(&"revision_of_model"));
        assert!(!f.contains(&"origin"), "serde(skip) fields are not keys");
        let d = fields_of::<DatasetConfig>();
        assert!(d.contains(&"type") && d.contains(&"field") && d.contains(&"path"));
        assert!(!d.contains(&"kind"));
    }
}
