//! Build a [`CausalLm`] from a [`TensorSource`]: every expected tensor checked by name and shape, with one
//! error listing everything missing, unexpected or mis-shaped.

use std::collections::BTreeSet;
use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Tensor};

use super::config::ModelConfig;
use super::decoder::CausalLm;
use super::tree::{Embedding, Make, RmsNorm, Tree, Weights};
use super::weights::TensorSource;
use crate::error::{Error, Result};
use crate::lora::linear::LoraLinear;
use crate::quant::{BasePlan, Frozen, QMatrix};

/// Tensors some checkpoints carry that the model does not use (never an error).
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".masked_bias")
        || name.ends_with(".attn.bias")
}

pub use super::tree::expected_tensors;

/// Check a source against a config without loading anything: one error naming every problem.
pub fn check_source(cfg: &ModelConfig, src: &dyn TensorSource) -> Result<()> {
    let expected = expected_tensors(cfg);
    let mut problems = Vec::new();
    let mut wanted = BTreeSet::new();
    for (name, shape) in &expected {
        wanted.insert(name.clone());
        match src.shape(name) {
            None => problems.push(format!("missing tensor `{name}` (expected shape {shape:?})")),
            Some(got) if &got != shape => problems.push(format!(
                "tensor `{name}` has shape {got:?} in the checkpoint but the config implies {shape:?}"
            )),
            Some(_) => {}
        }
    }
    for name in src.names() {
        if wanted.contains(&name) || ignorable(&name) {
            continue;
        }
        // Tied checkpoints sometimes still carry lm_head.weight; transformers ignores it too.
        if name == "lm_head.weight" && cfg.tie_word_embeddings {
            continue;
        }
        problems.push(format!(
            "unexpected tensor `{name}` (shape {:?})",
            src.shape(&name).unwrap_or_default()
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let shown: Vec<_> = problems.into_iter().take(20).collect();
    Err(Error::Weights(format!(
        "{}: the weights do not match the {} config ({} problem{}):\n  {}{}",
        src.origin(),
        cfg.architecture(),
        n,
        if n == 1 { "" } else { "s" },
        shown.join("\n  "),
        if n > 20 {
            format!("\n  ... and {} more", n - 20)
        } else {
            String::new()
        }
    )))
}

/// Makes the leaves of a [`Tree`] from a tensor source (names and shapes already checked by [`check_source`]).
struct Loader<'a, B: Backend> {
    src: &'a dyn TensorSource,
    device: &'a B::Device,
    dtype: DType,
    eps: f64,
    norm_offset: f32,
    plan: BasePlan,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor<const D: usize>(&self, name: &str) -> Result<Tensor<B, D>> {
        let data = self.src.load(name, self.dtype)?;
        Ok(Tensor::from_data(data, (self.device, self.dtype)))
    }

    /// A frozen matrix under the plan: kept as stored when the checkpoint holds it quantized, quantized when it
    /// is a dense decoder linear and the plan quantizes those, else dense in the compute dtype.
    fn frozen(&self, name: &str, decoder_linear: bool) -> Result<Frozen<B>> {
        let quant = |q: QMatrix| Frozen::Quant {
            q: Arc::new(q),
            dtype: self.dtype,
            device: self.device.clone(),
        };
        if self.plan.keep_stored {
            if let Some(q) = self.src.load_quantized(name)? {
                return Ok(quant(q));
            }
        }
        match self.plan.quantize {
            Some(scheme) if decoder_linear => {
                let data = self.src.load(name, DType::F32)?;
                let shape = data.shape.clone();
                let values = data.to_vec::<f32>().map_err(|e| {
                    Error::Weights(format!("{}: tensor `{name}`: {e:?}", self.src.origin()))
                })?;
                let q = QMatrix::quantize(&values, shape[0], shape[1], scheme).map_err(|e| {
                    Error::Weights(format!(
                        "{}: quantizing `{name}` to {scheme}: {e}",
                        self.src.origin()
                    ))
                })?;
                Ok(quant(q))
            }
            _ => Ok(Frozen::Dense(self.tensor(name)?)),
        }
    }
}

impl<B: Backend> Make<Weights<B>> for Loader<'_, B> {
    type Error = Error;

    fn embedding(&mut self, path: &str, _: usize, _: usize) -> Result<Embedding<B>> {
        Ok(Embedding {
            path: path.into(),
            weight: self.frozen(&format!("{path}.weight"), false)?,
        })
    }

    fn linear(&mut self, path: &str, _: usize, _: usize, bias: bool) -> Result<LoraLinear<B>> {
        let w = self.frozen(&format!("{path}.weight"), path != "lm_head")?;
        let b = if bias {
            Some(self.tensor(&format!("{path}.bias"))?)
        } else {
            None
        };
        Ok(LoraLinear::frozen(path, w, b))
    }

    fn tied(&mut self, path: &str, e: &Embedding<B>) -> Result<LoraLinear<B>> {
        let mut l = LoraLinear::frozen(path, e.weight.clone(), None);
        l.tied = true;
        Ok(l)
    }

    fn norm(&mut self, path: &str, _: usize, bias: bool) -> Result<RmsNorm<B>> {
        Ok(RmsNorm {
            path: path.into(),
            weight: self.tensor(&format!("{path}.weight"))?,
            bias: if bias {
                Some(self.tensor(&format!("{path}.bias"))?)
            } else {
                None
            },
            eps: self.eps,
            offset: self.norm_offset,
        })
    }
}

impl<B: Backend> CausalLm<B> {
    /// Load a model from a tensor source in the given compute dtype (F32, BF16 or F16), every weight dense.
    pub fn load(
        cfg: ModelConfig,
        src: &dyn TensorSource,
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_with(cfg, src, device, dtype, BasePlan::DENSE)
    }

    /// [`CausalLm::load`] with the frozen base held as `plan` says (quantized matrices kept or made).
    pub fn load_with(
        cfg: ModelConfig,
        src: &dyn TensorSource,
        device: &B::Device,
        dtype: DType,
        plan: BasePlan,
    ) -> Result<Self> {
        cfg.validate()?;
        check_source(&cfg, src)?;
        let mut loader = Loader::<B> {
            src,
            device,
            dtype,
            eps: cfg.rms_norm_eps,
            norm_offset: cfg.norm_offset(),
            plan,
        };
        let model = Tree::build(&cfg, &mut loader)?;
        let inv_freq = cfg.rope_inv_freq();
        Ok(CausalLm {
            config: cfg,
            model,
            inv_freq,
            device: device.clone(),
            saved: Default::default(),
        })
    }
}
