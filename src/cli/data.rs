//! `loratune data preview|stats`: see what training will consume before spending compute.
//!
//! `loratune data preview CONFIG [-n 3]` / `loratune data stats CONFIG` read a training config (its datasets,
//! data options and the base model's tokenizer); without a config, flags name the data:
//! `loratune data stats --dataset datasets/nimbrel/support_chat.jsonl --type chat --tokenizer MODEL_DIR_OR_GGUF`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{LoadOptions, Purpose, TrainConfig};
use crate::data::{
    default_cache_dir, DataFormat, DataOptions, DataSpec, DatasetSource, OnBadRow, Truncation,
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

/// Where the data is and how to read it: a training config, or flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// A training config (YAML): its datasets, test_datasets, chat template, sequence_len, packing, split and
    /// the base model's tokenizer. Without it, give --dataset and --tokenizer.
    pub config: Option<PathBuf>,
    /// Config overrides `key=value` (with CONFIG).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A dataset file, folder or glob (.jsonl, .json, .csv, .tsv, .parquet); repeat for several.
    #[arg(long = "dataset", required_unless_present = "config")]
    pub datasets: Vec<String>,
    /// Record format: alpaca, chat_template (alias chat), completion, text.
    #[arg(long = "type", default_value = "chat_template")]
    pub format: DataFormat,
    /// The tokenizer: a Hugging Face model folder (tokenizer.json, tokenizer_config.json) or a .gguf file.
    /// With CONFIG the default is the base model's.
    #[arg(long, required_unless_present = "config")]
    pub tokenizer: Option<PathBuf>,
    /// Chat template: a built-in name (chatml, llama3, mistral, gemma, phi3, alpaca) or a .jinja file;
    /// default: the tokenizer's own.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Chat: the field that holds the messages (default: messages, or conversations).
    #[arg(long)]
    pub field_messages: Option<String>,
    /// Maximum tokens per sample (and per packed row).
    #[arg(long, default_value_t = DataOptions::default().sequence_len)]
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
    /// Pack several samples per row (without CONFIG).
    #[arg(long)]
    pub sample_packing: bool,
    /// Rows per batch (without CONFIG).
    #[arg(long, default_value_t = DataOptions::default().micro_batch_size)]
    pub micro_batch_size: usize,
    /// Validation split: a fraction in (0, 1) or a number of samples (without CONFIG).
    #[arg(long, default_value_t = DataOptions::default().val_set_size)]
    pub val_set_size: f64,
    /// Seed of the split and shuffle (without CONFIG).
    #[arg(long, default_value_t = DataOptions::default().seed)]
    pub seed: u64,
    /// Token cache folder (default: the config's dataset_prepared_path, else $XDG_CACHE_HOME/loratune/data or
    /// ~/.cache/loratune/data).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print the statistics as JSON.
    #[arg(long)]
    pub json: bool,
}

fn load_tokenizer(path: &Path) -> Result<LoadedTokenizer> {
    crate::tokenizer::load_for_model(path)
        .with_context(|| format!("loading the tokenizer {}", path.display()))
}

/// The data and the tokenizer `data preview|stats` read: a training config's (the same conversion `train` makes,
/// so the token cache is shared), or the flags'.
fn inputs(
    src: &SourceArgs,
    flags: impl FnOnce(&mut DataOptions),
) -> Result<(DataSpec, LoadedTokenizer)> {
    if let Some(cfg_path) = &src.config {
        let opts = LoadOptions {
            purpose: Purpose::Data,
            ..LoadOptions::default()
        };
        let cfg = TrainConfig::load_with(cfg_path, &src.set, &opts)?;
        for line in cfg.findings() {
            eprintln!("{line}");
        }
        // The config's special-token overrides apply whichever tokenizer is read, as in `train`.
        let tok = match &src.tokenizer {
            Some(t) => cfg
                .tokenizer(t)
                .with_context(|| format!("loading the tokenizer {}", t.display()))?,
            None => cfg.tokenizer(&cfg.base_model_path()?)?,
        };
        return Ok((cfg.data_spec(), tok));
    }
    let train: Vec<DatasetSource> = src
        .datasets
        .iter()
        .map(|p| {
            let mut s = DatasetSource::new(p.clone(), src.format);
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
    flags(&mut options);
    let tok_path = src
        .tokenizer
        .as_ref()
        .context("--tokenizer is required without a config")?;
    let spec = DataSpec {
        train,
        eval: Vec::new(),
        options,
        cache_dir: default_cache_dir(),
    };
    Ok((spec, load_tokenizer(tok_path)?))
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Preview(p) => preview(p),
        DataCommand::Stats(s) => stats(s),
    }
}

fn preview(a: PreviewArgs) -> Result<()> {
    let (spec, tok) = inputs(&a.source, |_| {})?;
    let color = !a.no_color && std::io::stdout().is_terminal();
    let items = spec.preview(&tok, a.n)?;
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
    let (mut spec, tok) = inputs(&a.source, |o| {
        o.sample_packing = a.sample_packing;
        o.micro_batch_size = a.micro_batch_size;
        o.val_set_size = a.val_set_size;
        o.seed = a.seed;
    })?;
    if let Some(dir) = &a.cache_dir {
        spec.cache_dir = dir.clone();
    }
    let pipeline = spec.pipeline(&tok)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    while !pipeline.is_ready() {
        let p = pipeline.progress();
        bar.set_message(format!(
            "preparing: {} records, {} samples, {} tokens",
            p.records.load(Ordering::Relaxed),
            p.samples.load(Ordering::Relaxed),
            p.tokens.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `sequence_len` has one default: the config's, the data options' and the `--sequence-len` flag's are the same.
    #[test]
    fn sequence_len_has_one_default() {
        let config = crate::config::TrainConfig::default().sequence_len;
        let data = crate::data::DataOptions::default().sequence_len;
        let cmd = crate::cli::Cli::command();
        let stats = cmd
            .find_subcommand("data")
            .and_then(|d| d.find_subcommand("stats"))
            .expect("data stats");
        let flag = stats
            .get_arguments()
            .find(|a| a.get_id() == "sequence_len")
            .expect("--sequence-len");
        let flag: usize = flag.get_default_values()[0]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!((config, data, flag), (512, 512, 512));
    }
}
