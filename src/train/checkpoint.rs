//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! `output_dir/checkpoint-<step>/` holds the adapter in PEFT format (loadable on its own), the AdamW moments
//! (`optimizer.safetensors`, f32, keyed `exp_avg.<peft key>` / `exp_avg_sq.<peft key>`), and
//! `trainer_state.json` (step, optimizer step count, data-loader position, early-stopping state, config hash).
//! Learning rate and dropout masks are pure functions of (config, step), so they need no saved state.
//! A checkpoint is built in a temporary folder and renamed into place: an interrupted save leaves the previous
//! checkpoints intact, and a folder without `trainer_state.json` is never taken for a checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Moments};
use crate::error::{Error, Result};
use crate::export::atomic::{write_atomic, AtomicDir};
use crate::export::safetensors::{encode, pt_metadata, write_safetensors, OutDtype, TensorEntry};
use crate::lora::adapter::{lora_params, LoraSettings};
use crate::lora::peft::{write_adapter_files, AdapterForm};
use crate::model::weights::{host_f32, parse_safetensors_header};
use crate::model::CausalLm;

/// Bump when the layout changes.
pub const FORMAT: u32 = 1;

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Optimizer steps completed.
    pub global_step: u64,
    /// AdamW's step counter (bias correction).
    pub adam_step: u64,
    /// Where the training data stream continues (the data module's serialised loader state).
    pub loader_state: serde_json::Value,
    /// Hash of the resolved config, to refuse resuming a different run by mistake.
    pub config_hash: String,
    pub best_eval_loss: Option<f64>,
    /// Evaluations since the best one (early stopping).
    pub evals_without_improvement: u32,
    pub trained_tokens: u64,
    pub train_seconds: f64,
    /// Lines of metrics.jsonl that belong to steps ≤ global_step.
    pub metrics_lines: u64,
}

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("trainer_state.json").is_file() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    out
}

/// Save a checkpoint atomically; then delete the oldest ones beyond `keep` (None = keep all).
#[allow(clippy::too_many_arguments)]
pub fn save<B: burn::tensor::backend::AutodiffBackend>(
    output_dir: &Path,
    model: &CausalLm<B>,
    settings: &LoraSettings,
    base_model: &str,
    opt: &AdamW<B::InnerBackend>,
    state: &TrainerState,
    keep: Option<u32>,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output_dir, state.global_step);
    let staging = AtomicDir::create(&dir)?;
    let p = staging.path();
    write_adapter_files(p, model, settings, base_model, AdapterForm::AsTrained)?;
    let keys: Vec<String> = lora_params(model).into_iter().map(|(k, _)| k).collect();
    let mut moments = Vec::new();
    for (key, m) in keys.iter().zip(&opt.moments) {
        if let Some(Moments { m, v, step }) = m {
            for (prefix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let shape = t.dims().to_vec();
                let vals = host_f32(t.clone())?;
                moments.push(TensorEntry {
                    name: format!("{prefix}.{key}"),
                    dtype: OutDtype::F32,
                    shape,
                    bytes: encode(&vals, OutDtype::F32),
                });
            }
            // the parameter's own update count (below 2^24, so exact in f32)
            moments.push(TensorEntry {
                name: format!("step.{key}"),
                dtype: OutDtype::F32,
                shape: vec![1],
                bytes: encode(&[*step as f32], OutDtype::F32),
            });
        }
    }
    write_safetensors(&p.join("optimizer.safetensors"), &moments, &pt_metadata())?;
    let st = serde_json::to_string_pretty(state).map_err(|source| Error::Serialize {
        what: "trainer_state.json".into(),
        source: source.into(),
    })?;
    // trainer_state.json last: its presence marks a complete checkpoint.
    write_atomic(&p.join("trainer_state.json"), st.as_bytes())?;
    staging.commit()?;
    if let Some(k) = keep {
        let all = list_checkpoints(output_dir);
        let excess = all.len().saturating_sub(k.max(1) as usize);
        for (_, old) in all.into_iter().take(excess) {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dir)
}

/// Read `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("trainer_state.json");
    let text = crate::error::read_to_string(&p).map_err(|_| {
        Error::Train(format!(
            "{} is not a complete loratune checkpoint (no trainer_state.json)",
            dir.display()
        ))
    })?;
    let st: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: p.clone(),
        source,
    })?;
    if st.format != FORMAT {
        return Err(Error::Train(format!(
            "{}: checkpoint format {} is not supported by this loratune (expects {FORMAT})",
            p.display(),
            st.format
        )));
    }
    Ok(st)
}

/// Restore AdamW moments saved for the model's current adapters.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    keys: &[String],
    opt: &mut AdamW<B>,
    adam_step: u64,
    device: &B::Device,
) -> Result<()> {
    let p = dir.join("optimizer.safetensors");
    let bytes = crate::error::read_file(&p)?;
    let header = parse_safetensors_header(&bytes, &p)?;
    let mut map: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (name, (dtype, shape, start, end)) in header {
        let data = crate::model::weights::convert_raw(
            &bytes[start..end],
            dtype,
            shape.clone(),
            DType::F32,
            &name,
        )?;
        map.insert(
            name,
            (
                shape,
                data.to_vec::<f32>()
                    .map_err(|e| Error::Train(format!("{e:?}")))?,
            ),
        );
    }
    if keys.len() != opt.moments.len() {
        return Err(Error::Train(
            "optimizer state does not match the adapter layout".into(),
        ));
    }
    let per_param_steps = map.keys().any(|k| k.starts_with("step."));
    for (i, key) in keys.iter().enumerate() {
        let get = |prefix: &str| -> Result<Tensor<B, 2>> {
            let (shape, v) = map.get(&format!("{prefix}.{key}")).ok_or_else(|| {
                Error::Train(format!(
                    "{}: no `{prefix}.{key}` (checkpoint of a different adapter?)",
                    p.display()
                ))
            })?;
            if shape.len() != 2 {
                return Err(Error::Train(format!(
                    "{}: `{prefix}.{key}` is not 2-D",
                    p.display()
                )));
            }
            Ok(Tensor::from_data(
                TensorData::new(v.clone(), [shape[0], shape[1]]),
                (device, DType::F32),
            ))
        };
        // Checkpoints record each parameter's update count (`step.<key>`; a parameter never updated — an
        // expert no token reached — has no entry); earlier ones only the optimizer's.
        let own_step = map.get(&format!("step.{key}")).map(|(_, v)| v[0] as u64);
        let step = match own_step {
            Some(s) => s,
            None if per_param_steps => 0,
            None => adam_step,
        };
        opt.moments[i] = if step == 0 {
            None
        } else {
            Some(Moments {
                m: get("exp_avg")?,
                v: get("exp_avg_sq")?,
                step,
            })
        };
    }
    opt.step = adam_step;
    Ok(())
}
