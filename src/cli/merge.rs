//! `loratune merge` (base + PEFT adapter → merged HF folder) and `loratune convert` (GGUF → HF folder).
//! Both stream tensor by tensor: W + scale·B·A in f32, rounded once to the output dtype.

use std::path::Path;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::export::merge::write_merged_folder;
use crate::export::{ByteSize, ExportDtype};
use crate::lora::peft::read_adapter;
use crate::model;
use crate::tokenizer::load_for_model;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model: a Hugging Face folder, a .gguf file or ollama://NAME[:TAG].
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype: auto (the base's stored dtype, as PEFT's merge_and_unload keeps it), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: ExportDtype,
    /// Maximum shard size (e.g. 2GB); default: one model.safetensors.
    #[arg(long)]
    pub shard_size: Option<ByteSize>,
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// A .gguf model file (or an HF folder, to re-shard / change dtype).
    pub model: PathBuf,
    /// Output folder: a standard Hugging Face model folder.
    pub out: PathBuf,
    /// Output dtype: f32, bf16, f16 or auto (the stored dtype; f32 for quantised GGUF tensors).
    #[arg(long, default_value = "f32")]
    pub dtype: ExportDtype,
    /// Maximum shard size (e.g. 2GB); default: one model.safetensors.
    #[arg(long)]
    pub shard_size: Option<ByteSize>,
}

fn write(
    base_path: &Path,
    adapter: Option<&Path>,
    out: &Path,
    dtype: ExportDtype,
    shard: Option<&ByteSize>,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let (base_path, _) =
        crate::hub::resolve_model_arg(base_path, &crate::hub::ollama::OllamaOptions::from_env())?;
    let base_path = base_path.as_path();
    if out.exists() && out.canonicalize().ok() == base_path.canonicalize().ok() {
        bail!("--out must differ from the base model location");
    }
    let base = model::open(base_path)?;
    let adapter = adapter
        .map(|a| read_adapter(a).with_context(|| format!("reading adapter {}", a.display())))
        .transpose()?;
    let tok = load_for_model(base_path)
        .with_context(|| format!("loading the tokenizer of {}", base_path.display()))?;
    let dtype = dtype.resolve(base.source.as_ref());
    write_merged_folder(
        base_path,
        &base,
        adapter.as_ref(),
        &tok,
        out,
        dtype,
        shard.map(|s| s.bytes),
    )?;
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
        a.dtype,
        a.shard_size.as_ref(),
    )
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    write(&a.model, None, &a.out, a.dtype, a.shard_size.as_ref())
}
