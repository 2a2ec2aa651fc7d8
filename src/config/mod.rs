//! The YAML training config (`loratune train config.yaml`), with Axolotl's key names.
//!
//! Loading is strict and happens before any model is touched:
//! 1. the YAML is parsed (syntax errors carry line/column);
//! 2. `--set key=value` overrides are applied ([`Override`]);
//! 3. every key is checked against the schema: unknown keys are errors with a did-you-mean, keys Axolotl has
//!    but loratune does not implement get a specific message, wrong types name the expected type;
//! 4. defaults are filled in and every value is checked (ranges, conflicts, dataset files exist, …).
//!
//! All problems found are reported together, each with the line and column of the offending key or value
//! (or the `--set` argument it came from). Checks that need the model or the data (target modules that do
//! not exist, a batch larger than the dataset) are exposed as [`TrainConfig::check_model`] and
//! [`TrainConfig::check_data`] for the training loop to call once it has loaded them.
//!
//! The resolved config (every default filled in) is written to the run folder with
//! [`TrainConfig::write_resolved`], and [`TrainConfig::config_hash`] identifies the settings that a checkpoint
//! must agree with to be resumed.

pub(crate) mod axolotl;
mod issues;
mod load;
pub mod names;
mod runtime;
pub mod suggest;
pub mod sweep;
mod validate;
pub mod yaml;

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::backend::{Bf16, Device, Devices};
pub use crate::data::DataFacts;
pub use crate::data::{DataFormat, FileKind, TrainOnEos, Truncation, ValSplit};
pub use crate::export::{ByteSize, ExportDtype};
pub use crate::lora::{LoraInit, TargetSpec};
pub use crate::quant::{BaseQuantization, Bnb4bitComputeDtype, Bnb4bitQuantType};
pub use crate::train::recompute::Checkpointing;
pub use crate::train::schedule::ScheduleKind;
pub use issues::{LoadOptions, Purpose};
pub use names::{Adapter, ChatTemplateName, LayerList, Optimizer, TargetModules};
pub use validate::ModelFacts;
pub use yaml::{KeyPath, Override, Pos};

/// The training configuration. Field names are the YAML keys (Axolotl's names where Axolotl has the
/// setting). Every field documents its default; `Option` fields are "unset" when absent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ----------------------------------------------------------------------------------------- model
    /// **Required.** The base model: a local Hugging Face folder (config.json + safetensors), a `.gguf`
    /// file, or a Hub repo id `org/name` (downloaded into the standard HF cache). See [`crate::hub`].
    pub base_model: String,
    /// Hub revision (branch, tag or commit sha) of `base_model` when it is a repo id. Default: unset = `main`.
    /// Pin a commit sha for reproducible runs. Axolotl's name `revision_of_model` is accepted.
    #[serde(alias = "revision_of_model")]
    pub base_model_revision: Option<String>,

    // -------------------------------------------------------------------------------------- datasets
    /// **Required.** Training datasets (at least one); see [`DatasetConfig`].
    pub datasets: Vec<DatasetConfig>,
    /// Separate evaluation datasets. Default: none. Mutually exclusive with `val_set_size` > 0 (as in Axolotl).
    pub test_datasets: Vec<DatasetConfig>,
    /// Held-out evaluation split of the training data: a fraction in (0, 1) or a whole number of samples
    /// (≥ 1). Default: `0` (no split).
    pub val_set_size: f64,
    /// Folder of the tokenized-data cache. Default: unset = `$XDG_CACHE_HOME/loratune/data`, else
    /// `~/.cache/loratune/data` (see [`crate::data::default_cache_dir`]).
    pub dataset_prepared_path: Option<PathBuf>,
    /// Skip malformed rows (counted and reported) instead of stopping at the first one. Default: `false`.
    pub skip_bad_rows: bool,
    /// Chat template for chat datasets: `tokenizer_default` (the base model's own), a built-in (`chatml`,
    /// `llama3`, `mistral`, `gemma`, `phi3`, `alpaca`) or `jinja` (with `chat_template_jinja`).
    /// Default: `tokenizer_default`, or `jinja` when `chat_template_jinja` is given.
    pub chat_template: ChatTemplateName,
    /// A Jinja chat template (the text, or the path of a `.jinja` file, which is read at load time).
    /// Default: unset.
    pub chat_template_jinja: Option<String>,
    /// Train on prompt/user tokens too, not only on the responses. Default: `false`.
    pub train_on_inputs: bool,
    /// Maximum tokens per sample (and per packed row). Default: `512` (Axolotl,
    /// [`crate::data::DEFAULT_SEQUENCE_LEN`]).
    pub sequence_len: usize,
    /// Pack several samples into one row (attention never crosses sample boundaries). Default: `false`.
    pub sample_packing: bool,
    /// What to do with samples longer than `sequence_len`: `drop` or `truncate`. Default: `drop` (Axolotl).
    pub truncation: Truncation,
    /// Overrides of the tokenizer's special tokens. Default: none.
    pub special_tokens: SpecialTokens,
    /// Chat datasets: the tokens that end a turn (each one token of the tokenizer, e.g. `[<end_of_turn>]`); those
    /// ending trained turns carry loss (per `train_on_eos`). Default: unset = the tokenizer's EOS and stop tokens
    /// plus the known end-of-turn tokens the chat template writes (`<|im_end|>`, `<|eot_id|>`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eot_tokens: Option<Vec<String>>,
    /// Keep the datasets' order (no shuffling): easy-to-hard curricula. Default: `false`.
    #[serde(skip_serializing_if = "is_false")]
    pub curriculum_sampling: bool,
    /// Drop samples whose tokens equal an earlier sample's (after rendering; across all datasets). Default: `false`.
    #[serde(skip_serializing_if = "is_false")]
    pub dataset_exact_deduplication: bool,
    /// Axolotl's name for packing in order; loratune always packs first-fit in sample order, so this only reads
    /// as a note. Default: unset.
    #[serde(skip_serializing)]
    pub sample_packing_sequentially: Option<bool>,

    // ------------------------------------------------------------------------------------------ LoRA
    /// Adapter kind: `lora`, or `qlora` (LoRA on a 4-bit NF4 base: implies `load_in_4bit`). Default: `lora`.
    pub adapter: Adapter,
    /// Quantize the base's decoder linear weights to 4-bit NF4 when loading a dense checkpoint (bitsandbytes'
    /// format; `lm_head` and embeddings stay dense, as in transformers). Default: `false`.
    pub load_in_4bit: bool,
    /// Quantize them to int8 (Q8_0 blocks: 32 weights share one f16 scale) instead. Default: `false`.
    pub load_in_8bit: bool,
    /// The 4-bit code: only `nf4` (`fp4` is refused). Default: `nf4`.
    pub bnb_4bit_quant_type: Bnb4bitQuantType,
    /// Quantize NF4's per-block absmax values again (8-bit dynamic code, blocks of 256): 0.37 fewer bits per
    /// weight. Default: `true` (Axolotl's QLoRA setting).
    pub bnb_4bit_use_double_quant: bool,
    /// Accepted for Axolotl configs; the compute dtype is the run's (`bf16`), a mismatch is reported. Default: unset.
    pub bnb_4bit_compute_dtype: Option<Bnb4bitComputeDtype>,
    /// A base stored quantized (GGUF blocks, a pre-quantized bitsandbytes checkpoint): `keep` it so (kernels
    /// dequantize a tile at a time) or `dequantize` it at load. Default: `keep`.
    pub base_quantization: BaseQuantization,
    /// LoRA rank r (≥ 1). Default: `8` (PEFT).
    pub lora_r: usize,
    /// LoRA alpha (> 0); the scale is alpha/r (alpha/√r with rsLoRA). Default: `8` (PEFT).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input, in [0, 1). Default: `0.0` (Axolotl, PEFT).
    pub lora_dropout: f64,
    /// Modules to adapt: a list of names (`[q_proj, v_proj]`), `all-linear`, or a regex matched against the
    /// full module path. Default: unset = PEFT's per-architecture default (q_proj and v_proj; Phi-3: qkv_proj),
    /// or every linear layer when `lora_target_linear: true`.
    pub lora_target_modules: Option<TargetModules>,
    /// Adapt every linear layer except `lm_head` (PEFT `all-linear`). Default: `false`.
    pub lora_target_linear: bool,
    /// Only adapt these decoder layers (indices). Default: unset = all layers. Axolotl's name
    /// `peft_layers_to_transform` is accepted.
    #[serde(alias = "peft_layers_to_transform")]
    pub lora_layers_to_transform: Option<LayerList>,
    /// PEFT's `layers_pattern` (Axolotl's `peft_layers_pattern`): the name of the model's layer list that
    /// `lora_layers_to_transform` indexes (`layers`; Falcon's `h`), one name or a list; checked against the model.
    /// Default: unset (the model's own).
    #[serde(
        alias = "peft_layers_pattern",
        default,
        deserialize_with = "string_or_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub lora_layers_pattern: Option<Vec<String>>,
    /// Rank-stabilised LoRA: scale alpha/√r instead of alpha/r. Default: `false`.
    pub peft_use_rslora: bool,
    /// DoRA (weight-decomposed LoRA, PEFT's `use_dora`): each adapted module also learns a magnitude per output row;
    /// exported as PEFT writes it (`lora_magnitude_vector`), merged as PEFT merges it. Not on `lm_head`, and not
    /// as a GGUF adapter (llama.cpp has no DoRA; export the merged model). Default: `false`.
    #[serde(skip_serializing_if = "is_false")]
    pub peft_use_dora: bool,
    /// LoRA initialisation (PEFT's `init_lora_weights`): `true` (PEFT default: Kaiming-uniform A, zero B),
    /// `gaussian`, `pissa` (A, B from the weight's top-r singular triplets; PEFT's `pissa_niter_K` reads as
    /// `pissa`) or `olora` (from its QR); the last two leave W − s·B·A in the base and export the adapter converted to
    /// a rank-2r LoRA on the original base. Default: `true`. Axolotl's `peft_init_lora_weights` and PEFT's
    /// `init_lora_weights` are accepted.
    #[serde(alias = "peft_init_lora_weights", alias = "init_lora_weights")]
    pub lora_init: LoraInit,
    /// Modules trained in full besides the adapters (PEFT's `modules_to_save`): `embed_tokens` and/or `lm_head`
    /// (each gets an f32 copy; a tied model gets two independent copies and is exported untied). Costs
    /// vocab × hidden × 16 bytes per module (weight, gradient, two AdamW moments). Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora_modules_to_save: Vec<String>,

    // -------------------------------------------------------------------------------------- training
    /// Samples per forward/backward pass (≥ 1). Default: `1` (Axolotl).
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (≥ 1). Default: `1`.
    pub gradient_accumulation_steps: usize,
    /// Axolotl's deprecated total batch size per step: sets `gradient_accumulation_steps` to
    /// `batch_size / micro_batch_size` (which must divide it). Default: unset.
    #[serde(skip_serializing)]
    pub batch_size: Option<usize>,
    /// Samples per evaluation forward pass (≥ 1); evaluation results do not depend on it. Default: unset =
    /// `micro_batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_batch_size: Option<usize>,
    /// Epochs over the training data (may be fractional). Default: unset. At least one of `num_epochs`
    /// and `max_steps` is required; when both are set `max_steps` wins (transformers).
    pub num_epochs: Option<f64>,
    /// Total optimizer steps. Default: unset (see `num_epochs`).
    pub max_steps: Option<u64>,
    /// **Required.** Peak learning rate (> 0), e.g. `2e-4` for LoRA. A numeric string is accepted (Axolotl).
    #[serde(deserialize_with = "lenient_f64")]
    pub learning_rate: f64,
    /// `constant` (alias `constant_with_warmup`), `linear` or `cosine`. Default: `cosine` (Axolotl).
    pub lr_scheduler: ScheduleKind,
    /// Warm up quadratically, `λ = (step / warmup)²`, instead of linearly (Axolotl's
    /// `get_cosine_schedule_with_quadratic_warmup`). Default: `false`.
    #[serde(skip_serializing_if = "is_false")]
    pub lr_quadratic_warmup: bool,
    /// Linear warmup steps. Default: unset (0). Exclusive with `warmup_ratio`.
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps, in [0, 1); steps = ceil(ratio × total) (transformers).
    /// Default: unset (0). Exclusive with `warmup_steps`.
    pub warmup_ratio: Option<f64>,
    /// With `cosine`: the final learning rate as a fraction of the peak, in [0, 1]. Default: unset (0).
    pub cosine_min_lr_ratio: Option<f64>,
    /// AdamW decoupled weight decay (≥ 0). Default: `0.0`.
    pub weight_decay: f64,
    /// Gradient-norm clipping threshold (≥ 0; 0 disables clipping). Default: `1.0` (transformers).
    pub max_grad_norm: f64,
    /// Mixture-of-experts models (Mixtral): weight of the routers' load-balancing loss added to the training loss,
    /// as transformers adds `router_aux_loss_coef · aux_loss` with `output_router_logits` (≥ 0; Mixtral's
    /// config.json says 0.001). Default: unset (off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_aux_loss_coef: Option<f64>,
    /// `adamw_torch` (aliases `adamw`, `adamw_hf`, `adamw_torch_fused`). Default: `adamw_torch`.
    pub optimizer: Optimizer,
    /// LoRA+ (`loraplus_lr_ratio`): the B factors learn at `learning_rate × ratio` (PEFT's
    /// `create_loraplus_optimizer`; the paper suggests 16). Default: unset (off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    /// LoRA+'s learning rate of LoRA on embedding layers (PEFT's default 1e-6). loratune adapts no embedding layer,
    /// so it has no effect (a note says so). Default: unset.
    #[serde(skip_serializing)]
    pub loraplus_lr_embedding: Option<f64>,
    /// AdamW β1 in [0, 1). Default: `0.9`.
    pub adam_beta1: f64,
    /// AdamW β2 in [0, 1). Default: `0.999`.
    pub adam_beta2: f64,
    /// AdamW ε (> 0). Default: `1e-8`. Axolotl's name `adam_eps` is accepted.
    #[serde(alias = "adam_eps")]
    pub adam_epsilon: f64,
    /// Keep the frozen base in bf16: `true`, `false` or `auto` (bf16 on a GPU that supports it, f32 on the
    /// CPU). LoRA weights and optimizer state are always f32. Default: `auto` (Axolotl).
    pub bf16: Bf16,
    /// Recompute each layer in the backward pass instead of keeping its activations: `true`, `false`, or
    /// `offload` (the layer inputs kept in host memory). Exact: the same losses and gradients. Default: `false`.
    pub gradient_checkpointing: Checkpointing,
    /// Axolotl's `bf16` without mixed precision; `true` here is `bf16: true`. Default: unset.
    #[serde(skip_serializing)]
    pub bfloat16: Option<bool>,
    /// Axolotl's activation offloading; with `gradient_checkpointing` on, `true` makes it `offload`.
    /// Default: unset.
    #[serde(skip_serializing)]
    pub activation_offloading: Option<bool>,
    /// PyTorch's checkpointing options (`use_reentrant`); loratune's recompute is exact either way, so this is
    /// read as a note. Default: unset.
    #[serde(skip_serializing)]
    pub gradient_checkpointing_kwargs: Option<BTreeMap<String, serde_yaml::Value>>,
    /// transformers' attention choice (`eager`, `sdpa`, `flash_attention_2`, …): loratune always uses its own
    /// attention kernel (exact, memory linear in the sequence); read as a note. Default: unset.
    #[serde(skip_serializing)]
    pub attn_implementation: Option<String>,
    /// Overrides of the model's config.json that Axolotl passes to transformers. Only
    /// `output_router_logits: true` is understood (the router load-balancing loss at the model's
    /// `router_aux_loss_coef`, unless `router_aux_loss_coef` is set). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_config: Option<BTreeMap<String, serde_yaml::Value>>,
    /// `cpu`, `cuda`, `cuda:N` or `auto`. Default: `auto`.
    pub device: Device,
    /// Data-parallel training: one peer per listed device (`[cuda:0, cuda:1]`; a device may be listed twice),
    /// or `all` (every CUDA device). Replaces `device` (which must then be unset or `auto`). Every peer holds the
    /// model, runs its share of each step's micro-batches, and the adapters' gradients are summed across peers
    /// (burn-collective) before one identical AdamW step on each. Per peer, `micro_batch_size ×
    /// gradient_accumulation_steps` samples per step. Default: unset (one device: `device`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
    /// Machines (processes) training together; each runs `loratune train` with its `node_rank` and the same
    /// config. Default: `1`. torchrun's `WORLD_SIZE` / `RANK` / `LOCAL_RANK` / `MASTER_ADDR` / `MASTER_PORT` are
    /// read when this key is unset: one node per process, each on device `cuda:LOCAL_RANK`.
    #[serde(skip_serializing_if = "is_one")]
    pub nodes: usize,
    /// This machine's index in `0..nodes`; node 0 writes the run folder. Default: `0`.
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub node_rank: usize,
    /// `host:port` of burn-collective's orchestrator, which node 0 starts (unless `host_coordinator: false`,
    /// for one started with `loratune coordinator --port P`). Node i's data service listens on port + 1 + i.
    /// Required with `nodes` > 1. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Whether node 0 starts the orchestrator in its own process at `coordinator`. Default: `true`.
    #[serde(skip_serializing_if = "is_true")]
    pub host_coordinator: bool,
    /// Seconds a peer waits for the others at a gradient all-reduce before failing the run (a peer that died or
    /// hangs; node 0 answering the `eval_generate` questions alone counts as waiting). Default: `1800`
    /// (transformers' `ddp_timeout`).
    pub ddp_timeout: u64,
    /// Random seed for LoRA init, shuffling and dropout. Default: `42` (transformers, Axolotl).
    pub seed: u64,

    // ------------------------------------------------------------------------------ outputs & checkpoints
    /// Run folder: checkpoints, `adapter/`, `merged/`, metrics and the resolved config. Default:
    /// `./model-out` (Axolotl).
    pub output_dir: PathBuf,
    /// Checkpoint every N optimizer steps (≥ 1). Default: unset = a checkpoint at the end of each epoch.
    pub save_steps: Option<u64>,
    /// Keep at most N checkpoints (≥ 1), deleting the oldest. Default: unset = keep all.
    pub save_total_limit: Option<u32>,
    /// Evaluate every N optimizer steps (≥ 1) when there is an evaluation set. Default: unset = at the end
    /// of each epoch.
    pub eval_steps: Option<u64>,
    /// Evaluate N times per epoch (Axolotl): every `ceil(total_steps / (N × num_epochs))` steps, as transformers
    /// reads Axolotl's fractional `eval_steps`. `0` or unset = off. Exclusive with `eval_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evals_per_epoch: Option<u32>,
    /// Checkpoint N times per epoch (Axolotl), computed as for `evals_per_epoch`. Exclusive with `save_steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saves_per_epoch: Option<u32>,
    /// Stop the run (keeping its last checkpoint and writing the adapter) when the logged training loss is above
    /// this for `loss_watchdog_patience` logged steps in a row. Default: unset (off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_watchdog_threshold: Option<f64>,
    /// Consecutive logged steps above `loss_watchdog_threshold` that stop the run (≥ 1). Default: `3` (Axolotl).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_watchdog_patience: Option<u32>,
    /// Log metrics every N optimizer steps (≥ 1). Default: unset = Axolotl's rule, 0.5 % of the total steps
    /// clamped to 1..=10 (see [`TrainConfig::logging_steps_for`]).
    pub logging_steps: Option<u64>,
    /// Stop when the eval loss has not improved for N evaluations (≥ 1; needs an eval set). Default: unset.
    pub early_stopping_patience: Option<u32>,
    /// Task metrics on held-out questions ([`EvalGenerate`]): asked before training (the baseline), at the end, and
    /// at every evaluation with `at_eval_steps`. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_generate: Option<EvalGenerate>,
    /// The trials of `loratune sweep` ([`SweepConfig`]). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepConfig>,
    /// Resume from this checkpoint folder. Default: unset.
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Resume from the newest checkpoint in `output_dir` if there is one. Default: `false`.
    pub auto_resume_from_checkpoints: bool,
    /// Also write the run's scalars as TensorBoard event files in `output_dir/runs/` (Axolotl's name). Default:
    /// `false`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub use_tensorboard: bool,
    /// transformers' name for the same: `tensorboard` (or a list holding it) writes the event files; `none`
    /// nothing; other trackers (`wandb`, `mlflow`, …) have no effect (loratune runs offline). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_to: Option<ReportTo>,
    /// Also write the merged model (`output_dir/merged/`, HF folder) at the end. Default: `false`.
    pub merge_lora: bool,
    /// Dtype of the merged model: `auto` (the base's stored dtype), `f32`, `bf16`, `f16`. Default: `auto`.
    pub export_dtype: ExportDtype,
    /// Maximum size of one merged safetensors shard, e.g. `2GB` (transformers' units). Default: `5GB`.
    pub merged_shard_size: ByteSize,

    /// Where the config came from (file, text, overrides): used to point later errors at lines.
    #[serde(skip)]
    origin: Option<Arc<issues::Origin>>,
    /// Non-fatal findings (ignored Axolotl keys, settings without effect).
    #[serde(skip)]
    warnings: Vec<ConfigIssue>,
    /// What Axolotl keys were mapped to (one line each), printed as `note:` lines.
    #[serde(skip)]
    notes: Vec<String>,
}

impl Default for TrainConfig {
    /// Defaults of keys that configure another module are that module's defaults.
    fn default() -> Self {
        let data = crate::data::DataOptions::default();
        let adamw = crate::train::optim::AdamWConfig::default();
        TrainConfig {
            base_model: String::new(),
            base_model_revision: None,
            datasets: Vec::new(),
            test_datasets: Vec::new(),
            val_set_size: data.val_set_size,
            dataset_prepared_path: None,
            skip_bad_rows: false,
            chat_template: ChatTemplateName::TokenizerDefault,
            chat_template_jinja: None,
            train_on_inputs: data.train_on_inputs,
            sequence_len: data.sequence_len,
            sample_packing: data.sample_packing,
            truncation: data.truncation,
            special_tokens: SpecialTokens::default(),
            eval_generate: None,
            sweep: None,
            eot_tokens: None,
            curriculum_sampling: false,
            dataset_exact_deduplication: false,
            sample_packing_sequentially: None,
            adapter: Adapter::Lora,
            load_in_4bit: false,
            load_in_8bit: false,
            bnb_4bit_quant_type: Bnb4bitQuantType::Nf4,
            bnb_4bit_use_double_quant: true,
            bnb_4bit_compute_dtype: None,
            base_quantization: BaseQuantization::Keep,
            lora_r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            lora_target_linear: false,
            lora_layers_to_transform: None,
            lora_layers_pattern: None,
            peft_use_rslora: false,
            peft_use_dora: false,
            lora_init: LoraInit::Kaiming,
            lora_modules_to_save: Vec::new(),
            micro_batch_size: data.micro_batch_size,
            gradient_accumulation_steps: 1,
            batch_size: None,
            eval_batch_size: None,
            num_epochs: None,
            max_steps: None,
            learning_rate: 0.0,
            lr_scheduler: ScheduleKind::Cosine,
            lr_quadratic_warmup: false,
            warmup_steps: None,
            warmup_ratio: None,
            cosine_min_lr_ratio: None,
            weight_decay: adamw.weight_decay,
            max_grad_norm: 1.0,
            router_aux_loss_coef: None,
            optimizer: Optimizer::AdamW,
            loraplus_lr_ratio: None,
            loraplus_lr_embedding: None,
            adam_beta1: adamw.beta1,
            adam_beta2: adamw.beta2,
            adam_epsilon: adamw.eps,
            bf16: Bf16::Auto,
            gradient_checkpointing: Checkpointing::Off,
            bfloat16: None,
            activation_offloading: None,
            gradient_checkpointing_kwargs: None,
            attn_implementation: None,
            model_config: None,
            device: Device::Auto,
            devices: None,
            nodes: 1,
            node_rank: 0,
            coordinator: None,
            host_coordinator: true,
            ddp_timeout: 1800,
            seed: data.seed,
            output_dir: PathBuf::from("./model-out"),
            save_steps: None,
            save_total_limit: None,
            eval_steps: None,
            evals_per_epoch: None,
            saves_per_epoch: None,
            loss_watchdog_threshold: None,
            loss_watchdog_patience: None,
            logging_steps: None,
            early_stopping_patience: None,
            resume_from_checkpoint: None,
            auto_resume_from_checkpoints: false,
            use_tensorboard: false,
            report_to: None,
            merge_lora: false,
            export_dtype: ExportDtype::Auto,
            merged_shard_size: ByteSize {
                text: "5GB".to_string(),
                bytes: 5_000_000_000,
            },
            origin: None,
            warnings: Vec::new(),
            notes: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// How the frozen base is held: stored quantized matrices kept or dequantized (`base_quantization`), dense
    /// decoder linears quantized to NF4 (`load_in_4bit` / `adapter: qlora`) or int8 (`load_in_8bit`).
    pub fn base_plan(&self) -> crate::quant::BasePlan {
        use crate::quant::QuantScheme;
        let quantize = if self.load_in_4bit || self.adapter == Adapter::Qlora {
            Some(QuantScheme::Nf4 {
                double: self.bnb_4bit_use_double_quant,
            })
        } else if self.load_in_8bit {
            Some(QuantScheme::Int8)
        } else {
            None
        };
        crate::quant::BasePlan {
            keep_stored: self.base_quantization == BaseQuantization::Keep,
            quantize,
        }
    }
}

/// One string or a list of strings (PEFT's `layers_pattern`).
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum One {
        S(String),
        L(Vec<String>),
    }
    Ok(Option::<One>::deserialize(d)?.map(|o| match o {
        One::S(s) => vec![s],
        One::L(l) => l,
    }))
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// transformers' `MixtralConfig.router_aux_loss_coef` default, for a config.json without the key.
const MIXTRAL_ROUTER_AUX_LOSS_COEF: f64 = 0.001;

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    names::LenientF64::deserialize(d).map(|v| v.0)
}

/// One dataset entry of `datasets:` / `test_datasets:` (Axolotl's keys). Field defaults depend on `type` and
/// are filled in at load time, so after loading every field relevant to the type is `Some`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// **Required.** A file, a folder, or a glob (`data/*.jsonl`), relative to the working directory.
    pub path: String,
    /// **Required.** `alpaca`, `chat_template` (alias `chat`), `completion` or `text`.
    #[serde(rename = "type")]
    pub kind: DataFormat,
    /// File format `jsonl`, `json` (a JSON array, or JSON lines), `csv`, `tsv` or `parquet`. Default: from the
    /// file extension.
    pub ds_type: Option<FileKind>,
    /// Split name; for local files only `train` exists (Axolotl's convention), optionally sliced as the `datasets`
    /// library slices it: `train[:20%]`, `train[100:200]`, `train[-10%:]`. Default: unset (= train).
    pub split: Option<String>,
    /// chat_template: the field holding the message list. Default: `messages`.
    pub field_messages: Option<String>,
    /// chat_template: message property → field name, e.g. `{role: from, content: value}` for ShareGPT.
    /// Default: `{role: role, content: content}` (missing entries are filled with these).
    pub message_property_mappings: Option<BTreeMap<String, String>>,
    /// chat_template: target role → source role names. Default: `{user: [human, user], assistant: [gpt,
    /// assistant], system: [system], tool: [tool]}` (Axolotl).
    pub roles: Option<BTreeMap<String, Vec<String>>>,
    /// chat_template: roles whose turns carry loss. Default: `[assistant]`.
    pub roles_to_train: Option<Vec<String>>,
    /// chat_template: which end-of-turn tokens carry loss: `turn`, `all`, `last`. Default: `turn` (Axolotl).
    pub train_on_eos: Option<TrainOnEos>,
    /// alpaca: instruction field. Default: `instruction`.
    pub field_instruction: Option<String>,
    /// alpaca: input field (may be empty per row). Default: `input`.
    pub field_input: Option<String>,
    /// alpaca: output field. Default: `output`.
    pub field_output: Option<String>,
    /// alpaca: optional system-prompt field. Default: `system`.
    pub field_system: Option<String>,
    /// completion: prompt field. Default: `prompt`.
    pub field_prompt: Option<String>,
    /// completion: completion field. Default: `completion`.
    pub field_completion: Option<String>,
    /// text: the text field. Default: `text`. Axolotl's name `field` is accepted.
    #[serde(alias = "field")]
    pub field_text: Option<String>,
    /// chat_template: remove a leading system message from every conversation (for templates without a system
    /// role, such as Gemma's), as Axolotl does. Default: `false`.
    pub drop_system_message: bool,
    /// chat_template: a per-dataset chat template overriding the top-level one. Default: unset.
    pub chat_template: Option<ChatTemplateName>,
    /// chat_template: per-dataset Jinja template text (or `.jinja` file path). Default: unset.
    pub chat_template_jinja: Option<String>,
}

impl DatasetConfig {
    /// Every key a dataset entry accepts (with Axolotl aliases).
    pub fn known_keys() -> &'static [&'static str] {
        load::fields_of::<DatasetConfig>()
    }
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            path: String::new(),
            kind: DataFormat::Chat,
            ds_type: None,
            split: None,
            field_messages: None,
            message_property_mappings: None,
            roles: None,
            roles_to_train: None,
            train_on_eos: None,
            field_instruction: None,
            field_input: None,
            field_output: None,
            field_system: None,
            field_prompt: None,
            field_completion: None,
            field_text: None,
            drop_system_message: false,
            chat_template: None,
            chat_template_jinja: None,
        }
    }
}

/// `eval_generate:` held-out questions with what their answers should say, asked greedily and scored
/// ([`crate::generate::score`]); results per question in `output_dir/eval_generate/step-N.jsonl`, means in
/// `metrics.jsonl` (`task`) and TensorBoard (`eval/task_<metric>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalGenerate {
    /// **Required.** A JSONL file of questions (e.g. `datasets/nimbrel/heldout.jsonl`), relative to the working
    /// directory.
    pub path: String,
    /// The field holding the question. Default: `question`.
    pub prompt_field: String,
    /// The field holding the expected answer (a string) or facts (a list of strings). Default: `expected_facts`.
    pub answer_field: String,
    /// Metrics: `exact`, `contains`, `regex`, `f1`. Default: `[contains, f1]`.
    pub metrics: Vec<crate::generate::score::Metric>,
    /// New tokens per answer (≥ 1). Default: `128`.
    pub max_new_tokens: usize,
    /// Questions per generation batch (≥ 1). Default: `8`.
    pub batch_size: usize,
    /// The system message before each question. Default: unset = the one most training conversations carry.
    pub system: Option<String>,
    /// Also ask at every evaluation (`eval_steps`), not only before training and at the end. Default: `false`.
    pub at_eval_steps: bool,
}

impl Default for EvalGenerate {
    fn default() -> Self {
        EvalGenerate {
            path: String::new(),
            prompt_field: "question".into(),
            answer_field: "expected_facts".into(),
            metrics: vec![
                crate::generate::score::Metric::Contains,
                crate::generate::score::Metric::F1,
            ],
            max_new_tokens: 128,
            batch_size: 8,
            system: None,
            at_eval_steps: false,
        }
    }
}

/// `sweep:` the trials `loratune sweep` runs ([`sweep`]): each an ordinary run of this config with some keys
/// changed, in `output_dir/trials/<n>-<key=value,…>/`. `loratune train` ignores the block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepConfig {
    /// `grid` (every combination), `random` (`trials` of them, seeded) or `halving` (synchronous successive
    /// halving over the grid, or over `trials` random ones). Default: `grid`.
    pub method: SweepMethod,
    /// **Required.** Config key (a dotted path such as `datasets.0.path` is allowed) → the values to try, a list;
    /// with `random` also a range `{min: 1.0e-5, max: 1.0e-3, log: true}` (`int: true` for whole numbers).
    pub parameters: serde_yaml::Mapping,
    /// How many trials `random` draws (and `halving` starts from, instead of the whole grid). Default: unset.
    pub trials: Option<usize>,
    /// The seed of `random`'s draws. Default: the config's `seed`.
    pub seed: Option<u64>,
    /// What ranks the trials: `eval_loss`, `train_loss`, or a task metric of `eval_generate` (`contains`, `f1`,
    /// `exact`, `regex`), taken at the end of each trial's budget. Default: `eval_loss`.
    pub metric: String,
    /// `minimize` or `maximize`. Default: minimize a loss, maximize a task metric.
    pub goal: Option<SweepGoal>,
    /// `halving`: keep the best 1/eta of the trials at each rung (≥ 2). Default: `3`.
    pub eta: usize,
    /// `halving`: the first rung's budget in optimizer steps; each rung multiplies it by `eta`, the last runs to
    /// `max_steps`. Default: `max_steps / eta^(rungs − 1)`.
    pub min_steps: Option<u64>,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            method: SweepMethod::Grid,
            parameters: serde_yaml::Mapping::new(),
            trials: None,
            seed: None,
            metric: "eval_loss".into(),
            goal: None,
            eta: 3,
            min_steps: None,
        }
    }
}

/// How a sweep picks and runs its trials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepMethod {
    Grid,
    Random,
    Halving,
}

impl SweepMethod {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            SweepMethod::Grid => "grid",
            SweepMethod::Random => "random",
            SweepMethod::Halving => "halving",
        }
    }
}

/// Whether a sweep's best trial has the lowest or the highest metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepGoal {
    Minimize,
    Maximize,
}

impl SweepGoal {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            SweepGoal::Minimize => "minimize",
            SweepGoal::Maximize => "maximize",
        }
    }
}

/// `special_tokens:` overrides of the tokenizer's special tokens (Axolotl's keys). Default: all unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token text.
    pub bos_token: Option<String>,
    /// End-of-sequence token text (also what a trained turn must end with).
    pub eos_token: Option<String>,
    /// Padding token text (never pad with EOS silently: the loop must keep EOS labels).
    pub pad_token: Option<String>,
    /// Unknown token text.
    pub unk_token: Option<String>,
}

/// Where the chat template comes from, after combining `chat_template` and `chat_template_jinja`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplateChoice {
    /// The base model's own template.
    TokenizerDefault,
    /// A built-in template by name (`chatml`, `llama3`, `mistral`, `gemma`, `phi3`, `alpaca`).
    Builtin(ChatTemplateName),
    /// Jinja text.
    Jinja(String),
}

/// One problem (or warning) in a config, pointing at the key or value in the file, or at the `--set`
/// argument it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key path (`datasets.0.path`); empty for the whole document.
    pub key: String,
    /// Position in the config file, when the key/value is in the file.
    pub pos: Option<Pos>,
    /// The `--set` argument that produced the value, when it came from one.
    pub from_override: Option<String>,
    /// What is wrong, e.g. "unknown key `lora_alpah`".
    pub what: String,
    /// Why / how to fix it, e.g. "did you mean `lora_alpha`?".
    pub detail: Option<String>,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if let Some(p) = self.pos {
            write!(f, " at line {} column {}", p.line, p.column)?;
        }
        if let Some(o) = &self.from_override {
            write!(f, " (from --set {o})")?;
        }
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        Ok(())
    }
}

/// Every problem found in a config file; displays as a list under the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The config file (as given), or a label for in-memory text.
    pub file: String,
    /// The problems, in file order (those without a position last).
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.issues.as_slice() {
            [one] => write!(f, "{}: {}", self.file, one),
            many => {
                write!(f, "{}: {} problems in the config:", self.file, many.len())?;
                for i in many {
                    write!(f, "\n  - {i}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

/// A config file's label (its path as given) and text.
fn read_config_file(path: &Path) -> Result<(String, String), ConfigErrors> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: label.clone(),
        issues: vec![ConfigIssue {
            key: String::new(),
            pos: None,
            from_override: None,
            what: "cannot read the config file".to_string(),
            detail: Some(e.to_string()),
        }],
    })?;
    Ok((label, text))
}

impl TrainConfig {
    /// Load, override, check and resolve a config file, with the default [`LoadOptions`] (dataset files
    /// and local model paths must exist, relative to the working directory). `overrides` are `--set`
    /// arguments (`key=value`).
    pub fn load(path: &Path, overrides: &[String]) -> crate::Result<TrainConfig> {
        Ok(Self::load_with(path, overrides, &LoadOptions::default())?)
    }

    /// [`TrainConfig::load`] with options, returning every problem in structured form.
    pub fn load_with(
        path: &Path,
        overrides: &[String],
        opts: &LoadOptions,
    ) -> Result<TrainConfig, ConfigErrors> {
        let (label, text) = read_config_file(path)?;
        load::load_str(&text, &label, overrides, opts)
    }

    /// Load from YAML text; `label` names it in messages (e.g. the file name).
    pub fn from_yaml_str(
        text: &str,
        label: &str,
        overrides: &[String],
        opts: &LoadOptions,
    ) -> Result<TrainConfig, ConfigErrors> {
        load::load_str(text, label, overrides, opts)
    }

    /// Every key the top level accepts (with Axolotl aliases), from the struct definition itself.
    pub fn known_keys() -> &'static [&'static str] {
        load::fields_of::<TrainConfig>()
    }

    /// Non-fatal findings from loading (ignored Axolotl keys, settings that have no effect); print them.
    pub fn warnings(&self) -> &[ConfigIssue] {
        &self.warnings
    }

    /// What mapped Axolotl keys became (e.g. an 8-bit optimizer → exact AdamW); print them as notes.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The lines every command that reads a config prints before it starts (`train`, `data stats`, `data preview`,
    /// `eval`): the warnings (`warning: …`), then the notes (`note: …`).
    pub fn findings(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|w| format!("warning: {w}"))
            .chain(self.notes.iter().map(|n| format!("note: {n}")))
            .collect()
    }

    /// The config file this came from (its label), if it was loaded from one.
    pub fn source_label(&self) -> Option<&str> {
        self.origin.as_ref().map(|o| o.label.as_str())
    }

    /// Resolve a path from the config (dataset, checkpoint, model) against the base folder the config was
    /// loaded with (the working directory by default). Absolute paths are returned unchanged.
    pub fn resolve_path(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        match self.origin.as_ref().and_then(|o| o.base_dir.as_ref()) {
            Some(base) if p.is_relative() => base.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The Hub revision to use for `base_model` (`main` when unset).
    pub fn revision(&self) -> &str {
        self.base_model_revision.as_deref().unwrap_or("main")
    }

    /// The modules to adapt, combining `lora_target_modules` and `lora_target_linear`; `None` = the family's
    /// default (PEFT's per-architecture `target_modules`).
    pub fn lora_targets(&self) -> Option<TargetSpec> {
        if self.lora_target_linear {
            return Some(TargetSpec::AllLinear);
        }
        match &self.lora_target_modules {
            None => None,
            Some(TargetModules::List(v)) => Some(TargetSpec::Names(v.clone())),
            Some(TargetModules::Pattern(p)) if p.eq_ignore_ascii_case("all-linear") => {
                Some(TargetSpec::AllLinear)
            }
            Some(TargetModules::Pattern(p)) => Some(TargetSpec::Regex(p.clone())),
        }
    }

    /// The `val_set_size` split (the value was checked at load time).
    pub fn val_split(&self) -> ValSplit {
        ValSplit::from_size(self.val_set_size).unwrap_or(ValSplit::None)
    }

    /// Whether the run has an evaluation set (`test_datasets` or `val_set_size` > 0).
    pub fn has_eval_set(&self) -> bool {
        !self.test_datasets.is_empty() || self.val_set_size > 0.0
    }

    /// The chat template for a dataset (its own `chat_template`/`chat_template_jinja`, else the top-level one).
    pub fn chat_template_for(&self, ds: &DatasetConfig) -> ChatTemplateChoice {
        let (name, jinja) = match (ds.chat_template, &ds.chat_template_jinja) {
            (Some(n), j) => (n, j.as_ref()),
            (None, Some(j)) => (ChatTemplateName::Jinja, Some(j)),
            (None, None) => (self.chat_template, self.chat_template_jinja.as_ref()),
        };
        match name {
            ChatTemplateName::TokenizerDefault => ChatTemplateChoice::TokenizerDefault,
            ChatTemplateName::Jinja => {
                ChatTemplateChoice::Jinja(jinja.cloned().unwrap_or_default())
            }
            other => ChatTemplateChoice::Builtin(other),
        }
    }

    /// The top-level chat template.
    pub fn chat_template_choice(&self) -> ChatTemplateChoice {
        match self.chat_template {
            ChatTemplateName::TokenizerDefault => ChatTemplateChoice::TokenizerDefault,
            ChatTemplateName::Jinja => {
                ChatTemplateChoice::Jinja(self.chat_template_jinja.clone().unwrap_or_default())
            }
            other => ChatTemplateChoice::Builtin(other),
        }
    }

    /// Peers training together: `devices` per node × `nodes` (1 on one device).
    pub fn world_size(&self) -> usize {
        self.devices.as_ref().map_or(1, Devices::count).max(1) * self.nodes.max(1)
    }

    /// Micro-batches per optimizer step across every peer (`gradient_accumulation_steps × world_size`): the
    /// step a single device would take with that many accumulation steps.
    pub fn micro_per_step(&self) -> usize {
        self.gradient_accumulation_steps
            .max(1)
            .saturating_mul(self.world_size())
    }

    /// Samples per optimizer step (`micro_batch_size × gradient_accumulation_steps × world_size`).
    pub fn samples_per_step(&self) -> usize {
        self.micro_batch_size.saturating_mul(self.micro_per_step())
    }

    /// Total optimizer steps given the number of micro-batches in one epoch, with transformers' rule:
    /// `max_steps` if set, else `ceil(num_epochs × max(micro_batches / micro-batches per step, 1))`.
    pub fn total_steps(&self, micro_batches_per_epoch: u64) -> u64 {
        if let Some(m) = self.max_steps {
            return m;
        }
        let per_epoch = (micro_batches_per_epoch / self.micro_per_step() as u64).max(1);
        let epochs = self.num_epochs.unwrap_or(1.0);
        (epochs * per_epoch as f64).ceil() as u64
    }

    /// Warmup steps for a run of `total_steps`: `warmup_steps`, or `ceil(warmup_ratio × total)`, or 0.
    pub fn warmup_steps_for(&self, total_steps: u64) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total_steps as f64).ceil() as u64,
            (None, None) => 0,
        }
    }

    /// Logging interval for a run of `total_steps`: `logging_steps`, or Axolotl's default
    /// `clamp(int(0.005 × total), 1, 10)`.
    pub fn logging_steps_for(&self, total_steps: u64) -> u64 {
        self.logging_steps
            .unwrap_or_else(|| ((total_steps as f64 * 0.005) as u64).clamp(1, 10))
    }

    /// Evaluation interval in optimizer steps for a run of `total` steps with `per_epoch` steps per epoch:
    /// `eval_steps`, else `evals_per_epoch`'s (Axolotl's fraction `1 / (N × num_epochs)` of the run, rounded up as
    /// transformers does), else once per epoch.
    pub fn eval_interval(&self, total: u64, per_epoch: u64) -> u64 {
        self.eval_steps
            .or_else(|| self.per_epoch_interval(self.evals_per_epoch, total))
            .unwrap_or(per_epoch)
            .max(1)
    }

    /// Checkpoint interval, as [`TrainConfig::eval_interval`] with `save_steps` / `saves_per_epoch`.
    pub fn save_interval(&self, total: u64, per_epoch: u64) -> u64 {
        self.save_steps
            .or_else(|| self.per_epoch_interval(self.saves_per_epoch, total))
            .unwrap_or(per_epoch)
            .max(1)
    }

    /// `ceil(total / (n × num_epochs))`; a fraction ≥ 1 (fewer than one per run) means at the end only.
    fn per_epoch_interval(&self, n: Option<u32>, total: u64) -> Option<u64> {
        let n = n.filter(|&n| n > 0)? as f64;
        let ratio = 1.0 / (n * self.num_epochs.unwrap_or(1.0));
        Some(if ratio < 1.0 {
            (total as f64 * ratio).ceil() as u64
        } else {
            total
        })
    }

    /// The learning-rate multiplier of each trainable parameter (by its PEFT key): LoRA+ gives the B factors
    /// `loraplus_lr_ratio` (PEFT's `create_loraplus_optimizer`: `lora_B` and 1-D parameters in group B), all else 1.
    pub fn lr_multipliers(&self, keys: &[String]) -> Vec<f64> {
        keys.iter()
            .map(|k| match self.loraplus_lr_ratio {
                Some(r) if k.contains(".lora_B.") => r,
                _ => 1.0,
            })
            .collect()
    }

    /// The router load-balancing coefficient for a mixture of experts whose config.json says `model_coef`:
    /// `router_aux_loss_coef`, else the model's when `model_config: {output_router_logits: true}` (transformers
    /// adds the loss then), else off.
    pub fn router_aux_coef(&self, model_coef: Option<f64>) -> Option<f64> {
        self.router_aux_loss_coef.or_else(|| {
            self.output_router_logits()
                .then(|| model_coef.unwrap_or(MIXTRAL_ROUTER_AUX_LOSS_COEF))
        })
    }

    fn output_router_logits(&self) -> bool {
        self.model_config
            .as_ref()
            .and_then(|m| m.get("output_router_logits"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// The resolved config as YAML (every default filled in). Loading this text gives the same settings.
    pub fn to_yaml(&self) -> crate::Result<String> {
        serde_yaml::to_string(self).map_err(|source| crate::Error::Serialize {
            what: "the resolved config".into(),
            source: source.into(),
        })
    }

    /// Write the resolved config to `dir/config.yaml` (atomically: temp file + rename), with a header
    /// naming the source file and the config hash. Returns the written path.
    pub fn write_resolved(&self, dir: &Path) -> crate::Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let path = dir.join("config.yaml");
        let mut text = String::new();
        text.push_str(
            "# Resolved loratune config: every default filled in, --set overrides applied.\n",
        );
        if let Some(label) = self.source_label() {
            text.push_str(&format!("# source: {label}\n"));
        }
        if let Some(o) = &self.origin {
            for ov in &o.overrides {
                text.push_str(&format!("# --set {}\n", ov.raw.replace('\n', " ")));
            }
        }
        text.push_str(&format!("# config_hash: {}\n", self.config_hash()));
        text.push_str(&self.to_yaml()?);
        crate::export::atomic::write_atomic(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Keys left out of [`TrainConfig::config_hash`]: they may change between a checkpoint and its resume
    /// without changing the training trajectory (where outputs go, how often to log/save/evaluate, how to
    /// export at the end, which device, caching).
    pub const HASH_EXCLUDED_KEYS: &'static [&'static str] = &[
        "output_dir",
        "resume_from_checkpoint",
        "auto_resume_from_checkpoints",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "logging_steps",
        "early_stopping_patience",
        "merge_lora",
        "export_dtype",
        "merged_shard_size",
        "dataset_prepared_path",
        "device",
        "devices",
        "nodes",
        "node_rank",
        "coordinator",
        "host_coordinator",
        "ddp_timeout",
        "evals_per_epoch",
        "saves_per_epoch",
        "loss_watchdog_threshold",
        "loss_watchdog_patience",
        "eval_batch_size",
        "use_tensorboard",
        "report_to",
    ];

    /// Whether the run writes TensorBoard event files (`use_tensorboard: true`, or `report_to` naming
    /// `tensorboard` or `all`).
    pub fn tensorboard(&self) -> bool {
        self.use_tensorboard
            || self
                .report_to
                .as_ref()
                .is_some_and(|r| r.names().any(|n| n == "tensorboard" || n == "all"))
    }

    /// A stable hash (16 hex digits, FNV-1a 64 over the canonical JSON of the resolved config minus
    /// [`TrainConfig::HASH_EXCLUDED_KEYS`]). Equal hashes mean a checkpoint can be resumed with this config.
    pub fn config_hash(&self) -> String {
        let mut v = match serde_json::to_value(self) {
            Ok(v) => v,
            // Serialising plain data cannot fail; hash the debug form rather than panic.
            Err(_) => serde_json::Value::String(format!("{self:?}")),
        };
        if let Some(obj) = v.as_object_mut() {
            for k in Self::HASH_EXCLUDED_KEYS {
                obj.remove(*k);
            }
            // The step's global batch, not how it is split over peers: a checkpoint of 2 peers × 2 accumulation
            // steps resumes on 1 peer × 4 (and hashes as before on one device).
            obj.insert(
                "gradient_accumulation_steps".into(),
                self.micro_per_step().into(),
            );
        }
        let text = v.to_string();
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }
}

/// FNV-1a, 64-bit: a tiny, fully specified hash (stable across platforms and Rust versions).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn step_arithmetic_follows_transformers() {
        let mut c = TrainConfig {
            gradient_accumulation_steps: 4,
            num_epochs: Some(2.0),
            ..TrainConfig::default()
        };
        // 10 micro-batches / 4 = 2 updates per epoch (floor, as transformers), × 2 epochs.
        assert_eq!(c.total_steps(10), 4);
        // fewer micro-batches than one accumulation still gives one step per epoch
        assert_eq!(c.total_steps(3), 2);
        c.num_epochs = Some(1.5);
        assert_eq!(c.total_steps(10), 3);
        c.max_steps = Some(7);
        assert_eq!(c.total_steps(10), 7);
        c.warmup_ratio = Some(0.1);
        assert_eq!(c.warmup_steps_for(95), 10);
        c.warmup_ratio = None;
        assert_eq!(c.warmup_steps_for(95), 0);
        assert_eq!(c.logging_steps_for(100), 1);
        assert_eq!(c.logging_steps_for(1000), 5);
        assert_eq!(c.logging_steps_for(100_000), 10);
    }

    #[test]
    fn lora_scale_and_targets() {
        use crate::model::Family;
        let mut c = TrainConfig {
            lora_r: 16,
            lora_alpha: 32.0,
            ..TrainConfig::default()
        };
        assert_eq!(c.lora_settings(Family::Llama).scale(), 2.0);
        c.peft_use_rslora = true;
        assert_eq!(c.lora_settings(Family::Llama).scale(), 8.0);
        assert_eq!(c.lora_targets(), None);
        assert_eq!(
            c.lora_settings(Family::Llama).targets,
            TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(
            c.lora_settings(Family::Phi3).targets,
            TargetSpec::Names(vec!["qkv_proj".into()])
        );
        c.lora_target_modules = Some(TargetModules::Pattern("all-linear".into()));
        assert_eq!(c.lora_targets(), Some(TargetSpec::AllLinear));
        c.lora_target_modules = Some(TargetModules::Pattern(r".*\.(q|v)_proj".into()));
        assert_eq!(
            c.lora_targets(),
            Some(TargetSpec::Regex(r".*\.(q|v)_proj".into()))
        );
        c.lora_target_linear = true;
        assert_eq!(c.lora_targets(), Some(TargetSpec::AllLinear));
    }
}

/// `report_to`: one tracker name or a list (transformers' `TrainingArguments.report_to`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReportTo {
    One(String),
    Many(Vec<String>),
}

impl ReportTo {
    /// The trackers transformers knows (`all` and `none` besides): loratune writes `tensorboard`'s files; the
    /// others would need a network service or a Python library.
    pub const KNOWN: &'static [&'static str] = &[
        "tensorboard",
        "all",
        "none",
        "wandb",
        "mlflow",
        "comet_ml",
        "neptune",
        "clearml",
        "dagshub",
        "dvclive",
        "codecarbon",
        "azure_ml",
        "flyte",
        "swanlab",
        "trackio",
    ];

    pub fn names(&self) -> impl Iterator<Item = &str> {
        let v: Vec<&str> = match self {
            ReportTo::One(s) => vec![s.as_str()],
            ReportTo::Many(v) => v.iter().map(String::as_str).collect(),
        };
        v.into_iter()
    }
}
