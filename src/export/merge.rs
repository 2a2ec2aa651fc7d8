//! Streaming merge of a PEFT adapter into a base checkpoint: tensor by tensor from the base's
//! [`TensorSource`](crate::model::TensorSource) to the output shards, so merging a model never needs the whole
//! model (let alone an f32 copy of it) in memory. W' = W + scale·B·A is computed in f32 and rounded once to the
//! output dtype.

use std::path::Path;

use burn::tensor::{DType, Tensor, TensorData};

use super::hf::{copy_tokenizer_files, write_hf_folder, HostTensor, MergedExportOptions};
use super::OutDtype;
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::lora::adapter::SavedModule;
use crate::lora::peft::PeftAdapter;
use crate::model::loader::{check_source, expected_tensors};
use crate::model::tree::embedding_tensor_name;
use crate::model::{ModelConfig, OpenedModel};
use crate::tokenizer::LoadedTokenizer;

/// scale·B·A (f32, `[out, in]`) on the CPU backend.
pub fn delta(
    a: &(Vec<usize>, Vec<f32>),
    b: &(Vec<usize>, Vec<f32>),
    scale: f64,
) -> Result<Vec<f32>> {
    let device = Default::default();
    let ta = Tensor::<Cpu, 2>::from_data(
        TensorData::new(a.1.clone(), [a.0[0], a.0[1]]),
        (&device, DType::F32),
    );
    let tb = Tensor::<Cpu, 2>::from_data(
        TensorData::new(b.1.clone(), [b.0[0], b.0[1]]),
        (&device, DType::F32),
    );
    crate::model::weights::host_f32(tb.matmul(ta).mul_scalar(scale))
}

/// DoRA's merge of a merged weight `[out, in]` (row-major): row o times m_o / ‖row o‖.
pub fn dora_rescale_rows(w: &mut [f32], magnitude: &[f32]) {
    let cols = w.len() / magnitude.len().max(1);
    for (row, &m) in w.chunks_mut(cols.max(1)).zip(magnitude) {
        let norm = row
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        let g = (m as f64 / norm) as f32;
        row.iter_mut().for_each(|x| *x *= g);
    }
}

/// Check that every module of `adapter` is a linear of the model `cfg` describes, with matching shapes.
pub fn check_adapter_fits(base: &OpenedModel, adapter: &PeftAdapter) -> Result<()> {
    let cfg = &base.config;
    let expected = expected_tensors(cfg);
    for (path, (ash, _, bsh, _, _)) in &adapter.modules {
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
    let want = vec![cfg.vocab_size, cfg.hidden_size];
    for (m, (shape, _)) in &adapter.saved {
        if *shape != want {
            return Err(Error::Lora(format!(
                "the adapter's trained {} is {shape:?}, but the base model's is {want:?} (adapter for another model \
                 or vocabulary?)",
                m.name()
            )));
        }
    }
    Ok(())
}

/// Every tensor of `base` in HF naming and layout, produced on demand as f32, with `adapter` (if any) merged
/// into its target weights: W + scale·B·A in f32, and for a DoRA adapter each row of it rescaled to the magnitude,
/// m_o / ‖(W + scale·B·A)_o‖ (PEFT's merge).
pub fn merged_host_tensors<'a>(
    base: &'a OpenedModel,
    adapter: Option<&'a PeftAdapter>,
) -> Result<Vec<HostTensor<'a>>> {
    check_source(&base.config, base.source.as_ref())?;
    if let Some(a) = adapter {
        check_adapter_fits(base, a)?;
    }
    let cfg = merged_config(base, adapter);
    let expected = expected_tensors(&cfg);
    let embed_name = embedding_tensor_name(&cfg);
    let modules = adapter.map(|a| &a.modules);
    let magnitudes = adapter.map(|a| &a.magnitudes);
    let src = base.source.as_ref();
    let untied_head = base.config.tie_word_embeddings && !cfg.tie_word_embeddings;
    Ok(expected
        .into_iter()
        .map(|(name, shape)| {
            let module = name.strip_suffix(".weight").map(str::to_string);
            let adapter_entry = module
                .as_ref()
                .and_then(|m| modules.and_then(|ms| ms.get(m)));
            let magnitude = module.and_then(|m| magnitudes.and_then(|ms| ms.get(&m)));
            // modules_to_save: the trained weight replaces the base's.
            let saved_module = if name == embed_name {
                Some(SavedModule::EmbedTokens)
            } else if name == HEAD_TENSOR {
                Some(SavedModule::LmHead)
            } else {
                None
            };
            let saved = saved_module.and_then(|m| adapter.and_then(|a| a.saved.get(&m)));
            // An untied head without a trained copy starts from the embedding matrix it was tied to.
            let load_name = if name == HEAD_TENSOR && untied_head {
                embed_name.clone()
            } else {
                name.clone()
            };
            HostTensor {
                name,
                shape,
                make: Box::new(move || {
                    if let Some((_, vals)) = saved {
                        return Ok(vals.clone());
                    }
                    let n = &load_name;
                    let mut w = src
                        .load(n, DType::F32)?
                        .to_vec::<f32>()
                        .map_err(|e| Error::Weights(format!("{n}: {e:?}")))?;
                    if let Some((ash, av, bsh, bv, scale)) = adapter_entry {
                        let d = delta(
                            &(ash.clone(), av.clone()),
                            &(bsh.clone(), bv.clone()),
                            *scale,
                        )?;
                        for (x, y) in w.iter_mut().zip(d) {
                            *x += y;
                        }
                        if let Some(m) = magnitude {
                            dora_rescale_rows(&mut w, m);
                        }
                    }
                    Ok(w)
                }),
            }
        })
        .collect())
}

/// The `lm_head` weight's name in a checkpoint (every family names its head so).
const HEAD_TENSOR: &str = "lm_head.weight";

/// The merged model's config: the base's, except that a tied model whose embedding or `lm_head` was trained in
/// full (`modules_to_save`: two independent copies, as PEFT trains them) comes out untied, with both matrices.
pub fn merged_config(base: &OpenedModel, adapter: Option<&PeftAdapter>) -> ModelConfig {
    let mut cfg = base.config.clone();
    if adapter.is_some_and(|a| !a.saved.is_empty()) {
        cfg.tie_word_embeddings = false;
    }
    cfg
}

/// Merge `adapter` into `base` (or, with `None`, convert `base` as it is) and write an HF folder at `out`.
pub fn merge_to_folder(
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    out: &Path,
    opts: &MergedExportOptions,
    fill: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let adapter = crate::lora::peft::portable_opt(adapter, base)?;
    let tensors = merged_host_tensors(base, adapter.as_deref())?;
    write_hf_folder(
        &merged_config(base, adapter.as_deref()),
        tensors,
        out,
        opts,
        fill,
    )
}

/// The merged (or, without an adapter, converted) Hugging Face folder of a base model — the one assembly that
/// `merge_lora: true`, `loratune merge` and `loratune convert` share: the weights in `dtype` (sharded when
/// `shard_size` is set), config.json, the base's generation_config.json (an unreadable one is an error naming it)
/// with the chat template's end-of-turn ids, and the tokenizer files (copied from an HF folder, written from a
/// GGUF's tokenizer otherwise).
pub fn write_merged_folder(
    model_path: &Path,
    base: &OpenedModel,
    adapter: Option<&PeftAdapter>,
    tokenizer: &LoadedTokenizer,
    out: &Path,
    dtype: OutDtype,
    shard_size: Option<u64>,
) -> Result<()> {
    let from_dir = model_path.is_dir();
    let gen_path = model_path.join("generation_config.json");
    let base_generation_config = if from_dir && gen_path.is_file() {
        let text = crate::error::read_to_string(&gen_path)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: gen_path.clone(),
            source,
        })?;
        if !v.is_object() {
            return Err(Error::Export(format!(
                "{}: generation_config.json must be a JSON object (transformers' GenerationConfig); fix or \
                 remove the file",
                gen_path.display()
            )));
        }
        Some(v)
    } else {
        None
    };
    let opts = MergedExportOptions {
        dtype,
        shard_size,
        extra_eos_ids: tokenizer.generation_stop_ids(),
        base_generation_config,
    };
    merge_to_folder(base, adapter, out, &opts, &|dst| {
        if from_dir {
            copy_tokenizer_files(model_path, dst).map(|_| ())
        } else {
            tokenizer.to_hf_files(dst)
        }
    })
}
