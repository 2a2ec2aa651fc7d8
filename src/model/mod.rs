//! The base model: configuration ([`config`], with the per-family rules in [`families`]), the module tree written
//! once ([`tree`]), checkpoint tensors ([`weights`], [`loader`]) and the decoder's math ([`decoder`]).

pub mod config;
pub mod decoder;
pub mod families;
pub mod loader;
pub mod memory;
pub mod tree;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{
    Activation, FalconLayout, Family, ModelConfig, MoeConfig, RopeConfig, RopeScaling,
};
pub use decoder::{CausalLm, KvCache, NoDropout, TokenBatch};
pub use tree::expected_tensors;
pub use weights::{SafetensorsSource, StoredDtype, TensorSource};

use crate::error::{Error, Result};

/// A model location opened for loading: its config and a source of its tensors.
pub struct OpenedModel {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub source: Box<dyn TensorSource>,
}

/// Open a Hugging Face model folder (config.json + safetensors) or a `.gguf` file.
pub fn open(path: &Path) -> Result<OpenedModel> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::Config(format!(
                "{}: no config.json in this folder (expected a Hugging Face model folder or a .gguf file)",
                path.display()
            )));
        }
        let config = ModelConfig::from_file(&cfg_path)?;
        let source = SafetensorsSource::open(path)?;
        return Ok(OpenedModel {
            path: path.to_path_buf(),
            config,
            source: Box::new(source),
        });
    }
    if crate::gguf::is_gguf_file(path) {
        let source = crate::gguf::GgufSource::open(path)?;
        return Ok(OpenedModel {
            path: path.to_path_buf(),
            config: source.config().clone(),
            source: Box::new(source),
        });
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "{}: no such file or folder (expected a Hugging Face model folder or a .gguf file)",
            path.display()
        )));
    }
    Err(Error::Config(format!(
        "{}: not a model folder; pass a Hugging Face folder (config.json + model.safetensors) or a .gguf file",
        path.display()
    )))
}

/// Short names of the linear modules LoRA can target (`q_proj`, ..., or Phi-3's fused names), in model order.
/// `lm_head` is listed last; `all-linear` excludes it, as PEFT does.
pub fn lora_target_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in tree::linear_paths(cfg) {
        let short = p.rsplit('.').next().unwrap_or(&p).to_string();
        if !names.contains(&short) {
            names.push(short);
        }
    }
    names
}
