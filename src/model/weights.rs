//! Where base-model weights come from: a [`TensorSource`] hands out tensors by their Hugging Face name, in
//! torch layout (`[out, in]` for linear weights), converted to the requested float dtype.
//!
//! Implementations: [`SafetensorsSource`] (`model.safetensors` or a sharded `model.safetensors.index.json`,
//! memory-mapped) and the GGUF reader (`crate::gguf`). The model builder asks for each tensor once, so the
//! only full copy of the weights in RAM is the one the backend owns.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

/// On-disk element types we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    /// Anything else (quantised GGUF types report their own names).
    Other(&'static str),
}

impl std::fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredDtype::F32 => write!(f, "F32"),
            StoredDtype::F16 => write!(f, "F16"),
            StoredDtype::BF16 => write!(f, "BF16"),
            StoredDtype::Other(s) => write!(f, "{s}"),
        }
    }
}

/// A provider of named base-model tensors.
pub trait TensorSource: Send + Sync {
    /// Human-readable origin for error messages (a path).
    fn origin(&self) -> String;
    /// All tensor names, in HF naming (`model.layers.0.self_attn.q_proj.weight`).
    fn names(&self) -> Vec<String>;
    /// Torch-layout shape of a tensor, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Stored element type of a tensor, if present.
    fn stored_dtype(&self, name: &str) -> Option<StoredDtype>;
    /// Load one tensor converted to `dtype` (F32, F16 or BF16), torch layout.
    fn load(&self, name: &str, dtype: DType) -> Result<TensorData>;

    /// A matrix the checkpoint stores quantized, as stored (torch layout): `None` for dense tensors and for
    /// formats a quantized base cannot keep (those load dequantized through [`TensorSource::load`]).
    fn load_quantized(&self, _name: &str) -> Result<Option<crate::quant::QMatrix>> {
        Ok(None)
    }

    /// The floating-point dtype most of the tensors are stored in (F32 for quantised GGUF files): what a merge
    /// keeps by default.
    fn dominant_dtype(&self) -> StoredDtype {
        let mut counts = [0usize; 3];
        for n in self.names() {
            match self.stored_dtype(&n) {
                Some(StoredDtype::BF16) => counts[1] += 1,
                Some(StoredDtype::F16) => counts[2] += 1,
                _ => counts[0] += 1,
            }
        }
        if counts[1] > counts[0] && counts[1] >= counts[2] {
            StoredDtype::BF16
        } else if counts[2] > counts[0] {
            StoredDtype::F16
        } else {
            StoredDtype::F32
        }
    }
}

/// A tensor's values on the host as f32 (from any float dtype): the one way loratune reads tensors back for files
/// and host-side math. An unreadable tensor is an error, never an empty vector.
pub fn host_f32<B: burn::tensor::backend::Backend, const D: usize>(
    t: burn::tensor::Tensor<B, D>,
) -> Result<Vec<f32>> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| Error::Weights(format!("reading a tensor back from the device: {e:?}")))
}

/// Convert little-endian raw elements of `from` to `TensorData` of `to`.
pub fn convert_raw(
    bytes: &[u8],
    from: StoredDtype,
    shape: Vec<usize>,
    to: DType,
    name: &str,
) -> Result<TensorData> {
    let n: usize = shape.iter().product();
    let esize = match from {
        StoredDtype::F32 => 4,
        StoredDtype::F16 | StoredDtype::BF16 => 2,
        StoredDtype::Other(t) => {
            return Err(Error::Weights(format!(
                "tensor `{name}` has unsupported dtype {t}; supported: F32, F16, BF16"
            )))
        }
    };
    if bytes.len() != n * esize {
        return Err(Error::Weights(format!(
            "tensor `{name}`: {} bytes for shape {shape:?} of {from} (expected {})",
            bytes.len(),
            n * esize
        )));
    }
    // Same type: one copy straight into the backend's buffer.
    let same = matches!(
        (from, to),
        (StoredDtype::F32, DType::F32)
            | (StoredDtype::F16, DType::F16)
            | (StoredDtype::BF16, DType::BF16)
    );
    if same {
        return Ok(TensorData::from_bytes_vec(bytes.to_vec(), shape, to));
    }
    let f32s: Vec<f32> = match from {
        StoredDtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StoredDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StoredDtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StoredDtype::Other(_) => unreachable!(),
    };
    f32_to_data(f32s, shape, to, name)
}

/// Wrap f32 values as `TensorData` of the requested float dtype.
pub fn f32_to_data(
    values: Vec<f32>,
    shape: Vec<usize>,
    to: DType,
    name: &str,
) -> Result<TensorData> {
    Ok(match to {
        DType::F32 => TensorData::new(values, shape),
        DType::BF16 => TensorData::new(
            values.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        DType::F16 => TensorData::new(
            values.into_iter().map(f16::from_f32).collect::<Vec<_>>(),
            shape,
        ),
        other => {
            return Err(Error::Weights(format!(
                "cannot load tensor `{name}` as {other:?}: compute dtype must be F32, F16 or BF16"
            )))
        }
    })
}

struct StEntry {
    shard: usize,
    dtype: StoredDtype,
    shape: Vec<usize>,
    /// Byte range inside the shard's mmap (absolute).
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors checkpoint, single file or sharded. A pre-quantized bitsandbytes 4-bit checkpoint's
/// weights (`W` packed, plus `W.absmax`, `W.quant_map`, `W.nested_*`, `W.quant_state.bitsandbytes__nf4`) appear
/// as one tensor `W` of the original shape: kept as NF4 ([`TensorSource::load_quantized`]) or dequantized.
pub struct SafetensorsSource {
    dir: PathBuf,
    shards: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, StEntry>,
    /// bitsandbytes NF4 weights: name → original shape (from their quant state).
    bnb: BTreeMap<String, Vec<usize>>,
}

/// The suffixes of a bitsandbytes 4-bit weight's companion tensors.
const BNB_SUFFIXES: &[&str] = &[
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
];
const BNB_STATE: &str = ".quant_state.bitsandbytes__nf4";

impl SafetensorsSource {
    /// Open `dir/model.safetensors` or `dir/model.safetensors.index.json` (or a single `.safetensors` file).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Self::from_files(dir, vec![path.to_path_buf()]);
        }
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = crate::error::read_to_string(&index)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Weights(format!("{}: missing `weight_map` object", index.display()))
                })?;
            let mut files: Vec<String> = map
                .values()
                .map(|f| {
                    f.as_str().map(str::to_string).ok_or_else(|| {
                        Error::Weights(format!(
                            "{}: weight_map values must be file names",
                            index.display()
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(Error::Weights(format!(
                        "{}: shard name `{f}` must be a plain file name",
                        index.display()
                    )));
                }
            }
            let paths = files.iter().map(|f| path.join(f)).collect();
            let src = Self::from_files(path.to_path_buf(), paths)?;
            // Every tensor the index promises must be in the shard it names.
            for (name, file) in map {
                let file = file.as_str().unwrap_or_default();
                match src.entries.get(name) {
                    Some(e)
                        if src.shards[e.shard].0.file_name().and_then(|s| s.to_str())
                            == Some(file) => {}
                    Some(_) => {
                        return Err(Error::Weights(format!(
                            "{}: index says `{name}` is in {file}, but it is in another shard",
                            index.display()
                        )))
                    }
                    None => {
                        return Err(Error::Weights(format!(
                        "{}: index lists `{name}` in {file}, but that shard does not contain it",
                        index.display()
                    )))
                    }
                }
            }
            Ok(src)
        } else if single.is_file() {
            Self::from_files(path.to_path_buf(), vec![single])
        } else {
            Err(Error::Weights(format!(
                "{}: no model.safetensors or model.safetensors.index.json found (pytorch_model.bin is not supported; convert it to safetensors)",
                path.display()
            )))
        }
    }

    fn from_files(dir: PathBuf, files: Vec<PathBuf>) -> Result<Self> {
        let mut shards = Vec::new();
        let mut entries = BTreeMap::new();
        for (i, p) in files.into_iter().enumerate() {
            let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: the file is opened read-only; we treat the mapping as immutable bytes. A concurrent
            // writer truncating the file could fault; that is the documented caveat of every mmap loader.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?;
            let parsed = parse_safetensors_header(&mmap, &p)?;
            for (name, (dtype, shape, start, end)) in parsed {
                if entries.contains_key(&name) {
                    return Err(Error::Weights(format!(
                        "tensor `{name}` appears in more than one shard ({})",
                        p.display()
                    )));
                }
                entries.insert(
                    name,
                    StEntry {
                        shard: i,
                        dtype,
                        shape,
                        start,
                        end,
                    },
                );
            }
            shards.push((p, mmap));
        }
        let mut src = SafetensorsSource {
            dir,
            shards,
            entries,
            bnb: BTreeMap::new(),
        };
        let states: Vec<String> = src
            .entries
            .keys()
            .filter(|k| k.ends_with(BNB_STATE))
            .cloned()
            .collect();
        for state in states {
            let w = state.trim_end_matches(BNB_STATE).to_string();
            let shape = src.bnb_shape(&state)?;
            src.bnb.insert(w, shape);
        }
        Ok(src)
    }

    fn bytes_of(&self, name: &str) -> Option<(&str, &[u8])> {
        let e = self.entries.get(name)?;
        let dtype = match e.dtype {
            StoredDtype::F32 => "F32",
            StoredDtype::F16 => "F16",
            StoredDtype::BF16 => "BF16",
            StoredDtype::Other(t) => t,
        };
        Some((dtype, &self.shards[e.shard].1[e.start..e.end]))
    }

    /// The original shape recorded in a bitsandbytes quant state (JSON bytes).
    fn bnb_shape(&self, state: &str) -> Result<Vec<usize>> {
        let bad = |why: String| {
            Error::Weights(format!(
                "{}: bitsandbytes quant state `{state}`: {why}",
                self.origin()
            ))
        };
        let (_, bytes) = self.bytes_of(state).ok_or_else(|| bad("missing".into()))?;
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        v.get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("no `shape` list".into()))
    }

    /// A bitsandbytes NF4 weight read from its tensors.
    fn bnb_nf4(&self, name: &str) -> Result<(crate::quant::nf4::Nf4, Vec<usize>)> {
        crate::quant::nf4::Nf4::from_bnb(name, |k| {
            self.bytes_of(k)
                .map(|(dtype, data)| crate::quant::nf4::RawTensor { dtype, data })
        })
        .map_err(|e| Error::Weights(format!("{}: {e}", self.origin())))
    }

    /// True for a bitsandbytes companion tensor (absmax, maps, quant state) of a 4-bit weight.
    fn is_bnb_companion(&self, name: &str) -> bool {
        BNB_SUFFIXES.iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|w| self.bnb.contains_key(w))
        })
    }

    /// Directory the checkpoint lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

type HeaderEntry = (StoredDtype, Vec<usize>, usize, usize);

/// Parse and validate a safetensors header against the file size, as strictly as the format's own crate: the
/// header length within the file (and at most [`crate::limits::SAFETENSORS_HEADER`]), every known dtype's
/// byte length = elements × element size, and the tensors tiling the data region exactly — contiguous from
/// byte 0, no overlaps, no gaps, ending at the end of the file. Never panics on bad input.
pub fn parse_safetensors_header(bytes: &[u8], path: &Path) -> Result<Vec<(String, HeaderEntry)>> {
    let bad = |msg: String| {
        Error::Weights(format!(
            "{}: corrupt safetensors file: {msg}",
            path.display()
        ))
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "only {} bytes, too short for a header",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if n > (bytes.len() as u64 - 8) {
        return Err(bad(format!(
            "header length {n} exceeds the file size {} (truncated download?)",
            bytes.len()
        )));
    }
    if n > crate::limits::SAFETENSORS_HEADER {
        return Err(bad(format!(
            "header length {n} is above the format's limit of {} bytes",
            crate::limits::SAFETENSORS_HEADER
        )));
    }
    let header = &bytes[8..8 + n as usize];
    let v: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let (dtype, esize) = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => (StoredDtype::F32, 4),
            Some("F16") => (StoredDtype::F16, 2),
            Some("BF16") => (StoredDtype::BF16, 2),
            Some("F64") => (StoredDtype::Other("F64"), 8),
            Some("I64") => (StoredDtype::Other("I64"), 8),
            Some("U64") => (StoredDtype::Other("U64"), 8),
            Some("I32") => (StoredDtype::Other("I32"), 4),
            Some("U32") => (StoredDtype::Other("U32"), 4),
            Some("I16") => (StoredDtype::Other("I16"), 2),
            Some("U16") => (StoredDtype::Other("U16"), 2),
            Some("I8") => (StoredDtype::Other("I8"), 1),
            Some("U8") => (StoredDtype::Other("U8"), 1),
            Some("BOOL") => (StoredDtype::Other("BOOL"), 1),
            Some("F8_E4M3") => (StoredDtype::Other("F8_E4M3"), 1),
            Some("F8_E5M2") => (StoredDtype::Other("F8_E5M2"), 1),
            Some(other) => {
                return Err(bad(format!(
                    "tensor `{name}` has unknown dtype `{}`",
                    other.chars().take(32).collect::<String>()
                )))
            }
            None => return Err(bad(format!("tensor `{name}` has no dtype"))),
        };
        let dims = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad(format!("tensor `{name}` has no shape")))?;
        if dims.len() > crate::limits::SAFETENSORS_RANK {
            return Err(bad(format!(
                "tensor `{name}` has {} dimensions (at most {} accepted)",
                dims.len(),
                crate::limits::SAFETENSORS_RANK
            )));
        }
        let shape: Vec<usize> = dims
            .iter()
            .map(|d| d.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("tensor `{name}` has a non-integer dimension")))?;
        let offs = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| {
                Some((
                    usize::try_from(a[0].as_u64()?).ok()?,
                    usize::try_from(a[1].as_u64()?).ok()?,
                ))
            })
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        if offs.0 > offs.1 || offs.1 > data_len {
            return Err(bad(format!(
                "tensor `{name}` data [{}, {}) lies outside the {data_len} data bytes (truncated file?)",
                offs.0, offs.1
            )));
        }
        let n_el = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n_el.and_then(|n| n.checked_mul(esize)) != Some(offs.1 - offs.0) {
            return Err(bad(format!(
                "tensor `{name}` shape {shape:?} of {dtype} needs {} bytes but its data_offsets give {}",
                n_el.and_then(|n| n.checked_mul(esize))
                    .map_or("more than addressable".to_string(), |b| b.to_string()),
                offs.1 - offs.0
            )));
        }
        out.push((
            name.clone(),
            (dtype, shape, data_start + offs.0, data_start + offs.1),
        ));
    }
    // The tensors must tile the data region: sorted by offset, each starts where the previous one ends.
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| (out[i].1 .2, out[i].1 .3));
    let mut end = data_start;
    let mut prev: Option<&str> = None;
    for &i in &order {
        let (name, (_, _, s, e)) = &out[i];
        if *s != end {
            let after = prev.map_or("the start of the data region".to_string(), |p| {
                format!("tensor `{p}`")
            });
            let kind = if *s < end {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            return Err(bad(format!(
                "tensor `{name}` (data_offsets [{}, {})) {kind} {after}, which ends at {}: tensors must be stored back to back",
                s - data_start,
                e - data_start,
                end - data_start
            )));
        }
        end = *e;
        prev = Some(name);
    }
    if end != bytes.len() {
        return Err(bad(format!(
            "{} bytes after the last tensor belong to no tensor (wrong header length, or a file with extra data)",
            bytes.len() - end
        )));
    }
    Ok(out)
}

impl TensorSource for SafetensorsSource {
    fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.entries
            .keys()
            .filter(|k| !self.is_bnb_companion(k))
            .cloned()
            .collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(s) = self.bnb.get(name) {
            return Some(s.clone());
        }
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        if self.bnb.contains_key(name) {
            return Some(StoredDtype::Other("NF4"));
        }
        self.entries.get(name).map(|e| e.dtype)
    }

    fn load_quantized(&self, name: &str) -> Result<Option<crate::quant::QMatrix>> {
        if !self.bnb.contains_key(name) {
            return Ok(None);
        }
        let (q, shape) = self.bnb_nf4(name)?;
        let (rows, cols) = match shape[..] {
            [r, c] => (r, c),
            _ => {
                return Err(Error::Weights(format!(
                    "{}: bitsandbytes weight `{name}` has shape {shape:?}, expected a matrix",
                    self.origin()
                )))
            }
        };
        crate::quant::QMatrix::nf4(rows, cols, q)
            .map(Some)
            .map_err(|e| Error::Weights(format!("{}: `{name}`: {e}", self.origin())))
    }

    fn load(&self, name: &str, dtype: DType) -> Result<TensorData> {
        if self.bnb.contains_key(name) {
            let (q, shape) = self.bnb_nf4(name)?;
            let mut v = vec![0f32; q.numel];
            q.dequant_range(0, &mut v);
            return f32_to_data(v, shape, dtype, name);
        }
        let e = self.entries.get(name).ok_or_else(|| {
            Error::Weights(format!("tensor `{name}` not found in {}", self.origin()))
        })?;
        let (path, mmap) = &self.shards[e.shard];
        let bytes = &mmap[e.start..e.end];
        let data = convert_raw(bytes, e.dtype, e.shape.clone(), dtype, name)
            .map_err(|err| Error::Weights(format!("{}: {err}", path.display())))?;
        // The tensor now lives in our buffer: drop the file pages from our resident set.
        #[cfg(unix)]
        {
            let page = 4096;
            let s = e.start / page * page;
            let len = e.end - s;
            // SAFETY: DontNeed on a read-only file mapping only drops clean pages; later reads refault them.
            let _ =
                unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, len) };
        }
        Ok(data)
    }
}
