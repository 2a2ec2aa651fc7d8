//! Ollama Modelfiles: `FROM` (a GGUF next to the Modelfile), optional `ADAPTER` (a GGUF LoRA adapter),
//! `TEMPLATE """…"""` in Go template syntax, `PARAMETER stop "…"` lines and `SYSTEM """…"""`.
//!
//! Ollama does not run Jinja chat templates; it needs one of its own Go templates. The model's Jinja template
//! is classified into a family by its markers and Ollama's standard template for that family is emitted (the
//! ones Ollama ships in `template/*.gotmpl`, which iterate over `.Messages`; Ollama inserts the Modelfile's
//! `SYSTEM` as the first message when a request has none):
//!
//! | family | recognised by | Ollama template | stop parameters |
//! |--------|---------------|-----------------|-----------------|
//! | `llama3` | `<\|start_header_id\|>` and `<\|eot_id\|>` | llama3-instruct | `<\|start_header_id\|>`, `<\|end_header_id\|>`, `<\|eot_id\|>` |
//! | `chatml` | `<\|im_start\|>` and `<\|im_end\|>` | chatml | `<\|im_start\|>`, `<\|im_end\|>` |
//! | `gemma` | `<start_of_turn>` and `<end_of_turn>` | gemma-instruct | `<start_of_turn>`, `<end_of_turn>` |
//! | `phi3` | `<\|user\|>`, `<\|assistant\|>` and `<\|end\|>` | phi-3 | `<\|end\|>`, `<\|user\|>`, `<\|assistant\|>` |
//! | `mistral` | `[INST]` and `[/INST]` | mistral-instruct | `[INST]`, `[/INST]` |
//!
//! The model's own end-of-turn / end-of-sequence tokens are added to the stop list. A default system prompt
//! (the text the Jinja template inserts when the conversation has no system message, e.g. SmolLM2's "You are a
//! helpful AI assistant named SmolLM, …") becomes `SYSTEM`, so Ollama's prompt equals the Jinja rendering.
//!
//! A fine-tune's export replaces that default with the system message most of its training conversations carried
//! (recorded by the run in the adapter's `loratune.json`), or with `export --system`, so the model is prompted
//! the way it was trained.
//!
//! A base that is already in Ollama (`ollama://NAME:TAG`) is not copied: the folder holds the GGUF LoRA adapter
//! and a Modelfile `FROM NAME:TAG` + `ADAPTER ./adapter.gguf` that keeps the source's own TEMPLATE, PARAMETERs and
//! SYSTEM ([`modelfile_for_ollama_base`]).

use std::path::Path;

use crate::error::{Error, Result};
use crate::tokenizer::{ChatTemplate, LoadedTokenizer, Message};

/// Chat-template families with a standard Ollama template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFamily {
    ChatMl,
    Llama3,
    Gemma,
    Mistral,
    Phi3,
}

const CHATML: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
";

const LLAMA3: &str = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

";

const GEMMA: &str = "{{- $system := \"\" }}
{{- range .Messages }}
{{- if eq .Role \"system\" }}
{{- if not $system }}{{ $system = .Content }}
{{- else }}{{ $system = printf \"%s\\n\\n%s\" $system .Content }}
{{- end }}
{{- continue }}
{{- else if eq .Role \"user\" }}<start_of_turn>user
{{- if $system }}
{{ $system }}
{{- $system = \"\" }}
{{- end }}
{{- else if eq .Role \"assistant\" }}<start_of_turn>model
{{- end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
";

const MISTRAL: &str = "[INST] {{ range $index, $_ := .Messages }}
{{- if eq .Role \"system\" }}{{ .Content }}

{{ else if eq .Role \"user\" }}{{ .Content }}[/INST]
{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>[INST] {{ end }}
{{- end }}";

const PHI3: &str = "{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
";

impl TemplateFamily {
    /// Every family, in detection order.
    pub const ALL: &'static [TemplateFamily] = &[
        TemplateFamily::Llama3,
        TemplateFamily::ChatMl,
        TemplateFamily::Gemma,
        TemplateFamily::Phi3,
        TemplateFamily::Mistral,
    ];

    /// The name used by `--template`.
    pub fn name(self) -> &'static str {
        match self {
            TemplateFamily::ChatMl => "chatml",
            TemplateFamily::Llama3 => "llama3",
            TemplateFamily::Gemma => "gemma",
            TemplateFamily::Mistral => "mistral",
            TemplateFamily::Phi3 => "phi3",
        }
    }

    fn names() -> String {
        Self::ALL
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parse a `--template` value.
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::Export(format!(
                    "unknown Ollama template `{s}`; choose one of {}",
                    Self::names()
                ))
            })
    }

    fn markers(self) -> &'static [&'static str] {
        match self {
            TemplateFamily::Llama3 => &["<|start_header_id|>", "<|eot_id|>"],
            TemplateFamily::ChatMl => &["<|im_start|>", "<|im_end|>"],
            TemplateFamily::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            TemplateFamily::Phi3 => &["<|user|>", "<|assistant|>", "<|end|>"],
            TemplateFamily::Mistral => &["[INST]", "[/INST]"],
        }
    }

    /// The family a Jinja chat template belongs to, from its markers.
    pub fn detect(jinja: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.markers().iter().all(|m| jinja.contains(m)))
    }

    /// Ollama's standard Go template for this family.
    pub fn go_template(self) -> &'static str {
        match self {
            TemplateFamily::ChatMl => CHATML,
            TemplateFamily::Llama3 => LLAMA3,
            TemplateFamily::Gemma => GEMMA,
            TemplateFamily::Mistral => MISTRAL,
            TemplateFamily::Phi3 => PHI3,
        }
    }

    /// The stop parameters Ollama's library uses for this family.
    pub fn stop_markers(self) -> &'static [&'static str] {
        match self {
            TemplateFamily::ChatMl => &["<|im_start|>", "<|im_end|>"],
            TemplateFamily::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            TemplateFamily::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            TemplateFamily::Mistral => &["[INST]", "[/INST]"],
            TemplateFamily::Phi3 => &["<|end|>", "<|user|>", "<|assistant|>"],
        }
    }

    /// How the family writes a system turn: (text before the prompt, text after it).
    fn system_block(self) -> Option<(&'static str, &'static str)> {
        match self {
            TemplateFamily::ChatMl => Some(("<|im_start|>system\n", "<|im_end|>")),
            TemplateFamily::Llama3 => Some((
                "<|start_header_id|>system<|end_header_id|>\n\n",
                "<|eot_id|>",
            )),
            TemplateFamily::Phi3 => Some(("<|system|>\n", "<|end|>")),
            TemplateFamily::Gemma | TemplateFamily::Mistral => None,
        }
    }
}

/// The system prompt `template` inserts when the conversation has none (rendered with one user message and a
/// generation prompt), `None` when it inserts none.
pub fn default_system_prompt(
    template: &ChatTemplate,
    family: TemplateFamily,
) -> Result<Option<String>> {
    let Some((start, end)) = family.system_block() else {
        return Ok(None);
    };
    const PROBE: &str = "\u{E000}probe\u{E000}";
    let text = template.render(&[Message::new("user", PROBE)], true)?;
    let before_user = match text.find(PROBE) {
        Some(i) => &text[..i],
        None => return Ok(None),
    };
    let Some(s) = before_user.find(start) else {
        return Ok(None);
    };
    let rest = &before_user[s + start.len()..];
    Ok(rest.find(end).map(|e| rest[..e].to_string()))
}

/// A Modelfile's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Modelfile {
    /// `FROM`: a path relative to the Modelfile (`./model.gguf`), or a model in Ollama (`llama3.2:1b`).
    pub from: String,
    /// `ADAPTER`: a GGUF LoRA adapter relative to the Modelfile.
    pub adapter: Option<String>,
    /// `TEMPLATE` (Go template).
    pub template: String,
    /// `PARAMETER stop` values.
    pub stops: Vec<String>,
    /// Other `PARAMETER`s (`temperature`, `num_ctx`, ...): a string, number or boolean each.
    pub parameters: Vec<(String, serde_json::Value)>,
    /// `SYSTEM`.
    pub system: Option<String>,
    /// The family the template was chosen for; `None` when TEMPLATE is the Ollama source model's own.
    pub family: Option<TemplateFamily>,
}

fn triple_quoted(what: &str, text: &str) -> Result<String> {
    if text.contains("\"\"\"") {
        return Err(Error::Export(format!(
            "the {what} contains \"\"\", which a Modelfile cannot quote"
        )));
    }
    Ok(format!("\"\"\"{text}\"\"\""))
}

fn quoted(what: &str, text: &str) -> Result<String> {
    if text.is_empty() {
        return Err(Error::Export(format!(
            "the {what} {text:?} cannot be written as a quoted Modelfile value"
        )));
    }
    if text.contains('"') || text.contains('\n') {
        return triple_quoted(what, text);
    }
    Ok(format!("\"{text}\""))
}

/// A `PARAMETER` value: a string quoted, a number or boolean as it is.
fn parameter_value(name: &str, v: &serde_json::Value) -> Result<String> {
    match v {
        serde_json::Value::String(s) => quoted(&format!("parameter `{name}`"), s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        other => Err(Error::Export(format!(
            "the parameter `{name}` = {other} cannot be written as a Modelfile PARAMETER"
        ))),
    }
}

impl Modelfile {
    /// Replace SYSTEM with `system` when given (`""`: no SYSTEM line); `None` keeps the model's own.
    pub fn set_system(&mut self, system: Option<&str>) {
        if let Some(s) = system {
            self.system = (!s.is_empty()).then(|| s.to_string());
        }
    }

    /// The Modelfile text.
    pub fn render(&self) -> Result<String> {
        let mut out = String::new();
        out.push_str(&format!("FROM {}\n", self.from));
        if let Some(a) = &self.adapter {
            out.push_str(&format!("ADAPTER {a}\n"));
        }
        out.push('\n');
        out.push_str(&format!(
            "TEMPLATE {}\n",
            triple_quoted("chat template", &self.template)?
        ));
        if let Some(s) = &self.system {
            out.push_str(&format!(
                "\nSYSTEM {}\n",
                triple_quoted("system prompt", s)?
            ));
        }
        out.push('\n');
        for s in &self.stops {
            out.push_str(&format!("PARAMETER stop {}\n", quoted("stop token", s)?));
        }
        for (k, v) in &self.parameters {
            out.push_str(&format!("PARAMETER {k} {}\n", parameter_value(k, v)?));
        }
        Ok(out)
    }
}

/// Build the Modelfile for a model with tokenizer `tok`: the template family from its chat template (or
/// `family` when given), stop tokens, default system prompt.
pub fn modelfile_for(
    tok: &LoadedTokenizer,
    family: Option<TemplateFamily>,
    from: &str,
    adapter: Option<&str>,
) -> Result<Modelfile> {
    let template = tok.chat_template().ok();
    let family = match family {
        Some(f) => f,
        None => {
            let src = tok.chat_template.as_deref().ok_or_else(|| {
                Error::Export(format!(
                    "the model has no chat template, so its Ollama TEMPLATE cannot be derived; pass --template with one of {}",
                    TemplateFamily::names()
                ))
            })?;
            TemplateFamily::detect(src).ok_or_else(|| {
                Error::Export(format!(
                    "the model's chat template is not one of the families with a standard Ollama template ({}); \
                     pass --template with the closest one, or edit TEMPLATE in the Modelfile by hand (first line: {:?})",
                    TemplateFamily::names(),
                    src.lines().next().unwrap_or("").chars().take(80).collect::<String>()
                ))
            })?
        }
    };
    let mut stops: Vec<String> = family
        .stop_markers()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for id in tok.generation_stop_ids() {
        if let Ok(t) = tok.decode(&[id], false) {
            if !t.is_empty() && !stops.contains(&t) && !t.contains('"') && !t.contains('\n') {
                stops.push(t);
            }
        }
    }
    let system = match &template {
        Some(t) => default_system_prompt(t, family)?,
        None => None,
    };
    Ok(Modelfile {
        from: from.to_string(),
        adapter: adapter.map(str::to_string),
        template: family.go_template().to_string(),
        stops,
        parameters: Vec::new(),
        system,
        family: Some(family),
    })
}

/// The Modelfile of a fine-tune of `source`, a model in the Ollama store: `FROM <name:tag>`, `ADAPTER adapter`,
/// and the source's own layers kept verbatim — TEMPLATE from its template layer, a PARAMETER line per value of
/// its params layer (each `stop` entry on its own line), SYSTEM from its system layer. Without a template layer
/// (or with `family` forced by `--template`) the TEMPLATE, stops and default system prompt are derived from
/// the tokenizer as [`modelfile_for`] does, and the source's params and system layer are added on top.
pub fn modelfile_for_ollama_base(
    tok: &LoadedTokenizer,
    source: &crate::hub::ollama::OllamaModel,
    family: Option<TemplateFamily>,
    adapter: Option<&str>,
) -> Result<Modelfile> {
    let from = source.name.short();
    let mut mf = match (&source.template, family) {
        (Some(t), None) => Modelfile {
            from,
            adapter: adapter.map(str::to_string),
            template: t.clone(),
            stops: Vec::new(),
            parameters: Vec::new(),
            system: None,
            family: None,
        },
        _ => modelfile_for(tok, family, &from, adapter)?,
    };
    if let Some(s) = &source.system {
        mf.system = Some(s.clone());
    }
    for (k, v) in source.params.iter().flatten() {
        let values = match v {
            serde_json::Value::Array(a) => a.clone(),
            one => vec![one.clone()],
        };
        for v in values {
            if k == "stop" {
                let s = v.as_str().ok_or_else(|| {
                    Error::Export(format!(
                        "the params layer of ollama://{} has a stop value that is not a string: {v}",
                        source.name
                    ))
                })?;
                if !mf.stops.iter().any(|x| x == s) {
                    mf.stops.push(s.to_string());
                }
            } else {
                parameter_value(k, &v)?;
                mf.parameters.push((k.clone(), v));
            }
        }
    }
    Ok(mf)
}

/// Write `Modelfile` into `dir`.
pub fn write_modelfile(dir: &Path, mf: &Modelfile) -> Result<()> {
    super::atomic::write_atomic(&dir.join("Modelfile"), mf.render()?.as_bytes())
}

/// What [`write_ollama_folder`] wrote.
#[derive(Debug, Clone)]
pub struct OllamaFolder {
    /// Each GGUF written, by its path in the final folder, with its report.
    pub gguf: Vec<(std::path::PathBuf, super::gguf::GgufExportReport)>,
    pub modelfile: Modelfile,
}

/// An Ollama folder at `out` (replaced atomically): one merged GGUF (`model.gguf`), or with `separate_adapter` the
/// base (`base.gguf`) and a GGUF LoRA adapter (`adapter.gguf`, in `adapter_type`, and an `ADAPTER` line), plus the
/// Modelfile — TEMPLATE from the chat template's family (or `template`), stop tokens, default system prompt.
#[allow(clippy::too_many_arguments)]
pub fn write_ollama_folder(
    model_path: &Path,
    base: &crate::model::OpenedModel,
    adapter: Option<&crate::lora::peft::PeftAdapter>,
    tokenizer: &LoadedTokenizer,
    out: &Path,
    opts: &super::gguf::GgufExportOptions,
    adapter_type: super::gguf::GgufType,
    template: Option<TemplateFamily>,
    separate_adapter: bool,
    system: Option<&str>,
) -> Result<OllamaFolder> {
    use super::gguf::{export_gguf_adapter, export_gguf_from, GgufExportOptions};
    let staging = super::atomic::AtomicDir::create(out)?;
    let dir = staging.path().to_path_buf();
    let mut gguf = Vec::new();
    let (from, adapter_file) = match (separate_adapter, adapter) {
        (true, None) => {
            return Err(Error::Export(
                "a separate adapter needs an adapter (--adapter DIR)".into(),
            ))
        }
        (true, Some(ad)) => {
            let r = export_gguf_from(model_path, base, None, &dir.join("base.gguf"), opts)?;
            gguf.push((out.join("base.gguf"), r));
            let ad_opts = GgufExportOptions {
                out_type: adapter_type,
                name: opts.name.clone(),
            };
            let r = export_gguf_adapter(base, ad, &dir.join("adapter.gguf"), &ad_opts)?;
            gguf.push((out.join("adapter.gguf"), r));
            ("./base.gguf", Some("./adapter.gguf"))
        }
        (false, _) => {
            let r = export_gguf_from(model_path, base, adapter, &dir.join("model.gguf"), opts)?;
            gguf.push((out.join("model.gguf"), r));
            ("./model.gguf", None)
        }
    };
    let mut modelfile = modelfile_for(tokenizer, template, from, adapter_file)?;
    modelfile.set_system(system);
    write_modelfile(&dir, &modelfile)?;
    staging.commit()?;
    Ok(OllamaFolder { gguf, modelfile })
}

/// An Ollama folder at `out` (replaced atomically) for a fine-tune of `source`, a model already in the Ollama
/// store: the GGUF LoRA adapter (`adapter.gguf`, in `opts.out_type`) and the Modelfile of
/// [`modelfile_for_ollama_base`] (`FROM <name:tag>`, `ADAPTER ./adapter.gguf`, the source's template, params and
/// system — `system` replaces the latter, [`Modelfile::set_system`]). The base is not copied: Ollama already has it.
#[allow(clippy::too_many_arguments)]
pub fn write_ollama_adapter_folder(
    base: &crate::model::OpenedModel,
    adapter: &crate::lora::peft::PeftAdapter,
    tokenizer: &LoadedTokenizer,
    source: &crate::hub::ollama::OllamaModel,
    out: &Path,
    opts: &super::gguf::GgufExportOptions,
    template: Option<TemplateFamily>,
    system: Option<&str>,
) -> Result<OllamaFolder> {
    let staging = super::atomic::AtomicDir::create(out)?;
    let dir = staging.path().to_path_buf();
    let mut modelfile =
        modelfile_for_ollama_base(tokenizer, source, template, Some("./adapter.gguf"))?;
    modelfile.set_system(system);
    // Refuse what the Modelfile cannot quote before the adapter is written.
    modelfile.render()?;
    let r = super::gguf::export_gguf_adapter(base, adapter, &dir.join("adapter.gguf"), opts)?;
    write_modelfile(&dir, &modelfile)?;
    staging.commit()?;
    Ok(OllamaFolder {
        gguf: vec![(out.join("adapter.gguf"), r)],
        modelfile,
    })
}

/// The command that imports the folder into Ollama.
pub fn create_command(name: &str, modelfile: &Path) -> String {
    let quote = |s: &str| {
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    format!(
        "ollama create {} -f {}",
        quote(name),
        quote(&modelfile.display().to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ChatTemplate;

    #[test]
    fn families_are_detected_from_the_builtin_templates() {
        for (builtin, fam) in [
            ("chatml", TemplateFamily::ChatMl),
            ("llama3", TemplateFamily::Llama3),
            ("gemma", TemplateFamily::Gemma),
            ("mistral", TemplateFamily::Mistral),
            ("phi3", TemplateFamily::Phi3),
        ] {
            let src = ChatTemplate::builtin_source(builtin).unwrap();
            assert_eq!(TemplateFamily::detect(src), Some(fam), "{builtin}");
            assert_eq!(TemplateFamily::parse(fam.name()).unwrap(), fam);
        }
        assert_eq!(
            TemplateFamily::detect(ChatTemplate::builtin_source("alpaca").unwrap()),
            None
        );
        assert!(TemplateFamily::parse("vicuna")
            .unwrap_err()
            .to_string()
            .contains("chatml"));
    }

    /// The Jinja rendering of each built-in template equals what Ollama's Go template produces for the same
    /// conversation (written out by hand from the Go template text).
    #[test]
    fn go_templates_render_like_the_jinja_templates() {
        let msgs = [
            Message::new("system", "S"),
            Message::new("user", "U1"),
            Message::new("assistant", "A1"),
            Message::new("user", "U2"),
        ];
        let chatml = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n";
        let t = ChatTemplate::builtin("chatml").unwrap();
        assert_eq!(t.render(&msgs, true).unwrap(), chatml);
        let llama3 = "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        let t = ChatTemplate::new(
            ChatTemplate::builtin_source("llama3").unwrap(),
            Some("<|begin_of_text|>"),
            None,
        )
        .unwrap();
        let r = t.render(&msgs, true).unwrap();
        // llama.cpp adds BOS itself (add_bos_token), Ollama's template leaves it out.
        assert_eq!(r.strip_prefix("<|begin_of_text|>").unwrap_or(&r), llama3);
        let phi3 = "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n<|assistant|>\n";
        let t = ChatTemplate::builtin("phi3").unwrap();
        let r = t.render(&msgs, true).unwrap();
        assert_eq!(r.strip_prefix("<s>").unwrap_or(&r), phi3);
        // Gemma's template has no system role; without one the Go template gives the same turns.
        let gemma = "<start_of_turn>user\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n";
        let t = ChatTemplate::new(
            ChatTemplate::builtin_source("gemma").unwrap(),
            Some("<bos>"),
            None,
        )
        .unwrap();
        let r = t.render(&msgs[1..], true).unwrap();
        assert_eq!(r.strip_prefix("<bos>").unwrap_or(&r), gemma);
    }

    #[test]
    fn modelfile_text_and_quoting() {
        let mf = Modelfile {
            from: "./model.gguf".into(),
            adapter: Some("./adapter.gguf".into()),
            template: CHATML.into(),
            stops: vec!["<|im_start|>".into(), "<|im_end|>".into()],
            parameters: Vec::new(),
            system: Some("Be brief.".into()),
            family: Some(TemplateFamily::ChatMl),
        };
        let text = mf.render().unwrap();
        assert!(text.starts_with(
            "FROM ./model.gguf\nADAPTER ./adapter.gguf\n\nTEMPLATE \"\"\"{{- range .Messages }}"
        ));
        assert!(text.contains("\nSYSTEM \"\"\"Be brief.\"\"\"\n"));
        assert!(text.ends_with("PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\n"));
        let mut bad = mf.clone();
        bad.system = Some("say \"\"\"".into());
        assert!(bad
            .render()
            .unwrap_err()
            .to_string()
            .contains("system prompt"));
        assert_eq!(
            create_command("my-model", Path::new("out/Modelfile")),
            "ollama create my-model -f out/Modelfile"
        );
        assert_eq!(
            create_command("a b", Path::new("x y/Modelfile")),
            "ollama create 'a b' -f 'x y/Modelfile'"
        );
    }
}
