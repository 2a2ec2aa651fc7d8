//! `loratune inspect MODEL`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;

use crate::model::{self, loader::expected_tensors};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face model folder (config.json + safetensors) or a .gguf file.
    pub model: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let opened = model::open(&a.model)?;
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
        let v = serde_json::json!({
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
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model          {}", a.model.display());
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
