//! Streaming merge of a PEFT adapter into a base checkpoint: tensor by tensor from the base's
//! [`TensorSource`](crate::model::TensorSource) to the output shards, so merging a model never needs the whole
//! model (let alone an f32 copy of it) in memory. W' = W + scale·B·A is computed in f32 and rounded once to the
//! output dtype.

use std::path::Path;

use burn::tensor::{DType, Tensor, TensorData};

use super::hf::{write_hf_folder, HostTensor, MergedExportOptions};
use crate::error::{Error, Result};
use crate::lora::peft::PeftAdapter;
use crate::model::loader::{check_source, expected_tensors};
use crate::model::OpenedModel;

type Cpu = burn::backend::Flex;

/// scale·B·A (f32, `[out, in]`) on the CPU backend.
fn delta(a: &(Vec<usize>, Vec<f32>), b: &(Vec<usize>, Vec<f32>), scale: f64) -> Vec<f32> {
    let device = Default::default();
    let ta = Tensor::<Cpu, 2>::from_data(
        TensorData::new(a.1.clone(), [a.0[0], a.0[1]]),
        (&device, DType::F32),
    );
    let tb = Tensor::<Cpu, 2>::from_data(
        TensorData::new(b.1.clone(), [b.0[0], b.0[1]]),
        (&device, DType::F32),
    );
    tb.matmul(ta)
        .mul_scalar(scale)
        .into_data()
        .to_vec::<f32>()
        .unwrap_or_default()
}

/// Merge `adapter` into `base` (or, with `None`, convert `base` as it is) and write an HF folder at `out`.
pub fn merge_to_folder(
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    out: &Path,
    opts: &MergedExportOptions,
    fill: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let cfg = &base.config;
    check_source(cfg, base.source.as_ref())?;
    let expected = expected_tensors(cfg);
    let empty = std::collections::BTreeMap::new();
    let modules = adapter.map(|a| &a.modules).unwrap_or(&empty);
    // Every adapter module must be a linear of this model with matching shapes.
    for (path, (ash, _, bsh, _, _)) in modules {
        let wname = format!("{path}.weight");
        let shape = expected
            .iter()
            .find(|(n, _)| n == &wname)
            .map(|(_, s)| s.clone());
        let shape = match shape {
            Some(s) => s,
            None if path == "lm_head" && cfg.tie_word_embeddings => {
                return Err(Error::Lora(
                    "the adapter targets lm_head, but this model ties lm_head to embed_tokens; a merge would change the embeddings too".into(),
                ))
            }
            None => {
                return Err(Error::Lora(format!(
                    "adapter module `{path}` does not exist in the base model {} (adapter for another model?)",
                    base.path.display()
                )))
            }
        };
        if ash[1] != shape[1] || bsh[0] != shape[0] {
            return Err(Error::Lora(format!(
                "adapter module `{path}`: lora_A {ash:?} / lora_B {bsh:?} do not fit the base weight {shape:?}"
            )));
        }
    }
    let src = base.source.as_ref();
    let tensors: Vec<HostTensor> = expected
        .into_iter()
        .map(|(name, shape)| {
            let module = name.strip_suffix(".weight").map(str::to_string);
            let adapter_entry = module.and_then(|m| modules.get(&m));
            let n = name.clone();
            HostTensor {
                name,
                shape,
                make: Box::new(move || {
                    let mut w = src
                        .load(&n, DType::F32)?
                        .to_vec::<f32>()
                        .map_err(|e| Error::Weights(format!("{n}: {e:?}")))?;
                    if let Some((ash, av, bsh, bv, scale)) = adapter_entry {
                        let d = delta(
                            &(ash.clone(), av.clone()),
                            &(bsh.clone(), bv.clone()),
                            *scale,
                        );
                        for (x, y) in w.iter_mut().zip(d) {
                            *x += y;
                        }
                    }
                    Ok(w)
                }),
            }
        })
        .collect();
    write_hf_folder(cfg, tensors, out, opts, fill)
}
