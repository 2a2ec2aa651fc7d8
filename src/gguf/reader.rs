//! GGUF v2/v3 parsing: header, metadata, tensor infos and the tensor data region, over a memory map.
//!
//! Layout (little-endian): `"GGUF"`, `u32` version, `u64` tensor count, `u64` metadata count, the metadata
//! key/value pairs (key = `u64` length + UTF-8 bytes, `u32` value type, value), the tensor infos (name,
//! `u32` n_dims, `u64` dims innermost first, `u32` ggml type, `u64` offset into the data region), padding to
//! `general.alignment` (default 32), then the data region.
//!
//! Every count, length and offset read from the file is checked against the bytes that are actually there
//! before anything is allocated or sliced, so a truncated or hostile file gives [`Error::Gguf`] naming the
//! file and the field, never a panic or a huge allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::types::GgmlType;
use super::value::MetaValue;
use crate::error::{Error, Result};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the data region when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays we accept (real files use at most 2).
pub const MAX_ARRAY_DEPTH: usize = 16;
/// Most metadata values (array elements included) we hold in memory: about 16 M, far above any real
/// tokenizer (a 256 k vocabulary with scores, types and merges is about 1 M values).
pub const MAX_METADATA_VALUES: usize = 1 << 24;

/// Metadata value type ids (GGUF spec).
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One tensor's description from the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored: innermost first (`ne[0]` = row length).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data region.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Torch-layout shape (the stored dims reversed: `[out, in]` for a linear weight).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Row length (`ne[0]`), 1 for a scalar.
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows (product of all dims but the innermost).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_len() / self.ggml_type.block_size() * self.ggml_type.type_size()
    }
}

/// An open GGUF file: parsed header plus the memory-mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// What the header parser returns.
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

impl GgufFile {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(corrupt(
                path,
                format!("the file is only {len} bytes long, too short for a GGUF header (24 bytes; truncated download?)"),
            ));
        }
        // SAFETY: the file is opened read-only and the mapping is only ever read. A concurrent writer
        // truncating the file could fault, the documented caveat of every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_header(&mmap, path)?;
        let mut by_name = HashMap::with_capacity(header.tensors.len());
        for (i, t) in header.tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata key/value pairs (`general.*`, `{arch}.*`, `tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        match self.metadata.get("general.architecture") {
            Some(MetaValue::String(s)) => Ok(s),
            Some(v) => Err(Error::Gguf(format!(
                "{}: `general.architecture` is a {}, expected a string",
                self.path.display(),
                v.type_name()
            ))),
            None => Err(Error::Gguf(format!(
                "{}: missing metadata key `general.architecture`",
                self.path.display()
            ))),
        }
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// One tensor's info by its llama.cpp name.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Alignment of the data region.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data region.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name).ok_or_else(|| self.missing(name))?;
        self.bytes_of(info)
    }

    fn bytes_of(&self, info: &TensorInfo) -> Result<&[u8]> {
        let start = self.data_offset as usize + info.offset as usize;
        let end = start + info.n_bytes as usize;
        self.mmap.get(start..end).ok_or_else(|| {
            corrupt(
                &self.path,
                format!(
                    "tensor `{}` data [{start}, {end}) lies outside the file",
                    info.name
                ),
            )
        })
    }

    fn missing(&self, name: &str) -> Error {
        Error::Gguf(format!(
            "{}: no tensor named `{name}` in this GGUF file",
            self.path.display()
        ))
    }

    /// Dequantise a whole tensor to f32, in stored (= torch row-major) order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor_info(name).ok_or_else(|| self.missing(name))?;
        self.dequantize_rows(info, 0, info.n_rows())
    }

    /// Dequantise rows `[start, end)` of a tensor (a row is `ne[0]` elements) to f32.
    pub fn dequantize_rows(&self, info: &TensorInfo, start: usize, end: usize) -> Result<Vec<f32>> {
        if start > end || end > info.n_rows() {
            return Err(Error::Gguf(format!(
                "{}: rows [{start}, {end}) requested from tensor `{}` which has {} rows",
                self.path.display(),
                info.name,
                info.n_rows()
            )));
        }
        let bytes = self.bytes_of(info)?;
        let rb = info.row_bytes();
        let src = &bytes[start * rb..end * rb];
        let mut out = vec![0f32; (end - start) * info.row_len()];
        super::dequant::dequantize_into(info.ggml_type, src, &mut out).map_err(|e| {
            Error::Gguf(format!(
                "{}: cannot load tensor `{}`: {e}",
                self.path.display(),
                info.name
            ))
        })?;
        Ok(out)
    }

    /// Drop the file pages of a tensor from our resident set (after it was copied out).
    pub fn release(&self, info: &TensorInfo) {
        #[cfg(unix)]
        {
            let page = 4096usize;
            let start = self.data_offset as usize + info.offset as usize;
            let s = start / page * page;
            let len = start + info.n_bytes as usize - s;
            if s + len <= self.mmap.len() {
                // SAFETY: DontNeed on a read-only file mapping only drops clean pages; later reads refault them.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, len)
                };
            }
        }
        #[cfg(not(unix))]
        let _ = info;
    }
}

fn corrupt(path: &Path, msg: String) -> Error {
    Error::Gguf(format!("{}: corrupt GGUF file: {msg}", path.display()))
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    values: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err(&self, what: &str, msg: String) -> Error {
        corrupt(self.path, format!("{what} (at byte {}): {msg}", self.pos))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.err(
                what,
                format!(
                    "needs {n} bytes but only {} are left in the {}-byte file (truncated download?)",
                    self.left(),
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed UTF-8 string.
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.left() as u64 {
            return Err(self.err(
                what,
                format!(
                    "string length {n} exceeds the {} bytes left in the file (truncated or corrupt file)",
                    self.left()
                ),
            ));
        }
        let bytes = self.take(n as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(what, format!("string is not valid UTF-8: {e}")))
    }

    fn count_value(&mut self, what: &str) -> Result<()> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.err(
                what,
                format!("the metadata holds more than {MAX_METADATA_VALUES} values; refusing to load it"),
            ));
        }
        Ok(())
    }

    /// One metadata value of type `ty`.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue> {
        use value_type as vt;
        self.count_value(what)?;
        Ok(match ty {
            vt::U8 => MetaValue::U8(self.u8(what)?),
            vt::I8 => MetaValue::I8(self.u8(what)? as i8),
            vt::U16 => MetaValue::U16(self.u16(what)?),
            vt::I16 => MetaValue::I16(self.u16(what)? as i16),
            vt::U32 => MetaValue::U32(self.u32(what)?),
            vt::I32 => MetaValue::I32(self.u32(what)? as i32),
            vt::F32 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            vt::U64 => MetaValue::U64(self.u64(what)?),
            vt::I64 => MetaValue::I64(self.u64(what)? as i64),
            vt::F64 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            vt::BOOL => match self.u8(what)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.err(what, format!("bool value must be 0 or 1, found {b}")));
                }
            },
            vt::STRING => MetaValue::String(self.string(what)?),
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(
                        what,
                        format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"),
                    ));
                }
                let ety = self.u32(what)?;
                let min = min_encoded_size(ety).ok_or_else(|| {
                    self.pos -= 4;
                    self.err(
                        what,
                        format!("unknown array element type {ety} (valid: 0..=12)"),
                    )
                })?;
                let n = self.u64(what)?;
                let room = (self.left() / min) as u64;
                if n > room {
                    return Err(self.err(
                        what,
                        format!(
                            "array of {n} elements cannot fit in the {} bytes left in the file (truncated or corrupt file)",
                            self.left()
                        ),
                    ));
                }
                if n > MAX_METADATA_VALUES as u64 {
                    return Err(self.err(
                        what,
                        format!("array of {n} elements is larger than the {MAX_METADATA_VALUES} we accept"),
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let item_what = format!("{what}[{i}]");
                    items.push(self.value(ety, &item_what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            other => {
                self.pos -= 4;
                return Err(self.err(what, format!("unknown value type {other} (valid: 0..=12)")));
            }
        })
    }
}

/// Smallest possible encoding of one value of a type (for bounding array counts), `None` for an unknown type.
fn min_encoded_size(ty: u32) -> Option<usize> {
    use value_type as vt;
    Some(match ty {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

/// Parse and validate the header of a GGUF image held in `buf` (the whole file). `path` names the file in errors.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<Header> {
    let mut c = Cursor {
        buf,
        pos: 0,
        path,
        values: 0,
    };
    let magic = c.array::<4>("magic")?;
    if &magic != GGUF_MAGIC {
        return Err(Error::Gguf(format!(
            "{}: not a GGUF file: it starts with bytes {:02x?} instead of \"GGUF\" (is it a safetensors or PyTorch file, or an HTML error page?)",
            path.display(),
            magic
        )));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(Error::Gguf(format!(
                "{}: GGUF version 1 is not supported (only v2 and v3); re-convert the model with a current llama.cpp",
                path.display()
            )))
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 || v.swap_bytes() == 1 => {
            return Err(Error::Gguf(format!(
                "{}: this is a big-endian GGUF file (version {} byte-swapped); only little-endian GGUF is supported — use the little-endian file",
                path.display(),
                v.swap_bytes()
            )))
        }
        v => {
            return Err(Error::Gguf(format!(
                "{}: unsupported GGUF version {v} (supported: 2, 3)",
                path.display()
            )))
        }
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // Smallest encodings: a key/value pair is 8 (key length) + 4 (type) + 1 bytes; a tensor info is
    // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    if n_kv > (c.left() / 13) as u64 {
        return Err(c.err(
            "metadata count",
            format!(
                "{n_kv} metadata entries cannot fit in the {} bytes of the file (truncated or corrupt file)",
                buf.len()
            ),
        ));
    }
    if n_tensors > (c.left() / 24) as u64 {
        return Err(c.err(
            "tensor count",
            format!(
                "{n_tensors} tensor infos cannot fit in the {} bytes of the file (truncated or corrupt file)",
                buf.len()
            ),
        ));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("key of metadata entry #{i}"))?;
        let what = format!("metadata `{key}`");
        let ty = c.u32(&what)?;
        let value = c.value(ty, &what, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(corrupt(path, format!("metadata key `{key}` appears twice")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
            _ => {
                return Err(corrupt(
                    path,
                    format!("`general.alignment` must be a power of two, found {v:?}"),
                ))
            }
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut seen = std::collections::HashSet::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor info #{i}"))?;
        let what = format!("tensor `{name}`");
        let n_dims = c.u32(&what)? as usize;
        if n_dims > MAX_DIMS {
            return Err(c.err(
                &what,
                format!("{n_dims} dimensions (ggml allows at most {MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64(&what)?;
            if d > i64::MAX as u64 {
                return Err(c.err(&what, format!("dimension {d} is negative as ggml's int64")));
            }
            dims.push(d);
        }
        let type_id = c.u32(&what)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            corrupt(
                path,
                format!(
                    "tensor `{name}` has unknown ggml type id {type_id}; it was written by a newer or broken tool (dequantisable types: {})",
                    GgmlType::dequantisable_names()
                ),
            )
        })?;
        let offset = c.u64(&what)?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("tensor `{name}` dims {dims:?} overflow the element count"),
                )
            })?;
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_size() as u64 != 0 {
            return Err(corrupt(
                path,
                format!(
                    "tensor `{name}` of type {ggml_type} has rows of {row} elements, not a multiple of the {}-element block",
                    ggml_type.block_size()
                ),
            ));
        }
        let n_bytes = ggml_type.bytes_for(n_elements).ok_or_else(|| {
            corrupt(
                path,
                format!("tensor `{name}` dims {dims:?} overflow the byte size"),
            )
        })?;
        if !seen.insert(name.clone()) {
            return Err(corrupt(path, format!("tensor `{name}` appears twice")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        });
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(e) if e <= file_len => {}
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor `{}` data ({} bytes at offset {} of the data region starting at byte {data_offset}) runs past the end of the {file_len}-byte file (truncated download?)",
                        t.name, t.n_bytes, t.offset
                    ),
                ))
            }
        }
    }
    // As llama.cpp's gguf.cpp requires: each tensor starts at the running sum of the aligned sizes before it,
    // so the tensors tile the data region in header order, aligned, without overlaps or gaps.
    let mut expected = 0u64;
    for t in &tensors {
        if t.offset != expected {
            let why = if t.offset % alignment != 0 {
                format!("it is not a multiple of the {alignment}-byte alignment")
            } else if t.offset < expected {
                "it overlaps the tensor before it".to_string()
            } else {
                "it leaves a gap after the tensor before it".to_string()
            };
            return Err(corrupt(
                path,
                format!(
                    "tensor `{}` has data offset {} but the tensors before it end at {expected} (aligned): {why}",
                    t.name, t.offset
                ),
            ));
        }
        expected = t
            .n_bytes
            .checked_next_multiple_of(alignment)
            .and_then(|n| expected.checked_add(n))
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!("tensor `{}` overflows the data region", t.name),
                )
            })?;
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}
