//! Hugging Face chat templates (Jinja) rendered with minijinja the way transformers renders them.
//!
//! transformers (`utils/chat_template_utils.py`) compiles a template in a sandboxed Jinja2 environment with
//! `trim_blocks=True`, `lstrip_blocks=True` and the loop-controls extension, replaces the `tojson` filter by
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` (no HTML escaping), adds the
//! globals `raise_exception(message)` and `strftime_now(format)`, and renders with the variables `messages`,
//! `tools` (None), `documents` (None), `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`).
//! `{% generation %}…{% endgeneration %}` marks assistant text for masks and does not change the output.
//!
//! This module reproduces that: Python string methods come from minijinja-contrib's `pycompat`, `None`/`True`/`False`
//! print as Python prints them, and the `{% generation %}` tags become a filter block so that their byte spans can
//! be reported ([`ChatTemplate::render_with_spans`]).

use std::cell::RefCell;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message: `role`, `content`, and any other fields (`name`, `tool_calls`, `tool_call_id`, ...), which are
/// kept in order and passed to the template unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Fields other than `role` and `content`, in the order they were read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with only a role and a content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
}

/// Names accepted by [`ChatTemplate::builtin`].
pub const BUILTIN_TEMPLATES: &[&str] = &[
    "chatml", "llama3", "mistral", "gemma", "phi3", "qwen2_5", "qwen3", "alpaca",
];

/// The text of a built-in template and the special tokens of the model it comes from.
struct Builtin {
    source: &'static str,
    bos: Option<&'static str>,
    eos: Option<&'static str>,
}

fn builtin_entry(name: &str) -> Option<Builtin> {
    let b = match name.to_ascii_lowercase().as_str() {
        // Generic ChatML (no default system prompt), as in llama-cpp-python's CHATML_CHAT_TEMPLATE.
        "chatml" => Builtin {
            source: include_str!("templates/chatml.jinja"),
            bos: None,
            eos: Some("<|im_end|>"),
        },
        // meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json.
        "llama3" | "llama-3" => Builtin {
            source: include_str!("templates/llama3.jinja"),
            bos: Some("<|begin_of_text|>"),
            eos: Some("<|eot_id|>"),
        },
        // mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json.
        "mistral" | "mistral_v1" => Builtin {
            source: include_str!("templates/mistral.jinja"),
            bos: Some("<s>"),
            eos: Some("</s>"),
        },
        // google/gemma-2-2b-it tokenizer_config.json.
        "gemma" | "gemma2" => Builtin {
            source: include_str!("templates/gemma.jinja"),
            bos: Some("<bos>"),
            eos: Some("<eos>"),
        },
        // microsoft/Phi-3.5-mini-instruct tokenizer_config.json.
        "phi3" | "phi-3" | "phi_3" | "phi_35" => Builtin {
            source: include_str!("templates/phi3.jinja"),
            bos: Some("<s>"),
            eos: Some("<|endoftext|>"),
        },
        // Qwen/Qwen2.5-7B-Instruct tokenizer_config.json (Axolotl's `qwen_25`).
        "qwen2_5" | "qwen_25" | "qwen2.5" => Builtin {
            source: include_str!("templates/qwen2_5.jinja"),
            bos: None,
            eos: Some("<|im_end|>"),
        },
        // Qwen/Qwen3-0.6B tokenizer_config.json (the Qwen3 family's template).
        "qwen3" => Builtin {
            source: include_str!("templates/qwen3.jinja"),
            bos: None,
            eos: Some("<|im_end|>"),
        },
        // The Stanford Alpaca prompt as a chat template (written for loratune).
        "alpaca" => Builtin {
            source: include_str!("templates/alpaca.jinja"),
            bos: Some("<s>"),
            eos: Some("</s>"),
        },
        _ => return None,
    };
    Some(b)
}

/// Tokens that end a turn in common templates; see [`ChatTemplate::end_of_turn_tokens`].
pub(crate) const KNOWN_END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_turn|>",
];

const TEMPLATE_NAME: &str = "chat_template";
/// Unicode noncharacters used to mark `{% generation %}` output while rendering with spans.
const GEN_START: char = '\u{FDD0}';
const GEN_END: char = '\u{FDD1}';
const GENERATION_FILTER: &str = "__loratune_generation";

thread_local! {
    /// The message given to `raise_exception` during the current render on this thread.
    static RAISED: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether `{% generation %}` blocks are being marked on this thread.
    static MARK_GENERATION: RefCell<bool> = const { RefCell::new(false) };
}

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Arc<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    fixed_now: Option<chrono::NaiveDateTime>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source` (a Jinja chat template as found in `tokenizer_config.json`, `chat_template.jinja` or GGUF
    /// `tokenizer.chat_template`). `bos_token` / `eos_token` are the strings the template sees; `None` leaves the
    /// variable undefined (as transformers does for a tokenizer without that token).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let env = build_env(source, None)?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env: Arc::new(env),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            fixed_now: None,
        })
    }

    /// A built-in template (one of [`BUILTIN_TEMPLATES`]) with the special tokens of the model it comes from.
    /// Use [`ChatTemplate::builtin_source`] with [`ChatTemplate::new`] to render it with another model's tokens.
    pub fn builtin(name: &str) -> Result<Self> {
        let b = builtin_entry(name).ok_or_else(|| unknown_builtin(name))?;
        Self::new(b.source, b.bos, b.eos)
    }

    /// The exact text of a built-in template.
    pub fn builtin_source(name: &str) -> Result<&'static str> {
        builtin_entry(name)
            .map(|b| b.source)
            .ok_or_else(|| unknown_builtin(name))
    }

    /// Freeze the clock behind `strftime_now` (for reproducible renders, e.g. Llama 3.1's "Today Date").
    pub fn with_fixed_now(mut self, now: chrono::NaiveDateTime) -> Result<Self> {
        self.env = Arc::new(build_env(&self.source, Some(now))?);
        self.fixed_now = Some(now);
        Ok(self)
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` the template is rendered with.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The `eos_token` the template is rendered with.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation_blocks(&self) -> bool {
        generation_tag_regex(false).is_match(&self.source)
    }

    /// Render `messages`. `add_generation_prompt` appends the header of an assistant turn (for generation).
    /// A `raise_exception(...)` in the template becomes an error carrying its message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_inner(messages, add_generation_prompt, false)
    }

    /// Render and also return the byte ranges of the output produced inside `{% generation %}` blocks
    /// (empty when the template has none).
    pub fn render_with_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        for (i, m) in messages.iter().enumerate() {
            let has_marker = |s: &str| s.contains(GEN_START) || s.contains(GEN_END);
            if has_marker(&m.content)
                || has_marker(&serde_json::Value::Object(m.extra.clone()).to_string())
            {
                return Err(Error::Tokenizer(format!(
                    "message {i} contains the Unicode noncharacter U+FDD0 or U+FDD1, which loratune reserves to \
                     locate {{% generation %}} blocks; remove it from the data"
                )));
            }
        }
        let marked = self.render_inner(messages, add_generation_prompt, true)?;
        let mut out = String::with_capacity(marked.len());
        let mut spans = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        for c in marked.chars() {
            match c {
                GEN_START => open.push(out.len()),
                GEN_END => {
                    let start = open.pop().ok_or_else(|| {
                        Error::Tokenizer("chat template: unbalanced {% generation %} output".into())
                    })?;
                    // Nested blocks: report only the outermost span.
                    if open.is_empty() {
                        spans.push(start..out.len());
                    }
                }
                c => out.push(c),
            }
        }
        if !open.is_empty() {
            return Err(Error::Tokenizer(
                "chat template: unbalanced {% generation %} output".into(),
            ));
        }
        Ok((out, spans))
    }

    fn render_inner(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        mark: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))?;
        let messages: Vec<serde_json::Value> =
            messages.iter().map(message_to_template_value).collect();
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), serde_json::Value::Array(messages));
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), b.clone().into());
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), e.clone().into());
        }
        RAISED.with(|r| r.borrow_mut().take());
        MARK_GENERATION.with(|m| *m.borrow_mut() = mark);
        let result = tmpl.render(json_to_value(&serde_json::Value::Object(ctx)));
        MARK_GENERATION.with(|m| *m.borrow_mut() = false);
        let raised = RAISED.with(|r| r.borrow_mut().take());
        match result {
            Ok(s) => Ok(s),
            Err(e) => match raised {
                Some(msg) => Err(Error::Tokenizer(format!(
                    "chat template raised an error: {msg}"
                ))),
                None if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::Tokenizer(format!(
                    "chat template stopped: it used up its budget of {} steps (~{} MB of text) for one render — \
                     it loops without end or builds huge strings; fix or replace the template",
                    crate::limits::TEMPLATE_FUEL,
                    (crate::limits::TEMPLATE_FUEL * 64) >> 20
                ))),
                None => Err(Error::Tokenizer(format!(
                    "chat template failed to render: {e:#}"
                ))),
            },
        }
    }

    /// End-of-turn tokens this template writes: the known ones (`<|im_end|>`, `<|eot_id|>`, `<|eom_id|>`,
    /// `<end_of_turn>`, `<|end|>`, ...) that occur in its text, then `eos_token` when the template emits it.
    /// These are the stop tokens for generation and the extra `eos_token_id`s of `generation_config.json`.
    pub fn end_of_turn_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = KNOWN_END_OF_TURN
            .iter()
            .filter(|t| self.source.contains(*t))
            .map(|t| t.to_string())
            .collect();
        if let Some(eos) = &self.eos_token {
            if self.source.contains("eos_token") && !out.contains(eos) {
                out.push(eos.clone());
            }
        }
        out
    }
}

/// A JSON value as a template value (maps keep their key order).
fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => {
            Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

fn unknown_builtin(name: &str) -> Error {
    Error::Tokenizer(format!(
        "unknown built-in chat template `{name}`; built-in templates are: {} (or set `chat_template` to the \
         template text / the model's own template)",
        BUILTIN_TEMPLATES.join(", ")
    ))
}

/// A message as transformers hands it to the template: `None`-valued fields dropped, and reasoning text copied to
/// both `thinking` and `reasoning_content` (transformers' `_alias_reasoning_fields`).
fn message_to_template_value(m: &Message) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| m.extra.get(*k).filter(|v| !v.is_null()).cloned());
    if let Some(r) = &reasoning {
        map.insert("thinking".into(), r.clone());
    }
    map.insert("role".into(), m.role.clone().into());
    map.insert("content".into(), m.content.clone().into());
    for (k, v) in &m.extra {
        if !v.is_null() {
            map.insert(k.clone(), v.clone());
        }
    }
    if let Some(r) = reasoning {
        // `{"thinking": r, **message, "reasoning_content": r}`: the last assignment wins, at the key's first position.
        map.insert("reasoning_content".into(), r);
    }
    serde_json::Value::Object(map)
}

fn generation_tag_regex(end: bool) -> regex::Regex {
    let word = if end { "endgeneration" } else { "generation" };
    // The pattern is a constant; it compiles.
    regex::Regex::new(&format!(r"\{{%([-+]?)\s*{word}\s*([-+]?)%\}}"))
        .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
}

/// Turn `{% generation %}` / `{% endgeneration %}` into a filter block (same whitespace control).
fn rewrite_generation_tags(source: &str) -> String {
    let s = generation_tag_regex(true).replace_all(source, "{%${1} endfilter ${2}%}");
    generation_tag_regex(false)
        .replace_all(
            &s,
            format!("{{%${{1}} filter {GENERATION_FILTER} ${{2}}%}}").as_str(),
        )
        .into_owned()
}

fn build_env(
    source: &str,
    fixed_now: Option<chrono::NaiveDateTime>,
) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    // Bounds the time and the memory one render may take (a hostile template in a downloaded GGUF).
    env.set_fuel(Some(crate::limits::TEMPLATE_FUEL));
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| Error::Tokenizer(format!("chat template syntax config: {e}")))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(bounded_pycompat);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", python_str_filter);
    env.add_filter(GENERATION_FILTER, generation_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: String| {
        strftime_now(&format, fixed_now)
    });
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
        .map_err(|e| {
            Error::Tokenizer(format!(
                "chat template does not compile: {e:#}; fix the template text (`chat_template` in the config, \
                 tokenizer_config.json or chat_template.jinja)"
            ))
        })?;
    Ok(env)
}

/// Print values the way Jinja2 (Python) prints them: `None`, `True`, `False`; undefined prints nothing.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(minijinja::Error::from),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(minijinja::Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `str(x)` as Python writes it: `None`, `True`, `False` (minijinja's own `string` filter writes `none`, `true`).
fn python_str_filter(value: &Value) -> Value {
    match value.kind() {
        ValueKind::None => Value::from("None"),
        ValueKind::Bool => Value::from(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => value.clone(),
        _ => Value::from(value.to_string()),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    RAISED.with(|r| *r.borrow_mut() = Some(message.clone()));
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn generation_filter(body: String) -> String {
    if MARK_GENERATION.with(|m| *m.borrow()) {
        let mut s = String::with_capacity(body.len() + 6);
        s.push(GEN_START);
        s.push_str(&body);
        s.push(GEN_END);
        s
    } else {
        body
    }
}

fn strftime_now(
    format: &str,
    fixed_now: Option<chrono::NaiveDateTime>,
) -> std::result::Result<String, minijinja::Error> {
    let now = fixed_now.unwrap_or_else(|| chrono::Local::now().naive_local());
    let mut s = String::new();
    write!(s, "{}", now.format(format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format string {format:?}"),
        )
    })?;
    Ok(s)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, i.e. Python's
/// `json.dumps` with those arguments (positional or keyword).
/// Python's string methods (minijinja-contrib's pycompat), except that the two whose result size comes from their
/// arguments — `str.format` field widths and `str.replace` — are refused when they would build a string above
/// [`crate::limits::TEMPLATE_STRING`] (pycompat allocates them before fuel could stop it).
fn bounded_pycompat(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let limit = crate::limits::TEMPLATE_STRING;
    if let Some(s) = value.as_str() {
        let too_big = match method {
            "format" => format_field_width(s) > limit as u64,
            "replace" => match (
                args.first().and_then(|a| a.as_str()),
                args.get(1).and_then(|a| a.as_str()),
            ) {
                (Some(old), Some(new)) => {
                    let hits = if old.is_empty() {
                        s.chars().count() + 1
                    } else {
                        s.matches(old).count()
                    };
                    hits.saturating_mul(new.len()).saturating_add(s.len()) > limit
                }
                _ => false,
            },
            _ => false,
        };
        if too_big {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("str.{method} would build a string above {limit} bytes"),
            ));
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// The largest number written inside a `{...}` replacement field of a `str.format` pattern (its width or
/// precision), saturating.
fn format_field_width(pattern: &str) -> u64 {
    let mut widest = 0u64;
    let mut in_field = false;
    let mut n = 0u64;
    let mut prev = '\0';
    for c in pattern.chars() {
        match c {
            '{' if !in_field => in_field = prev != '{',
            '}' => in_field = false,
            d if in_field && d.is_ascii_digit() => {
                n = n.saturating_mul(10).saturating_add(d as u64 - '0' as u64);
                widest = widest.max(n);
            }
            _ => {}
        }
        if !c.is_ascii_digit() {
            n = 0;
        }
        prev = c;
    }
    widest
}

fn tojson_filter(
    value: &Value,
    args: Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.0.len() > names.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments (ensure_ascii, indent, separators, sort_keys)",
        ));
    }
    let mut opts: [Option<Value>; 4] = Default::default();
    for (i, a) in args.0.iter().enumerate() {
        opts[i] = Some(a.clone());
    }
    for (i, n) in names.iter().enumerate() {
        if kwargs.has(n) {
            if opts[i].is_some() {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument {n}"),
                ));
            }
            opts[i] = Some(kwargs.get::<Value>(n)?);
        }
    }
    kwargs.assert_all_used()?;
    let ensure_ascii = opts[0].as_ref().is_some_and(|v| v.is_true());
    let indent: Option<String> = match &opts[1] {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or a string",
                    )
                })?;
                let n = usize::try_from(n).unwrap_or(0);
                if n > crate::limits::TEMPLATE_INDENT {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "tojson: indent {n} is above the limit of {}",
                            crate::limits::TEMPLATE_INDENT
                        ),
                    ));
                }
                Some(" ".repeat(n))
            }
        },
    };
    let (item_sep, key_sep) = match &opts[2] {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let sort_keys = opts[3].as_ref().is_some_and(|v| v.is_true());
    let d = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    d.dump(value, 0, &mut out)?;
    Ok(Value::from(out))
}

struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn dump(
        &self,
        v: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        if level > 512 {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: value nested too deeply",
            ));
        }
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Undefined => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type Undefined is not JSON serializable",
                ))
            }
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float_repr(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Bytes => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type bytes is not JSON serializable",
                ))
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    let key = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
                        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
                        ValueKind::None => "null".to_string(),
                        ValueKind::Number if k.is_integer() => k.to_string(),
                        ValueKind::Number => python_float_repr(f64::try_from(k.clone())?),
                        _ => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                format!(
                                    "tojson: keys must be str, int, float, bool or None, not {}",
                                    k.kind()
                                ),
                            ))
                        }
                    };
                    self.string(&key, out);
                    out.push_str(&self.key_sep);
                    let item = v.get_item(k)?;
                    self.dump(&item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.dump(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: value {v} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{:04x}", unit);
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` (also what `json.dumps` writes): shortest round-trip digits, exponent form when the
/// decimal exponent is < -4 or >= 16, `NaN` / `Infinity` / `-Infinity`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddde±x".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // position of the decimal point within `digits`
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat(point.unsigned_abs() as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
    }

    fn read(p: &std::path::Path) -> String {
        std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Every (template × conversation × add_generation_prompt) rendered by transformers 5.24
    /// (scripts/reference/chat_template_reference.py) is reproduced byte for byte, including the
    /// `raise_exception` messages; cases where Jinja2 failed otherwise must fail here too.
    #[test]
    fn matches_transformers_renderer() {
        let expected: serde_json::Value =
            serde_json::from_str(&read(&fixtures().join("expected.json"))).unwrap();
        let now = chrono::NaiveDateTime::parse_from_str(
            expected["fixed_now"].as_str().unwrap(),
            "%Y-%m-%dT%H:%M:%S",
        )
        .unwrap();
        let convs = expected["conversations"].as_object().unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert!(
            cases.len() >= 100,
            "expected.json has only {} cases",
            cases.len()
        );
        let mut failures = Vec::new();
        let mut templates = std::collections::BTreeSet::new();
        let (mut texts, mut raised, mut errors, mut spans_checked) = (0, 0, 0, 0);
        for case in cases {
            let name = case["template"].as_str().unwrap();
            templates.insert(name.to_string());
            let source = read(&fixtures().join(name));
            let t = ChatTemplate::new(
                &source,
                case["bos_token"].as_str(),
                case["eos_token"].as_str(),
            )
            .unwrap()
            .with_fixed_now(now)
            .unwrap();
            let conv = case["conversation"].as_str().unwrap();
            let messages: Vec<Message> = serde_json::from_value(convs[conv].clone()).unwrap();
            let gp = case["add_generation_prompt"].as_bool().unwrap();
            let got = t.render(&messages, gp);
            let label = format!("{name} / {conv} / add_generation_prompt={gp}");
            if let Some(want) = case.get("text").and_then(|v| v.as_str()) {
                texts += 1;
                match got {
                    Ok(s) if s == want => {}
                    Ok(s) => failures.push(format!("{label}:\n--- want\n{want:?}\n--- got\n{s:?}")),
                    Err(e) => failures.push(format!("{label}: unexpected error {e}")),
                }
                let want_spans: Vec<Range<usize>> = case["generation_spans"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p[0].as_u64().unwrap() as usize..p[1].as_u64().unwrap() as usize)
                    .collect();
                spans_checked += want_spans.len();
                match t.render_with_spans(&messages, gp) {
                    Ok((s, spans)) if s == want && spans == want_spans => {}
                    other => {
                        failures.push(format!("{label}: spans want {want_spans:?}, got {other:?}"))
                    }
                }
            } else if let Some(msg) = case.get("raise_exception").and_then(|v| v.as_str()) {
                raised += 1;
                match got {
                    Err(e) if e.to_string() == format!("chat template raised an error: {msg}") => {}
                    other => failures.push(format!(
                        "{label}: want raise_exception({msg:?}), got {other:?}"
                    )),
                }
            } else {
                errors += 1;
                if got.is_ok() {
                    failures.push(format!(
                        "{label}: Jinja2 failed ({}) but we rendered",
                        case["error"]
                    ));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        assert!(templates.len() >= 13);
        assert!(
            spans_checked >= 10,
            "only {spans_checked} generation spans checked"
        );
        eprintln!(
            "chat templates: {} templates, {} cases matched ({texts} texts, {raised} raise_exception, {errors} \
             errors, {spans_checked} generation spans)",
            templates.len(),
            cases.len()
        );
    }

    #[test]
    fn builtins_are_the_real_templates() {
        let pairs = [
            ("chatml", "chatml.jinja"),
            ("llama3", "meta-llama-Meta-Llama-3-8B-Instruct.jinja"),
            ("mistral", "mistralai-Mistral-7B-Instruct-v0.1.jinja"),
            ("gemma", "google-gemma-2-2b-it.jinja"),
            ("phi3", "microsoft-Phi-3.5-mini-instruct.jinja"),
            ("qwen2_5", "Qwen-Qwen2.5-7B-Instruct.jinja"),
            ("qwen3", "Qwen-Qwen3-0.6B.jinja"),
            ("alpaca", "alpaca.jinja"),
        ];
        for (name, file) in pairs {
            assert_eq!(
                ChatTemplate::builtin_source(name).unwrap(),
                read(&fixtures().join(file)),
                "{name}"
            );
            ChatTemplate::builtin(name).unwrap();
        }
        assert_eq!(pairs.len(), BUILTIN_TEMPLATES.len());
        let err = ChatTemplate::builtin("vicuna").unwrap_err().to_string();
        assert!(
            err.contains("vicuna")
                && err.contains("chatml, llama3, mistral, gemma, phi3, qwen2_5, qwen3, alpaca"),
            "{err}"
        );
    }

    #[test]
    fn builtin_renders_hand_checked_strings() {
        let msgs = vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
        ];
        let chatml = ChatTemplate::builtin("chatml")
            .unwrap()
            .render(&msgs, false)
            .unwrap();
        assert_eq!(
            chatml,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        );
        let alpaca = ChatTemplate::builtin("alpaca")
            .unwrap()
            .render(&msgs[..1], true)
            .unwrap();
        assert_eq!(
            alpaca,
            "<s>Below is an instruction that describes a task. Write a response that appropriately completes \
             the request.\n\n### Instruction:\nHi\n\n### Response:\n"
        );
        let mistral = ChatTemplate::builtin("mistral")
            .unwrap()
            .render(&msgs, false)
            .unwrap();
        assert_eq!(mistral, "<s>[INST] Hi [/INST]Hello</s> ");
    }

    #[test]
    fn python_semantics() {
        let t = |src: &str| {
            ChatTemplate::new(src, Some("<s>"), None)
                .unwrap()
                .render(&[], false)
                .unwrap()
        };
        assert_eq!(
            t("{{ none }}|{{ true }}|{{ false }}|{{ undefined_var }}"),
            "None|True|False|"
        );
        assert_eq!(
            t("{{ '  x  '.strip() }}{{ 'abc'.startswith('a') }}{{ 'a,b'.split(',') | length }}"),
            "xTrue2"
        );
        assert_eq!(
            t("{% for k, v in {'b': 1, 'a': 2}.items() %}{{ k }}{{ v }}{% endfor %}"),
            "b1a2"
        );
        assert_eq!(
            t("{{ 'x'.upper() + bos_token }}{{ eos_token is defined }}"),
            "X<s>False"
        );
        assert_eq!(
            t("{% for i in range(5) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"),
            "02"
        );
        // trim_blocks + lstrip_blocks, and the final newline of the template dropped (Jinja2 default).
        assert_eq!(t("  {% if true %}\nA\n  {% endif %}\nB\n"), "A\nB");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = |src: &str| {
            ChatTemplate::new(src, None, None)
                .unwrap()
                .render(&[], false)
                .unwrap()
        };
        let v = r#"{'b': [1, 2.5, none, true], 'a': "<é>\n\"", 'c': {}, 'd': []}"#;
        assert_eq!(
            t(&format!("{{{{ {v} | tojson }}}}")),
            r#"{"b": [1, 2.5, null, true], "a": "<é>\n\"", "c": {}, "d": []}"#
        );
        assert_eq!(
            t(&format!("{{{{ {v} | tojson(indent=2) }}}}")),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"<é>\\n\\\"\",\n  \"c\": {},\n  \"d\": []\n}"
        );
        assert_eq!(
            t(&format!(
                "{{{{ {v} | tojson(sort_keys=true, separators=(',', ':')) }}}}"
            )),
            r#"{"a":"<é>\n\"","b":[1,2.5,null,true],"c":{},"d":[]}"#
        );
        assert_eq!(
            t("{{ 'é🦙' | tojson(ensure_ascii=true) }}"),
            r#""\u00e9\ud83e\udd99""#
        );
        assert_eq!(
            t("{{ [1e20, 0.0001, 1e-5, 3.0, -0.5] | tojson }}"),
            "[1e+20, 0.0001, 1e-05, 3.0, -0.5]"
        );
    }

    #[test]
    fn raise_exception_and_compile_errors_are_clear() {
        let t =
            ChatTemplate::new("{{ raise_exception('Roles must alternate') }}", None, None).unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert_eq!(e, "chat template raised an error: Roles must alternate");
        let e = ChatTemplate::new("{% for m in messages %}", None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not compile") && e.contains("chat_template"),
            "{e}"
        );
        let e = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None)
            .unwrap()
            .render(&[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("strftime_now"), "{e}");
    }

    #[test]
    fn chat_template_is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<ChatTemplate>();
        check::<crate::tokenizer::LoadedTokenizer>();
        let t = ChatTemplate::builtin("chatml").unwrap();
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.render(&[Message::new("user", "x")], true).unwrap());
        assert_eq!(
            h.join().unwrap(),
            t.render(&[Message::new("user", "x")], true).unwrap()
        );
    }

    #[test]
    fn strftime_now_uses_the_clock() {
        let now = chrono::NaiveDate::from_ymd_opt(2024, 7, 26)
            .unwrap()
            .and_hms_opt(9, 30, 0)
            .unwrap();
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y %H:%M') }}", None, None)
            .unwrap()
            .with_fixed_now(now)
            .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "26 Jul 2024 09:30");
    }

    #[test]
    fn generation_blocks_render_as_block_tags_and_give_spans() {
        // `{% generation %}` is a block tag: trim_blocks eats the newline after `{% endgeneration %}`, as in Jinja2.
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}";
        let msgs = vec![
            Message::new("user", "hi"),
            Message::new("assistant", "héllo"),
            Message::new("user", "q"),
            Message::new("assistant", "ok"),
        ];
        let t = ChatTemplate::new(src, None, Some("</s>")).unwrap();
        assert!(t.has_generation_blocks());
        let want = "U: hi\nA: héllo</s>U: q\nA: ok</s>";
        assert_eq!(t.render(&msgs, false).unwrap(), want);
        let (text, spans) = t.render_with_spans(&msgs, false).unwrap();
        assert_eq!(text, want);
        let pieces: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(pieces, vec!["héllo</s>", "ok</s>"]);
        // Whitespace control on the tags is kept.
        let t2 = ChatTemplate::new("x  {%- generation -%}  y  {%- endgeneration %}", None, None)
            .unwrap();
        assert_eq!(
            t2.render_with_spans(&[], false).unwrap(),
            ("xy".to_string(), std::iter::once(1..2).collect::<Vec<_>>())
        );
        // Reserved marker characters in the data are refused, not silently mangled.
        let bad = vec![Message::new("assistant", "a\u{FDD0}b")];
        assert!(t
            .render_with_spans(&bad, false)
            .unwrap_err()
            .to_string()
            .contains("U+FDD0"));
    }

    #[test]
    fn messages_keep_extra_fields() {
        let m: Message =
            serde_json::from_str(r#"{"role":"user","content":"x","name":"bob","weight":0}"#)
                .unwrap();
        assert_eq!(m.extra.len(), 2);
        let back = serde_json::to_string(&m).unwrap();
        assert_eq!(
            back,
            r#"{"role":"user","content":"x","name":"bob","weight":0}"#
        );
        let t = ChatTemplate::new(
            "{{ messages[0].name }}|{{ messages[0] | tojson }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[m], false).unwrap(),
            r#"bob|{"role": "user", "content": "x", "name": "bob", "weight": 0}"#
        );
    }

    #[test]
    fn end_of_turn_tokens_found_in_templates() {
        let eot = |n: &str| ChatTemplate::builtin(n).unwrap().end_of_turn_tokens();
        assert_eq!(eot("chatml"), vec!["<|im_end|>"]);
        assert_eq!(eot("llama3"), vec!["<|eot_id|>"]);
        assert_eq!(eot("gemma"), vec!["<end_of_turn>"]);
        assert_eq!(eot("phi3"), vec!["<|end|>", "<|endoftext|>"]);
        assert_eq!(eot("mistral"), vec!["</s>"]);
    }
}
