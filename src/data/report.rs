//! What `loratune data preview` and `loratune data stats` show: rendered samples with their labels marked, and
//! counts, lengths and batch efficiency of the prepared data (aggregated with polars).

use std::fmt;
use std::path::PathBuf;

use polars::prelude::*;
use serde::Serialize;

use super::cache::Counts;
use super::loader::Prepared;
use super::options::{DataOptions, DatasetSource, Truncation};
use super::render::{PreviewToken, SampleBuilder};
use super::rows::RowParser;
use super::source::{read_records, ResolvedFile};
use crate::error::{Error, Result};

/// The file in a run folder that holds the [`DataStats`] of the run's data (what `train` read, kept, skipped,
/// dropped and truncated).
pub const DATA_REPORT: &str = "data_report.json";

/// Length distribution of the samples (tokens per sample).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LengthStats {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

/// Rows and padding of the first training epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EpochSummary {
    pub samples: usize,
    pub rows: usize,
    pub batches: usize,
    /// Real tokens / tokens computed (batch × seq summed over batches).
    pub fill: f64,
    /// Loss targets in the epoch.
    pub labels: u64,
}

/// Everything `data stats` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub train_counts: Counts,
    pub eval_counts: Option<Counts>,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub lengths: LengthStats,
    /// Labels / tokens over the kept training samples.
    pub label_fraction: f64,
    pub epoch0: EpochSummary,
    pub sequence_len: usize,
    pub sample_packing: bool,
    pub micro_batch_size: usize,
    pub cache: PathBuf,
}

fn pe(e: PolarsError) -> Error {
    Error::Data(format!("computing data statistics: {e}"))
}

fn length_stats(lens: Vec<u32>) -> Result<LengthStats> {
    if lens.is_empty() {
        return Ok(LengthStats::default());
    }
    let df = DataFrame::new_infer_height(vec![Column::new("len".into(), lens)]).map_err(pe)?;
    let q = |p: f64, name: &str| {
        col("len")
            .cast(DataType::Float64)
            .quantile(lit(p), QuantileMethod::Nearest)
            .alias(name)
    };
    let out = df
        .lazy()
        .select([
            col("len").cast(DataType::Float64).min().alias("min"),
            col("len").cast(DataType::Float64).mean().alias("mean"),
            q(0.5, "p50"),
            q(0.9, "p90"),
            q(0.95, "p95"),
            q(0.99, "p99"),
            col("len").cast(DataType::Float64).max().alias("max"),
        ])
        .collect()
        .map_err(pe)?;
    let get = |name: &str| -> Result<f64> {
        let c = out.column(name).map_err(pe)?;
        let v = c.get(0).map_err(pe)?;
        v.extract::<f64>()
            .ok_or_else(|| Error::Data(format!("computing data statistics: no value for {name}")))
    };
    Ok(LengthStats {
        min: get("min")? as u64,
        mean: get("mean")?,
        p50: get("p50")? as u64,
        p90: get("p90")? as u64,
        p95: get("p95")? as u64,
        p99: get("p99")? as u64,
        max: get("max")? as u64,
    })
}

/// Statistics of prepared data.
pub fn stats(p: &Prepared) -> Result<DataStats> {
    let cache = &p.train_cache;
    let lens: Vec<u32> = (0..cache.len())
        .map(|i| cache.sample_len(i) as u32)
        .collect();
    let lengths = length_stats(lens)?;
    let c = &cache.meta.counts;
    let plan = p.epoch_plan(0);
    let mut computed = 0u64;
    let mut real = 0u64;
    let mut labels = 0u64;
    for b in 0..plan.batches() {
        let rows = plan.batch_rows(b);
        let row_len = |r: &[u32]| {
            r.iter()
                .map(|&s| cache.sample_len(s as usize) as u64)
                .sum::<u64>()
        };
        let seq = rows.iter().map(|r| row_len(r)).max().unwrap_or(0);
        computed += seq * rows.len() as u64;
        for r in &rows {
            real += row_len(r);
            labels += r
                .iter()
                .map(|&s| {
                    cache
                        .entry(s as usize)
                        .map(|e| e.labels as u64)
                        .unwrap_or(0)
                })
                .sum::<u64>();
        }
    }
    Ok(DataStats {
        train_counts: c.clone(),
        eval_counts: match &p.eval_cache {
            Some(ec) if !Arc::ptr_eq(ec, &p.train_cache) => Some(ec.meta.counts.clone()),
            _ => None,
        },
        train_samples: p.train_ids.len(),
        eval_samples: p.eval_ids.len(),
        lengths,
        label_fraction: if c.tokens > 0 {
            c.labels as f64 / c.tokens as f64
        } else {
            0.0
        },
        epoch0: EpochSummary {
            samples: plan.samples.len(),
            rows: plan.rows(),
            batches: plan.batches(),
            fill: if computed > 0 {
                real as f64 / computed as f64
            } else {
                0.0
            },
            labels,
        },
        sequence_len: p.options.sequence_len,
        sample_packing: p.options.sample_packing,
        micro_batch_size: p.options.micro_batch_size,
        cache: cache.dir.clone(),
    })
}

fn write_counts(f: &mut fmt::Formatter<'_>, c: &Counts, seq_len: usize) -> fmt::Result {
    writeln!(f, "  records read          {}", c.records)?;
    writeln!(f, "  samples kept          {}", c.samples)?;
    let skipped: u64 = c.skipped.values().sum();
    if skipped > 0 {
        let parts: Vec<String> = c.skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(
            f,
            "  bad records skipped   {skipped} ({})",
            parts.join(", ")
        )?;
        for m in &c.skip_examples {
            writeln!(f, "      e.g. {m}")?;
        }
    } else {
        writeln!(f, "  bad records skipped   0")?;
    }
    writeln!(f, "  dropped (> {seq_len} tokens)  {}", c.dropped_too_long)?;
    writeln!(f, "  truncated to {seq_len}     {}", c.truncated)?;
    if c.dropped_no_labels > 0 {
        writeln!(
            f,
            "  dropped (no label left after truncation)  {}",
            c.dropped_no_labels
        )?;
    }
    for m in &c.drop_examples {
        writeln!(f, "      e.g. {m}")?;
    }
    if c.duplicates > 0 {
        writeln!(f, "  dropped (exact duplicates)  {}", c.duplicates)?;
    }
    writeln!(f, "  tokens                {}", c.tokens)?;
    writeln!(
        f,
        "  trained tokens        {} ({:.1}%)",
        c.labels,
        if c.tokens > 0 {
            100.0 * c.labels as f64 / c.tokens as f64
        } else {
            0.0
        }
    )?;
    if c.spans_without_end > 0 {
        writeln!(
            f,
            "  WARNING: {} trained turns do not end with an end-of-turn/EOS token: the model may not learn to stop",
            c.spans_without_end
        )?;
    }
    if c.per_source.len() > 1 {
        for s in &c.per_source {
            writeln!(
                f,
                "    {}: {} records, {} samples, {} tokens, {} trained",
                s.path, s.records, s.samples, s.tokens, s.labels
            )?;
        }
    }
    Ok(())
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "training datasets:")?;
        write_counts(f, &self.train_counts, self.sequence_len)?;
        let l = &self.lengths;
        writeln!(
            f,
            "  tokens per sample     min {}  mean {:.1}  p50 {}  p90 {}  p95 {}  p99 {}  max {}",
            l.min, l.mean, l.p50, l.p90, l.p95, l.p99, l.max
        )?;
        if let Some(ec) = &self.eval_counts {
            writeln!(f, "evaluation datasets:")?;
            write_counts(f, ec, self.sequence_len)?;
        }
        writeln!(
            f,
            "split: {} training samples, {} evaluation samples",
            self.train_samples, self.eval_samples
        )?;
        let e = &self.epoch0;
        writeln!(
            f,
            "epoch 0: {} samples in {} rows ({}), {} batches of ≤ {} rows, {:.1}% of computed positions are real \
             tokens, {} loss targets",
            e.samples,
            e.rows,
            if self.sample_packing {
                format!("packed to ≤ {} tokens", self.sequence_len)
            } else {
                "one sample per row".to_string()
            },
            e.batches,
            self.micro_batch_size,
            100.0 * e.fill,
            e.labels
        )?;
        write!(f, "cache: {}", self.cache.display())
    }
}

/// A previewed record: where it is, and its tokens with labels marked — or why it is rejected.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreviewItem {
    pub file: PathBuf,
    pub location: String,
    pub tokens: Vec<PreviewToken>,
    pub labels: usize,
    /// Set when the record is rejected (bad row) — `tokens` is then empty.
    pub error: Option<String>,
    /// Length-policy note (dropped / truncated).
    pub note: Option<String>,
}

const MARK_OPEN: &str = "⟦";
const MARK_CLOSE: &str = "⟧";

impl PreviewItem {
    /// The text with trained tokens marked: green with `color`, else between ⟦ and ⟧.
    pub fn marked_text(&self, color: bool) -> String {
        let (open, close) = if color {
            ("\x1b[1;32m", "\x1b[0m")
        } else {
            (MARK_OPEN, MARK_CLOSE)
        };
        let mut out = String::new();
        let mut in_label = false;
        for t in &self.tokens {
            if t.trained != in_label {
                out.push_str(if t.trained { open } else { close });
                in_label = t.trained;
            }
            out.push_str(&t.piece);
        }
        if in_label {
            out.push_str(close);
        }
        out
    }

    /// Header + marked text (or the error).
    pub fn render(&self, color: bool) -> String {
        let head = format!("── {} {}", self.file.display(), self.location);
        match &self.error {
            Some(e) => format!("{head}: REJECTED\n{e}\n"),
            None => {
                let note = self
                    .note
                    .as_ref()
                    .map(|n| format!(", {n}"))
                    .unwrap_or_default();
                format!(
                    "{head}: {} tokens, {} trained{note}\n{}\n",
                    self.tokens.len(),
                    self.labels,
                    self.marked_text(color)
                )
            }
        }
    }
}

/// Render the first `n` records of `sources` (in file order) with their labels, without preparing anything.
pub fn preview_sources(
    sources: &[DatasetSource],
    builder: &SampleBuilder,
    options: &DataOptions,
    n: usize,
) -> Result<Vec<PreviewItem>> {
    let files = sources
        .iter()
        .map(super::source::resolve)
        .collect::<Result<Vec<_>>>()?;
    let parsers = sources
        .iter()
        .map(RowParser::new)
        .collect::<Result<Vec<_>>>()?;
    let mut base = builder.clone();
    base.train_on_inputs = options.train_on_inputs;
    let builders = sources
        .iter()
        .map(|s| base.for_source(s))
        .collect::<Result<Vec<_>>>()?;
    preview(sources, &files, &parsers, &builders, options, n)
}

/// Render the first `n` records of the datasets (in file order) with their labels.
pub fn preview(
    sources: &[DatasetSource],
    files: &[Vec<ResolvedFile>],
    parsers: &[RowParser],
    builders: &[SampleBuilder],
    options: &DataOptions,
    n: usize,
) -> Result<Vec<PreviewItem>> {
    let mut items = Vec::new();
    'outer: for (s, fl) in files.iter().enumerate() {
        for file in fl {
            if items.len() >= n {
                break 'outer;
            }
            let want = n - items.len();
            let limit = sources
                .get(s)
                .and_then(|src| src.limit)
                .map_or(want, |l| l.min(want));
            let parser = &parsers[s];
            let builder = &builders[s];
            let columns = parser.columns();
            read_records(file, Some(limit), columns.as_deref(), 256, &mut |rec| {
                let mut item = PreviewItem {
                    file: file.path.clone(),
                    location: rec.loc.to_string(),
                    tokens: Vec::new(),
                    labels: 0,
                    error: None,
                    note: None,
                };
                let built = rec
                    .value
                    .as_ref()
                    .map_err(|b| b.clone())
                    .and_then(|v| parser.parse(v, builder.train_on_inputs))
                    .and_then(|ex| builder.preview(&ex));
                match built {
                    Err(b) => item.error = Some(b.message(&file.path, rec.loc)),
                    Ok((_, _, mut toks)) => {
                        if let Some(t) = toks.first_mut() {
                            t.trained = false;
                        }
                        let len = toks.len();
                        if len > options.sequence_len {
                            match options.truncation {
                                Truncation::Drop => {
                                    item.note = Some(format!(
                                        "DROPPED in training: {len} tokens > sequence_len {}",
                                        options.sequence_len
                                    ))
                                }
                                Truncation::Truncate => {
                                    toks.truncate(options.sequence_len);
                                    item.note = Some(format!("truncated from {len} tokens"));
                                }
                            }
                        }
                        item.labels = toks.iter().filter(|t| t.trained).count();
                        item.tokens = toks;
                    }
                }
                items.push(item);
                Ok(true)
            })?;
        }
    }
    Ok(items)
}
