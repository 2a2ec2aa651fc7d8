//! `loratune inspect MODEL`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use crate::hub::ollama::{OllamaModel, OllamaOptions, Verification};
use crate::model::{self, loader::expected_tensors};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face model folder (config.json + safetensors), a .gguf file, or ollama://NAME[:TAG] (a model in
    /// the local Ollama store).
    pub model: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The first `max_lines` lines of `text` (at most `max_chars` characters), then how much was left out.
fn truncated(text: &str, max_lines: usize, max_chars: usize) -> String {
    let text = text.trim_end();
    let head: String = text
        .lines()
        .take(max_lines)
        .collect::<Vec<_>>()
        .join("\n")
        .chars()
        .take(max_chars)
        .collect();
    if head.len() == text.len() {
        return head;
    }
    format!(
        "{head}…\n(truncated: {} lines, {} characters in all)",
        text.lines().count(),
        text.chars().count()
    )
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n               ")
}

fn ollama_json(m: &OllamaModel) -> serde_json::Value {
    serde_json::json!({
        "name": m.name.short(),
        "full_name": m.name.full(),
        "store": m.store.display().to_string(),
        "manifest": m.manifest.display().to_string(),
        "blob": m.blob.display().to_string(),
        "digest": m.digest,
        "size": m.size,
        "sha256": match m.verification {
            Verification::Hashed => "verified",
            Verification::Cached => "verified earlier (same size and mtime)",
        },
        "template": m.template,
        "params": m.params,
        "system": m.system,
        "layers": m.layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

fn print_ollama(m: &OllamaModel) {
    println!("ollama         {} ({})", m.name.short(), m.name.full());
    println!(
        "  model blob   {} ({:.1} MB, sha256 {}), {}",
        m.digest,
        m.size as f64 / 1e6,
        match m.verification {
            Verification::Hashed => "verified",
            Verification::Cached => "verified earlier",
        },
        m.blob.display()
    );
    match &m.template {
        Some(t) => println!("  template     {}", indent(&truncated(t, 12, 800))),
        None => println!("  template     (none)"),
    }
    if let Some(p) = &m.params {
        println!(
            "  params       {}",
            serde_json::to_string(p).unwrap_or_default()
        );
    }
    if let Some(s) = &m.system {
        println!("  system       {}", indent(&truncated(s, 12, 800)));
    }
    let others: Vec<String> = m
        .layers
        .iter()
        .filter(|l| {
            ![
                crate::hub::ollama::MEDIA_MODEL,
                crate::hub::ollama::MEDIA_TEMPLATE,
                crate::hub::ollama::MEDIA_PARAMS,
                crate::hub::ollama::MEDIA_SYSTEM,
            ]
            .contains(&l.media_type.as_str())
        })
        .map(|l| format!("{} ({} B)", l.kind(), l.size))
        .collect();
    if !others.is_empty() {
        println!("  other layers {}", others.join(", "));
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    let (path, ollama) = crate::hub::resolve_model_arg(&a.model, &OllamaOptions::from_env())?;
    for n in ollama.iter().flat_map(OllamaModel::notes) {
        eprintln!("note: {n}");
    }
    let opened = model::open(&path)?;
    let cfg = &opened.config;
    model::loader::check_source(cfg, opened.source.as_ref())?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for name in opened.source.names() {
        if let Some(d) = opened.source.stored_dtype(&name) {
            *dtypes.entry(d.to_string()).or_default() += 1;
        }
    }
    let targets = model::lora_target_names(cfg);
    let n_params = cfg.num_parameters();
    let n_tensors = expected_tensors(cfg).len();
    if a.json {
        let mut v = serde_json::json!({
            "path": a.model.display().to_string(),
            "architecture": cfg.architecture(),
            "model_type": cfg.family.model_type(),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "parameters": n_params,
            "tensors": n_tensors,
            "dtypes": dtypes,
            "tied_embeddings": cfg.tie_word_embeddings,
            "rope_theta": cfg.rope.theta,
            "lora_targets": targets,
        });
        if let Some(m) = cfg.moe {
            v["experts"] = serde_json::json!({"experts": m.experts, "per_token": m.top_k});
        }
        if let Some(f) = cfg.falcon {
            v["falcon"] = serde_json::json!({"parallel": f.parallel, "shared_norm": f.shared_norm, "bias": f.bias});
        }
        if let Some(m) = &ollama {
            v["ollama"] = ollama_json(m);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model          {}", a.model.display());
    if let Some(m) = &ollama {
        print_ollama(m);
    }
    println!(
        "architecture   {} ({})",
        cfg.architecture(),
        cfg.family.model_type()
    );
    println!("layers         {}", cfg.num_hidden_layers);
    println!(
        "hidden         {} (intermediate {})",
        cfg.hidden_size, cfg.intermediate_size
    );
    println!(
        "heads          {} query / {} key-value (head_dim {}, GQA groups {})",
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.gqa_groups()
    );
    if let Some(m) = cfg.moe {
        println!(
            "experts        {} per layer, {} per token (intermediate is one expert's)",
            m.experts, m.top_k
        );
    }
    if let Some(f) = cfg.falcon {
        let norms = match (f.parallel, f.shared_norm) {
            (true, true) => "parallel attention + MLP, one shared LayerNorm",
            (true, false) => "parallel attention + MLP, ln_attn + ln_mlp",
            _ => "sequential attention, MLP",
        };
        println!(
            "falcon layout  {norms}{}",
            if f.bias { ", linear biases" } else { "" }
        );
    }
    println!("vocab          {}", cfg.vocab_size);
    println!(
        "parameters     {} ({:.1}M)",
        n_params,
        n_params as f64 / 1e6
    );
    let d: Vec<String> = dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    println!("stored dtypes  {}", d.join(", "));
    println!(
        "tied lm_head   {}",
        if cfg.tie_word_embeddings { "yes" } else { "no" }
    );
    println!(
        "rope           theta {} {:?}",
        cfg.rope.theta, cfg.rope.scaling
    );
    let windows: Vec<String> = cfg
        .layer_windows
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| format!("{i}:{w}")))
        .collect();
    if !windows.is_empty() {
        println!("sliding window {}", windows.join(" "));
    }
    println!("LoRA targets   {}", targets.join(", "));
    Ok(())
}
