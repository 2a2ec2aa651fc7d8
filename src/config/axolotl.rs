//! Every Axolotl key loratune knows, and what it does with each: the one table behind the loader's handling of
//! keys that are not loratune settings and behind the key table in `configs/README.md` (a test keeps the two
//! equal and checks that every key of the pinned Axolotl example configs in `tests/fixtures/axolotl/` is here).
//!
//! - **implemented**: a loratune key with Axolotl's name and meaning (a field of [`super::TrainConfig`] or
//!   [`super::DatasetConfig`]); the entry names the test that proves it.
//! - **mapped**: accepted and translated into what loratune does instead, with one `note:` line when it matters.
//! - **ignored**: cannot apply in loratune (a PyTorch library, a tracker, a kernel switch); accepted, and all such
//!   keys of a config are named in one grouped warning line.
//! - **only if off**: a feature loratune does not have; accepted (in the grouped warning) when off or empty, an
//!   error saying why when on.

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The top level of the config.
    Top,
    /// An entry of `datasets:` / `test_datasets:`.
    Dataset,
    /// A nested mapping of loratune's own (`special_tokens:`): no Axolotl extras.
    Nested,
}

/// What loratune does with an Axolotl key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A loratune key with Axolotl's meaning; the test (or module) that proves it.
    Implemented(&'static str),
    /// Translated into loratune's own setting: to what.
    Mapped(&'static str),
    /// Without effect in loratune: why.
    Ignored(&'static str),
    /// A feature loratune does not have: an error when on (why), ignored when off.
    OnlyIfOff(&'static str),
}

pub(crate) struct AxolotlKey {
    pub name: &'static str,
    pub scope: Scope,
    pub class: Class,
}

const fn top(name: &'static str, class: Class) -> AxolotlKey {
    AxolotlKey {
        name,
        scope: Scope::Top,
        class,
    }
}

const fn ds(name: &'static str, class: Class) -> AxolotlKey {
    AxolotlKey {
        name,
        scope: Scope::Dataset,
        class,
    }
}

use Class::{Ignored, Implemented, Mapped, OnlyIfOff};

const ATTENTION: &str = "loratune's own attention kernel (exact softmax attention, memory linear in the sequence length)";
const TRACKER: &str =
    "experiment trackers are not integrated; metrics go to output_dir/metrics.jsonl";
const ONE_DEVICE: &str = "a PyTorch distribution library (ZeRO / FSDP shard the model); loratune trains data-parallel with `devices` / `nodes` on burn-collective, and a model too large for one device needs a quantized base";
const KERNELS: &str = "a PyTorch kernel switch; loratune's fused kernels are always on";
const TOKENIZER: &str = "the tokenizer is read from the model (tokenizer.json or the GGUF)";
const ARCH: &str = "the architecture is read from the model's config";
const RL: &str = "only supervised fine-tuning is supported (no DPO/KTO/ORPO/GRPO/reward models)";
const FULL: &str = "loratune trains LoRA adapters, not the full model";
const GPTQ: &str =
    "GPTQ bases are not supported; use a dense, GGUF, bitsandbytes-NF4 base or load_in_4bit";
const RELORA: &str = "ReLoRA (periodic merge and restart) is not supported";
const EVAL_GEN: &str =
    "generation metrics during evaluation are not implemented; eval reports loss and perplexity";

/// The table. Sorted by scope, then name.
pub(crate) const AXOLOTL_KEYS: &[AxolotlKey] = &[
    top("activation_offloading", Mapped("`gradient_checkpointing: offload` (each layer recomputed in the backward, its input kept in host memory)")),
    top("adam_beta1", Implemented("train::optim tests (torch AdamW)")),
    top("adam_beta2", Implemented("train::optim tests (torch AdamW)")),
    top("adam_eps", Implemented("alias of adam_epsilon; it::config axolotl_mapped_keys…")),
    top("adam_epsilon", Implemented("train::optim tests (torch AdamW)")),
    top("adapter", Implemented("it::train qlora_trains_on_an_nf4_base…")),
    top("attn_implementation", Mapped(ATTENTION)),
    top("auto_resume_from_checkpoints", Implemented("it::train resume tests")),
    top("base_model", Implemented("it::hub, it::ollama")),
    top("batch_size", Mapped("gradient_accumulation_steps = batch_size / micro_batch_size (Axolotl's deprecated total batch)")),
    top("bf16", Implemented("it::parity bf16 tests")),
    top("bfloat16", Mapped("`bf16: true` (the base kept in bf16)")),
    top("bnb_4bit_compute_dtype", Implemented("quant tests")),
    top("bnb_4bit_quant_type", Implemented("quant tests")),
    top("bnb_4bit_use_double_quant", Implemented("it::bnb")),
    top("center_rewards_coefficient", OnlyIfOff(RL)),
    top("chat_template", Implemented("tokenizer::chat_template builtins_are_the_real_templates")),
    top("chat_template_jinja", Implemented("it::data")),
    top("cosine_constant_lr_ratio", OnlyIfOff("the constant-then-cosine schedule is not implemented; use cosine_min_lr_ratio")),
    top("cosine_min_lr_ratio", Implemented("train::schedule tests")),
    top("curriculum_sampling", Implemented("data tests: curriculum_sampling_keeps_file_order")),
    top("dataset_exact_deduplication", Implemented("data tests: exact_deduplication_drops_repeated_samples")),
    top("dataset_prepared_path", Implemented("data::cache tests")),
    top("datasets", Implemented("it::data")),
    top("ddp_broadcast_buffers", Ignored("PyTorch DDP's buffer broadcast; loratune's peers train no buffers")),
    top("ddp_bucket_cap_mb", Ignored("PyTorch DDP's gradient buckets; loratune sums a step's adapter gradients in one all-reduce")),
    top("ddp_find_unused_parameters", Ignored("PyTorch DDP's unused-parameter search; an adapter without a gradient on some peer (an unused expert) is handled exactly")),
    top("ddp_timeout", Implemented("it::parallel a_hung_node_ends_the_run_after_ddp_timeout")),
    top("debug", Ignored("to see tokenized samples run `loratune data preview CONFIG`")),
    top("deepspeed", Ignored(ONE_DEVICE)),
    top("diffusion", OnlyIfOff("diffusion language-model training is not supported")),
    top("do_causal_lm_eval", Ignored(EVAL_GEN)),
    top("early_stopping_patience", Implemented("it::train early_stopping_ends_the_run…")),
    top("eot_tokens", Implemented("data tests: eot_tokens_choose_the_trained_turn_ends")),
    top("eval_batch_size", Implemented("data tests: eval_batches_come_from_the_split_in_data_order")),
    top("eval_causal_lm_metrics", Ignored(EVAL_GEN)),
    top("eval_max_new_tokens", Ignored(EVAL_GEN)),
    top("eval_sample_packing", Ignored("evaluation follows `sample_packing`")),
    top("eval_steps", Implemented("it::train thirty_steps…")),
    top("eval_strategy", Ignored("evaluation runs every eval_steps / evals_per_epoch, else at each epoch's end")),
    top("eval_table_size", Ignored(EVAL_GEN)),
    top("evals_per_epoch", Implemented("it::config axolotl_mapped_keys_become_loratune_settings_with_a_note; it::axolotl")),
    top("flash_attention", Ignored(ATTENTION)),
    top("flash_attn_cross_entropy", Ignored(KERNELS)),
    top("flash_attn_fuse_mlp", Ignored(KERNELS)),
    top("flash_optimum", Ignored(KERNELS)),
    top("flex_attention", Ignored(ATTENTION)),
    top("flex_attn_compile_kwargs", Ignored(KERNELS)),
    top("float16", OnlyIfOff("an fp16 base is not supported; use `bf16: true`")),
    top("fp16", OnlyIfOff("fp16 mixed precision is not supported; use `bf16: true` (or `auto`)")),
    top("fp8", OnlyIfOff("fp8 training is not supported")),
    top("fp8_enable_fsdp_float8_all_gather", OnlyIfOff("fp8 training is not supported")),
    top("fsdp", Ignored(ONE_DEVICE)),
    top("fsdp_config", Ignored(ONE_DEVICE)),
    top("fsdp_version", Ignored(ONE_DEVICE)),
    top("fused_attn_kernel", Ignored(KERNELS)),
    top("gptq", OnlyIfOff(GPTQ)),
    top("gptq_disable_exllama", OnlyIfOff(GPTQ)),
    top("gptq_groupsize", OnlyIfOff(GPTQ)),
    top("gptq_model_v1", OnlyIfOff(GPTQ)),
    top("gradient_accumulation_steps", Implemented("it::train gradient_accumulation_is_normalised_per_token…")),
    top("gradient_checkpointing", Implemented("it::train gradient_checkpointing_equals_the_plain_step")),
    top("gradient_checkpointing_kwargs", Mapped("use_reentrant picks one of PyTorch's two recompute implementations; loratune's layer recompute is exact either way")),
    top("group_by_length", Ignored("samples are shuffled uniformly")),
    top("hf_use_auth_token", Ignored("Hub downloads use HF_TOKEN or the token file of `huggingface-cli login`")),
    top("hub_model_id", Ignored("pushing to the Hub is not supported; upload output_dir/adapter yourself")),
    top("is_falcon_derived_model", Ignored(ARCH)),
    top("is_llama_derived_model", Ignored(ARCH)),
    top("is_mistral_derived_model", Ignored(ARCH)),
    top("is_qwen_derived_model", Ignored(ARCH)),
    top("jagged_restart_anneal_steps", OnlyIfOff(RELORA)),
    top("jagged_restart_steps", OnlyIfOff(RELORA)),
    top("jagged_restart_warmup_steps", OnlyIfOff(RELORA)),
    top("kto_desirable_weight", OnlyIfOff(RL)),
    top("learning_rate", Implemented("train::schedule tests")),
    top("liger_fused_linear_cross_entropy", Ignored(KERNELS)),
    top("liger_glu_activation", Ignored(KERNELS)),
    top("liger_layer_norm", Ignored(KERNELS)),
    top("liger_rms_norm", Ignored(KERNELS)),
    top("liger_rope", Ignored(KERNELS)),
    top("lisa_layers_attribute", OnlyIfOff(FULL)),
    top("lisa_n_layers", OnlyIfOff(FULL)),
    top("lisa_step_interval", OnlyIfOff(FULL)),
    top("llmcompressor", OnlyIfOff("sparse / compressed fine-tuning is not supported")),
    top("load_in_4bit", Implemented("it::quant")),
    top("load_in_8bit", Implemented("it::quant")),
    top("logging_steps", Implemented("config tests")),
    top("lora_alpha", Implemented("it::lora")),
    top("lora_dropout", Implemented("it::train steps_are_deterministic_with_dropout")),
    top("lora_fan_in_fan_out", OnlyIfOff("only fan_in_fan_out: false models are supported")),
    top("lora_mlp_kernel", Ignored(KERNELS)),
    top("lora_model_dir", OnlyIfOff("to continue from a saved adapter use resume_from_checkpoint")),
    top("lora_modules_to_save", Implemented("it::lora peft_modules_to_save_forward_grads_and_step, it::train modules_to_save_runs_resume_and_export")),
    top("lora_o_kernel", Ignored(KERNELS)),
    top("lora_qkv_kernel", Ignored(KERNELS)),
    top("lora_r", Implemented("it::lora")),
    top("lora_target_linear", Implemented("lora::targets tests")),
    top("lora_target_modules", Implemented("lora::targets tests")),
    top("lora_target_parameters", OnlyIfOff("LoRA on raw parameters (fused MoE experts) is not supported; loratune adapts each expert's linears (lora_target_modules: [w1, w2, w3])")),
    top("loss_watchdog_patience", Implemented("it::axolotl loss_watchdog_stops_a_run_whose_loss_stays_high")),
    top("loss_watchdog_threshold", Implemented("it::axolotl loss_watchdog_stops_a_run_whose_loss_stays_high")),
    top("loraplus_lr_embedding", Mapped("no effect: the learning rate of LoRA on embedding layers, which loratune does not adapt (a note says so)")),
    top("loraplus_lr_ratio", Implemented("it::config loraplus_groups_are_pefts (PEFT's create_loraplus_optimizer)")),
    top("lr_quadratic_warmup", Implemented("train::schedule tests: quadratic_warmup")),
    top("lr_scheduler", Implemented("train::schedule tests")),
    top("lr_scheduler_kwargs", OnlyIfOff("use warmup_steps/warmup_ratio and cosine_min_lr_ratio")),
    top("max_grad_norm", Implemented("train::step tests")),
    top("max_packed_sequence_len", OnlyIfOff("deprecated in Axolotl; use sequence_len")),
    top("max_steps", Implemented("it::train")),
    top("micro_batch_size", Implemented("it::train")),
    top("model_config", Mapped("`output_router_logits: true` = the router load-balancing loss at the model's router_aux_loss_coef (router_aux_loss_coef)")),
    top("model_type", Ignored(ARCH)),
    top("num_epochs", Implemented("it::train")),
    top("num_labels", OnlyIfOff(RL)),
    top("nvfp4_merge_aware", OnlyIfOff("NVFP4 bases are not supported")),
    top("optimizer", Implemented("train::optim tests; 8-bit/4-bit/paged AdamW map to exact f32 AdamW (note line)")),
    top("orpo_alpha", OnlyIfOff(RL)),
    top("otel_metrics_host", Ignored(TRACKER)),
    top("otel_metrics_port", Ignored(TRACKER)),
    top("output_dir", Implemented("it::train")),
    top("pad_to_sequence_len", Ignored("batches are padded to their longest sample")),
    top("peft", OnlyIfOff("PEFT's LoftQ initialisation is not supported")),
    top("peft_layers_pattern", Implemented("it::config layers_pattern_names_the_models_layer_list (alias of lora_layers_pattern)")),
    top("peft_use_dora", Implemented("it::lora peft_forward_llama_dora, peft_grads_and_adamw_llama_dora (PEFT use_dora)")),
    top("peft_use_rslora", Implemented("it::lora rslora")),
    top("plugins", Ignored("Axolotl plugins are Python modules; loratune has its own kernels")),
    top("pretraining_dataset", OnlyIfOff("streaming pre-training datasets are not supported; use datasets with type: text")),
    top("process_reward_model", OnlyIfOff(RL)),
    top("push_dataset_to_hub", Ignored("the tokenized data stays in dataset_prepared_path")),
    top("qat", OnlyIfOff("quantization-aware training is not supported")),
    top("ray_num_workers", Ignored(ONE_DEVICE)),
    top("reinit_weights", OnlyIfOff(FULL)),
    top("relora", OnlyIfOff(RELORA)),
    top("relora_cpu_offload", OnlyIfOff(RELORA)),
    top("relora_prune_ratio", OnlyIfOff(RELORA)),
    top("remove_unused_columns", Ignored("only the fields a dataset type needs are read")),
    top("resize_token_embeddings_to_32x", Ignored("the vocabulary is never resized (no tokens are added)")),
    top("resume_from_checkpoint", Implemented("it::train resume_after_interruption_is_bit_identical")),
    top("reward_model", OnlyIfOff(RL)),
    top("rl", OnlyIfOff(RL)),
    top("rl_beta", OnlyIfOff(RL)),
    top("s2_attention", Ignored(ATTENTION)),
    top("sample_packing", Implemented("it::data packing tests")),
    top("sample_packing_sequentially", Mapped("loratune packs samples in their (shuffled) order, first fit: the sequential packing")),
    top("save_only_model", Ignored("checkpoints always keep the optimizer state, for exact resume")),
    top("save_safetensors", Ignored("weights are always written as safetensors")),
    top("save_steps", Implemented("it::train thirty_steps…")),
    top("save_strategy", Ignored("checkpoints are written every save_steps / saves_per_epoch, else at each epoch's end")),
    top("save_total_limit", Implemented("it::train thirty_steps…")),
    top("saves_per_epoch", Implemented("it::config axolotl_mapped_keys_become_loratune_settings_with_a_note; it::axolotl")),
    top("sdp_attention", Ignored(ATTENTION)),
    top("seed", Implemented("it::train steps_are_deterministic_with_dropout")),
    top("sequence_len", Implemented("data tests")),
    top("special_tokens", Implemented("tokenizer tests")),
    top("strict", Ignored("loratune is always strict")),
    top("test_datasets", Implemented("it::data")),
    top("test_value", Ignored("an Axolotl test switch")),
    top("tf32", Ignored("TF32 matmuls are a CUDA backend choice, not a config setting")),
    top("tokenizer_legacy", Ignored(TOKENIZER)),
    top("tokenizer_type", Ignored(TOKENIZER)),
    top("tokenizer_use_fast", Ignored(TOKENIZER)),
    top("tokens", OnlyIfOff("adding tokens (resizing the embedding and lm_head) is not implemented yet")),
    top("torch_compile", Ignored(KERNELS)),
    top("torch_compile_mode", Ignored(KERNELS)),
    top("torchdistx_path", Ignored(ONE_DEVICE)),
    top("train_on_inputs", Implemented("data tests")),
    top("trl", OnlyIfOff(RL)),
    top("trust_remote_code", Ignored("loratune never runs model code from the Hub; its architectures are built in")),
    top("unfrozen_parameters", OnlyIfOff(FULL)),
    top("use_otel_metrics", Ignored(TRACKER)),
    top("use_ray", Ignored(ONE_DEVICE)),
    top("use_sonicmoe", Ignored(KERNELS)),
    top("use_tensorboard", Implemented("train::tensorboard tests; it::train tensorboard_events_follow_the_run")),
    top("use_wandb", Ignored(TRACKER)),
    top("val_set_size", Implemented("data tests")),
    top("wandb_entity", Ignored(TRACKER)),
    top("wandb_log_model", Ignored(TRACKER)),
    top("wandb_name", Ignored(TRACKER)),
    top("wandb_project", Ignored(TRACKER)),
    top("wandb_run_id", Ignored(TRACKER)),
    top("wandb_watch", Ignored(TRACKER)),
    top("warmup_ratio", Implemented("train::schedule tests")),
    top("warmup_steps", Implemented("train::schedule tests")),
    top("weight_decay", Implemented("train::optim tests")),
    top("xformers_attention", Ignored(ATTENTION)),
    top("eager_attention", Ignored(ATTENTION)),
    ds("conversation", OnlyIfOff("use `type: chat_template` with `chat_template:`")),
    ds("data_files", OnlyIfOff("list the files through `path` (a file, a folder or a glob such as data/*.jsonl)")),
    ds("drop_system_message", Implemented("data tests")),
    ds("field_chosen", OnlyIfOff(RL)),
    ds("field_messages", Implemented("data tests")),
    ds("field_rejected", OnlyIfOff(RL)),
    ds("max_completion_length", OnlyIfOff(RL)),
    ds("message_field_content", OnlyIfOff("deprecated in Axolotl; use `message_property_mappings: {content: <field>}`")),
    ds("message_field_role", OnlyIfOff("deprecated in Axolotl; use `message_property_mappings: {role: <field>}`")),
    ds("message_property_mappings", Implemented("data tests")),
    ds("name", OnlyIfOff("Hub dataset configurations are not supported; use local files")),
    ds("path", Implemented("it::data")),
    ds("revision", OnlyIfOff("Hub datasets are not supported; use local files")),
    ds("roles", Implemented("data tests")),
    ds("shards", OnlyIfOff("dataset sharding is not supported")),
    ds("split", Implemented("data tests: split_slices_select_rows_as_hf_datasets")),
    ds("step_separator", OnlyIfOff(RL)),
    ds("train_on_last_step_only", OnlyIfOff(RL)),
    ds("trust_remote_code", Ignored("loratune never runs dataset code from the Hub")),
    ds("type", Implemented("data tests (alpaca, alpaca:chat, alpaca:chatml, alpaca:phi, chat_template, completion)")),
];

/// The entry for a key that is not a loratune field, if Axolotl has it.
pub(crate) fn lookup(scope: Scope, name: &str) -> Option<&'static AxolotlKey> {
    AXOLOTL_KEYS
        .iter()
        .find(|k| k.scope == scope && k.name == name)
}

/// The documentation table (Markdown), as `configs/README.md` carries it between its markers (a test writes and
/// checks it).
#[cfg(test)]
pub(crate) fn markdown_table() -> String {
    let mut out = String::from("| Key | Where | loratune | How / why |\n|---|---|---|---|\n");
    let mut rows: Vec<&AxolotlKey> = AXOLOTL_KEYS.iter().collect();
    rows.sort_by_key(|k| (k.scope == Scope::Dataset, k.name));
    for k in rows {
        let (class, text) = match k.class {
            Implemented(t) => ("implemented", t),
            Mapped(t) => ("mapped", t),
            Ignored(t) => ("ignored (warning)", t),
            OnlyIfOff(t) => ("error when on", t),
        };
        let scope = match k.scope {
            Scope::Top => "top level",
            Scope::Dataset | Scope::Nested => "dataset entry",
        };
        out.push_str(&format!(
            "| `{}` | {scope} | {class} | {} |\n",
            k.name,
            text.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatasetConfig, TrainConfig};

    /// Implemented and mapped keys are fields of the config (so serde reads them); ignored and refused ones are
    /// not (so the loader sees them as Axolotl extras). Every name appears once per scope.
    #[test]
    fn the_table_agrees_with_the_config_structs() {
        let mut seen = std::collections::BTreeSet::new();
        for k in AXOLOTL_KEYS {
            assert!(
                seen.insert((k.scope == Scope::Dataset, k.name)),
                "{} twice",
                k.name
            );
            let fields = match k.scope {
                Scope::Top => TrainConfig::known_keys(),
                Scope::Dataset => DatasetConfig::known_keys(),
                Scope::Nested => unreachable!(),
            };
            let field = fields.contains(&k.name);
            match k.class {
                Implemented(_) | Mapped(_) => assert!(field, "{} is not a config key", k.name),
                Ignored(_) | OnlyIfOff(_) => assert!(!field, "{} is a config key", k.name),
            }
        }
    }

    /// `configs/README.md` carries this table between its markers; `UPDATE_DOCS=1` rewrites it.
    #[test]
    fn the_readme_table_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/README.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let (start, end) = ("<!-- axolotl-keys:start -->\n", "<!-- axolotl-keys:end -->");
        let a = text.find(start).expect("start marker") + start.len();
        let b = text.find(end).expect("end marker");
        let want = markdown_table();
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let new = format!("{}{want}{}", &text[..a], &text[b..]);
            std::fs::write(&path, new).unwrap();
            return;
        }
        assert_eq!(
            &text[a..b],
            want,
            "configs/README.md's Axolotl key table is stale: run UPDATE_DOCS=1 cargo test --release --lib the_readme_table"
        );
    }

    /// Every key of the pinned Axolotl example configs (top level and dataset entries) is classified here or is
    /// a loratune key, and the count is what the closing note quotes.
    #[test]
    fn every_key_of_the_pinned_examples_is_classified() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/axolotl/examples");
        let mut stack = vec![root];
        let (mut top, mut dsk) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let doc: serde_yaml::Value =
                    serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                for (k, v) in doc.as_mapping().unwrap() {
                    let k = k.as_str().unwrap().to_string();
                    if k == "datasets" || k == "test_datasets" {
                        for entry in v.as_sequence().into_iter().flatten() {
                            for dk in entry.as_mapping().unwrap().keys() {
                                dsk.insert(dk.as_str().unwrap().to_string());
                            }
                        }
                    }
                    top.insert(k);
                }
            }
        }
        for k in &top {
            assert!(
                lookup(Scope::Top, k).is_some(),
                "top-level key `{k}` of the Axolotl examples is not classified in src/config/axolotl.rs"
            );
        }
        for k in &dsk {
            assert!(
                lookup(Scope::Dataset, k).is_some(),
                "dataset key `{k}` of the Axolotl examples is not classified in src/config/axolotl.rs"
            );
        }
        assert_eq!(
            (top.len(), dsk.len()),
            (157, 14),
            "keys in the pinned examples"
        );
    }
}
