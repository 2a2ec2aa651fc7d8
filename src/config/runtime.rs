//! The one conversion from a loaded config to what a run is made of: each component the commands use (`train`,
//! `eval`, `data stats|preview`, the exports) is built here, from the config alone, by one function. The types
//! belong to their domain modules; this file only fills them in.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::{ChatTemplateChoice, ChatTemplateName, DatasetConfig, TrainConfig};
use crate::backend::Placement;
use crate::data::{DataOptions, DataPipeline, DataSpec, DatasetSource, OnBadRow, PropertyMappings};
use crate::error::{Error, Result};
use crate::lora::{LoraSettings, TargetSpec};
use crate::model::Family;
use crate::tokenizer::{self, LoadedTokenizer};
use crate::train::optim::AdamWConfig;
use crate::train::schedule::Schedule;

impl TrainConfig {
    /// The base model as a local path (an HF folder or a `.gguf`), downloading a Hub repo id into the HF cache
    /// and finding an `ollama://` model's verified GGUF in the Ollama store.
    pub fn base_model_path(&self) -> Result<PathBuf> {
        let mut hub = crate::hub::HubOptions::from_env()?;
        hub.progress = std::io::stderr().is_terminal();
        // Relative paths are relative to the working directory, as in Axolotl.
        let resolved = crate::hub::resolve_base_model_in(
            &self.base_model,
            Some(self.revision()),
            None::<&Path>,
            &hub,
        )?;
        if let crate::hub::ResolvedModel::Ollama(m) = &resolved {
            for n in m.notes() {
                eprintln!("warning: {n}");
            }
        }
        Ok(resolved.path().to_path_buf())
    }

    /// The base model's tokenizer with the config's `special_tokens` applied (token texts must already be in the
    /// vocabulary).
    pub fn tokenizer(&self, model_path: &Path) -> Result<LoadedTokenizer> {
        let mut tok = tokenizer::load_for_model(model_path)?;
        let st = &self.special_tokens;
        let pick = |text: &Option<String>, key: &str| -> Result<Option<(String, u32)>> {
            match text {
                None => Ok(None),
                Some(t) => tok.token_to_id(t).map(|id| Some((t.clone(), id))).ok_or_else(|| {
                    Error::Config(format!(
                        "special_tokens.{key}: `{t}` is not a token of this tokenizer (adding new tokens is not supported; \
                         pick an existing token such as the model's eos)"
                    ))
                }),
            }
        };
        let (bos, eos, pad) = (
            pick(&st.bos_token, "bos_token")?,
            pick(&st.eos_token, "eos_token")?,
            pick(&st.pad_token, "pad_token")?,
        );
        if let Some(b) = bos {
            tok.bos = Some(b);
        }
        if let Some(e) = eos {
            tok.eos = Some(e);
        }
        if let Some(p) = pad {
            tok.pad = Some(p);
        }
        Ok(tok)
    }

    /// The data the config describes: `datasets`, `test_datasets`, `val_set_size`, `sequence_len`,
    /// `sample_packing`, `truncation`, `train_on_inputs`, `chat_template`(`_jinja`), `skip_bad_rows`, `seed`,
    /// `micro_batch_size`, `dataset_prepared_path`.
    pub fn data_spec(&self) -> DataSpec {
        DataSpec {
            train: self.datasets.iter().map(|d| self.source(d)).collect(),
            eval: self.test_datasets.iter().map(|d| self.source(d)).collect(),
            options: self.data_options(),
            cache_dir: match &self.dataset_prepared_path {
                Some(p) => self.resolve_path(p),
                None => crate::data::default_cache_dir(),
            },
        }
    }

    /// [`TrainConfig::data_spec`], preparing in the background with `tokenizer`.
    pub fn data_pipeline(&self, tokenizer: &LoadedTokenizer) -> Result<DataPipeline> {
        self.data_spec().pipeline(tokenizer)
    }

    fn data_options(&self) -> DataOptions {
        DataOptions {
            sequence_len: self.sequence_len,
            sample_packing: self.sample_packing,
            train_on_inputs: self.train_on_inputs,
            truncation: self.truncation,
            val_set_size: self.val_set_size,
            seed: self.seed,
            micro_batch_size: self.micro_batch_size,
            shuffle: !self.curriculum_sampling,
            eval_batch_size: self.eval_batch_size,
            eot_tokens: self.eot_tokens.clone(),
            deduplicate: self.dataset_exact_deduplication,
            on_bad_row: if self.skip_bad_rows {
                OnBadRow::Skip
            } else {
                OnBadRow::Error
            },
            chat_template: match self.chat_template {
                ChatTemplateName::TokenizerDefault => None,
                _ => template_text(self.chat_template_choice()),
            },
            ..Default::default()
        }
    }

    /// One `datasets:` / `test_datasets:` entry; relative paths are resolved against the config's folder.
    fn source(&self, ds: &DatasetConfig) -> DatasetSource {
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
            template_text(self.chat_template_for(ds))
        } else {
            None
        };
        DatasetSource {
            path: self.resolve_path(&ds.path).to_string_lossy().into_owned(),
            format: ds.kind,
            ds_type: ds.ds_type,
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
            train_on_eos: ds.train_on_eos.unwrap_or_default(),
            drop_system_message: ds.drop_system_message,
            chat_template: own_template,
            weight: None,
            limit: None,
            // Validated at load time.
            rows: ds
                .split
                .as_deref()
                .and_then(|s| crate::data::slice::RowSlice::parse(s).ok().flatten()),
        }
    }

    /// `lora_modules_to_save` as modules (validation has refused any other name), each once.
    pub fn modules_to_save(&self) -> Vec<crate::lora::adapter::SavedModule> {
        let mut out = Vec::new();
        for m in self
            .lora_modules_to_save
            .iter()
            .filter_map(|m| crate::lora::adapter::SavedModule::parse(m))
        {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// The adapter to attach to a model of `family` (its default targets when the config names none).
    pub fn lora_settings(&self, family: Family) -> LoraSettings {
        let targets = self.lora_targets().unwrap_or_else(|| {
            TargetSpec::Names(
                family
                    .rules()
                    .default_lora_targets
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )
        });
        LoraSettings {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            use_rslora: self.peft_use_rslora,
            targets,
            layers: self.lora_layers_to_transform.as_ref().map(|l| l.0.clone()),
            init: self.lora_init,
            seed: self.seed,
            use_dora: self.peft_use_dora,
            modules_to_save: self.modules_to_save(),
        }
    }

    /// The learning-rate schedule of a run of `total` optimizer steps.
    pub fn schedule(&self, total: u64) -> Schedule {
        Schedule {
            kind: self.lr_scheduler,
            base_lr: self.learning_rate,
            warmup: self.warmup_steps_for(total),
            total,
            min_ratio: self.cosine_min_lr_ratio.unwrap_or(0.0),
            quadratic_warmup: self.lr_quadratic_warmup,
        }
    }

    /// AdamW's hyperparameters.
    /// With LoRA+ the weight decay is 0, as PEFT's `create_loraplus_optimizer` sets every group's (its
    /// `loraplus_weight_decay` defaults to 0 and the optimizer's own `weight_decay` is overridden).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: if self.loraplus_lr_ratio.is_some() {
                0.0
            } else {
                self.weight_decay
            },
        }
    }

    /// Where the run computes: `device`, `bf16`.
    pub fn placement(&self) -> Result<Placement> {
        Placement::resolve(self.device, self.bf16)
    }
}

/// A template choice as the data path takes it: a built-in name or Jinja text; `None` = the tokenizer's own.
fn template_text(c: ChatTemplateChoice) -> Option<String> {
    match c {
        ChatTemplateChoice::TokenizerDefault => None,
        ChatTemplateChoice::Builtin(name) => Some(name.as_str().to_string()),
        ChatTemplateChoice::Jinja(text) => Some(text),
    }
}
