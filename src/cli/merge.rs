//! `loratune merge` (base + PEFT adapter → merged HF folder) and `loratune convert` (GGUF → HF folder).
//! Both stream tensor by tensor: W + scale·B·A in f32, rounded once to the output dtype.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::export::hf::{copy_tokenizer_files, parse_size, MergedExportOptions};
use crate::export::merge::merge_to_folder;
use crate::export::safetensors::OutDtype;
use crate::lora::peft::read_adapter;
use crate::model;
use crate::tokenizer::load_for_model;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model: a Hugging Face folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Maximum shard size (e.g. 2GB); default: one model.safetensors.
    #[arg(long)]
    pub shard_size: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// A .gguf model file (or an HF folder, to re-shard / change dtype).
    pub model: PathBuf,
    /// Output folder: a standard Hugging Face model folder.
    pub out: PathBuf,
    /// Output dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Maximum shard size (e.g. 2GB); default: one model.safetensors.
    #[arg(long)]
    pub shard_size: Option<String>,
}

fn write(
    base_path: &Path,
    adapter: Option<&Path>,
    out: &Path,
    dtype: &str,
    shard: Option<&String>,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let dtype = OutDtype::parse(dtype)?;
    let shard_size = shard.map(|s| parse_size(s)).transpose()?;
    if out.exists() && out.canonicalize().ok() == base_path.canonicalize().ok() {
        bail!("--out must differ from the base model location");
    }
    let base = model::open(base_path)?;
    let adapter = adapter
        .map(|a| read_adapter(a).with_context(|| format!("reading adapter {}", a.display())))
        .transpose()?;
    let tok = load_for_model(base_path)
        .with_context(|| format!("loading the tokenizer of {}", base_path.display()))?;
    let base_gen = if base_path.is_dir() {
        let p = base_path.join("generation_config.json");
        if p.is_file() {
            Some(
                serde_json::from_str(
                    &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
                )
                .with_context(|| format!("{}: invalid JSON", p.display()))?,
            )
        } else {
            None
        }
    } else {
        None
    };
    let opts = MergedExportOptions {
        dtype,
        shard_size,
        extra_eos_ids: tok.generation_stop_ids(),
        base_generation_config: base_gen,
    };
    let from_dir = base_path.is_dir();
    merge_to_folder(&base, adapter.as_ref(), out, &opts, &|d| {
        if from_dir {
            copy_tokenizer_files(base_path, d)?;
            Ok(())
        } else {
            tok.to_hf_files(d)
        }
    })?;
    eprintln!(
        "wrote {} ({} {}, {:.1}s)",
        out.display(),
        base.config.architecture(),
        dtype.torch_name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run_merge(a: MergeArgs) -> Result<()> {
    write(
        &a.model,
        Some(&a.adapter),
        &a.out,
        &a.dtype,
        a.shard_size.as_ref(),
    )
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    write(&a.model, None, &a.out, &a.dtype, a.shard_size.as_ref())
}
