//! Dataset files: resolving paths/folders/globs, and streaming their records one at a time.
//!
//! JSON Lines are read line by line with serde_json (exact line numbers); a `.json` array is deserialised
//! element by element (never the whole array at once); CSV/TSV and Parquet go through a polars streaming scan
//! (`sink_batches` on the streaming engine) whose batches are handed over a bounded channel, so memory holds at
//! most a couple of batches whatever the file size. Every record becomes a `serde_json::Value` object.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use polars::prelude::*;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::Value;

use super::options::{DatasetSource, FileKind};
use super::rows::{BadRow, BadRowKind};
use crate::error::{Error, Result};

/// One concrete file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedFile {
    pub path: PathBuf,
    pub kind: FileKind,
    /// Size in bytes and modification time (ns since the epoch): part of the cache key.
    pub len: u64,
    pub mtime_ns: u128,
}

/// Where a record is in its file, as a user would look for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLoc {
    /// JSON Lines and CSV/TSV: 1-based line number (where a CSV record starts).
    Line(u64),
    /// JSON array: 1-based element number.
    Record(u64),
    /// Parquet: 1-based row.
    Row(u64),
}

impl RowLoc {
    /// The number, whatever the kind.
    pub fn number(self) -> u64 {
        match self {
            RowLoc::Line(n) | RowLoc::Record(n) | RowLoc::Row(n) => n,
        }
    }
}

impl fmt::Display for RowLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowLoc::Line(n) => write!(f, "line {n}"),
            RowLoc::Record(n) => write!(f, "record {n} of the JSON array"),
            RowLoc::Row(n) => write!(f, "row {n}"),
        }
    }
}

fn has_glob_chars(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn file_entry(path: PathBuf, forced: Option<FileKind>, what: &str) -> Result<ResolvedFile> {
    let kind = match forced {
        Some(k) => k,
        None => {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            FileKind::from_extension(ext).ok_or_else(|| {
                Error::Data(format!(
                    "{}: unsupported file extension `{ext}` ({what}); supported: .jsonl, .json, .csv, .tsv, .parquet \
                     — or set ds_type: json|jsonl|csv|tsv|parquet on the dataset",
                    path.display()
                ))
            })?
        }
    };
    let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(ResolvedFile {
        path,
        kind,
        len: meta.len(),
        mtime_ns,
    })
}

/// The files of one dataset entry: a file, every supported file of a folder (sorted by name), or the files
/// matching a glob (sorted). An entry that matches nothing is an error.
pub fn resolve(source: &DatasetSource) -> Result<Vec<ResolvedFile>> {
    let p = source.path.trim();
    if p.is_empty() {
        return Err(Error::Data(
            "a dataset has an empty `path`; set it to a file, folder or glob".into(),
        ));
    }
    let path = PathBuf::from(p);
    if path.is_file() {
        return Ok(vec![file_entry(path, source.ds_type, "the dataset path")?]);
    }
    if path.is_dir() {
        let rd = std::fs::read_dir(&path).map_err(|e| Error::io(&path, e))?;
        let mut files = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(&path, e))?;
            let f = entry.path();
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            let matches = match source.ds_type {
                Some(k) => FileKind::from_extension(ext) == Some(k),
                None => FileKind::from_extension(ext).is_some(),
            };
            if f.is_file() && matches {
                files.push(f);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Data(format!(
                "{}: this folder holds no .jsonl/.json/.csv/.tsv/.parquet files; point `path` at a data file or a glob",
                path.display()
            )));
        }
        return files
            .into_iter()
            .map(|f| file_entry(f, source.ds_type, "in the dataset folder"))
            .collect();
    }
    if has_glob_chars(p) {
        let paths = glob::glob(p).map_err(|e| {
            Error::Data(format!(
                "dataset path `{p}` is not a valid glob pattern: {e}"
            ))
        })?;
        let mut files = Vec::new();
        for entry in paths {
            let f = entry.map_err(|e| Error::Data(format!("dataset glob `{p}`: {e}")))?;
            if f.is_file() {
                files.push(f);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(Error::Data(format!(
                "dataset glob `{p}` matches no files (relative paths start at {}); check the pattern",
                std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default()
            )));
        }
        return files
            .into_iter()
            .map(|f| file_entry(f, source.ds_type, "matched by the dataset glob"))
            .collect();
    }
    Err(Error::Data(format!(
        "dataset `{p}`: no such file or folder (relative paths start at {}); loratune reads local .jsonl, .json, \
         .csv, .tsv and .parquet files, folders and globs",
        std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default()
    )))
}

/// A record as read: its location and either its JSON object or why it could not be read.
pub struct RawRecord {
    pub loc: RowLoc,
    pub value: std::result::Result<Value, BadRow>,
}

/// Stream the records of `file` into `f` (which returns `false` to stop), reading at most `limit` records.
/// `columns`: for CSV/Parquet, the columns to read (`None` = all); JSON records are always read whole.
pub fn read_records(
    file: &ResolvedFile,
    limit: Option<usize>,
    columns: Option<&[String]>,
    batch_rows: usize,
    f: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    if limit == Some(0) {
        return Ok(());
    }
    match file.kind {
        FileKind::Jsonl => read_jsonl(&file.path, limit, f),
        FileKind::Json => {
            let first = first_non_space_byte(&file.path)?;
            match first {
                Some(b'[') => read_json_array(&file.path, limit, f),
                Some(b'{') | None => read_jsonl(&file.path, limit, f),
                Some(c) => Err(Error::Data(format!(
                    "{}: a .json dataset must be a JSON array of objects (`[{{...}}, ...]`) or JSON lines \
                     (one object per line); this file starts with `{}`",
                    file.path.display(),
                    c as char
                ))),
            }
        }
        FileKind::Csv | FileKind::Tsv => read_csv(file, limit, columns, f),
        FileKind::Parquet => read_polars(file, limit, columns, batch_rows, f),
    }
}

/// CSV/TSV, record by record (RFC 4180 quoting, a header row, UTF-8 with or without a BOM): a row with the wrong
/// number of fields or bytes that are not UTF-8 is a bad row at its line, skippable like any other; every value
/// is text (a numeric-looking answer stays a string) and an empty cell is null.
fn read_csv(
    file: &ResolvedFile,
    limit: Option<usize>,
    columns: Option<&[String]>,
    f: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    let path = &file.path;
    let sep = if file.kind == FileKind::Tsv {
        b'\t'
    } else {
        b','
    };
    let reader = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = csv::ReaderBuilder::new()
        .delimiter(sep)
        .has_headers(true)
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 20, reader));
    let csv_err = |e: csv::Error| {
        let at = e
            .position()
            .map(|p| format!(" at line {}", p.line()))
            .unwrap_or_default();
        Error::Data(format!(
            "{}: cannot read this CSV file{at}: {e}",
            path.display()
        ))
    };
    let header: Vec<String> = r
        .byte_headers()
        .map_err(csv_err)?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            std::str::from_utf8(h).map(str::to_string).map_err(|_| {
                Error::Data(format!(
                    "{}: the header's column {} is not valid UTF-8; re-encode the file as UTF-8",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect::<Result<_>>()?;
    let keep: Vec<bool> = header
        .iter()
        .map(|h| columns.is_none_or(|c| c.iter().any(|c| c == h)))
        .collect();
    let mut rec = csv::ByteRecord::new();
    let mut records = 0usize;
    loop {
        match r.read_byte_record(&mut rec) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            // An I/O error, not a malformed row (the csv reader accepts any bytes).
            Err(e) => return Err(csv_err(e)),
        }
        let line = rec.position().map_or(0, |p| p.line());
        let value = if rec.len() != header.len() {
            Err(BadRow::new(
                BadRowKind::InvalidJson,
                "",
                format!(
                    "the row has {} fields but the header has {}",
                    rec.len(),
                    header.len()
                ),
                "quote values that contain the separator or a line break, and give every row one value per column",
            ))
        } else {
            let mut obj = serde_json::Map::with_capacity(header.len());
            let mut bad = None;
            for ((name, cell), keep) in header.iter().zip(rec.iter()).zip(&keep) {
                if !keep {
                    continue;
                }
                match std::str::from_utf8(cell) {
                    Ok("") => {
                        obj.insert(name.clone(), Value::Null);
                    }
                    Ok(text) => {
                        obj.insert(name.clone(), Value::String(text.to_string()));
                    }
                    Err(e) => {
                        bad = Some(BadRow::new(
                            BadRowKind::InvalidJson,
                            name,
                            format!("not valid UTF-8 (byte {})", e.valid_up_to() + 1),
                            "re-encode the file as UTF-8",
                        ));
                        break;
                    }
                }
            }
            match bad {
                Some(b) => Err(b),
                None => Ok(Value::Object(obj)),
            }
        };
        records += 1;
        if !f(RawRecord {
            loc: RowLoc::Line(line),
            value,
        })? {
            return Ok(());
        }
        if Some(records) == limit {
            return Ok(());
        }
    }
}

fn first_non_space_byte(path: &Path) -> Result<Option<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(file);
    let mut buf = [0u8; 4096];
    let mut first_chunk = true;
    loop {
        let n = r.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(None);
        }
        let mut s = &buf[..n];
        if first_chunk && s.starts_with(&[0xEF, 0xBB, 0xBF]) {
            s = &s[3..];
        }
        first_chunk = false;
        if let Some(&c) = s.iter().find(|c| !c.is_ascii_whitespace()) {
            return Ok(Some(c));
        }
    }
}

fn read_jsonl(
    path: &Path,
    limit: Option<usize>,
    f: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut records = 0usize;
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        let mut s: &[u8] = &buf;
        if line == 1 && s.starts_with(&[0xEF, 0xBB, 0xBF]) {
            s = &s[3..];
        }
        if s.iter().all(|c| c.is_ascii_whitespace()) {
            continue;
        }
        let value = match std::str::from_utf8(s) {
            Err(e) => Err(BadRow::new(
                BadRowKind::InvalidJson,
                "",
                format!("the line is not valid UTF-8 (byte {})", e.valid_up_to() + 1),
                "re-encode the file as UTF-8",
            )),
            Ok(text) => serde_json::from_str::<Value>(text).map_err(|e| {
                BadRow::new(
                    BadRowKind::InvalidJson,
                    "",
                    format!("invalid JSON at column {}: {e}", e.column()),
                    "each line of a .jsonl file must be one complete JSON object",
                )
            }),
        };
        records += 1;
        if !f(RawRecord {
            loc: RowLoc::Line(line),
            value,
        })? {
            return Ok(());
        }
        if Some(records) == limit {
            return Ok(());
        }
    }
}

/// Deserialises a JSON array element by element, handing each to the callback.
struct ArrayStreamer<'a> {
    f: &'a mut dyn FnMut(RawRecord) -> Result<bool>,
    limit: Option<usize>,
    count: u64,
    stopped: bool,
    failed: Option<Error>,
}

impl<'de> DeserializeSeed<'de> for &mut ArrayStreamer<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &mut ArrayStreamer<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Value>()? {
            self.count += 1;
            let rec = RawRecord {
                loc: RowLoc::Record(self.count),
                value: Ok(v),
            };
            match (self.f)(rec) {
                Ok(true) => {}
                Ok(false) => {
                    self.stopped = true;
                    return Err(serde::de::Error::custom("stopped"));
                }
                Err(e) => {
                    self.failed = Some(e);
                    return Err(serde::de::Error::custom("callback failed"));
                }
            }
            if self.limit.is_some_and(|l| self.count as usize >= l) {
                self.stopped = true;
                return Err(serde::de::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

fn read_json_array(
    path: &Path,
    limit: Option<usize>,
    f: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    // Skip a UTF-8 byte-order mark.
    {
        let head = reader.fill_buf().map_err(|e| Error::io(path, e))?;
        if head.starts_with(&[0xEF, 0xBB, 0xBF]) {
            reader.consume(3);
        }
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut streamer = ArrayStreamer {
        f,
        limit,
        count: 0,
        stopped: false,
        failed: None,
    };
    let res = (&mut streamer).deserialize(&mut de);
    if let Some(e) = streamer.failed.take() {
        return Err(e);
    }
    if streamer.stopped {
        return Ok(());
    }
    match res.and_then(|_| de.end()) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::Data(format!(
            "{}: invalid JSON at line {}, column {} (after {} complete records): {e}; a .json dataset must be one \
             JSON array of objects",
            path.display(),
            e.line(),
            e.column(),
            streamer.count
        ))),
    }
}

fn polars_err(path: &Path, e: PolarsError) -> Error {
    Error::Data(format!("{}: cannot read this file: {e}", path.display()))
}

/// Parquet, in record batches through polars' streaming engine.
fn read_polars(
    file: &ResolvedFile,
    limit: Option<usize>,
    columns: Option<&[String]>,
    batch_rows: usize,
    f: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    let path = &file.path;
    let pl_path = PlRefPath::try_from_path(path).map_err(|e| polars_err(path, e))?;
    let args = ScanArgsParquet {
        glob: false,
        ..Default::default()
    };
    let mut lf = LazyFrame::scan_parquet(pl_path, args).map_err(|e| polars_err(path, e))?;
    if let Some(cols) = columns {
        let schema = lf.collect_schema().map_err(|e| polars_err(path, e))?;
        let present: Vec<Expr> = cols
            .iter()
            .filter(|c| schema.contains(c.as_str()))
            .map(|c| col(c.as_str()))
            .collect();
        if !present.is_empty() {
            lf = lf.select(present);
        }
    }
    if let Some(n) = limit {
        lf = lf.limit(n as IdxSize);
    }
    let (tx, rx) = sync_channel::<DataFrame>(2);
    let sink = lf
        .sink_batches(
            PlanCallback::new(move |df: DataFrame| Ok(tx.send(df).is_err())),
            true,
            NonZeroUsize::new(batch_rows.max(1)),
        )
        .map_err(|e| polars_err(path, e))?;
    let handle = std::thread::Builder::new()
        .name("loratune-polars-scan".into())
        .spawn(move || sink.collect_with_engine(Engine::Streaming).map(|_| ()))
        .map_err(|e| Error::io(path, e))?;
    let mut row = 0u64;
    let mut outcome: Result<()> = Ok(());
    'batches: for df in rx.iter() {
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cols = df.columns();
        for i in 0..df.height() {
            row += 1;
            let mut obj = serde_json::Map::with_capacity(names.len());
            let mut bad = None;
            for (name, c) in names.iter().zip(cols.iter()) {
                match c.get(i) {
                    Ok(av) => {
                        obj.insert(name.clone(), any_to_json(&av));
                    }
                    Err(e) => {
                        bad = Some(BadRow::new(
                            BadRowKind::WrongType,
                            name,
                            format!("cannot read the value: {e}"),
                            "check the column's type",
                        ));
                        break;
                    }
                }
            }
            let rec = RawRecord {
                loc: RowLoc::Row(row),
                value: match bad {
                    Some(b) => Err(b),
                    None => Ok(Value::Object(obj)),
                },
            };
            match f(rec) {
                Ok(true) => {}
                Ok(false) => break 'batches,
                Err(e) => {
                    outcome = Err(e);
                    break 'batches;
                }
            }
        }
    }
    drop(rx);
    let joined = handle.join().map_err(|_| {
        Error::Data(format!(
            "{}: the polars reader thread panicked",
            path.display()
        ))
    })?;
    outcome?;
    match joined {
        Ok(()) => Ok(()),
        // A stop requested by us surfaces as no error; anything else is a real read error.
        Err(e) => Err(polars_err(path, e)),
    }
}

/// A polars cell as JSON (strings, numbers, booleans, lists and structs; other types as their text).
pub fn any_to_json(av: &AnyValue) -> Value {
    match av {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String((*s).to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::UInt8(v) => Value::from(*v),
        AnyValue::UInt16(v) => Value::from(*v),
        AnyValue::UInt32(v) => Value::from(*v),
        AnyValue::UInt64(v) => Value::from(*v),
        AnyValue::Int8(v) => Value::from(*v),
        AnyValue::Int16(v) => Value::from(*v),
        AnyValue::Int32(v) => Value::from(*v),
        AnyValue::Int64(v) => Value::from(*v),
        AnyValue::Float32(v) => serde_json::Number::from_f64(*v as f64)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AnyValue::Float64(v) => serde_json::Number::from_f64(*v)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AnyValue::List(s) => Value::Array(s.iter().map(|x| any_to_json(&x)).collect()),
        AnyValue::Struct(_, _, fields) => {
            let mut obj = serde_json::Map::new();
            for (fld, v) in fields.iter().zip(av._iter_struct_av()) {
                obj.insert(fld.name().to_string(), any_to_json(&v));
            }
            Value::Object(obj)
        }
        AnyValue::StructOwned(b) => {
            let (vals, fields) = &**b;
            let mut obj = serde_json::Map::new();
            for (fld, v) in fields.iter().zip(vals.iter()) {
                obj.insert(fld.name().to_string(), any_to_json(v));
            }
            Value::Object(obj)
        }
        other => Value::String(other.str_value().to_string()),
    }
}
