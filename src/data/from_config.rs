//! The training config's dataset keys ([`crate::config::TrainConfig`], Axolotl names) → the data path's runtime
//! structs.

use std::path::PathBuf;

use super::options::{
    DataFormat, DataOptions, DatasetSource, FileKind, OnBadRow, PropertyMappings, TrainOnEos,
    Truncation,
};
use super::DataPipeline;
use crate::config::{
    ChatTemplateChoice, ChatTemplateName, DatasetConfig, DatasetType, DsType, TrainConfig,
};
use crate::error::Result;

fn choice_to_option(c: ChatTemplateChoice) -> Option<String> {
    match c {
        ChatTemplateChoice::TokenizerDefault => None,
        ChatTemplateChoice::Builtin(name) => Some(name.as_str().to_string()),
        ChatTemplateChoice::Jinja(text) => Some(text),
    }
}

/// One `datasets:` / `test_datasets:` entry. Relative paths are resolved against the config's folder.
pub fn source_from_config(cfg: &TrainConfig, ds: &DatasetConfig) -> DatasetSource {
    let format = match ds.kind {
        DatasetType::Alpaca => DataFormat::Alpaca,
        DatasetType::ChatTemplate => DataFormat::Chat,
        DatasetType::Completion => DataFormat::Completion,
        DatasetType::Text => DataFormat::Text,
    };
    let ds_type = ds.ds_type.map(|t| match t {
        DsType::Json => FileKind::Json,
        DsType::Csv => FileKind::Csv,
        DsType::Parquet => FileKind::Parquet,
    });
    let message_property_mappings =
        ds.message_property_mappings
            .as_ref()
            .map(|m| PropertyMappings {
                role: m.get("role").cloned().unwrap_or_else(|| "role".into()),
                content: m
                    .get("content")
                    .cloned()
                    .unwrap_or_else(|| "content".into()),
            });
    // Only a template set on the entry itself; the run's template is the builder's default.
    let own_template = if ds.chat_template.is_some() || ds.chat_template_jinja.is_some() {
        choice_to_option(cfg.chat_template_for(ds))
    } else {
        None
    };
    DatasetSource {
        path: cfg.resolve_path(&ds.path).to_string_lossy().into_owned(),
        format,
        ds_type,
        field_messages: ds.field_messages.clone(),
        message_property_mappings,
        roles: ds.roles.clone().unwrap_or_default(),
        roles_to_train: ds.roles_to_train.clone(),
        field_instruction: ds.field_instruction.clone(),
        field_input: ds.field_input.clone(),
        field_output: ds.field_output.clone(),
        field_system: ds.field_system.clone(),
        field_prompt: ds.field_prompt.clone(),
        field_completion: ds.field_completion.clone(),
        field_text: ds.field_text.clone(),
        train_on_eos: match ds.train_on_eos {
            None | Some(crate::config::TrainOnEos::Turn) => TrainOnEos::Turn,
            Some(crate::config::TrainOnEos::All) => TrainOnEos::All,
            Some(crate::config::TrainOnEos::Last) => TrainOnEos::Last,
        },
        drop_system_message: ds.drop_system_message,
        chat_template: own_template,
        weight: None,
        limit: None,
    }
}

/// The data options of a config.
pub fn options_from_config(cfg: &TrainConfig) -> DataOptions {
    DataOptions {
        sequence_len: cfg.sequence_len,
        sample_packing: cfg.sample_packing,
        train_on_inputs: cfg.train_on_inputs,
        truncation: match cfg.truncation {
            crate::config::Truncation::Drop => Truncation::Drop,
            crate::config::Truncation::Truncate => Truncation::Truncate,
        },
        val_set_size: cfg.val_set_size,
        seed: cfg.seed,
        micro_batch_size: cfg.micro_batch_size,
        shuffle: true,
        on_bad_row: if cfg.skip_bad_rows {
            OnBadRow::Skip
        } else {
            OnBadRow::Error
        },
        chat_template: match cfg.chat_template {
            ChatTemplateName::TokenizerDefault => None,
            _ => choice_to_option(cfg.chat_template_choice()),
        },
        ..Default::default()
    }
}

/// The token-cache folder: `dataset_prepared_path` (resolved against the config's folder), else
/// [`super::default_cache_dir`].
pub fn cache_dir_from_config(cfg: &TrainConfig) -> PathBuf {
    match &cfg.dataset_prepared_path {
        Some(p) => cfg.resolve_path(p),
        None => super::default_cache_dir(),
    }
}

impl DataPipeline {
    /// The pipeline a training config describes, with `tokenizer` (the base model's): `datasets`,
    /// `test_datasets`, `val_set_size`, `sequence_len`, `sample_packing`, `truncation`, `train_on_inputs`,
    /// `chat_template`(`_jinja`), `skip_bad_rows`, `seed`, `micro_batch_size`, `dataset_prepared_path`.
    pub fn from_config(
        cfg: &TrainConfig,
        tokenizer: &crate::tokenizer::LoadedTokenizer,
    ) -> Result<Self> {
        let train = cfg
            .datasets
            .iter()
            .map(|d| source_from_config(cfg, d))
            .collect();
        let eval = cfg
            .test_datasets
            .iter()
            .map(|d| source_from_config(cfg, d))
            .collect();
        DataPipeline::from_tokenizer(
            train,
            eval,
            options_from_config(cfg),
            tokenizer,
            cache_dir_from_config(cfg),
        )
    }
}
