//! The on-disk token cache and the background thread that fills it.
//!
//! Layout of `<cache_dir>/<key>/` (all little-endian):
//! - `ids.bin`: every sample's token ids (u32), concatenated in data order;
//! - `mask.bin`: one byte per token, 1 = trained (its label is the token) — the first token of each sample is
//!   never a label, which the batcher applies;
//! - `index.bin`: 32 bytes per sample: token offset (u64), record number in its file (u64), length (u32),
//!   labelled tokens (u32), file number (u32), flags (u32: bit 0 = truncated);
//! - `meta.json`: the key's inputs, the files, and the counts. Written last: a folder without it is incomplete.
//!
//! A cache is built in `<key>.tmp-<pid>-<n>/` and renamed into place, so an interrupted build never leaves a
//! folder that looks complete. The key hashes everything that changes the tokens: each file's path, size and
//! modification time, the dataset entries, the tokenizer (its full serialisation and special tokens), the chat
//! template text, `sequence_len`, `truncation`, `train_on_inputs` and `on_bad_row`. Seed, split, packing and
//! batch size are applied when reading, so changing them reuses the cache.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::options::{DataOptions, DatasetSource, OnBadRow, Truncation};
use super::render::SampleBuilder;
use super::rows::{BadRow, RowParser};
use super::source::{read_records, RawRecord, ResolvedFile, RowLoc};
use crate::error::{Error, Result};

/// Bump when the cache layout or the meaning of its contents changes.
pub const CACHE_VERSION: u32 = 3;

/// How many skipped and dropped records the counts quote (file and line).
const EXAMPLES: usize = 5;
const ENTRY_BYTES: usize = 32;

/// 64-bit FNV-1a, seeded (a stable hash for cache keys and fingerprints).
pub fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A streaming 128-bit FNV-1a digest (two seeds).
#[derive(Debug, Clone)]
pub struct Digest(u64, u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(
            0xcbf2_9ce4_8422_2325,
            0xcbf2_9ce4_8422_2325 ^ 0x9e37_79b9_7f4a_7c15,
        )
    }
}

impl Digest {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            self.1 = (self.1 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}{:016x}", self.0, self.1)
    }
}

/// 128-bit hex digest of a text (two seeded FNV-1a passes).
pub fn digest(text: &str) -> String {
    format!(
        "{:016x}{:016x}",
        fnv1a64(text.as_bytes(), 0),
        fnv1a64(text.as_bytes(), 0x9e37_79b9_7f4a_7c15)
    )
}

/// A file of a cached group, with the dataset entry it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedFile {
    pub source: usize,
    pub file: ResolvedFile,
}

/// Counts of one dataset entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub path: String,
    pub records: u64,
    pub samples: u64,
    pub tokens: u64,
    pub labels: u64,
}

/// What preparation read, kept, skipped, truncated and dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Records read (every line/element/row except blank JSONL lines).
    pub records: u64,
    /// Samples kept.
    pub samples: u64,
    /// Bad records skipped, by reason (only with `skip_bad_rows: true`).
    pub skipped: BTreeMap<String, u64>,
    /// The first few skip messages (file, line, field, fix).
    pub skip_examples: Vec<String>,
    /// The first few samples dropped for their length (file, line, tokens).
    #[serde(default)]
    pub drop_examples: Vec<String>,
    /// Samples longer than `sequence_len` that were dropped (`truncation: drop`).
    pub dropped_too_long: u64,
    /// Samples cut to `sequence_len` (`truncation: truncate`).
    pub truncated: u64,
    /// Samples dropped because truncation left no label.
    pub dropped_no_labels: u64,
    /// Tokens and labels of the kept samples (labels after the first-token rule).
    pub tokens: u64,
    pub labels: u64,
    /// Trained turns that do not end with an end-of-turn / EOS token.
    pub spans_without_end: u64,
    /// Samples dropped as exact duplicates of an earlier one (`dataset_exact_deduplication`).
    #[serde(default)]
    pub duplicates: u64,
    pub per_source: Vec<SourceCounts>,
    /// Kept conversations per system message (the first [`SYSTEM_MESSAGES`] distinct ones).
    #[serde(default)]
    pub system_messages: BTreeMap<String, u64>,
}

/// How many distinct system messages [`Counts`] keeps count of.
pub const SYSTEM_MESSAGES: usize = 64;

impl Counts {
    fn count_system_message(&mut self, text: String) {
        let n = self.system_messages.len();
        match self.system_messages.get_mut(&text) {
            Some(c) => *c += 1,
            None if n < SYSTEM_MESSAGES => {
                self.system_messages.insert(text, 1);
            }
            None => {}
        }
    }

    /// The system message most kept conversations carry, with their count (ties: the first in text order).
    pub fn main_system_message(&self) -> Option<(&str, u64)> {
        let mut best: Option<(&str, u64)> = None;
        for (text, &c) in &self.system_messages {
            if best.is_none_or(|(_, b)| c > b) {
                best = Some((text, c));
            }
        }
        best
    }
}

/// `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub version: u32,
    pub key: String,
    pub files: Vec<CachedFile>,
    pub sequence_len: usize,
    pub counts: Counts,
    /// Digest of the cached samples (ids, labels, lengths, dataset entry): identifies the data for resuming,
    /// independently of file paths and modification times.
    pub content_digest: String,
}

/// One sample's index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub record: u64,
    pub len: u32,
    pub labels: u32,
    pub file: u32,
    pub flags: u32,
}

impl Entry {
    fn to_bytes(self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.record.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.labels.to_le_bytes());
        b[24..28].copy_from_slice(&self.file.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| {
            b.get(i..i + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let u32_at = |i: usize| {
            b.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
        };
        Some(Entry {
            offset: u64_at(0)?,
            record: u64_at(8)?,
            len: u32_at(16)?,
            labels: u32_at(20)?,
            file: u32_at(24)?,
            flags: u32_at(28)?,
        })
    }
}

/// Live progress of a preparation (readable from any thread).
#[derive(Debug, Default)]
pub struct Progress {
    pub records: AtomicU64,
    pub samples: AtomicU64,
    pub tokens: AtomicU64,
    /// Set to ask the preparation thread to stop early.
    pub cancel: AtomicBool,
}

/// Everything that determines a group's cached tokens.
pub struct CacheInputs<'a> {
    pub sources: &'a [DatasetSource],
    pub files: &'a [Vec<ResolvedFile>],
    /// One builder per dataset entry (same tokenizer; the entry's template and `train_on_eos`).
    pub builders: &'a [SampleBuilder],
    pub options: &'a DataOptions,
}

impl CacheInputs<'_> {
    /// The cache key (hex) of these inputs.
    pub fn key(&self) -> String {
        let o = self.options;
        let desc = serde_json::json!({
            "version": CACHE_VERSION,
            "sources": self.sources,
            "files": self.files,
            "tokenizer": self.builders.first().map(|b| digest(&b.tok.fingerprint_text())),
            "templates": self
                .builders
                .iter()
                .map(|b| b.template.as_ref().map(|t| digest(&t.fingerprint())))
                .collect::<Vec<_>>(),
            "train_on_eos": self.builders.iter().map(|b| b.train_on_eos).collect::<Vec<_>>(),
            "train_on_inputs": o.train_on_inputs,
            "sequence_len": o.sequence_len,
            "truncation": o.truncation,
            "on_bad_row": o.on_bad_row,
            "deduplicate": o.deduplicate,
        });
        digest(&desc.to_string())
    }
}

struct Memmapped(Option<memmap2::Mmap>);

impl Memmapped {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Ok(Memmapped(None));
        }
        // SAFETY: the cache files are written once, renamed into place and never modified afterwards.
        let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Ok(Memmapped(Some(m)))
    }
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// A complete cache, memory-mapped.
pub struct TokenCache {
    pub dir: PathBuf,
    pub meta: CacheMeta,
    ids: Memmapped,
    mask: Memmapped,
    index: Memmapped,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("dir", &self.dir)
            .field("samples", &self.len())
            .finish()
    }
}

fn corrupt(dir: &Path, what: &str) -> Error {
    Error::Data(format!(
        "{}: the token cache is damaged ({what}); delete this folder and run again to rebuild it",
        dir.display()
    ))
}

impl TokenCache {
    /// Open a complete cache folder, checking that its files agree with each other.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let meta: CacheMeta = serde_json::from_slice(&crate::error::read_file(&meta_path)?)
            .map_err(|e| Error::Json {
                path: meta_path.clone(),
                source: e,
            })?;
        if meta.version != CACHE_VERSION {
            return Err(corrupt(dir, "written by another loratune version"));
        }
        let ids = Memmapped::open(&dir.join("ids.bin"))?;
        let mask = Memmapped::open(&dir.join("mask.bin"))?;
        let index = Memmapped::open(&dir.join("index.bin"))?;
        let n_tokens = mask.bytes().len() as u64;
        if ids.bytes().len() as u64 != 4 * n_tokens || n_tokens != meta.counts.tokens {
            return Err(corrupt(
                dir,
                "ids.bin, mask.bin and meta.json disagree on the token count",
            ));
        }
        if index.bytes().len() % ENTRY_BYTES != 0
            || (index.bytes().len() / ENTRY_BYTES) as u64 != meta.counts.samples
        {
            return Err(corrupt(
                dir,
                "index.bin and meta.json disagree on the sample count",
            ));
        }
        let cache = TokenCache {
            dir: dir.to_path_buf(),
            meta,
            ids,
            mask,
            index,
        };
        for i in 0..cache.len() {
            let e = cache.entry(i).ok_or_else(|| corrupt(dir, "short index"))?;
            if e.offset + e.len as u64 > n_tokens
                || e.file as usize >= cache.meta.files.len()
                || e.len == 0
            {
                return Err(corrupt(
                    dir,
                    &format!("index entry {i} points outside the token file"),
                ));
            }
        }
        Ok(cache)
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.index.bytes().len() / ENTRY_BYTES
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index entry of sample `i`.
    pub fn entry(&self, i: usize) -> Option<Entry> {
        let b = self
            .index
            .bytes()
            .get(i * ENTRY_BYTES..(i + 1) * ENTRY_BYTES)?;
        Entry::from_bytes(b)
    }

    /// Token count of sample `i` (0 when out of range).
    pub fn sample_len(&self, i: usize) -> usize {
        self.entry(i).map(|e| e.len as usize).unwrap_or(0)
    }

    /// The dataset entry of sample `i`.
    pub fn sample_source(&self, i: usize) -> usize {
        self.entry(i)
            .and_then(|e| self.meta.files.get(e.file as usize))
            .map(|f| f.source)
            .unwrap_or(0)
    }

    /// Append sample `i`'s ids and trained flags to the vectors.
    pub fn read_sample(&self, i: usize, ids: &mut Vec<u32>, trained: &mut Vec<bool>) -> Result<()> {
        let e = self
            .entry(i)
            .ok_or_else(|| corrupt(&self.dir, "sample index out of range"))?;
        let (a, n) = (e.offset as usize, e.len as usize);
        let idb = self
            .ids
            .bytes()
            .get(4 * a..4 * (a + n))
            .ok_or_else(|| corrupt(&self.dir, "short ids.bin"))?;
        let mb = self
            .mask
            .bytes()
            .get(a..a + n)
            .ok_or_else(|| corrupt(&self.dir, "short mask.bin"))?;
        ids.extend(
            idb.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        trained.extend(mb.iter().map(|&m| m != 0));
        Ok(())
    }
}

/// Find a complete cache for `key` under `cache_dir`.
pub fn find_complete(cache_dir: &Path, key: &str) -> Option<PathBuf> {
    let dir = cache_dir.join(key);
    dir.join("meta.json").is_file().then_some(dir)
}

struct Chunk {
    records: Vec<(usize, RawRecord)>,
}

enum Outcome {
    /// The sample and its conversation's system message, if any.
    Sample(super::render::Sample, Option<String>),
    Bad(BadRow),
}

/// Read every file of a group, render and tokenize in chunks, and write the cache. Runs on the preparation
/// thread; returns the complete cache's folder.
pub fn build(
    inputs: &CacheInputs,
    parsers: &[RowParser],
    cache_dir: &Path,
    progress: &Progress,
) -> Result<PathBuf> {
    let key = inputs.key();
    if let Some(dir) = find_complete(cache_dir, &key) {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    // Build folders of processes that died mid-build (the cache is shared, so only those of dead ones).
    crate::export::atomic::remove_stale_staging(cache_dir, false);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = cache_dir.join(format!(
        "{key}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = build_into(inputs, parsers, &key, &tmp, progress);
    match result {
        Ok(()) => {
            let dir = cache_dir.join(&key);
            match std::fs::rename(&tmp, &dir) {
                Ok(()) => Ok(dir),
                Err(_) if find_complete(cache_dir, &key).is_some() => {
                    // Another process finished the same cache first.
                    let _ = std::fs::remove_dir_all(&tmp);
                    Ok(dir)
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    Err(Error::io(&dir, e))
                }
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn writer(path: &Path) -> Result<BufWriter<std::fs::File>> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

fn build_into(
    inputs: &CacheInputs,
    parsers: &[RowParser],
    key: &str,
    tmp: &Path,
    progress: &Progress,
) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let ids_path = tmp.join("ids.bin");
    let mask_path = tmp.join("mask.bin");
    let index_path = tmp.join("index.bin");
    let mut ids_w = writer(&ids_path)?;
    let mut mask_w = writer(&mask_path)?;
    let mut index_w = writer(&index_path)?;

    let mut files = Vec::new();
    for (s, fl) in inputs.files.iter().enumerate() {
        for f in fl {
            files.push(CachedFile {
                source: s,
                file: f.clone(),
            });
        }
    }
    let opts = inputs.options;
    let chunk_rows = opts.chunk_rows.max(1);

    // Reader thread: records → chunks over a bounded channel (at most 2 chunks in flight).
    let (tx, rx) = sync_channel::<Result<Chunk>>(2);
    let reader_files = files.clone();
    let columns: Vec<Option<Vec<String>>> = parsers.iter().map(|p| p.columns()).collect();
    // Each source's record range: its `split` slice (counting its records first when the slice needs the
    // total), then its `limit`.
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(inputs.sources.len());
    for (s, src) in inputs.sources.iter().enumerate() {
        let mut range = match &src.rows {
            Some(slice) if slice.needs_total() => {
                let mut total = 0usize;
                for cf in files.iter().filter(|cf| cf.source == s) {
                    read_records(&cf.file, None, None, chunk_rows, &mut |_| {
                        total += 1;
                        Ok(true)
                    })?;
                }
                slice.resolve(total)
            }
            Some(slice) => slice.resolve(usize::MAX),
            None => 0..usize::MAX,
        };
        if let Some(l) = src.limit {
            range.end = range.end.min(range.start.saturating_add(l));
        }
        ranges.push(range);
    }
    let limits: Vec<Option<usize>> = ranges
        .iter()
        .map(|r| (r.end != usize::MAX).then_some(r.end))
        .collect();
    let starts: Vec<usize> = ranges.iter().map(|r| r.start).collect();
    let reader = std::thread::Builder::new()
        .name("loratune-data-reader".into())
        .spawn(move || {
            let mut read_per_source = vec![0usize; limits.len()];
            let mut chunk = Vec::with_capacity(chunk_rows);
            for (fi, cf) in reader_files.iter().enumerate() {
                let s = cf.source;
                let remaining = limits[s].map(|l| l.saturating_sub(read_per_source[s]));
                if remaining == Some(0) {
                    continue;
                }
                let mut closed = false;
                let res = read_records(
                    &cf.file,
                    remaining,
                    columns[s].as_deref(),
                    chunk_rows,
                    &mut |rec| {
                        read_per_source[s] += 1;
                        if read_per_source[s] <= starts[s] {
                            return Ok(true);
                        }
                        chunk.push((fi, rec));
                        if chunk.len() >= chunk_rows {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(chunk_rows));
                            if tx.send(Ok(Chunk { records: full })).is_err() {
                                closed = true;
                                return Ok(false);
                            }
                        }
                        Ok(true)
                    },
                );
                if closed {
                    return;
                }
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            if !chunk.is_empty() {
                let _ = tx.send(Ok(Chunk { records: chunk }));
            }
        })
        .map_err(|e| Error::io(tmp, e))?;

    let mut counts = Counts {
        per_source: inputs
            .sources
            .iter()
            .map(|s| SourceCounts {
                path: s.path.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut offset = 0u64;
    let mut seen: std::collections::HashSet<(u64, u64)> = std::collections::HashSet::new();
    let mut content = Digest::default();
    let seq_len = opts.sequence_len;
    let mut failure: Option<Error> = None;
    'chunks: for chunk in rx.iter() {
        if progress.cancel.load(Ordering::Relaxed) {
            failure = Some(Error::Data("data preparation was cancelled".into()));
            break;
        }
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let outcomes: Vec<Outcome> = chunk
            .records
            .par_iter()
            .map(|(fi, rec)| {
                let source = files[*fi].source;
                let parsed = match &rec.value {
                    Ok(v) => parsers[source].parse(v, inputs.builders[source].train_on_inputs),
                    Err(b) => Err(b.clone()),
                };
                match parsed.and_then(|ex| {
                    let system = ex.system_message().map(str::to_string);
                    inputs.builders[source].build(&ex).map(|s| (s, system))
                }) {
                    Ok((s, system)) => Outcome::Sample(s, system),
                    Err(b) => Outcome::Bad(b),
                }
            })
            .collect();
        for ((fi, rec), outcome) in chunk.records.iter().zip(outcomes) {
            let source = files[*fi].source;
            counts.records += 1;
            counts.per_source[source].records += 1;
            progress.records.fetch_add(1, Ordering::Relaxed);
            let kept_system: Option<String>;
            let mut sample = match outcome {
                Outcome::Bad(b) => {
                    let msg = b.message(&files[*fi].file.path, rec.loc);
                    match opts.on_bad_row {
                        OnBadRow::Error => {
                            failure = Some(Error::Data(msg));
                            break 'chunks;
                        }
                        OnBadRow::Skip => {
                            *counts.skipped.entry(b.kind.name().to_string()).or_insert(0) += 1;
                            if counts.skip_examples.len() < EXAMPLES {
                                counts.skip_examples.push(msg);
                            }
                            continue;
                        }
                    }
                }
                Outcome::Sample(s, system) => {
                    kept_system = system;
                    s
                }
            };
            let mut flags = 0u32;
            if sample.ids.len() > seq_len {
                match opts.truncation {
                    Truncation::Drop => {
                        counts.dropped_too_long += 1;
                        if counts.drop_examples.len() < EXAMPLES {
                            counts.drop_examples.push(format!(
                                "{} {}: {} tokens > sequence_len {seq_len} (raise sequence_len, or set `truncation: truncate`)",
                                files[*fi].file.path.display(),
                                rec.loc,
                                sample.ids.len()
                            ));
                        }
                        continue;
                    }
                    Truncation::Truncate => {
                        sample.ids.truncate(seq_len);
                        sample.trained.truncate(seq_len);
                        flags |= 1;
                    }
                }
            }
            // The first token of a sample is never a label (it has no context inside the sample).
            let labels = sample.trained.iter().skip(1).filter(|&&t| t).count() as u64;
            if labels == 0 {
                counts.dropped_no_labels += 1;
                if counts.drop_examples.len() < EXAMPLES {
                    counts.drop_examples.push(format!(
                        "{} {}: no trained token left in the first {seq_len} tokens",
                        files[*fi].file.path.display(),
                        rec.loc
                    ));
                }
                continue;
            }
            if flags & 1 != 0 {
                counts.truncated += 1;
            }
            let len = sample.ids.len();
            if opts.deduplicate {
                // Two independently seeded 64-bit hashes of ids and mask: a false match is out of reach.
                let mut bytes = Vec::with_capacity(5 * len);
                for id in &sample.ids {
                    bytes.extend_from_slice(&id.to_le_bytes());
                }
                bytes.extend(sample.trained.iter().map(|&t| t as u8));
                if !seen.insert((fnv1a64(&bytes, 1), fnv1a64(&bytes, 0x9e37_79b9_7f4a_7c15))) {
                    counts.duplicates += 1;
                    continue;
                }
            }
            let record = match rec.loc {
                RowLoc::Line(n) | RowLoc::Record(n) | RowLoc::Row(n) => n,
            };
            let mut buf = Vec::with_capacity(4 * len);
            for id in &sample.ids {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            ids_w.write_all(&buf).map_err(|e| Error::io(&ids_path, e))?;
            let mb: Vec<u8> = sample.trained.iter().map(|&t| t as u8).collect();
            mask_w
                .write_all(&mb)
                .map_err(|e| Error::io(&mask_path, e))?;
            let entry = Entry {
                offset,
                record,
                len: len as u32,
                labels: labels as u32,
                file: *fi as u32,
                flags,
            };
            index_w
                .write_all(&entry.to_bytes())
                .map_err(|e| Error::io(&index_path, e))?;
            content.update(&(len as u32).to_le_bytes());
            content.update(&(source as u32).to_le_bytes());
            content.update(&buf);
            content.update(&mb);
            offset += len as u64;
            counts.samples += 1;
            counts.tokens += len as u64;
            counts.labels += labels;
            counts.spans_without_end += sample.spans_without_end as u64;
            if let Some(sys) = kept_system {
                counts.count_system_message(sys);
            }
            let ps = &mut counts.per_source[source];
            ps.samples += 1;
            ps.tokens += len as u64;
            ps.labels += labels;
            progress.samples.fetch_add(1, Ordering::Relaxed);
            progress.tokens.fetch_add(len as u64, Ordering::Relaxed);
        }
    }
    drop(rx);
    let joined = reader.join();
    if let Some(e) = failure {
        return Err(e);
    }
    if joined.is_err() {
        return Err(Error::Data("the dataset reader thread panicked".into()));
    }
    for (w, p) in [
        (&mut ids_w, &ids_path),
        (&mut mask_w, &mask_path),
        (&mut index_w, &index_path),
    ] {
        w.flush().map_err(|e| Error::io(p, e))?;
        w.get_ref().sync_all().map_err(|e| Error::io(p, e))?;
    }
    let meta = CacheMeta {
        version: CACHE_VERSION,
        key: key.to_string(),
        files,
        sequence_len: seq_len,
        counts,
        content_digest: content.hex(),
    };
    let meta_path = tmp.join("meta.json");
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Json {
        path: meta_path.clone(),
        source: e,
    })?;
    std::fs::write(&meta_path, text).map_err(|e| Error::io(&meta_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Counts, SYSTEM_MESSAGES};

    /// The most frequent system message wins, ties go to the first in text order, and only the first
    /// `SYSTEM_MESSAGES` distinct ones are counted (a dataset with a system message per record stays small).
    #[test]
    fn main_system_message_counts_and_caps() {
        let mut c = Counts::default();
        assert_eq!(c.main_system_message(), None);
        for s in ["b", "a", "b", "a"] {
            c.count_system_message(s.to_string());
        }
        assert_eq!(c.main_system_message(), Some(("a", 2)));
        c.count_system_message("b".to_string());
        assert_eq!(c.main_system_message(), Some(("b", 3)));
        for i in 0..2 * SYSTEM_MESSAGES {
            c.count_system_message(format!("unique {i}"));
        }
        assert_eq!(c.system_messages.len(), SYSTEM_MESSAGES);
        c.count_system_message("b".to_string());
        assert_eq!(c.main_system_message(), Some(("b", 4)));
    }
}
