//! Plain runtime descriptions of the datasets and of the data options. The YAML config module converts its
//! (Axolotl-named) keys into these; nothing here parses YAML.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::named_enum;

/// The default `sequence_len` (Axolotl's): maximum tokens per sample and per packed row.
pub const DEFAULT_SEQUENCE_LEN: usize = 512;

named_enum! {
    /// How a record is turned into text (a dataset entry's `type`).
    pub enum DataFormat ("dataset type") {
        /// `{"instruction", "input", "output"}` (+ optional `"system"`), rendered with the Stanford Alpaca prompt;
        /// the response and EOS are trained.
        Alpaca = "alpaca",
        /// Alpaca records in Axolotl's `chat` prompt style (`USER: …\nASSISTANT:`).
        AlpacaChat = "alpaca:chat",
        /// Alpaca records in Axolotl's `chatml` prompt style (`<|im_start|>user\n…`).
        AlpacaChatml = "alpaca:chatml",
        /// Alpaca records in Axolotl's `phi` prompt style (`<|user|>\n…<|end|>…<|assistant|>`).
        AlpacaPhi = "alpaca:phi",
        /// `{"messages": [{"role", "content"}]}` (or ShareGPT `{"conversations": [{"from", "value"}]}` via field
        /// mappings), rendered with the chat template; assistant turns (content + end-of-turn token) are trained.
        Chat = "chat_template" | "chat",
        /// `{"prompt", "completion"}`: the prompt is masked, the completion and EOS are trained.
        Completion = "completion",
        /// `{"text"}`: raw text, all trained (BOS per the tokenizer, EOS appended).
        Text = "text",
    }
    reject {
        "sharegpt" => "use `type: chat_template` with `field_messages: conversations` and `message_property_mappings: {role: from, content: value}` (Axolotl deprecated `sharegpt` the same way)",
        "pretrain" => "streaming pre-training datasets are not supported; use `type: text`",
    }
}

impl DataFormat {
    /// The prompt style of an alpaca type (`alpaca`, `alpaca:chat`, …); `None` for the other types.
    pub fn alpaca_style(self) -> Option<AlpacaStyle> {
        match self {
            DataFormat::Alpaca => Some(AlpacaStyle::Instruct),
            DataFormat::AlpacaChat => Some(AlpacaStyle::Chat),
            DataFormat::AlpacaChatml => Some(AlpacaStyle::Chatml),
            DataFormat::AlpacaPhi => Some(AlpacaStyle::Phi),
            DataFormat::Chat | DataFormat::Completion | DataFormat::Text => None,
        }
    }
}

/// Axolotl's alpaca prompt styles (`PromptStyle` of its `AlpacaPrompter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlpacaStyle {
    Instruct,
    Chat,
    Chatml,
    Phi,
}

named_enum! {
    /// The file kind (a dataset entry's `ds_type`); by default taken from the file extension.
    pub enum FileKind ("dataset file type") {
        /// One JSON object per line (`.jsonl`, `.ndjson`).
        Jsonl = "jsonl" | "ndjson",
        /// A JSON array of objects (`.json`); a `.json` file whose first character is `{` is read as JSON lines.
        Json = "json",
        /// Comma-separated values with a header row (`.csv`).
        Csv = "csv",
        /// Tab-separated values with a header row (`.tsv`).
        Tsv = "tsv",
        /// Apache Parquet (`.parquet`, `.pq`).
        Parquet = "parquet" | "pq",
    }
    reject {
        "arrow" => "convert the dataset to Parquet or JSONL",
        "text" => "use JSONL with a `text` field and `type: text`",
    }
}

impl FileKind {
    /// From a file extension (case-insensitive).
    pub fn from_extension(ext: &str) -> Option<Self> {
        Self::parse(ext).ok()
    }

    /// From a path's extension (also for globs such as `data/*.jsonl`).
    pub fn of_path(path: &str) -> Option<Self> {
        let ext = std::path::Path::new(path).extension()?.to_str()?;
        Self::from_extension(ext)
    }
}

/// Which record fields hold a message's role and content (Axolotl's `message_property_mappings`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PropertyMappings {
    pub role: String,
    pub content: String,
}

/// One dataset entry of the config: files plus how to read their records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetSource {
    /// A file, a folder (all .jsonl/.json/.csv/.tsv/.parquet files in it, sorted) or a glob (`data/*.jsonl`).
    pub path: String,
    /// Record format (Axolotl `type`).
    #[serde(rename = "type")]
    pub format: DataFormat,
    /// File kind; `None` = from the extension.
    pub ds_type: Option<FileKind>,
    /// Chat: the field holding the list of messages. `None` = `messages`, or `conversations` when a record has
    /// no `messages` field.
    pub field_messages: Option<String>,
    /// Chat: the message fields holding role and content. `None` = `role`/`content`, or ShareGPT's
    /// `from`/`value` when a message has no `role` field.
    pub message_property_mappings: Option<PropertyMappings>,
    /// Chat: extra role names, target role → names used in the data (e.g. `assistant: [gpt, bot]`). Always
    /// included: user ← human, user; assistant ← gpt, assistant, model; system ← system; tool ← tool.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Chat: the roles whose turns are trained; `None` = `["assistant"]`.
    pub roles_to_train: Option<Vec<String>>,
    /// Alpaca / completion / text field names (`None` = the standard name).
    pub field_instruction: Option<String>,
    pub field_input: Option<String>,
    pub field_output: Option<String>,
    pub field_system: Option<String>,
    pub field_prompt: Option<String>,
    pub field_completion: Option<String>,
    pub field_text: Option<String>,
    /// Chat: which end-of-turn tokens are trained (`turn`: those of trained turns; `all`: every one; `last`:
    /// only the conversation's last).
    pub train_on_eos: TrainOnEos,
    /// Chat: remove a leading system message (for templates without a system role, e.g. Gemma's).
    pub drop_system_message: bool,
    /// Chat: this dataset's own chat template (a built-in name or Jinja text); `None` = the run's template.
    pub chat_template: Option<String>,
    /// Sampling weight in the training mix: each epoch takes every sample ⌊weight⌋ times plus a seeded
    /// fraction `weight − ⌊weight⌋` of them. `None` = 1.
    pub weight: Option<f64>,
    /// Read at most this many records of this dataset (the first ones, in file order).
    pub limit: Option<usize>,
    /// Only these records (file order), from the entry's `split` (`train[:20%]`, `train[100:200]`).
    pub rows: Option<crate::data::slice::RowSlice>,
}

impl Default for DatasetSource {
    fn default() -> Self {
        DatasetSource {
            path: String::new(),
            format: DataFormat::Chat,
            ds_type: None,
            field_messages: None,
            message_property_mappings: None,
            roles: BTreeMap::new(),
            roles_to_train: None,
            field_instruction: None,
            field_input: None,
            field_output: None,
            field_system: None,
            field_prompt: None,
            field_completion: None,
            field_text: None,
            train_on_eos: TrainOnEos::Turn,
            drop_system_message: false,
            chat_template: None,
            weight: None,
            limit: None,
            rows: None,
        }
    }
}

impl DatasetSource {
    /// A source with default field names.
    pub fn new(path: impl Into<String>, format: DataFormat) -> Self {
        DatasetSource {
            path: path.into(),
            format,
            ..Default::default()
        }
    }
}

named_enum! {
    /// Which end-of-turn tokens of a chat sample are trained (Axolotl's `train_on_eos`).
    pub enum TrainOnEos ("train_on_eos value") {
        /// The end-of-turn token closing each trained turn (Axolotl's default).
        Turn = "turn",
        /// Every end-of-turn token in the text, also those closing untrained (user/system) turns.
        All = "all",
        /// Only the end-of-turn token of the last trained turn.
        Last = "last",
    }
    reject {}
}

// `named_enum!` derives a fixed set of traits; the default is given here.
#[allow(clippy::derivable_impls)]
impl Default for TrainOnEos {
    fn default() -> Self {
        TrainOnEos::Turn
    }
}

named_enum! {
    /// What to do with a sample longer than `sequence_len`.
    pub enum Truncation ("truncation policy") {
        /// Drop it (counted in the stats). Axolotl's default.
        Drop = "drop",
        /// Keep its first `sequence_len` tokens (counted in the stats).
        Truncate = "truncate",
    }
    reject {}
}

/// What to do with a record that cannot be used (missing field, wrong type, unknown role, template error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop with an error naming the file, line/row and field.
    Error,
    /// Skip it and count it per reason (reported in the stats and at the end of preparation).
    Skip,
}

/// Options of the data path (Axolotl names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// Maximum tokens per sample, and per packed row.
    pub sequence_len: usize,
    /// Pack several samples into each row (attention never crosses samples; positions restart).
    pub sample_packing: bool,
    /// Train on every token (prompts included), not only on the trained roles / completions.
    pub train_on_inputs: bool,
    /// Policy for samples longer than `sequence_len`.
    pub truncation: Truncation,
    /// Held-out validation split taken from the training data: 0 = none, a value in (0, 1) = that fraction
    /// (rounded up, as `datasets.train_test_split`), an integer ≥ 1 = that many samples.
    pub val_set_size: f64,
    /// Seed of the split, the shuffle and the weighted sampling.
    pub seed: u64,
    /// Rows (packed or not) per batch.
    pub micro_batch_size: usize,
    /// Rows per evaluation batch; `None` = `micro_batch_size`. The eval loss does not depend on it.
    pub eval_batch_size: Option<usize>,
    /// Shuffle the training samples each epoch.
    pub shuffle: bool,
    /// Bad records: error (default) or skip with per-reason counts.
    pub on_bad_row: OnBadRow,
    /// Chat template override: a built-in name (chatml, llama3, mistral, gemma, phi3, alpaca) or Jinja text;
    /// `None` = the tokenizer's own template.
    pub chat_template: Option<String>,
    /// The tokens that end a chat turn (Axolotl's `eot_tokens`); `None` = the tokenizer's stop tokens and the
    /// known end-of-turn tokens the template writes.
    pub eot_tokens: Option<Vec<String>>,
    /// Drop samples whose tokens and trained mask equal an earlier sample's (Axolotl's
    /// `dataset_exact_deduplication`).
    pub deduplicate: bool,
    /// Records per chunk read, rendered and tokenized together by the preparation thread.
    pub chunk_rows: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            sequence_len: DEFAULT_SEQUENCE_LEN,
            sample_packing: false,
            train_on_inputs: false,
            truncation: Truncation::Drop,
            val_set_size: 0.0,
            seed: 42,
            micro_batch_size: 1,
            shuffle: true,
            on_bad_row: OnBadRow::Error,
            chat_template: None,
            eot_tokens: None,
            deduplicate: false,
            eval_batch_size: None,
            chunk_rows: 1024,
        }
    }
}

impl DataOptions {
    /// Check the values that do not depend on the data.
    pub fn validate(&self) -> Result<()> {
        for (key, check) in [
            ("sequence_len", Self::check_sequence_len(self.sequence_len)),
            ("micro_batch_size", Self::check_count(self.micro_batch_size)),
            ("chunk_rows", Self::check_count(self.chunk_rows)),
        ] {
            check.map_err(|m| Error::Data(format!("{key}: {m}")))?;
        }
        self.val_split_kind()?;
        Ok(())
    }

    /// A sample needs two tokens (one input, one target).
    pub fn check_sequence_len(n: usize) -> std::result::Result<(), String> {
        if n < 2 {
            return Err(format!(
                "must be at least 2 tokens (next-token prediction needs two), got {n}; typically 512–4096"
            ));
        }
        crate::limits::check(&crate::limits::SEQUENCE_LEN, n as u64).map(|_| ())
    }

    /// A count that must be at least 1.
    pub fn check_count(n: usize) -> std::result::Result<(), String> {
        if n == 0 {
            return Err("must be at least 1, got 0".into());
        }
        if n as u64 > crate::limits::BATCH {
            return Err(format!(
                "{n} is above loratune's limit of {}",
                crate::limits::BATCH
            ));
        }
        Ok(())
    }

    /// Interpret `val_set_size`.
    pub fn val_split_kind(&self) -> Result<ValSplit> {
        ValSplit::from_size(self.val_set_size)
            .map_err(|m| Error::Data(format!("val_set_size: {m}")))
    }
}

/// The validation split requested by `val_set_size`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSplit {
    /// No held-out split.
    None,
    /// This fraction of the training samples (0 < f < 1), rounded up.
    Fraction(f64),
    /// This many training samples.
    Count(usize),
}

impl ValSplit {
    /// The split a `val_set_size` value asks for: 0 = none, a value in (0, 1) = that fraction, a whole number ≥ 1
    /// = that many samples. The error says what is wrong and what to write instead.
    pub fn from_size(v: f64) -> std::result::Result<ValSplit, String> {
        if !v.is_finite() || v < 0.0 {
            return Err(format!(
                "must be 0 (no split), a fraction in (0, 1) or a whole number of samples ≥ 1, got {v}"
            ));
        }
        if v == 0.0 {
            Ok(ValSplit::None)
        } else if v < 1.0 {
            Ok(ValSplit::Fraction(v))
        } else if v.fract() == 0.0 && v <= u32::MAX as f64 {
            Ok(ValSplit::Count(v as usize))
        } else {
            Err(format!(
                "{v} is neither a fraction below 1 nor a whole number of samples; use e.g. 0.05 or {}",
                v.round()
            ))
        }
    }

    /// Number of validation samples out of `n` (fractions rounded up, as `datasets.train_test_split`).
    pub fn count(self, n: usize) -> usize {
        match self {
            ValSplit::None => 0,
            ValSplit::Fraction(f) => ((f * n as f64).ceil() as usize).min(n),
            ValSplit::Count(c) => c,
        }
    }
}
