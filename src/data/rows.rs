//! Records → examples: field extraction and validation for the alpaca / chat / completion / text formats.
//!
//! A record that cannot be used yields a [`BadRow`]: its reason (counted per reason when bad rows are skipped),
//! the field, what is wrong and how to fix it. The caller adds the file and line/row.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::options::{DataFormat, DatasetSource};
use super::Message;
use crate::error::{Error, Result};

/// Why a record was rejected (the key of the skip counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BadRowKind {
    /// Not valid JSON / UTF-8, or not a JSON object.
    InvalidJson,
    /// A required field is absent, null or empty.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A message role that is not known and not mapped with `roles`.
    UnknownRole,
    /// The record has nothing to train on (no message of a trained role).
    NothingToTrain,
    /// The chat template raised an error or failed to render.
    TemplateError,
    /// The chat template does not render conversations incrementally, so turn spans cannot be located.
    TemplateNotIncremental,
}

impl BadRowKind {
    /// The name used in stats.
    pub fn name(self) -> &'static str {
        match self {
            BadRowKind::InvalidJson => "invalid_json",
            BadRowKind::MissingField => "missing_field",
            BadRowKind::WrongType => "wrong_type",
            BadRowKind::UnknownRole => "unknown_role",
            BadRowKind::NothingToTrain => "nothing_to_train",
            BadRowKind::TemplateError => "template_error",
            BadRowKind::TemplateNotIncremental => "template_not_incremental",
        }
    }
}

/// A rejected record: reason, field path, problem and fix.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub kind: BadRowKind,
    /// The field path (`messages[2].role`), empty when the whole record is concerned.
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl BadRow {
    pub fn new(
        kind: BadRowKind,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        BadRow {
            kind,
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// The full message for a record of `file` at `loc`.
    pub fn message(&self, file: &std::path::Path, loc: impl fmt::Display) -> String {
        let field = if self.field.is_empty() {
            String::new()
        } else {
            format!(" field `{}`:", self.field)
        };
        format!(
            "{} {loc}:{field} {}; {} (or set `skip_bad_rows: true` in the config — `--skip-bad-rows` for `loratune data` — to skip and count such records)",
            file.display(),
            self.problem,
            self.fix
        )
    }
}

/// A record ready to be rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Messages (roles already mapped to system/user/assistant/tool/...) and which of them are trained.
    Chat {
        messages: Vec<Message>,
        trained: Vec<bool>,
    },
    Alpaca {
        style: crate::data::options::AlpacaStyle,
        system: Option<String>,
        instruction: String,
        input: Option<String>,
        output: String,
    },
    Completion {
        prompt: String,
        completion: String,
    },
    Text {
        text: String,
    },
}

impl Example {
    /// The conversation's system message (a chat whose first message has the `system` role).
    pub fn system_message(&self) -> Option<&str> {
        match self {
            Example::Chat { messages, .. } => messages
                .first()
                .filter(|m| m.role == "system")
                .map(|m| m.content.as_str()),
            _ => None,
        }
    }
}

/// Per-dataset parsing rules (field names, role mapping), prepared once.
#[derive(Debug, Clone)]
pub struct RowParser {
    format: DataFormat,
    field_messages: Option<String>,
    mappings: Option<(String, String)>,
    /// Name in the data → role given to the template.
    role_map: HashMap<String, String>,
    roles_to_train: Vec<String>,
    fields: BTreeMap<&'static str, String>,
    drop_system_message: bool,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Built-in role names: target role → names accepted in the data.
const DEFAULT_ROLES: &[(&str, &[&str])] = &[
    ("system", &["system"]),
    ("user", &["user", "human"]),
    ("assistant", &["assistant", "gpt", "model"]),
    ("tool", &["tool", "function", "ipython"]),
];

impl RowParser {
    /// Prepare the rules of `source`, checking them.
    pub fn new(source: &DatasetSource) -> Result<Self> {
        let mut role_map = HashMap::new();
        for (target, names) in DEFAULT_ROLES {
            for n in *names {
                role_map.insert(n.to_string(), target.to_string());
            }
        }
        for (target, names) in &source.roles {
            for n in names {
                role_map.insert(n.clone(), target.clone());
            }
            role_map.insert(target.clone(), target.clone());
        }
        let roles_to_train = source
            .roles_to_train
            .clone()
            .unwrap_or_else(|| vec!["assistant".to_string()]);
        let targets: std::collections::BTreeSet<&String> = role_map.values().collect();
        for r in &roles_to_train {
            if !targets.contains(r) {
                return Err(Error::Data(format!(
                    "dataset {}: roles_to_train names `{r}`, which is not a role ({}); use the role names the template \
                     sees, after the `roles` mapping",
                    source.path,
                    targets.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let mut fields = BTreeMap::new();
        let mut set = |k: &'static str, v: &Option<String>, default: &str| {
            fields.insert(k, v.clone().unwrap_or_else(|| default.to_string()));
        };
        set("instruction", &source.field_instruction, "instruction");
        set("input", &source.field_input, "input");
        set("output", &source.field_output, "output");
        set("system", &source.field_system, "system");
        set("prompt", &source.field_prompt, "prompt");
        set("completion", &source.field_completion, "completion");
        set("text", &source.field_text, "text");
        Ok(RowParser {
            format: source.format,
            field_messages: source.field_messages.clone(),
            mappings: source
                .message_property_mappings
                .as_ref()
                .map(|m| (m.role.clone(), m.content.clone())),
            role_map,
            roles_to_train,
            fields,
            drop_system_message: source.drop_system_message,
        })
    }

    /// The columns this format reads (for CSV/Parquet projection); `None` = all.
    pub fn columns(&self) -> Option<Vec<String>> {
        let f = |k: &str| self.fields[k].clone();
        match self.format {
            DataFormat::Alpaca
            | DataFormat::AlpacaChat
            | DataFormat::AlpacaChatml
            | DataFormat::AlpacaPhi => {
                Some(vec![f("instruction"), f("input"), f("output"), f("system")])
            }
            DataFormat::Completion => Some(vec![f("prompt"), f("completion")]),
            DataFormat::Text => Some(vec![f("text")]),
            DataFormat::Chat => match &self.field_messages {
                Some(m) => Some(vec![m.clone()]),
                None => Some(vec!["messages".into(), "conversations".into()]),
            },
        }
    }

    /// Turn a record into an example. `train_on_inputs` marks every chat message as trained.
    pub fn parse(
        &self,
        value: &Value,
        train_on_inputs: bool,
    ) -> std::result::Result<Example, BadRow> {
        let obj = match value {
            Value::Object(o) => o,
            other => {
                return Err(BadRow::new(
                    BadRowKind::InvalidJson,
                    "",
                    format!("the record is {}, not a JSON object", json_type(other)),
                    "each record must be an object such as {\"messages\": [...]}",
                ))
            }
        };
        match self.format {
            DataFormat::Chat => self.parse_chat(obj, train_on_inputs),
            DataFormat::Alpaca
            | DataFormat::AlpacaChat
            | DataFormat::AlpacaChatml
            | DataFormat::AlpacaPhi => {
                let instruction = self.req_str(obj, "instruction")?;
                let input = self.opt_str(obj, "input")?;
                let output = self.req_str_allow_empty(obj, "output")?;
                let system = self.opt_str(obj, "system")?;
                Ok(Example::Alpaca {
                    style: self.format.alpaca_style().expect("an alpaca type"),
                    system,
                    instruction,
                    input,
                    output,
                })
            }
            DataFormat::Completion => {
                let name = &self.fields["prompt"];
                if !obj.contains_key(name.as_str()) && obj.contains_key("text") {
                    return Err(BadRow::new(
                        BadRowKind::MissingField,
                        name,
                        "missing; the record has a `text` field instead",
                        "raw text is `type: text`; `type: completion` expects `prompt` and `completion` fields",
                    ));
                }
                let prompt = self.req_str_allow_empty(obj, "prompt")?;
                let completion = self.req_str(obj, "completion")?;
                Ok(Example::Completion { prompt, completion })
            }
            DataFormat::Text => Ok(Example::Text {
                text: self.req_str(obj, "text")?,
            }),
        }
    }

    fn field_fix(&self, key: &str) -> String {
        format!(
            "add it, or name the field that holds it with `field_{key}: <name>` on the dataset ({} format)",
            self.format.as_str()
        )
    }

    fn get_str(
        &self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
    ) -> std::result::Result<Option<String>, BadRow> {
        let name = &self.fields[key];
        match obj.get(name.as_str()) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(BadRow::new(
                BadRowKind::WrongType,
                name,
                format!("expected a string, found {}", json_type(other)),
                "write the value as a JSON string",
            )),
        }
    }

    fn req_str(
        &self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
    ) -> std::result::Result<String, BadRow> {
        match self.get_str(obj, key)? {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(BadRow::new(
                BadRowKind::MissingField,
                &self.fields[key],
                "is empty",
                "fill it in or remove the record",
            )),
            None => Err(self.missing(obj, key)),
        }
    }

    fn req_str_allow_empty(
        &self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
    ) -> std::result::Result<String, BadRow> {
        match self.get_str(obj, key)? {
            Some(s) => Ok(s),
            None => Err(self.missing(obj, key)),
        }
    }

    fn opt_str(
        &self,
        obj: &serde_json::Map<String, Value>,
        key: &str,
    ) -> std::result::Result<Option<String>, BadRow> {
        Ok(self.get_str(obj, key)?.filter(|s| !s.trim().is_empty()))
    }

    fn missing(&self, obj: &serde_json::Map<String, Value>, key: &str) -> BadRow {
        let name = &self.fields[key];
        if obj.get(name.as_str()).is_some_and(Value::is_null) {
            return BadRow::new(
                BadRowKind::MissingField,
                name,
                "is null",
                "fill it in or remove the record",
            );
        }
        let present: Vec<&str> = obj.keys().map(|k| k.as_str()).take(8).collect();
        BadRow::new(
            BadRowKind::MissingField,
            name,
            format!("missing (the record has: {})", present.join(", ")),
            self.field_fix(key),
        )
    }

    fn parse_chat(
        &self,
        obj: &serde_json::Map<String, Value>,
        train_on_inputs: bool,
    ) -> std::result::Result<Example, BadRow> {
        let (field, list) = match &self.field_messages {
            Some(f) => (f.as_str(), obj.get(f.as_str())),
            None => match obj.get("messages") {
                Some(v) => ("messages", Some(v)),
                None => ("conversations", obj.get("conversations")),
            },
        };
        let list = match list {
            Some(Value::Array(a)) => a,
            Some(Value::Null) | None => {
                let present: Vec<&str> = obj.keys().map(|k| k.as_str()).take(8).collect();
                return Err(BadRow::new(
                    BadRowKind::MissingField,
                    if self.field_messages.is_some() { field } else { "messages" },
                    format!("missing (the record has: {})", present.join(", ")),
                    "chat records hold a list of messages in `messages` (or ShareGPT `conversations`); name another \
                     field with `field_messages: <name>`",
                ));
            }
            Some(other) => {
                return Err(BadRow::new(
                    BadRowKind::WrongType,
                    field,
                    format!("expected a list of messages, found {}", json_type(other)),
                    "write it as [{\"role\": \"user\", \"content\": \"...\"}, ...]",
                ))
            }
        };
        if list.is_empty() {
            return Err(BadRow::new(
                BadRowKind::MissingField,
                field,
                "is an empty list",
                "give each conversation at least one user and one assistant message",
            ));
        }
        let mut messages = Vec::with_capacity(list.len());
        let mut trained = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let m = match m {
                Value::Object(o) => o,
                other => {
                    return Err(BadRow::new(
                        BadRowKind::WrongType,
                        format!("{field}[{i}]"),
                        format!("expected a message object, found {}", json_type(other)),
                        "write each message as {\"role\": ..., \"content\": ...}",
                    ))
                }
            };
            let (rk, ck) = match &self.mappings {
                Some((r, c)) => (r.as_str(), c.as_str()),
                None if !m.contains_key("role") && m.contains_key("from") => ("from", "value"),
                None => ("role", "content"),
            };
            let role_name = match m.get(rk) {
                Some(Value::String(s)) => s,
                None | Some(Value::Null) => {
                    return Err(BadRow::new(
                        BadRowKind::MissingField,
                        format!("{field}[{i}].{rk}"),
                        "missing",
                        "give every message a role, or map the role field with `message_property_mappings: {role: <name>, content: <name>}`",
                    ))
                }
                Some(other) => {
                    return Err(BadRow::new(
                        BadRowKind::WrongType,
                        format!("{field}[{i}].{rk}"),
                        format!("expected a string, found {}", json_type(other)),
                        "write the role as a string such as \"user\"",
                    ))
                }
            };
            let role = match self.role_map.get(role_name.as_str()) {
                Some(r) => r.clone(),
                None => {
                    let mut known: Vec<&str> = self.role_map.keys().map(|s| s.as_str()).collect();
                    known.sort();
                    return Err(BadRow::new(
                        BadRowKind::UnknownRole,
                        format!("{field}[{i}].{rk}"),
                        format!("unknown role `{role_name}` (known: {})", known.join(", ")),
                        format!("map it on the dataset, e.g. `roles: {{assistant: [{role_name}]}}`, or fix the record"),
                    ));
                }
            };
            let content = match m.get(ck) {
                Some(Value::String(s)) => s.clone(),
                // OpenAI tool-call messages carry `content: null` beside their `tool_calls`; anywhere else a
                // null content would train an empty turn without a word.
                Some(Value::Null) if m.get("tool_calls").is_some_and(|t| !t.is_null()) => String::new(),
                Some(Value::Null) => {
                    return Err(BadRow::new(
                        BadRowKind::MissingField,
                        format!("{field}[{i}].{ck}"),
                        "is null",
                        "give the message its text (only a message with `tool_calls` may have a null content)",
                    ))
                }
                None => {
                    return Err(BadRow::new(
                        BadRowKind::MissingField,
                        format!("{field}[{i}].{ck}"),
                        "missing",
                        "give every message a content, or map the content field with `message_property_mappings`",
                    ))
                }
                Some(other) => {
                    return Err(BadRow::new(
                        BadRowKind::WrongType,
                        format!("{field}[{i}].{ck}"),
                        format!("expected a string, found {}", json_type(other)),
                        "write the content as one string (lists of content parts are not supported)",
                    ))
                }
            };
            let mut extra = serde_json::Map::new();
            for (k, v) in m {
                if k != rk && k != ck {
                    extra.insert(k.clone(), v.clone());
                }
            }
            trained.push(train_on_inputs || self.roles_to_train.contains(&role));
            messages.push(Message {
                role,
                content,
                extra,
            });
        }
        if self.drop_system_message && messages.first().is_some_and(|m| m.role == "system") {
            messages.remove(0);
            trained.remove(0);
        }
        if !trained.iter().any(|&t| t) {
            return Err(BadRow::new(
                BadRowKind::NothingToTrain,
                field,
                format!(
                    "no message with a trained role ({}): the record would contribute no loss",
                    self.roles_to_train.join(", ")
                ),
                "add the assistant reply, or change `roles_to_train`",
            ));
        }
        Ok(Example::Chat { messages, trained })
    }
}
