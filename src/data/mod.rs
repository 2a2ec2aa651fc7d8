//! The data path: dataset files → rendered, tokenized, masked samples → packed or padded batches.
//!
//! # Using it
//! ```text
//! // Returns at once; the datasets are prepared on a background thread while the model loads.
//! let data = DataPipeline::from_tokenizer(train_sources, eval_sources, options, &tokenizer, cache_dir)?;
//! let per_epoch = data.batches_in_epoch(0)?;       // waits for preparation (exact counts for the schedule)
//! let mut loader = data.train_loader(None)?;       // or Some(&state_from_checkpoint)
//! let batch = loader.next().unwrap()?;             // Batch { tokens: TokenBatch, labels, trained_tokens, .. }
//! let state = loader.state();                      // serialise into the checkpoint (serde)
//! for batch in data.eval_batches()? { let batch = batch?; /* eval loss */ }
//! println!("{}", data.stats()?);                   // what `loratune data stats` prints
//! ```
//! The loader is endless: it moves to the next epoch by itself and every batch carries its `epoch` and
//! `index`. Labels follow transformers (`labels[i]` = token i or -100; the loss shifts), and
//! `trained_tokens` is the number of loss targets, for normalising gradient accumulation per token.
//!
//! # Design
//! **Sources** ([`source`]): files, folders and globs of JSONL / JSON arrays / CSV / TSV / Parquet are read as a
//! stream of records (JSON objects). JSONL is read line by line (exact line numbers in errors), a JSON array
//! element by element, CSV/Parquet through a polars streaming scan that hands over batches on a bounded channel.
//!
//! **Records → samples** ([`rows`], [`render`]): each record is validated for its format (alpaca, chat,
//! completion, text; field names and role mapping configurable). A bad record is an error naming the file,
//! line/row, field and fix — or, with `skip_bad_rows: true`, skipped and counted per reason. Chat records are
//! rendered with the chat template, trained spans come from the template (generation blocks or prefix renders,
//! never a search for the response text), the text is tokenized once without special tokens (no double BOS),
//! and tokens are marked trained through the tokenizer's byte offsets. The end-of-turn token of a trained turn
//! is trained; padding is masked by position, never by comparing ids, so pad = eos cannot unlabel an EOS.
//! Trained turns that do not end with an end-of-turn/EOS token are counted and reported.
//!
//! **Preparation and the token cache** ([`cache`]): a background thread streams records in chunks of
//! `chunk_rows` (a reader thread fills a 2-chunk channel; chunks are rendered and tokenized in parallel with
//! rayon) and appends each sample to an on-disk cache — token ids, trained flags and a fixed-size index entry —
//! keyed by a hash of the files (path, size, mtime), dataset entries, tokenizer, template and the
//! tokenization options. Records never accumulate in memory: RAM holds a few chunks while preparing, and
//! afterwards the memory-mapped index plus ~20 bytes per sample for the split and the epoch plan; token ids
//! are read from the memory-mapped cache as batches are built. A dataset larger than RAM therefore works, and
//! a second run (or `data stats` followed by `train`) reuses the cache. Long samples are dropped or truncated
//! per `truncation`, with counts.
//!
//! Training starts when preparation has finished: the learning-rate schedule, the progress bar, the
//! validation split and the packing need the exact number and lengths of the samples, which only a complete
//! pass knows. The trainer overlaps preparation with loading the model, and a cached dataset is ready at once.
//!
//! **Order, split, batches** ([`loader`]): a seeded permutation picks the validation samples
//! (`val_set_size`), each epoch shuffles the training samples with ChaCha8 (seed, stream = epoch), per-dataset
//! weights repeat or subsample entries, and rows are formed either by first-fit packing (positions restart at
//! 0 in each sample, segment ids keep attention inside samples, each sample's first token is never a label) or
//! one sample per row, length-bucketed and right-padded. The stream position is (epoch, batch):
//! [`LoaderState`] serialises it with a fingerprint of the cached contents (not of paths or modification
//! times) and the order options, and [`DataPipeline::train_loader`] resumes at exactly the same batch.

pub mod cache;
pub mod loader;
pub mod options;
#[cfg(test)]
mod parity;
pub mod render;
pub mod report;
pub mod rows;
pub mod slice;
pub mod source;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

pub use cache::{CacheMeta, Counts, Progress, TokenCache};
pub use loader::{Batch, EpochPlan, LoaderState, Prepared, TrainLoader, IGNORE_INDEX};
pub use options::{
    DataFormat, DataOptions, DatasetSource, FileKind, OnBadRow, PropertyMappings, TrainOnEos,
    Truncation, ValSplit, DEFAULT_SEQUENCE_LEN,
};
pub use render::{ChatRenderer, SampleBuilder, SpecialToken, TemplateRenderer, TextTokenizer};
pub use report::{DataStats, PreviewItem, DATA_REPORT};
pub use rows::{BadRow, BadRowKind, Example, RowParser};

use crate::error::{Error, Result};

/// The default token-cache folder: `$XDG_CACHE_HOME/loratune/data`, else `~/.cache/loratune/data`, else
/// `.loratune-cache/data` in the current folder.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("loratune/data");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".cache/loratune/data");
    }
    PathBuf::from(".loratune-cache/data")
}

pub use crate::tokenizer::Message;

/// What the data pipeline knows after tokenizing, for the config's checks
/// ([`crate::config::TrainConfig::check_data`]).
#[derive(Debug, Clone, Default)]
pub struct DataFacts {
    /// Training samples (or packed rows with `sample_packing`) after the eval split and dropping.
    pub train_samples: usize,
    /// Evaluation samples (0 when there is no eval set).
    pub eval_samples: usize,
    /// Samples before the `val_set_size` split (for checking the split itself).
    pub samples_before_split: usize,
    /// The system message most training conversations carry and how many do ([`cache::Counts`]).
    pub system_message: Option<(String, u64)>,
}

/// Everything that defines a run's data: the training and evaluation datasets, the options and the token-cache
/// folder. Built from a config ([`crate::config::TrainConfig::data_spec`]) or from `loratune data` flags.
#[derive(Debug, Clone)]
pub struct DataSpec {
    pub train: Vec<DatasetSource>,
    pub eval: Vec<DatasetSource>,
    pub options: DataOptions,
    pub cache_dir: PathBuf,
}

impl DataSpec {
    /// Start preparing the datasets with the base model's tokenizer ([`DataPipeline::from_tokenizer`]).
    pub fn pipeline(self, tokenizer: &crate::tokenizer::LoadedTokenizer) -> Result<DataPipeline> {
        DataPipeline::from_tokenizer(
            self.train,
            self.eval,
            self.options,
            tokenizer,
            self.cache_dir,
        )
    }

    /// The first `n` training records rendered with their trained tokens marked, without preparing anything.
    pub fn preview(
        &self,
        tokenizer: &crate::tokenizer::LoadedTokenizer,
        n: usize,
    ) -> Result<Vec<PreviewItem>> {
        let builder = SampleBuilder::from_tokenizer(
            tokenizer,
            self.options.chat_template.as_deref(),
            self.options.train_on_inputs,
        )?
        .with_eot_tokens(tokenizer, self.options.eot_tokens.as_deref())?;
        report::preview_sources(&self.train, &builder, &self.options, n)
    }
}

/// A group of datasets (train or eval) ready to be read: files, parsers and a sample builder per entry.
#[derive(Clone)]
struct Group {
    sources: Vec<DatasetSource>,
    files: Vec<Vec<source::ResolvedFile>>,
    parsers: Vec<RowParser>,
    builders: Vec<SampleBuilder>,
}

impl Group {
    fn new(sources: Vec<DatasetSource>, base: &SampleBuilder) -> Result<Self> {
        let mut files = Vec::new();
        let mut parsers = Vec::new();
        let mut builders = Vec::new();
        for s in &sources {
            files.push(source::resolve(s)?);
            parsers.push(RowParser::new(s)?);
            let b = base.for_source(s)?;
            if s.format == DataFormat::Chat && b.template.is_none() {
                return Err(Error::Data(format!(
                    "dataset {}: chat datasets need a chat template, and the tokenizer has none; set \
                     `chat_template:` to a built-in name (chatml, llama3, mistral, gemma, phi3) or to the template \
                     text",
                    s.path
                )));
            }
            builders.push(b);
            if let Some(w) = s.weight {
                if !w.is_finite() || w < 0.0 {
                    return Err(Error::Data(format!(
                        "dataset {}: weight {w} must be a number ≥ 0 (1 = use every sample once per epoch)",
                        s.path
                    )));
                }
            }
        }
        Ok(Group {
            sources,
            files,
            parsers,
            builders,
        })
    }
}

/// The data pipeline: prepares the datasets on a background thread and serves batches.
pub struct DataPipeline {
    options: DataOptions,
    train: Group,
    cache_dir: PathBuf,
    progress: Arc<Progress>,
    job: Mutex<Option<JoinHandle<Result<Prepared>>>>,
    ready: OnceLock<std::result::Result<Arc<Prepared>, String>>,
}

impl Drop for DataPipeline {
    fn drop(&mut self) {
        self.progress
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl DataPipeline {
    /// Check the datasets and options (files exist, fields and roles make sense, a template exists for chat
    /// data) and start preparing them in the background. `eval` = separate evaluation datasets (exclusive
    /// with `val_set_size`).
    pub fn new(
        train: Vec<DatasetSource>,
        eval: Vec<DatasetSource>,
        options: DataOptions,
        builder: SampleBuilder,
        cache_dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        options.validate()?;
        let mut builder = builder;
        builder.train_on_inputs = options.train_on_inputs;
        if train.is_empty() {
            return Err(Error::Data(
                "no datasets: add at least one entry under `datasets:`".into(),
            ));
        }
        if !eval.is_empty() && options.val_split_kind()? != options::ValSplit::None {
            return Err(Error::Data(
                "both evaluation datasets and val_set_size are set; use one of them (set val_set_size: 0 to \
                 evaluate on the separate datasets)"
                    .into(),
            ));
        }
        let train_g = Group::new(train, &builder)?;
        let eval_g = if eval.is_empty() {
            None
        } else {
            Some(Group::new(eval, &builder)?)
        };
        let cache_dir = cache_dir.into();
        let progress = Arc::new(Progress::default());
        let job = {
            let (options, pad_id, train_g, dir, progress) = (
                options.clone(),
                builder.tok.pad_id,
                train_g.clone(),
                cache_dir.clone(),
                progress.clone(),
            );
            std::thread::Builder::new()
                .name("loratune-data-prepare".into())
                .spawn(move || {
                    prepare(&options, pad_id, &train_g, eval_g.as_ref(), &dir, &progress)
                })
                .map_err(|e| Error::io(&cache_dir, e))?
        };
        Ok(DataPipeline {
            options,
            train: train_g,
            cache_dir,
            progress,
            job: Mutex::new(Some(job)),
            ready: OnceLock::new(),
        })
    }

    /// [`DataPipeline::new`] with the tokenizer's special tokens and stop ids, and the chat template named by
    /// `options.chat_template` (a built-in name or Jinja text) or else the tokenizer's own.
    pub fn from_tokenizer(
        train: Vec<DatasetSource>,
        eval: Vec<DatasetSource>,
        options: DataOptions,
        tokenizer: &crate::tokenizer::LoadedTokenizer,
        cache_dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        let builder = SampleBuilder::from_tokenizer(
            tokenizer,
            options.chat_template.as_deref(),
            options.train_on_inputs,
        )?
        .with_eot_tokens(tokenizer, options.eot_tokens.as_deref())?;
        Self::new(train, eval, options, builder, cache_dir)
    }

    /// Live counters of the preparation.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The options in use.
    pub fn options(&self) -> &DataOptions {
        &self.options
    }

    /// Where caches are kept.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Whether preparation has finished (successfully or not).
    pub fn is_ready(&self) -> bool {
        if self.ready.get().is_some() {
            return true;
        }
        match self.job.lock() {
            Ok(g) => g.as_ref().is_none_or(|h| h.is_finished()),
            Err(_) => true,
        }
    }

    /// Wait for preparation and return the prepared data.
    pub fn prepared(&self) -> Result<Arc<Prepared>> {
        let r = self.ready.get_or_init(|| {
            let handle = match self.job.lock() {
                Ok(mut g) => g.take(),
                Err(_) => None,
            };
            match handle {
                None => Err("data preparation did not run".to_string()),
                Some(h) => match h.join() {
                    Ok(Ok(p)) => Ok(Arc::new(p)),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the data preparation thread panicked".to_string()),
                },
            }
        });
        r.clone().map_err(Error::Data)
    }

    /// A training loader at `state` (None = the start).
    pub fn train_loader(&self, state: Option<&LoaderState>) -> Result<TrainLoader> {
        TrainLoader::new(self.prepared()?, state)
    }

    /// Batches in training epoch `epoch` (it can vary between epochs with packing or fractional weights).
    pub fn batches_in_epoch(&self, epoch: u64) -> Result<usize> {
        Ok(self.prepared()?.epoch_plan(epoch).batches())
    }

    /// The evaluation batches, in data order (empty without a split or eval datasets).
    pub fn eval_batches(&self) -> Result<impl Iterator<Item = Result<Batch>>> {
        let p = self.prepared()?;
        let plan = p.eval_plan();
        let n = plan.as_ref().map(|pl| pl.batches()).unwrap_or(0);
        Ok((0..n).map(move |b| {
            let plan = plan
                .as_ref()
                .ok_or_else(|| Error::Data("no evaluation data".into()))?;
            let cache = p
                .eval_cache
                .as_ref()
                .ok_or_else(|| Error::Data("no evaluation data".into()))?;
            p.make_batch(cache, &plan.batch_rows(b), 0, b as u64)
        }))
    }

    /// The counts the config's semantic checks need (`batch larger than data`, split sizes): training samples
    /// (packed rows with `sample_packing`), evaluation samples, and samples before the split.
    pub fn data_facts(&self) -> Result<DataFacts> {
        let p = self.prepared()?;
        let train_samples = if p.options.sample_packing {
            p.epoch_plan(0).rows()
        } else {
            p.train_ids.len()
        };
        let before_split = match &p.eval_cache {
            Some(ec) if Arc::ptr_eq(ec, &p.train_cache) => p.train_cache.len(),
            _ => p.train_ids.len(),
        };
        Ok(DataFacts {
            train_samples,
            eval_samples: p.eval_ids.len(),
            samples_before_split: before_split,
            system_message: p
                .train_cache
                .meta
                .counts
                .main_system_message()
                .map(|(t, n)| (t.to_string(), n)),
        })
    }

    /// Statistics of the prepared data.
    pub fn stats(&self) -> Result<DataStats> {
        report::stats(&*self.prepared()?)
    }

    /// The first `n` records of the training datasets, rendered with their trained tokens marked (does not wait
    /// for preparation).
    pub fn preview(&self, n: usize) -> Result<Vec<PreviewItem>> {
        report::preview(
            &self.train.sources,
            &self.train.files,
            &self.train.parsers,
            &self.train.builders,
            &self.options,
            n,
        )
    }
}

fn prepare(
    options: &DataOptions,
    pad_id: u32,
    train: &Group,
    eval: Option<&Group>,
    cache_dir: &Path,
    progress: &Progress,
) -> Result<Prepared> {
    let build_group = |g: &Group| -> Result<Arc<TokenCache>> {
        let inputs = cache::CacheInputs {
            sources: &g.sources,
            files: &g.files,
            builders: &g.builders,
            options,
        };
        let dir = cache::build(&inputs, &g.parsers, cache_dir, progress)?;
        Ok(Arc::new(TokenCache::open(&dir)?))
    };
    let train_cache = build_group(train)?;
    let eval_cache = match eval {
        Some(g) => Some(build_group(g)?),
        None => None,
    };
    let weights = train
        .sources
        .iter()
        .map(|s| s.weight.unwrap_or(1.0))
        .collect();
    Prepared::new(train_cache, eval_cache, weights, options.clone(), pad_id)
}
