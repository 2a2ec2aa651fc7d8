//! The loading pipeline: parse → overrides → schema check (unknown keys, types) → defaults and validation
//! ([`super::validate`]).

use serde::de::{self, DeserializeOwned, Visitor};
use serde_yaml::{Mapping, Value};
use std::cell::Cell;
use std::fmt;

use std::sync::Arc;

use super::axolotl::{self, Class, Scope};
use super::issues::{finalize, Issue, LoadOptions, Origin};
use super::suggest::did_you_mean;
use super::yaml::{describe, KeyPath, Override, Pos};
use super::{
    ConfigErrors, ConfigIssue, DatasetConfig, EvalGenerate, SpecialTokens, SweepConfig, TrainConfig,
};

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
        match Override::parse(raw) {
            Ok(o) => parsed.push(o),
            Err(msg) => override_errors.push(invalid_override(msg)),
        }
    }
    if !override_errors.is_empty() {
        return Err(fail(override_errors));
    }
    load_doc(doc, text, label, parsed, opts)
}

fn invalid_override(msg: String) -> ConfigIssue {
    ConfigIssue {
        key: String::new(),
        pos: None,
        from_override: None,
        what: "invalid override".to_string(),
        detail: Some(msg),
    }
}

/// [`load_str`] with overrides already parsed (a sweep's trials: values that are YAML nodes, not `--set` text).
pub(crate) fn load_with_overrides(
    text: &str,
    label: &str,
    overrides: Vec<Override>,
    opts: &LoadOptions,
) -> Result<TrainConfig, ConfigErrors> {
    let doc = match serde_yaml::from_str::<Value>(text) {
        Ok(v) if v.is_mapping() => v,
        Ok(v) if v.is_null() => Value::Mapping(Mapping::new()),
        // Syntax and top-level errors, reported as for any config.
        _ => return load_str(text, label, &[], opts),
    };
    load_doc(doc, text, label, overrides, opts)
}

/// Steps 2–4 of [`load_str`] on the parsed document.
fn load_doc(
    mut doc: Value,
    text: &str,
    label: &str,
    overrides: Vec<Override>,
    opts: &LoadOptions,
) -> Result<TrainConfig, ConfigErrors> {
    let fail = |issues: Vec<ConfigIssue>| ConfigErrors {
        file: label.to_string(),
        issues,
    };
    let mut parsed = Vec::new();
    let mut override_errors = Vec::new();
    for o in overrides {
        match o.apply(&mut doc) {
            Ok(()) => parsed.push(o),
            Err(msg) => override_errors.push(invalid_override(msg)),
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
        ignored,
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
    // Keys without effect share one warning line; a lone one keeps its own line (with its position).
    let lone = ignored.is_empty() && warnings.iter().filter(|w| w.is_no_effect()).count() == 1;
    if !lone {
        let (no_effect, rest): (Vec<Issue>, Vec<Issue>) =
            warnings.into_iter().partition(Issue::is_no_effect);
        warnings = rest;
        warnings.extend(grouped_ignored(&ignored, &no_effect));
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

/// Report a key that is not a loratune field: an Axolotl key without effect is collected for the grouped warning,
/// one for a feature loratune lacks is an error when on, anything else is unknown (with a did-you-mean).
fn unknown_key(
    key: &str,
    value: &Value,
    path: &KeyPath,
    fields: &[&str],
    scope: Scope,
    sink: &mut Sink,
) {
    if let Some(entry) = axolotl::lookup(scope, key) {
        match entry.class {
            Class::Ignored(_) => sink.ignored.push(path.clone()),
            Class::OnlyIfOff(_) if is_off(value) => sink.ignored.push(path.clone()),
            Class::OnlyIfOff(why) => sink.issues.push(Issue::key(
                path.clone(),
                format!("unsupported key `{path}`"),
                Some(format!("{why}; remove it (or set it off)")),
            )),
            // Implemented and mapped keys are fields, so they never get here.
            Class::Implemented(_) | Class::Mapped(_) => {}
        }
        return;
    }
    let detail = match did_you_mean(key, fields.iter().copied()) {
        Some(s) => format!("did you mean `{s}`?"),
        None if fields.len() <= 25 => format!("known keys here: {}", fields.join(", ")),
        None => "it is neither a loratune key nor an Axolotl key loratune knows; every key is listed in \
                 configs/README.md (loratune's keys, and Axolotl's with what loratune does with each)"
            .to_string(),
    };
    sink.issues.push(Issue::key(
        path.clone(),
        format!("unknown key `{key}`"),
        Some(detail),
    ));
}

/// The one warning line for every key of a config that has no effect: Axolotl keys that cannot apply in loratune
/// (their reasons are in configs/README.md), then settings made redundant by others (with the reason).
fn grouped_ignored(ignored: &[KeyPath], no_effect: &[Issue]) -> Option<Issue> {
    if ignored.is_empty() && no_effect.is_empty() {
        return None;
    }
    let mut names: Vec<String> = ignored.iter().map(|p| p.to_string()).collect();
    names.dedup();
    let axolotl = (!names.is_empty()).then(|| {
        format!(
            "{} Axolotl key{} without effect in loratune: {} (configs/README.md says why for each)",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        )
    });
    let redundant = (!no_effect.is_empty()).then(|| {
        no_effect
            .iter()
            .map(|i| match &i.detail {
                Some(d) => format!("`{}` has no effect ({d})", i.path),
                None => format!("`{}` has no effect", i.path),
            })
            .collect::<Vec<_>>()
            .join("; ")
    });
    let text: Vec<String> = axolotl.into_iter().chain(redundant).collect();
    Some(Issue::key(
        KeyPath::root(),
        format!("ignored: {}", text.join("; ")),
        None,
    ))
}

/// Where the schema walk records what it finds.
#[derive(Default)]
struct Sink {
    issues: Vec<Issue>,
    warnings: Vec<Issue>,
    /// Axolotl keys without effect here (named together in one warning).
    ignored: Vec<KeyPath>,
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
    scope: Scope,
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
        if v.is_null() && fields.contains(&name) {
            // `key:` with nothing after it is unset (Axolotl's configs write many keys so).
            continue;
        }
        if !fields.contains(&name) {
            unknown_key(name, v, &p, fields, scope, sink);
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
        let cleaned = check_struct::<DatasetConfig>(m, &ep, Scope::Dataset, sink, &mut no_nested);
        out.push(Value::Mapping(cleaned));
    }
    Some(Value::Sequence(out))
}

/// A nested mapping of loratune's own keys (`special_tokens:`, `eval_generate:`): its keys checked against `T`;
/// `null` (the key written with nothing under it) becomes `if_null`; anything else is an error showing `example`.
fn nested_mapping<T: DeserializeOwned>(
    v: &Value,
    p: &KeyPath,
    sink: &mut Sink,
    if_null: Option<Value>,
    example: &str,
) -> Option<Value> {
    match v {
        Value::Null => if_null,
        Value::Mapping(m) => Some(Value::Mapping(check_struct::<T>(
            m,
            p,
            Scope::Nested,
            sink,
            &mut no_nested,
        ))),
        other => {
            sink.issues.push(Issue::invalid(
                p.clone(),
                format!(
                    "expected a mapping such as `{example}`, found {}",
                    describe(other)
                ),
            ));
            None
        }
    }
}

fn check_top(root: &Mapping, sink: &mut Sink) -> Mapping {
    let mut nested =
        |name: &str, v: &Value, p: &KeyPath, sink: &mut Sink| -> Option<Option<Value>> {
            match name {
                "datasets" | "test_datasets" => Some(check_dataset_list(v, p, sink)),
                "special_tokens" => Some(nested_mapping::<SpecialTokens>(
                    v,
                    p,
                    sink,
                    Some(Value::Mapping(Mapping::new())),
                    "pad_token: \"<pad>\"",
                )),
                // `eval_generate:` with nothing under it is unset, as any empty key.
                "eval_generate" => Some(nested_mapping::<EvalGenerate>(
                    v,
                    p,
                    sink,
                    None,
                    "path: datasets/nimbrel/heldout.jsonl",
                )),
                "sweep" => Some(nested_mapping::<SweepConfig>(
                    v,
                    p,
                    sink,
                    None,
                    "method: grid",
                )),
                _ => None,
            }
        };
    check_struct::<TrainConfig>(root, &KeyPath::root(), Scope::Top, sink, &mut nested)
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
