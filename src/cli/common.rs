//! Pieces shared by subcommands: loading a model + tokenizer (+ adapter) on the CPU.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::DType;

use crate::model::{self, CausalLm};
use crate::tokenizer::{self, LoadedTokenizer};

pub type Cpu = burn::backend::Flex;

/// A model ready for inference.
pub struct Loaded {
    pub model: CausalLm<Cpu>,
    pub tokenizer: LoadedTokenizer,
    pub load_seconds: f64,
}

/// Load a model (HF folder or .gguf) and its tokenizer in f32 on the CPU, optionally with a PEFT adapter.
pub fn load_cpu(path: &Path, adapter: Option<&PathBuf>) -> Result<Loaded> {
    let t0 = std::time::Instant::now();
    let opened = model::open(path)?;
    let tok = tokenizer::load_for_model(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    let device = Default::default();
    let mut m = CausalLm::<Cpu>::load(opened.config, opened.source.as_ref(), &device, DType::F32)?;
    if let Some(a) = adapter {
        crate::lora::peft::load_adapter(&mut m, a)
            .with_context(|| format!("loading the adapter {}", a.display()))?;
    }
    Ok(Loaded {
        model: m,
        tokenizer: tok,
        load_seconds: t0.elapsed().as_secs_f64(),
    })
}
