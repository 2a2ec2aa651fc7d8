//! `loratune data preview|stats`: see what training will consume before spending compute.
//!
//! Until the YAML config is wired in, the datasets and options are given as flags:
//! `loratune data stats --dataset datasets/nimbrel/support_chat.jsonl --type chat --tokenizer MODEL_DIR`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::data::{
    default_cache_dir, DataFormat, DataOptions, DataPipeline, DatasetSource, OnBadRow,
    SampleBuilder, Truncation,
};
use crate::tokenizer::LoadedTokenizer;

#[derive(clap::Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Print the first records as the model will see them, with the trained tokens marked.
    Preview(PreviewArgs),
    /// Tokenize the datasets (into the token cache) and print counts, lengths, truncation and batch efficiency.
    Stats(StatsArgs),
}

/// Where the data is and how to read it.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// A dataset file, folder or glob (.jsonl, .json, .csv, .tsv, .parquet); repeat for several.
    #[arg(long = "dataset", required = true)]
    pub datasets: Vec<String>,
    /// Record format: alpaca, chat (alias chat_template, sharegpt), completion, text.
    #[arg(long = "type", default_value = "chat")]
    pub format: String,
    /// The tokenizer: a Hugging Face model folder (tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Chat template: a built-in name (chatml, llama3, mistral, gemma, phi3, alpaca) or a .jinja file;
    /// default: the tokenizer's own.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Chat: the field that holds the messages (default: messages, or conversations).
    #[arg(long)]
    pub field_messages: Option<String>,
    /// Maximum tokens per sample (and per packed row).
    #[arg(long, default_value_t = 2048)]
    pub sequence_len: usize,
    /// Train on every token, not only on the assistant turns / completions.
    #[arg(long)]
    pub train_on_inputs: bool,
    /// Cut samples longer than sequence_len instead of dropping them.
    #[arg(long)]
    pub truncate: bool,
    /// Skip bad records (counted per reason) instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Read at most this many records of each dataset.
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Number of records to show.
    #[arg(short = 'n', long, default_value_t = 3)]
    pub n: usize,
    /// Mark trained tokens with ⟦ ⟧ instead of colour.
    #[arg(long)]
    pub no_color: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Pack several samples per row.
    #[arg(long)]
    pub sample_packing: bool,
    /// Rows per batch.
    #[arg(long, default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Validation split: a fraction in (0, 1) or a number of samples.
    #[arg(long, default_value_t = 0.0)]
    pub val_set_size: f64,
    /// Seed of the split and shuffle.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Token cache folder (default: $XDG_CACHE_HOME/loratune/data or ~/.cache/loratune/data).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print the statistics as JSON.
    #[arg(long)]
    pub json: bool,
}

fn build(
    src: &SourceArgs,
    extra: impl FnOnce(&mut DataOptions),
) -> Result<(Vec<DatasetSource>, DataOptions, SampleBuilder)> {
    let format = DataFormat::parse(&src.format)?;
    let sources: Vec<DatasetSource> = src
        .datasets
        .iter()
        .map(|p| {
            let mut s = DatasetSource::new(p.clone(), format);
            s.field_messages = src.field_messages.clone();
            s.limit = src.limit;
            s
        })
        .collect();
    let template = match &src.chat_template {
        Some(t) if t.ends_with(".jinja") => Some(
            std::fs::read_to_string(t)
                .with_context(|| format!("reading the chat template file {t}"))?,
        ),
        other => other.clone(),
    };
    let mut options = DataOptions {
        sequence_len: src.sequence_len,
        train_on_inputs: src.train_on_inputs,
        truncation: if src.truncate {
            Truncation::Truncate
        } else {
            Truncation::Drop
        },
        on_bad_row: if src.skip_bad_rows {
            OnBadRow::Skip
        } else {
            OnBadRow::Error
        },
        chat_template: template,
        ..Default::default()
    };
    extra(&mut options);
    let tok = LoadedTokenizer::from_hf_dir(&src.tokenizer)?;
    let builder = SampleBuilder::from_tokenizer(
        &tok,
        options.chat_template.as_deref(),
        options.train_on_inputs,
    )?;
    Ok((sources, options, builder))
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Preview(p) => preview(p),
        DataCommand::Stats(s) => stats(s),
    }
}

fn preview(a: PreviewArgs) -> Result<()> {
    let (sources, options, builder) = build(&a.source, |_| {})?;
    let color = !a.no_color && std::io::stdout().is_terminal();
    let items = crate::data::report::preview_sources(&sources, &builder, &options, a.n)?;
    if color {
        println!("trained tokens in \x1b[1;32mgreen\x1b[0m; the first token of each sample is never trained");
    } else {
        println!("trained tokens between ⟦ ⟧; the first token of each sample is never trained");
    }
    for it in &items {
        println!("{}", it.render(color));
    }
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    let (sources, options, builder) = build(&a.source, |o| {
        o.sample_packing = a.sample_packing;
        o.micro_batch_size = a.micro_batch_size;
        o.val_set_size = a.val_set_size;
        o.seed = a.seed;
    })?;
    let cache = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let pipeline = DataPipeline::new(sources, vec![], options, builder, cache)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    while !pipeline.is_ready() {
        let p = pipeline.progress();
        bar.set_message(format!(
            "preparing: {} records, {} samples, {} tokens",
            p.records.load(std::sync::atomic::Ordering::Relaxed),
            p.samples.load(std::sync::atomic::Ordering::Relaxed),
            p.tokens.load(std::sync::atomic::Ordering::Relaxed)
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    let st = pipeline.stats()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!("{st}");
    }
    Ok(())
}
