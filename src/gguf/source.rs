//! [`GgufSource`]: a GGUF file as a [`TensorSource`] of HF-named, HF-layout tensors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, TensorData};

use super::config::model_config;
use super::reader::GgufFile;
use super::tensors::{plan, unpermute_rope_rows, HfTensorSpec, Transform};
use super::types::GgmlType;
use crate::error::{Error, Result};
use crate::model::weights::{convert_raw, f32_to_data, StoredDtype, TensorSource};
use crate::model::ModelConfig;
use crate::quant::{QMatrix, KEPT_GGML};

/// A GGUF model file: its config (from metadata) and its tensors under HF names.
pub struct GgufSource {
    file: GgufFile,
    config: ModelConfig,
    specs: BTreeMap<String, HfTensorSpec>,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("file", &self.file)
            .field("family", &self.config.family)
            .field("tensors", &self.specs.len())
            .finish()
    }
}

impl GgufSource {
    /// Open a GGUF file, derive its [`ModelConfig`] and map its tensors to HF names.
    pub fn open(path: &Path) -> Result<Self> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// Wrap an already opened file.
    pub fn from_file(file: GgufFile) -> Result<Self> {
        let config = model_config(&file)?;
        let specs = plan(&file, &config)?;
        Ok(GgufSource {
            file,
            config,
            specs,
        })
    }

    /// The model configuration derived from the metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The underlying file (metadata for the tokenizer: `tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// How an HF tensor is produced.
    pub fn spec(&self, hf_name: &str) -> Option<&HfTensorSpec> {
        self.specs.get(hf_name)
    }

    fn spec_or_err(&self, name: &str) -> Result<&HfTensorSpec> {
        self.specs.get(name).ok_or_else(|| {
            Error::Weights(format!(
                "tensor `{name}` not found in {} (it holds {} tensors, e.g. `{}`)",
                self.origin(),
                self.specs.len(),
                self.specs.keys().next().map(String::as_str).unwrap_or("-")
            ))
        })
    }

    /// Load one HF tensor as f32 in torch layout (dequantised, un-permuted, Gemma norms shifted back).
    pub fn load_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let spec = self.spec_or_err(name)?;
        let info = self.file.tensor_info(&spec.gguf_name).ok_or_else(|| {
            Error::Gguf(format!(
                "{}: tensor `{}` vanished",
                self.origin(),
                spec.gguf_name
            ))
        })?;
        let (start, n) = spec_rows(spec, info);
        let data = self.file.dequantize_rows(info, start, start + n)?;
        self.file.release(info);
        let data =
            apply_transform(&self.config, data, &spec.shape, spec.transform).map_err(|e| {
                Error::Gguf(format!(
                    "{}: tensor `{}` (`{name}`): {e}",
                    self.origin(),
                    spec.gguf_name
                ))
            })?;
        Ok((data, spec.shape.clone()))
    }
}

/// The rows of a GGUF tensor an HF tensor is: `(first, count)`.
fn spec_rows(spec: &HfTensorSpec, info: &super::reader::TensorInfo) -> (usize, usize) {
    match spec.rows {
        Some(start) => (start, spec.shape.first().copied().unwrap_or(1)),
        None => (0, info.n_rows()),
    }
}

/// The bytes of an HF tensor within its GGUF tensor's bytes.
fn spec_bytes<'a>(
    spec: &HfTensorSpec,
    info: &super::reader::TensorInfo,
    bytes: &'a [u8],
) -> &'a [u8] {
    let (start, n) = spec_rows(spec, info);
    let row = info.row_bytes();
    &bytes[start * row..(start + n) * row]
}

fn apply_transform(
    cfg: &ModelConfig,
    mut data: Vec<f32>,
    shape: &[usize],
    t: Transform,
) -> std::result::Result<Vec<f32>, String> {
    match t {
        Transform::FalconQkv => {
            let order = cfg.fused_qkv_order().unwrap_or_default();
            let cols = shape.iter().skip(1).product::<usize>();
            super::tensors::falcon_qkv_rows(&data, cols, &order, false)
        }
        Transform::None => Ok(data),
        Transform::GemmaNorm => {
            for v in &mut data {
                *v -= 1.0;
            }
            Ok(data)
        }
        Transform::UnpermuteRope { n_head } => {
            let rows = shape.first().copied().unwrap_or(1);
            let cols = shape.iter().skip(1).product::<usize>();
            unpermute_rope_rows(&data, rows, cols, n_head)
        }
    }
}

fn stored(t: GgmlType) -> StoredDtype {
    match t {
        GgmlType::F32 => StoredDtype::F32,
        GgmlType::F16 => StoredDtype::F16,
        GgmlType::BF16 => StoredDtype::BF16,
        other => StoredDtype::Other(other.name()),
    }
}

impl TensorSource for GgufSource {
    fn origin(&self) -> String {
        self.file.path().display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.specs.get(name).map(|s| s.shape.clone())
    }

    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        let spec = self.specs.get(name)?;
        self.file
            .tensor_info(&spec.gguf_name)
            .map(|i| stored(i.ggml_type))
    }

    fn load_quantized(&self, name: &str) -> Result<Option<QMatrix>> {
        let spec = self.spec_or_err(name)?;
        let Some(info) = self.file.tensor_info(&spec.gguf_name) else {
            return Ok(None);
        };
        if !KEPT_GGML.contains(&info.ggml_type) || spec.shape.len() != 2 {
            return Ok(None);
        }
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        let err = |e: String| {
            Error::Gguf(format!(
                "{}: tensor `{}` (`{name}`): {e}",
                self.origin(),
                spec.gguf_name
            ))
        };
        let bytes = spec_bytes(spec, info, self.file.tensor_bytes(&spec.gguf_name)?).to_vec();
        self.file.release(info);
        let q = QMatrix::ggml(info.ggml_type, rows, cols, bytes).map_err(err)?;
        let q = match spec.transform {
            Transform::None => q,
            // HF row h·d + a·(d/2) + j is stored at h·d + 2j + a (llama.cpp's interleaved RoPE pairs).
            Transform::UnpermuteRope { n_head } => {
                let d = rows / n_head.max(1);
                let half = d / 2;
                if half == 0 || d * n_head != rows {
                    return Err(err(format!("{rows} rows do not split into {n_head} heads")));
                }
                q.permute_rows(|i| {
                    let (h, r) = (i / d, i % d);
                    h * d + 2 * (r % half) + r / half
                })
                .map_err(err)?
            }
            Transform::FalconQkv => {
                let order = self.config.fused_qkv_order().unwrap_or_default();
                let mut hf_to_gguf = vec![0usize; order.len()];
                for (c, &h) in order.iter().enumerate() {
                    hf_to_gguf[h as usize] = c;
                }
                q.permute_rows(|i| hf_to_gguf[i]).map_err(err)?
            }
            Transform::GemmaNorm => return Ok(None),
        };
        Ok(Some(q))
    }

    fn load(&self, name: &str, dtype: DType) -> Result<TensorData> {
        let spec = self.spec_or_err(name)?;
        // Plain float tensors that need no fix-up go straight from the file to the requested dtype.
        if spec.transform == Transform::None {
            if let Some(info) = self.file.tensor_info(&spec.gguf_name) {
                if let st @ (StoredDtype::F32 | StoredDtype::F16 | StoredDtype::BF16) =
                    stored(info.ggml_type)
                {
                    let bytes = spec_bytes(spec, info, self.file.tensor_bytes(&spec.gguf_name)?);
                    let data = convert_raw(bytes, st, spec.shape.clone(), dtype, name)
                        .map_err(|e| Error::Weights(format!("{}: {e}", self.origin())))?;
                    self.file.release(info);
                    return Ok(data);
                }
            }
        }
        let (values, shape) = self.load_f32(name)?;
        f32_to_data(values, shape, dtype, name)
    }
}
