//! Merged Hugging Face model folders that transformers, vLLM and llama.cpp's converter load:
//! config.json, model.safetensors (or shards + model.safetensors.index.json), generation_config.json and the
//! tokenizer files. Tied models keep `lm_head` out of the files.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Tensor};
use serde_json::{json, Value};

use super::atomic::{write_atomic, AtomicDir};
use super::safetensors::{encode, pt_metadata, write_safetensors, OutDtype, TensorEntry};
use crate::error::{Error, Result};
use crate::model::tree::Leaf;
use crate::model::CausalLm;

/// Options for a merged export.
#[derive(Debug, Clone)]
pub struct MergedExportOptions {
    pub dtype: OutDtype,
    /// Maximum bytes of tensor data per shard; `None` = one `model.safetensors`.
    pub shard_size: Option<u64>,
    /// Extra end-of-sequence ids for generation_config.json (the chat template's end-of-turn token).
    pub extra_eos_ids: Vec<u32>,
    /// The base model's generation_config.json, kept (sampling defaults) with the eos ids completed.
    pub base_generation_config: Option<Value>,
}

impl Default for MergedExportOptions {
    fn default() -> Self {
        MergedExportOptions {
            dtype: OutDtype::F32,
            shard_size: None,
            extra_eos_ids: Vec::new(),
            base_generation_config: None,
        }
    }
}

/// A tensor the export will write, produced on demand so only one shard is in memory at a time.
pub struct ExportTensor<'a, B: Backend> {
    pub name: String,
    pub shape: Vec<usize>,
    make: Box<dyn Fn() -> Tensor<B, 2> + 'a>,
}

impl<B: Backend> ExportTensor<'_, B> {
    /// Materialise as f32 values.
    pub fn values(&self) -> Result<Vec<f32>> {
        crate::model::weights::host_f32((self.make)())
    }
}

/// Every tensor of the model in HF naming and checkpoint order, with adapters merged (in f32) into their weights.
/// A model with fully trained copies (`modules_to_save`) is exported from its adapter folder instead
/// ([`super::merge::merge_to_folder`], which also unties a tied head): the callers refuse it.
pub fn merged_tensors<B: Backend>(model: &CausalLm<B>) -> Vec<ExportTensor<'_, B>> {
    model
        .model
        .leaves()
        .into_iter()
        .filter_map(|leaf| {
            let name = leaf.tensor_name();
            let (shape, make): (Vec<usize>, Box<dyn Fn() -> Tensor<B, 2> + '_>) = match leaf {
                Leaf::Embedding(e) => {
                    (e.weight.dims().to_vec(), Box::new(move || e.weight.dense()))
                }
                Leaf::Weight(l) => (
                    l.weight.dims().to_vec(),
                    Box::new(move || l.merged_weight_f32()),
                ),
                Leaf::Bias(l) => vector(l.bias.as_ref()?),
                Leaf::Norm(n) => vector(&n.weight),
                Leaf::NormBias(n) => vector(n.bias.as_ref()?),
            };
            Some(ExportTensor { name, shape, make })
        })
        .collect()
}

/// A 1-D tensor, exported as `[1, n]`.
#[allow(clippy::type_complexity)]
fn vector<B: Backend>(t: &Tensor<B, 1>) -> (Vec<usize>, Box<dyn Fn() -> Tensor<B, 2> + '_>) {
    let n = t.dims()[0];
    (vec![n], Box::new(move || t.clone().reshape([1, n])))
}

fn plan_shards(sizes: &[usize], limit: Option<u64>) -> Vec<Vec<usize>> {
    let Some(limit) = limit else {
        return vec![(0..sizes.len()).collect()];
    };
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_size = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if !cur.is_empty() && cur_size + s as u64 > limit {
            shards.push(std::mem::take(&mut cur));
            cur_size = 0;
        }
        cur.push(i);
        cur_size += s as u64;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// generation_config.json: bos/pad and every end-of-sequence id (config eos + template end-of-turn).
pub fn generation_config(
    cfg: &crate::model::ModelConfig,
    base: Option<&Value>,
    extra_eos: &[u32],
) -> Value {
    let mut eos: Vec<u32> = cfg.eos_token_ids.clone();
    if let Some(b) = base.and_then(|b| b.get("eos_token_id")) {
        let ids: Vec<u32> = match b {
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            v => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        };
        for e in ids {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
    }
    for e in extra_eos {
        if !eos.contains(e) {
            eos.push(*e);
        }
    }
    let mut v = match base {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        _ => json!({"_from_model_config": false, "transformers_version": "4.46.0"}),
    };
    if let Some(b) = cfg.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    match eos.len() {
        0 => {}
        1 => v["eos_token_id"] = json!(eos[0]),
        _ => v["eos_token_id"] = json!(eos),
    }
    if let Some(p) = cfg.pad_token_id {
        v["pad_token_id"] = json!(p);
    }
    v
}

/// Tokenizer / template files copied from a source HF folder when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
];

/// A tensor to write, in HF naming, produced on demand as f32 values (one shard in memory at a time).
pub struct HostTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub make: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
}

/// Write the merged model's weights + config.json + generation_config.json into `dir` (created atomically).
/// `fill` may add more files (tokenizer) into the staging folder before it is swapped in.
pub fn save_merged<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    opts: &MergedExportOptions,
    fill: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    refuse_saved_copies(model)?;
    let tensors: Vec<HostTensor> = merged_tensors(model)
        .into_iter()
        .map(|t| HostTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            make: Box::new(move || t.values()),
        })
        .collect();
    write_hf_folder(&model.config, tensors, dir, opts, fill)
}

/// The in-memory exports write the frozen embedding and head: refuse a model whose copies were trained.
pub fn refuse_saved_copies<B: Backend>(model: &CausalLm<B>) -> Result<()> {
    if model.saved.is_empty() {
        Ok(())
    } else {
        Err(Error::Export(
            "this model trains embed_tokens / lm_head in full (modules_to_save): save its adapter and merge that \
             folder (`loratune merge`, or merge_lora: true), which writes the trained matrices"
                .into(),
        ))
    }
}

/// Write an HF model folder from host tensors: shards (or one file) + index, config.json, generation_config.json.
pub fn write_hf_folder(
    cfg: &crate::model::ModelConfig,
    tensors: Vec<HostTensor>,
    dir: &Path,
    opts: &MergedExportOptions,
    fill: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let staging = AtomicDir::create(dir)?;
    let out = staging.path();
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() * opts.dtype.size())
        .collect();
    let total: usize = sizes.iter().sum();
    let shards = plan_shards(&sizes, opts.shard_size);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (si, idxs) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let mut entries: Vec<TensorEntry> = Vec::with_capacity(idxs.len());
        for &i in idxs {
            let t = &tensors[i];
            weight_map.insert(t.name.clone(), fname.clone());
            let values = (t.make)()?;
            entries.push(TensorEntry {
                name: t.name.clone(),
                dtype: opts.dtype,
                shape: t.shape.clone(),
                bytes: encode(&values, opts.dtype),
            });
        }
        write_safetensors(&out.join(&fname), &entries, &pt_metadata())?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    write_json(
        &out.join("config.json"),
        &cfg.to_hf_json(opts.dtype.torch_name()),
    )?;
    write_json(
        &out.join("generation_config.json"),
        &generation_config(
            cfg,
            opts.base_generation_config.as_ref(),
            &opts.extra_eos_ids,
        ),
    )?;
    fill(out)?;
    staging.commit()
}

/// Pretty-print JSON to a file atomically.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|source| Error::Serialize {
        what: path.display().to_string(),
        source: source.into(),
    })?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Copy the tokenizer files that exist in `src_dir` into `dst_dir`.
pub fn copy_tokenizer_files(src_dir: &Path, dst_dir: &Path) -> Result<usize> {
    let mut n = 0;
    for f in TOKENIZER_FILES {
        let p = src_dir.join(f);
        if p.is_file() {
            let bytes = crate::error::read_file(&p)?;
            write_atomic(&dst_dir.join(f), &bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_limit_and_keep_order() {
        let s = plan_shards(&[40, 40, 40, 100, 10], Some(90));
        assert_eq!(s, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        assert_eq!(plan_shards(&[1, 2], None), vec![vec![0, 1]]);
    }
}
