//! A streaming safetensors writer: the header is computed up front, tensors are written one after another to
//! a temporary file that is fsynced and renamed into place (never a half-written file under the final name).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};

use super::atomic::AtomicFile;
use crate::error::{Error, Result};
use crate::names::named_enum;

named_enum! {
    /// The dtype of a merged model: `export_dtype` in the config, `--dtype` of `loratune merge` / `convert`.
    pub enum ExportDtype ("export dtype") {
        /// The dtype the base model's floating-point weights are stored in (f32 for a quantised GGUF base), as
        /// PEFT's `merge_and_unload` keeps it.
        Auto = "auto",
        /// 32-bit float.
        F32 = "f32" | "float32" | "fp32",
        /// bfloat16.
        Bf16 = "bf16" | "bfloat16",
        /// IEEE half precision.
        F16 = "f16" | "float16" | "fp16" | "half",
    }
    reject {}
}

impl ExportDtype {
    /// The element type to write for a base whose tensors `src` holds.
    pub fn resolve(self, src: &dyn crate::model::TensorSource) -> OutDtype {
        match self {
            ExportDtype::F32 => OutDtype::F32,
            ExportDtype::Bf16 => OutDtype::BF16,
            ExportDtype::F16 => OutDtype::F16,
            ExportDtype::Auto => match src.dominant_dtype() {
                crate::model::StoredDtype::BF16 => OutDtype::BF16,
                crate::model::StoredDtype::F16 => OutDtype::F16,
                _ => OutDtype::F32,
            },
        }
    }
}

/// Element types we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
    BF16,
}

impl OutDtype {
    /// safetensors' dtype tag.
    pub fn tag(self) -> &'static str {
        match self {
            OutDtype::F32 => "F32",
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::BF16 => 2,
        }
    }
    /// The name transformers uses in config.json (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }
    /// Parse `f32`/`float32`/`bf16`/`bfloat16`/`f16`/`float16`.
    pub fn parse(s: &str) -> Result<Self> {
        match ExportDtype::parse(s) {
            Ok(ExportDtype::F32) => Ok(OutDtype::F32),
            Ok(ExportDtype::F16) => Ok(OutDtype::F16),
            Ok(ExportDtype::Bf16) => Ok(OutDtype::BF16),
            Ok(ExportDtype::Auto) => Err(Error::Export(
                "dtype `auto` needs a base model to take it from; name f32, bf16 or f16".into(),
            )),
            Err(m) => Err(Error::Export(m)),
        }
    }
}

/// Convert f32 values to little-endian bytes of `dtype` (round-to-nearest-even for bf16/f16).
pub fn encode(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        OutDtype::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        OutDtype::F16 => {
            for v in values {
                out.extend_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        OutDtype::BF16 => {
            for v in values {
                out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
    out
}

/// One tensor to write: its name, dtype, shape and encoded bytes.
pub struct TensorEntry {
    pub name: String,
    pub dtype: OutDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The header for a list of tensors (names sorted, as the safetensors library writes them) + data order.
fn header(
    entries: &[TensorEntry],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].name.cmp(&entries[b].name));
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(|source| Error::Serialize {
                what: "safetensors metadata".into(),
                source: source.into(),
            })?,
        );
    }
    let mut offset = 0usize;
    for &i in &order {
        let e = &entries[i];
        let n: usize = e.shape.iter().product();
        if n * e.dtype.size() != e.bytes.len() {
            return Err(Error::Export(format!(
                "tensor `{}`: {} bytes for shape {:?} of {}",
                e.name,
                e.bytes.len(),
                e.shape,
                e.dtype.tag()
            )));
        }
        map.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype.tag(), "shape": e.shape, "data_offsets": [offset, offset + e.bytes.len()]}),
        );
        offset += e.bytes.len();
    }
    let mut h =
        serde_json::to_vec(&serde_json::Value::Object(map)).map_err(|source| Error::Serialize {
            what: "a safetensors header".into(),
            source: source.into(),
        })?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    Ok((h, order))
}

/// Write a safetensors file atomically.
pub fn write_safetensors(
    path: &Path,
    entries: &[TensorEntry],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let (h, order) = header(entries, metadata)?;
    let mut f = AtomicFile::create(path)?;
    let w = f.writer();
    let io = |e: std::io::Error| Error::io(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for i in order {
        w.write_all(&entries[i].bytes).map_err(io)?;
    }
    f.commit()
}

/// Total data bytes of a set of entries (for shard planning / index `total_size`).
pub fn data_size(entries: &[TensorEntry]) -> usize {
    entries.iter().map(|e| e.bytes.len()).sum()
}

/// `{"format": "pt"}`, the metadata PEFT and transformers write.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}
