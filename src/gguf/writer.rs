//! GGUF v3 writer: metadata of every value type, tensor infos, alignment padding, and tensor data streamed one
//! tensor at a time into an [`AtomicFile`] (an interrupted write never leaves a partial file under the final
//! name, and only one tensor's data is in memory at once).
//!
//! Layout, as gguf-py's `GGUFWriter` (0.19.0) produces it: `"GGUF"`, `u32` version 3, `u64` tensor count, `u64`
//! metadata count, the key/value pairs in insertion order, the tensor infos (name, `u32` n_dims, `u64` dims
//! innermost first, `u32` ggml type, `u64` offset into the data region), zero padding to the alignment (32, or
//! `general.alignment`), then each tensor's data followed by zero padding to the alignment.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::quant::quantize;
use super::reader::{value_type as vt, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use super::types::GgmlType;
use super::value::MetaValue;
use crate::error::{Error, Result};
use crate::export::atomic::AtomicFile;

/// The GGUF version written.
pub const GGUF_VERSION: u32 = 3;

/// Where a tensor's data comes from when the file is written.
pub enum TensorPayload<'a> {
    /// f32 values in row-major (torch) order; the writer encodes them to the tensor's type.
    F32(Box<dyn FnOnce() -> Result<Vec<f32>> + 'a>),
    /// Bytes already encoded in the tensor's type (e.g. copied unchanged from another GGUF file).
    Raw(Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>),
}

struct PendingTensor<'a> {
    name: String,
    /// ggml order: innermost first.
    dims: Vec<u64>,
    ty: GgmlType,
    n_bytes: u64,
    payload: TensorPayload<'a>,
}

/// A GGUF file being assembled: metadata and tensor descriptions now, data when [`GgufWriter::write`] runs.
pub struct GgufWriter<'a> {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
    names: HashSet<String>,
    alignment: u64,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteSummary {
    /// File size in bytes.
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Tensors per ggml type, in first-seen order.
    pub types: Vec<(GgmlType, usize)>,
}

fn bad(msg: String) -> Error {
    Error::Gguf(msg)
}

/// The GGUF type id of a metadata value.
fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => vt::U8,
        MetaValue::I8(_) => vt::I8,
        MetaValue::U16(_) => vt::U16,
        MetaValue::I16(_) => vt::I16,
        MetaValue::U32(_) => vt::U32,
        MetaValue::I32(_) => vt::I32,
        MetaValue::U64(_) => vt::U64,
        MetaValue::I64(_) => vt::I64,
        MetaValue::F32(_) => vt::F32,
        MetaValue::F64(_) => vt::F64,
        MetaValue::Bool(_) => vt::BOOL,
        MetaValue::String(_) => vt::STRING,
        MetaValue::Array(_) => vt::ARRAY,
    }
}

/// Check that an array can be encoded: non-empty (the element type is taken from the elements) and homogeneous,
/// recursively.
fn check_value(key: &str, v: &MetaValue) -> Result<()> {
    if let MetaValue::Array(items) = v {
        let Some(first) = items.first() else {
            return Err(bad(format!(
                "metadata `{key}`: an empty array cannot be written (its element type is unknown); leave the key out"
            )));
        };
        let t = type_id(first);
        if let Some((i, other)) = items.iter().enumerate().find(|(_, x)| type_id(x) != t) {
            return Err(bad(format!(
                "metadata `{key}`: array elements must all have one type, but element 0 is a {} and element {i} a {}",
                first.type_name(),
                other.type_name()
            )));
        }
        if t == vt::ARRAY {
            for (i, x) in items.iter().enumerate() {
                check_value(&format!("{key}[{i}]"), x)?;
            }
        }
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encode a value's payload (without its type id).
fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(b) => out.push(*b as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(items) => {
            // check_value guarantees a first element.
            let ety = items.first().map(type_id).unwrap_or(vt::U8);
            out.extend_from_slice(&ety.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for x in items {
                put_value(out, x);
            }
        }
    }
}

/// Smallest |x| that no longer fits the type (f16 rounds values ≥ 65520 to infinity; Q8_0 / Q4_0 store the
/// block scale max/127 resp. max/8 as f16).
fn overflow_limit(ty: GgmlType) -> Option<f32> {
    const F16_INF: f32 = 65520.0;
    match ty {
        GgmlType::F16 => Some(F16_INF),
        GgmlType::Q8_0 => Some(F16_INF * 127.0),
        GgmlType::Q4_0 => Some(F16_INF * 8.0),
        _ => None,
    }
}

fn pad_len(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align - n
}

impl<'a> GgufWriter<'a> {
    /// An empty file description (alignment 32).
    pub fn new() -> Self {
        GgufWriter {
            metadata: Vec::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// Set a metadata key (replacing its value in place if it is already set, otherwise appending it).
    /// `general.alignment` also sets the data alignment (a power of two, written as u32).
    pub fn set(&mut self, key: impl Into<String>, value: MetaValue) -> Result<()> {
        let key = key.into();
        if key.is_empty() {
            return Err(bad("metadata keys cannot be empty".into()));
        }
        check_value(&key, &value)?;
        if key == "general.alignment" {
            let a = value
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 30);
            match a {
                Some(a) => {
                    self.alignment = a;
                }
                None => {
                    return Err(bad(format!(
                        "`general.alignment` must be a power of two, got {value:?}"
                    )))
                }
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key, value)),
        }
        Ok(())
    }

    /// The metadata set so far, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Describe a tensor: its name, torch-order shape (`[out, in]` for a linear weight), ggml type and where its
    /// data comes from. Data is produced only when the file is written.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        ty: GgmlType,
        payload: TensorPayload<'a>,
    ) -> Result<()> {
        let name = name.into();
        if name.is_empty() || name.len() > 63 {
            // ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL.
            return Err(bad(format!(
                "tensor name `{name}` must be 1 to 63 bytes long (ggml's limit)"
            )));
        }
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return Err(bad(format!(
                "tensor `{name}` has {} dimensions; ggml allows 1 to {MAX_DIMS}",
                shape.len()
            )));
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let row = dims[0];
        if !row.is_multiple_of(ty.block_size() as u64) {
            return Err(bad(format!(
                "tensor `{name}` (shape {shape:?}) has rows of {row} elements, not a multiple of {ty}'s {}-element blocks",
                ty.block_size()
            )));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor `{name}` shape {shape:?} overflows")))?;
        let n_bytes = ty
            .bytes_for(n_elements)
            .ok_or_else(|| bad(format!("tensor `{name}` shape {shape:?} overflows")))?;
        if !self.names.insert(name.clone()) {
            return Err(bad(format!("tensor `{name}` is added twice")));
        }
        self.tensors.push(PendingTensor {
            name,
            dims,
            ty,
            n_bytes,
            payload,
        });
        Ok(())
    }

    /// Number of tensors described.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// The header: magic, version, counts, metadata, tensor infos and the padding before the data region.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(1 << 16);
        h.extend_from_slice(GGUF_MAGIC);
        h.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut h, k);
            h.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut h, v);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&offset.to_le_bytes());
            offset += t.n_bytes + pad_len(t.n_bytes, self.alignment);
        }
        let pad = pad_len(h.len() as u64, self.alignment) as usize;
        h.resize(h.len() + pad, 0);
        h
    }

    /// Write the file to `w`; `origin` names the destination in errors. Returns the summary.
    pub fn write_to(self, w: &mut dyn Write, origin: &Path) -> Result<WriteSummary> {
        let io = |e: std::io::Error| Error::io(origin, e);
        let header = self.header();
        w.write_all(&header).map_err(io)?;
        let mut bytes = header.len() as u64;
        let mut types: Vec<(GgmlType, usize)> = Vec::new();
        let n = self.tensors.len();
        let alignment = self.alignment;
        for t in self.tensors {
            let data = match t.payload {
                TensorPayload::Raw(f) => f()?,
                TensorPayload::F32(f) => {
                    let values = f()?;
                    let n_el: u64 = t.dims.iter().product();
                    if values.len() as u64 != n_el {
                        return Err(bad(format!(
                            "{}: tensor `{}`: {} values produced for shape {:?} ({n_el} elements)",
                            origin.display(),
                            t.name,
                            values.len(),
                            t.dims.iter().rev().collect::<Vec<_>>()
                        )));
                    }
                    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
                        return Err(bad(format!(
                            "{}: tensor `{}` holds a non-finite value ({} at flat index {i}); refusing to export a broken model",
                            origin.display(),
                            t.name,
                            values[i]
                        )));
                    }
                    if let Some(limit) = overflow_limit(t.ty) {
                        let amax = values.iter().fold(0f32, |m, x| m.max(x.abs()));
                        if amax >= limit {
                            return Err(bad(format!(
                                "{}: tensor `{}` holds a value of magnitude {amax}, which overflows {} (limit {limit}); export as bf16 or f32 instead",
                                origin.display(),
                                t.name,
                                t.ty
                            )));
                        }
                    }
                    quantize(t.ty, &values, t.dims[0] as usize).map_err(|e| {
                        bad(format!("{}: tensor `{}`: {e}", origin.display(), t.name))
                    })?
                }
            };
            if data.len() as u64 != t.n_bytes {
                return Err(bad(format!(
                    "{}: tensor `{}`: {} bytes of data for {} bytes of {}",
                    origin.display(),
                    t.name,
                    data.len(),
                    t.n_bytes,
                    t.ty
                )));
            }
            w.write_all(&data).map_err(io)?;
            let pad = pad_len(t.n_bytes, alignment) as usize;
            w.write_all(&vec![0u8; pad]).map_err(io)?;
            bytes += t.n_bytes + pad as u64;
            match types.iter_mut().find(|(ty, _)| *ty == t.ty) {
                Some((_, c)) => *c += 1,
                None => types.push((t.ty, 1)),
            }
        }
        Ok(WriteSummary {
            bytes,
            tensors: n,
            types,
        })
    }

    /// Write the file atomically at `dest` (its folder must exist).
    pub fn write(self, dest: &Path) -> Result<WriteSummary> {
        let mut f = AtomicFile::create(dest)?;
        let summary = self.write_to(f.writer(), dest)?;
        f.commit()?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::parse_header;

    fn payload(v: Vec<f32>) -> TensorPayload<'static> {
        TensorPayload::F32(Box::new(move || Ok(v)))
    }

    /// Every metadata type, nested arrays and odd tensor sizes survive writer → reader, and the layout is
    /// aligned as gguf-py lays it out.
    #[test]
    fn every_value_type_round_trips_through_the_reader() {
        let mut w = GgufWriter::new();
        let values = vec![
            ("a.u8", MetaValue::U8(200)),
            ("a.i8", MetaValue::I8(-100)),
            ("a.u16", MetaValue::U16(65000)),
            ("a.i16", MetaValue::I16(-32000)),
            ("a.u32", MetaValue::U32(4_000_000_000)),
            ("a.i32", MetaValue::I32(-2_000_000_000)),
            ("a.u64", MetaValue::U64(u64::MAX - 1)),
            ("a.i64", MetaValue::I64(i64::MIN + 1)),
            ("a.f32", MetaValue::F32(1e-5)),
            ("a.f64", MetaValue::F64(-2.5e300)),
            ("a.bool", MetaValue::Bool(true)),
            ("a.str", MetaValue::String("héllo {{ x }}\n".into())),
            (
                "a.arr",
                MetaValue::Array(vec![
                    MetaValue::String("x".into()),
                    MetaValue::String("".into()),
                ]),
            ),
            (
                "a.nested",
                MetaValue::Array(vec![
                    MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                    MetaValue::Array(vec![MetaValue::F32(3.0)]),
                ]),
            ),
        ];
        for (k, v) in &values {
            w.set(*k, v.clone()).unwrap();
        }
        // Replacing keeps the position.
        w.set("a.u8", MetaValue::U8(7)).unwrap();
        assert_eq!(w.metadata()[0], ("a.u8".to_string(), MetaValue::U8(7)));
        let x: Vec<f32> = (0..3 * 5).map(|i| i as f32 * 0.25 - 1.0).collect();
        w.add_tensor("t.f32", &[3, 5], GgmlType::F32, payload(x.clone()))
            .unwrap();
        w.add_tensor("t.f16", &[5], GgmlType::F16, payload(x[..5].to_vec()))
            .unwrap();
        let y: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        w.add_tensor("t.q8", &[2, 32], GgmlType::Q8_0, payload(y.clone()))
            .unwrap();
        let raw = quantize(GgmlType::Q4_0, &y, 32).unwrap();
        let raw2 = raw.clone();
        w.add_tensor(
            "t.raw",
            &[2, 32],
            GgmlType::Q4_0,
            TensorPayload::Raw(Box::new(move || Ok(raw2))),
        )
        .unwrap();
        let mut buf = Vec::new();
        let summary = w.write_to(&mut buf, Path::new("mem.gguf")).unwrap();
        assert_eq!(summary.bytes as usize, buf.len());
        assert_eq!(summary.tensors, 4);
        assert_eq!(buf.len() % 32, 0, "the file ends padded to the alignment");
        let h = parse_header(&buf, Path::new("mem.gguf")).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata.len(), values.len());
        for (k, v) in &values {
            let expect = if *k == "a.u8" {
                MetaValue::U8(7)
            } else {
                v.clone()
            };
            assert_eq!(h.metadata.get(*k), Some(&expect), "{k}");
        }
        assert_eq!(h.data_offset % 32, 0);
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["t.f32", "t.f16", "t.q8", "t.raw"]);
        assert_eq!(h.tensors[0].dims, vec![5, 3]);
        for t in &h.tensors {
            assert_eq!(t.offset % 32, 0, "{}", t.name);
        }
        let data = |i: usize| {
            let t = &h.tensors[i];
            let s = (h.data_offset + t.offset) as usize;
            &buf[s..s + t.n_bytes as usize]
        };
        let f32s: Vec<f32> = data(0)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(f32s, x);
        assert_eq!(data(1).len(), 10);
        assert_eq!(data(2), &quantize(GgmlType::Q8_0, &y, 32).unwrap()[..]);
        assert_eq!(data(3), &raw[..]);
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut w = GgufWriter::new();
        w.set("general.alignment", MetaValue::U32(64)).unwrap();
        w.add_tensor("a", &[3], GgmlType::F32, payload(vec![1.0, 2.0, 3.0]))
            .unwrap();
        w.add_tensor("b", &[1], GgmlType::F32, payload(vec![4.0]))
            .unwrap();
        let mut buf = Vec::new();
        w.write_to(&mut buf, Path::new("m")).unwrap();
        let h = parse_header(&buf, Path::new("m")).unwrap();
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.tensors[1].offset, 64);
        assert!(GgufWriter::new()
            .set("general.alignment", MetaValue::U32(48))
            .is_err());
    }

    #[test]
    fn invalid_input_is_refused_with_names() {
        let mut w = GgufWriter::new();
        let e = w
            .set("k", MetaValue::Array(vec![]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`k`") && e.contains("empty array"), "{e}");
        let e = w
            .set(
                "mixed",
                MetaValue::Array(vec![MetaValue::U8(1), MetaValue::String("x".into())]),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("element 1 a string"), "{e}");
        let e = w
            .add_tensor("q", &[2, 48], GgmlType::Q8_0, payload(vec![0.0; 96]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`q`") && e.contains("48"), "{e}");
        w.add_tensor("x", &[2], GgmlType::F32, payload(vec![0.0; 2]))
            .unwrap();
        assert!(w
            .add_tensor("x", &[2], GgmlType::F32, payload(vec![0.0; 2]))
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(w
            .add_tensor("y", &[1, 1, 1, 1, 1], GgmlType::F32, payload(vec![0.0]))
            .is_err());
        // Wrong number of values and non-finite values are caught when writing, naming the tensor.
        let mut w = GgufWriter::new();
        w.add_tensor("short", &[4], GgmlType::F32, payload(vec![0.0; 3]))
            .unwrap();
        let e = w
            .write_to(&mut Vec::new(), Path::new("o.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`short`") && e.contains("3 values"), "{e}");
        let mut w = GgufWriter::new();
        w.add_tensor("nan", &[2], GgmlType::F16, payload(vec![0.0, f32::NAN]))
            .unwrap();
        let e = w
            .write_to(&mut Vec::new(), Path::new("o.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nan`") && e.contains("non-finite"), "{e}");
        let mut w = GgufWriter::new();
        w.add_tensor("big", &[2], GgmlType::F16, payload(vec![0.0, 70000.0]))
            .unwrap();
        let e = w
            .write_to(&mut Vec::new(), Path::new("o.gguf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`big`") && e.contains("bf16 or f32"), "{e}");
        let mut w = GgufWriter::new();
        w.add_tensor("ok", &[2], GgmlType::F16, payload(vec![0.0, 65504.0]))
            .unwrap();
        w.write_to(&mut Vec::new(), Path::new("o.gguf")).unwrap();
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = std::env::temp_dir().join(format!("lt-gguf-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("m.gguf");
        let mut w = GgufWriter::new();
        w.add_tensor(
            "bad",
            &[2],
            GgmlType::F32,
            TensorPayload::F32(Box::new(|| Err(Error::Weights("source vanished".into())))),
        )
        .unwrap();
        assert!(w.write(&dest).is_err());
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "temporary file removed"
        );
        let mut w = GgufWriter::new();
        w.set("general.architecture", MetaValue::String("llama".into()))
            .unwrap();
        w.add_tensor("ok", &[2], GgmlType::F32, payload(vec![1.0, 2.0]))
            .unwrap();
        let s = w.write(&dest).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), s.bytes);
        let f = crate::gguf::GgufFile::open(&dest).unwrap();
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.dequantize("ok").unwrap(), vec![1.0, 2.0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
