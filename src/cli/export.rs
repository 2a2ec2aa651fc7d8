//! `loratune export`: a merged GGUF (`--format gguf`), a GGUF LoRA adapter (`--format gguf-adapter`) or an
//! Ollama folder (`--format ollama`: GGUF + Modelfile, and the `ollama create` command to run). For a base in the
//! Ollama store (`--model ollama://NAME:TAG`) the Ollama folder holds the adapter only, with a Modelfile
//! `FROM NAME:TAG` + `ADAPTER` that keeps the source's template, parameters and system prompt.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::export::gguf::{
    export_gguf_adapter, export_gguf_from, GgufExportOptions, GgufExportReport, GgufType,
};
use crate::export::ollama::{
    create_command, write_ollama_adapter_folder, write_ollama_folder, TemplateFamily,
};
use crate::hub::ollama::OllamaOptions;
use crate::lora::peft::{read_adapter, read_training_facts, PeftAdapter};
use crate::model;
use crate::tokenizer::load_for_model;

/// What `export` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// One GGUF file with the adapter merged in (llama.cpp, Ollama, LM Studio, ...).
    Gguf,
    /// A GGUF LoRA adapter for llama.cpp's `--lora` / Ollama's `ADAPTER` (needs --adapter).
    GgufAdapter,
    /// A folder with the GGUF(s) and an Ollama Modelfile.
    Ollama,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The base model: a Hugging Face folder, a .gguf file or ollama://NAME[:TAG] (a model in the local Ollama
    /// store; with --format ollama the folder then holds the adapter and a Modelfile `FROM NAME:TAG`).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output path: a .gguf file (gguf, gguf-adapter) or a folder (ollama); replaced atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight type: f32, f16, bf16, q8_0 or q4_0 (default: f16 for models, f32 for adapters; norms and other
    /// 1-D tensors stay f32).
    #[arg(long = "type")]
    pub out_type: Option<String>,
    /// Model name (`general.name`; for ollama also the name in the `ollama create` command).
    #[arg(long)]
    pub name: Option<String>,
    /// ollama: the chat-template family when it cannot be detected (chatml, llama3, gemma, phi3, mistral).
    #[arg(long)]
    pub template: Option<String>,
    /// ollama: write the base GGUF and a GGUF adapter (`ADAPTER` line) instead of one merged GGUF.
    #[arg(long)]
    pub separate_adapter: bool,
    /// ollama: the Modelfile's SYSTEM prompt. Default: the system message most of the run's training
    /// conversations carried (recorded in the adapter's loratune.json), else the model's own default; `--system ""`
    /// writes none.
    #[arg(long)]
    pub system: Option<String>,
}

fn print_report(path: &Path, r: &GgufExportReport) {
    let types: Vec<String> = r
        .summary
        .types
        .iter()
        .map(|(t, n)| format!("{n}×{t}"))
        .collect();
    eprintln!(
        "wrote {} ({:.1} MB, {} tensors: {})",
        path.display(),
        r.summary.bytes as f64 / 1e6,
        r.summary.tensors,
        types.join(", ")
    );
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}

fn load_adapter(a: &Option<PathBuf>) -> Result<Option<PeftAdapter>> {
    a.as_ref()
        .map(|p| read_adapter(p).with_context(|| format!("reading adapter {}", p.display())))
        .transpose()
}

fn ensure_parent(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if p.is_dir() {
        bail!(
            "--out {} is a folder; give a file path ending in .gguf",
            p.display()
        );
    }
    Ok(())
}

pub fn run(a: ExportArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let (model_path, ollama) = crate::hub::resolve_model_arg(&a.model, &OllamaOptions::from_env())?;
    for n in ollama.iter().flat_map(|m| m.notes()) {
        eprintln!("note: {n}");
    }
    if a.out.exists() && a.out.canonicalize().ok() == model_path.canonicalize().ok() {
        bail!("--out must differ from the base model location");
    }
    let default_type = if a.format == ExportFormat::GgufAdapter {
        "f32"
    } else {
        "f16"
    };
    let out_type = GgufType::parse(a.out_type.as_deref().unwrap_or(default_type))?;
    if a.format != ExportFormat::Ollama && (a.template.is_some() || a.separate_adapter) {
        bail!("--template and --separate-adapter apply to --format ollama only");
    }
    let base = model::open(&model_path)?;
    let adapter = load_adapter(&a.adapter)?;
    let opts = GgufExportOptions {
        out_type,
        name: a.name.clone(),
    };
    match a.format {
        ExportFormat::Gguf => {
            ensure_parent(&a.out)?;
            let r = export_gguf_from(&model_path, &base, adapter.as_ref(), &a.out, &opts)?;
            print_report(&a.out, &r);
        }
        ExportFormat::GgufAdapter => {
            let Some(ad) = adapter.as_ref() else {
                bail!("--format gguf-adapter needs --adapter DIR (a PEFT adapter folder)");
            };
            ensure_parent(&a.out)?;
            let r = export_gguf_adapter(&base, ad, &a.out, &opts)?;
            print_report(&a.out, &r);
        }
        ExportFormat::Ollama => {
            let family = a
                .template
                .as_deref()
                .map(TemplateFamily::parse)
                .transpose()?;
            if a.separate_adapter && adapter.is_none() {
                bail!("--separate-adapter needs --adapter DIR");
            }
            let tok = load_for_model(&model_path)
                .with_context(|| format!("loading the tokenizer of {}", a.model.display()))?;
            // SYSTEM: --system, else the training data's, else the model's (chosen in the folder writers).
            let trained_system = match &a.adapter {
                Some(dir) => read_training_facts(dir)?.system_message,
                None => None,
            };
            let system: Option<&str> = match (&a.system, &trained_system) {
                (Some(s), _) => Some(s),
                (None, Some((s, _))) => Some(s),
                (None, None) => None,
            };
            let adapter_type = GgufType::parse(a.out_type.as_deref().unwrap_or("f32"))?;
            let folder = match (&ollama, adapter.as_ref()) {
                (Some(src), Some(ad)) => write_ollama_adapter_folder(
                    &base,
                    ad,
                    &tok,
                    src,
                    &a.out,
                    &GgufExportOptions {
                        out_type: adapter_type,
                        name: a.name.clone(),
                    },
                    family,
                    system,
                )?,
                (Some(src), None) => bail!(
                    "{} is already in Ollama (as {}): give --adapter DIR to export a fine-tune of it \
                     (a Modelfile FROM {} + ADAPTER)",
                    a.model.display(),
                    src.name.short(),
                    src.name.short()
                ),
                (None, _) => write_ollama_folder(
                    &model_path,
                    &base,
                    adapter.as_ref(),
                    &tok,
                    &a.out,
                    &opts,
                    adapter_type,
                    family,
                    a.separate_adapter,
                    system,
                )?,
            };
            for (path, r) in &folder.gguf {
                print_report(path, r);
            }
            let mf = &folder.modelfile;
            let name = a.name.clone().unwrap_or_else(|| {
                a.out
                    .file_name()
                    .map(|s| s.to_string_lossy().to_lowercase())
                    .unwrap_or_else(|| "loratune-model".into())
            });
            eprintln!(
                "wrote {} (Modelfile: FROM {}{}, {} template, {} stop token(s){}{})",
                a.out.display(),
                mf.from,
                if mf.adapter.is_some() {
                    " + ADAPTER"
                } else {
                    ""
                },
                match (mf.family, &ollama) {
                    (Some(f), _) => f.name().to_string(),
                    (None, Some(src)) => format!("{}'s own", src.name.short()),
                    (None, None) => "the source's".to_string(),
                },
                mf.stops.len(),
                match mf.parameters.len() {
                    0 => String::new(),
                    n => format!(", {n} other parameter(s)"),
                },
                match (&mf.system, &a.system, &trained_system) {
                    (None, _, _) => String::new(),
                    (Some(_), Some(_), _) => ", the --system prompt".to_string(),
                    (Some(_), None, Some((_, n))) => format!(
                        ", the system prompt of {n} training conversation{}",
                        if *n == 1 { "" } else { "s" }
                    ),
                    (Some(_), None, None)
                        if ollama.as_ref().is_some_and(|s| s.system.is_some()) =>
                        ", the source's system prompt".to_string(),
                    (Some(_), None, None) => ", default system prompt".to_string(),
                }
            );
            println!("{}", create_command(&name, &a.out.join("Modelfile")));
        }
    }
    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
