//! `loratune train`: a whole run from a resolved [`TrainConfig`] — base model resolution, data preparation (in the
//! background while the model loads), LoRA attach or exact resume, the optimizer loop with evaluation, early
//! stopping and checkpoints, then the adapter (and merged model) export, metrics and a loss curve.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{self, TrainerState, FORMAT};
use super::optim::{AdamW, AdamWConfig};
use super::report::{loss_curve_svg, MetricLine, MetricsWriter};
use super::schedule::{Schedule, ScheduleKind};
use super::step::{eval_loss, train_step, StepConfig};
use crate::config::{self, names, LoraTargets, TrainConfig};
use crate::data::{Batch, DataPipeline, LoaderState};
use crate::error::{Error, Result};
use crate::lora::adapter::{attach, lora_params, set_trainable, LoraInit, LoraSettings};
use crate::lora::peft::{apply_adapter, read_adapter, save_adapter};
use crate::lora::TargetSpec;
use crate::model::{self, CausalLm};
use crate::tokenizer::{self, LoadedTokenizer};

/// How to run (things that are not part of the experiment's config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop abruptly (no final save, no export — as if the process were killed) after this many optimizer steps
    /// of this invocation. For testing resume.
    pub stop_after: Option<u64>,
    /// Progress display.
    pub progress: ProgressMode,
}

/// Progress display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal, periodic log lines otherwise.
    #[default]
    Auto,
    /// Log lines only.
    Plain,
    /// Nothing on the terminal (metrics.jsonl is still written).
    Quiet,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    pub merged_dir: Option<PathBuf>,
    /// Optimizer steps completed (including those before a resume).
    pub steps: u64,
    pub total_steps: u64,
    /// Per-step losses of this invocation, in order.
    pub losses: Vec<f64>,
    pub best_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub seconds: f64,
    /// Trained (loss-bearing) tokens per second over this invocation's steps.
    pub trained_tokens_per_second: f64,
    /// All real tokens processed per second.
    pub tokens_per_second: f64,
    pub resumed_from: Option<PathBuf>,
    pub stopped_early: bool,
    pub interrupted: bool,
}

/// Train according to `cfg`.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let bf16 = |gpu: bool| match cfg.bf16 {
        names::Bf16::True => DType::BF16,
        names::Bf16::False => DType::F32,
        names::Bf16::Auto => {
            if gpu {
                DType::BF16
            } else {
                DType::F32
            }
        }
    };
    type Flex = burn::backend::Flex;
    type Ckpt = burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    let use_cuda = match cfg.device {
        names::Device::Cpu => false,
        names::Device::Cuda(_) => {
            if !cfg!(feature = "cuda") {
                return Err(Error::Train(
                    "device: cuda needs a loratune built with `--features cuda`; rebuild, or set device: cpu".into(),
                ));
            }
            true
        }
        names::Device::Auto => cfg!(feature = "cuda") && cuda_available(),
    };
    if use_cuda {
        #[cfg(feature = "cuda")]
        {
            type Cuda = burn::backend::Cuda<f32, i32>;
            let idx = match cfg.device {
                names::Device::Cuda(i) => i,
                _ => 0,
            };
            let device = burn::backend::cuda::CudaDevice::new(idx);
            return if cfg.gradient_checkpointing {
                run::<burn::backend::Autodiff<Cuda, Ckpt>>(cfg, opts, device, bf16(true))
            } else {
                run::<burn::backend::Autodiff<Cuda>>(cfg, opts, device, bf16(true))
            };
        }
    }
    if cfg.gradient_checkpointing {
        run::<burn::backend::Autodiff<Flex, Ckpt>>(cfg, opts, Default::default(), bf16(false))
    } else {
        run::<burn::backend::Autodiff<Flex>>(cfg, opts, Default::default(), bf16(false))
    }
}

/// Whether a CUDA device can be used (driver present).
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        std::path::Path::new("/dev/nvidiactl").exists()
            || std::path::Path::new("/proc/driver/nvidia/version").exists()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// LoRA settings from the config.
pub fn lora_settings(cfg: &TrainConfig, family: model::Family) -> LoraSettings {
    let targets = match cfg.lora_targets() {
        LoraTargets::AllLinear => TargetSpec::AllLinear,
        LoraTargets::Names(n) => TargetSpec::Names(n),
        LoraTargets::Regex(r) => TargetSpec::Regex(r),
        LoraTargets::ArchitectureDefault => {
            if family.fused_projections() {
                TargetSpec::Names(vec!["qkv_proj".into()])
            } else {
                TargetSpec::Names(vec!["q_proj".into(), "v_proj".into()])
            }
        }
    };
    LoraSettings {
        r: cfg.lora_r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        use_rslora: cfg.peft_use_rslora,
        targets,
        layers: cfg.lora_layers_to_transform.as_ref().map(|l| l.0.clone()),
        init: match cfg.lora_init {
            names::LoraInit::Default => LoraInit::Kaiming,
            names::LoraInit::Gaussian => LoraInit::Gaussian,
        },
        seed: cfg.seed,
    }
}

/// Apply `special_tokens` overrides (token texts must already be in the vocabulary).
pub fn apply_special_tokens(cfg: &TrainConfig, tok: &mut LoadedTokenizer) -> Result<()> {
    let st = &cfg.special_tokens;
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
    Ok(())
}

/// Resolve the base model to a local path (HF folder or .gguf).
pub fn resolve_model_path(cfg: &TrainConfig) -> Result<PathBuf> {
    let mut hub = crate::hub::HubOptions::from_env()?;
    hub.progress = std::io::stderr().is_terminal();
    // Relative paths are relative to the working directory, as in Axolotl.
    Ok(
        match crate::hub::resolve_base_model_in(
            &cfg.base_model,
            Some(cfg.revision()),
            None::<&Path>,
            &hub,
        )? {
            crate::hub::ResolvedModel::Folder(f) => f.dir,
            crate::hub::ResolvedModel::Gguf(p) => p,
        },
    )
}

struct Printer {
    bar: Option<ProgressBar>,
    mode: ProgressMode,
}

impl Printer {
    fn new(mode: ProgressMode, total: u64, start: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (mode == ProgressMode::Auto && tty).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_position(start);
            b
        });
        Printer { bar, mode }
    }
    fn line(&self, s: &str) {
        match (&self.bar, self.mode) {
            (_, ProgressMode::Quiet) => {}
            (Some(b), _) => b.println(s),
            (None, _) => eprintln!("{s}"),
        }
    }
    fn step(&self, pos: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn eval<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    batches: &[Batch],
) -> Option<(f64, f64)> {
    if batches.is_empty() {
        return None;
    }
    let pairs: Vec<_> = batches
        .iter()
        .map(|b| (&b.tokens, b.labels.as_slice()))
        .collect();
    let (sum, n) = eval_loss(model, &pairs);
    if n == 0 {
        return None;
    }
    let l = sum / n as f64;
    Some((l, l.exp()))
}

fn run<B: AutodiffBackend>(
    cfg: &TrainConfig,
    opts: &RunOptions,
    device: B::Device,
    dtype: DType,
) -> Result<RunSummary> {
    let t_start = Instant::now();
    let p = Printer::new(opts.progress, 0, 0);
    let out = cfg.output_dir.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;

    // Resume point.
    let resume_dir = match (
        &cfg.resume_from_checkpoint,
        cfg.auto_resume_from_checkpoints,
    ) {
        (Some(d), _) => Some(d.clone()),
        (None, true) => checkpoint::list_checkpoints(&out).pop().map(|(_, d)| d),
        (None, false) => None,
    };
    let resume_state = resume_dir
        .as_deref()
        .map(checkpoint::read_state)
        .transpose()?;
    let hash = cfg.config_hash();
    if let (Some(st), Some(d)) = (&resume_state, &resume_dir) {
        if st.config_hash != hash {
            return Err(Error::Train(format!(
                "{} was written by a run with a different configuration (hash {} ≠ {hash}); resume with the same \
                 config, or use a new output_dir",
                d.display(),
                st.config_hash
            )));
        }
    } else if !checkpoint::list_checkpoints(&out).is_empty() {
        p.line(&format!(
            "note: {} already holds checkpoints; they are not used (set auto_resume_from_checkpoints: true to continue)",
            out.display()
        ));
    }
    cfg.write_resolved(&out)?;
    for w in cfg.warnings() {
        p.line(&format!("warning: {w}"));
    }

    // Base model, tokenizer, data (in the background).
    let model_path = resolve_model_path(cfg)?;
    let mut tok = tokenizer::load_for_model(&model_path)?;
    apply_special_tokens(cfg, &mut tok)?;
    let data = DataPipeline::from_config(cfg, &tok)?;
    let opened = model::open(&model_path)?;
    let mcfg = opened.config.clone();
    let facts = config::ModelFacts {
        linear_modules: model::loader::expected_tensors(&mcfg)
            .into_iter()
            // Every 2-D weight but the embeddings: the linears, and lm_head only when it is not tied.
            .filter_map(|(n, s)| {
                (s.len() == 2 && n != "model.embed_tokens.weight")
                    .then(|| n.trim_end_matches(".weight").to_string())
            })
            .collect(),
        num_layers: mcfg.num_hidden_layers,
        max_position_embeddings: Some(mcfg.max_position_embeddings),
        has_chat_template: tok.chat_template.is_some(),
    };
    for w in cfg.check_model(&facts).map_err(Error::from)? {
        p.line(&format!("warning: {w}"));
    }
    let t_load = Instant::now();
    let mut model = CausalLm::<B>::load(mcfg.clone(), opened.source.as_ref(), &device, dtype)?;
    let settings = lora_settings(cfg, mcfg.family);
    let report = if let Some(d) = &resume_dir {
        let a = read_adapter(d)?;
        apply_adapter(&mut model, &a)?;
        crate::lora::adapter::report(&model, a.modules.keys().cloned().collect())
    } else {
        attach(&mut model, &settings)?
    };
    set_trainable(&mut model);
    p.line(&format!(
        "model {} ({}, {:?}) loaded in {:.1}s; {report}",
        model_path.display(),
        mcfg.architecture(),
        dtype,
        t_load.elapsed().as_secs_f64()
    ));

    // Data.
    let data_facts = data.data_facts()?;
    for w in cfg.check_data(&data_facts).map_err(Error::from)? {
        p.line(&format!("warning: {w}"));
    }
    let per_epoch = data.batches_in_epoch(0)? as u64;
    let total = cfg.total_steps(per_epoch);
    let warmup = cfg.warmup_steps_for(total);
    let sched = Schedule {
        kind: match cfg.lr_scheduler {
            names::LrScheduler::Constant => ScheduleKind::Constant,
            names::LrScheduler::Linear => ScheduleKind::Linear,
            names::LrScheduler::Cosine => ScheduleKind::Cosine,
        },
        base_lr: cfg.learning_rate,
        warmup,
        total,
        min_ratio: cfg.cosine_min_lr_ratio.unwrap_or(0.0),
    };
    let ga = cfg.gradient_accumulation_steps.max(1);
    let eval_batches: Vec<Batch> = data.eval_batches()?.collect::<Result<_>>()?;
    p.line(&format!(
        "data: {} training {} ({} micro-batches of {} per epoch), {} eval samples; {} optimizer steps (warmup {warmup})",
        data_facts.train_samples,
        if cfg.sample_packing { "packed rows" } else { "samples" },
        per_epoch,
        cfg.micro_batch_size,
        data_facts.eval_samples,
        total
    ));

    // Optimizer and state.
    let keys: Vec<String> = lora_params(&model).into_iter().map(|(k, _)| k).collect();
    let mut opt = AdamW::<B::InnerBackend>::new(
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
        keys.len(),
    );
    let mut state = TrainerState {
        format: FORMAT,
        global_step: 0,
        adam_step: 0,
        loader_state: serde_json::Value::Null,
        config_hash: hash.clone(),
        best_eval_loss: None,
        evals_without_improvement: 0,
        trained_tokens: 0,
        train_seconds: 0.0,
        metrics_lines: 0,
    };
    let mut loader_state: Option<LoaderState> = None;
    if let (Some(st), Some(d)) = (&resume_state, &resume_dir) {
        checkpoint::load_optimizer(d, &keys, &mut opt, st.adam_step, &device)?;
        loader_state = Some(
            serde_json::from_value(st.loader_state.clone()).map_err(|e| {
                Error::Train(format!(
                    "{}: unreadable data-loader state: {e}",
                    d.display()
                ))
            })?,
        );
        state = st.clone();
        p.line(&format!(
            "resuming from {} at step {}/{}",
            d.display(),
            st.global_step,
            total
        ));
    }
    let mut loader = data.train_loader(loader_state.as_ref())?;
    let mut metrics = MetricsWriter::open(&out, state.metrics_lines)?;
    let log_every = cfg.logging_steps_for(total).max(1);
    let eval_every = cfg
        .eval_steps
        .unwrap_or(per_epoch.div_ceil(ga as u64).max(1));
    let save_every = cfg
        .save_steps
        .unwrap_or(per_epoch.div_ceil(ga as u64).max(1));

    let bar = Printer::new(opts.progress, total, state.global_step);
    let base_name = cfg.base_model.clone();
    let mut losses = Vec::new();
    let (mut window_loss, mut window_n, mut window_tokens, mut window_t) =
        (0.0, 0u64, 0usize, Instant::now());
    let (mut inv_trained, mut inv_real) = (0usize, 0usize);
    let t_loop = Instant::now();
    let mut last_eval: Option<f64> = None;
    let mut stopped_early = false;
    let mut steps_this_run = 0u64;
    let mut last_ckpt: Option<PathBuf> = resume_dir.clone();
    while state.global_step < total {
        let step = state.global_step;
        let mut micro: Vec<Batch> = Vec::with_capacity(ga);
        for _ in 0..ga {
            match loader.next() {
                Some(b) => micro.push(b?),
                None => {
                    return Err(Error::Train(
                        "the training data stream ended unexpectedly".into(),
                    ))
                }
            }
        }
        let pairs: Vec<_> = micro
            .iter()
            .map(|b| (&b.tokens, b.labels.as_slice()))
            .collect();
        let lr = sched.lr(step);
        let stats = train_step(
            &mut model,
            &mut opt,
            &pairs,
            StepConfig {
                lr,
                max_grad_norm: cfg.max_grad_norm,
                seed: cfg.seed,
                step,
            },
        )
        .map_err(|e| {
            let keep = last_ckpt
                .as_ref()
                .map(|d| format!(" The last good checkpoint is {}.", d.display()))
                .unwrap_or_else(|| " No checkpoint was written yet.".into());
            Error::Train(format!("{e}{keep}"))
        })?;
        state.global_step += 1;
        state.adam_step = opt.step;
        state.trained_tokens += stats.trained_tokens as u64;
        steps_this_run += 1;
        inv_trained += stats.trained_tokens;
        inv_real += stats.real_tokens;
        losses.push(stats.loss);
        window_loss += stats.loss;
        window_n += 1;
        window_tokens += stats.real_tokens;
        let s = state.global_step;
        let epoch = s as f64 * ga as f64 / per_epoch.max(1) as f64;
        bar.step(
            s,
            format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                stats.loss,
                lr,
                inv_real as f64 / t_loop.elapsed().as_secs_f64()
            ),
        );
        if s % log_every == 0 || s == total {
            let dt = window_t.elapsed().as_secs_f64();
            let line = MetricLine {
                step: s,
                loss: Some(window_loss / window_n as f64),
                lr: Some(lr),
                grad_norm: Some(stats.grad_norm),
                tokens_per_second: Some(window_tokens as f64 / dt.max(1e-9)),
                eval_loss: None,
                eval_perplexity: None,
                epoch: Some(epoch),
            };
            metrics.write(&line)?;
            if bar.bar.is_none() {
                bar.line(&format!(
                    "step {s}/{total} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s epoch {:.2}",
                    window_loss / window_n as f64,
                    lr,
                    stats.grad_norm,
                    window_tokens as f64 / dt.max(1e-9),
                    epoch
                ));
            }
            (window_loss, window_n, window_tokens, window_t) = (0.0, 0, 0, Instant::now());
        }
        let is_last = s == total;
        if !eval_batches.is_empty() && (s % eval_every == 0 || is_last) {
            if let Some((l, ppl)) = eval(&model.valid(), &eval_batches) {
                last_eval = Some(l);
                metrics.write(&MetricLine {
                    step: s,
                    loss: None,
                    lr: None,
                    grad_norm: None,
                    tokens_per_second: None,
                    eval_loss: Some(l),
                    eval_perplexity: Some(ppl),
                    epoch: Some(epoch),
                })?;
                bar.line(&format!("step {s}: eval loss {l:.4}, perplexity {ppl:.2}"));
                if state.best_eval_loss.is_none_or(|b| l < b) {
                    state.best_eval_loss = Some(l);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
                if let Some(pat) = cfg.early_stopping_patience {
                    if state.evals_without_improvement >= pat {
                        bar.line(&format!(
                            "early stopping: eval loss has not improved for {pat} evaluations"
                        ));
                        stopped_early = true;
                    }
                }
            }
        }
        if s % save_every == 0 || is_last || stopped_early {
            state.loader_state =
                serde_json::to_value(loader.state()).map_err(|e| Error::Train(e.to_string()))?;
            state.train_seconds += t_loop.elapsed().as_secs_f64();
            state.metrics_lines = metrics.lines;
            let d = checkpoint::save(
                &out,
                &model,
                &settings,
                &base_name,
                &opt,
                &state,
                cfg.save_total_limit,
            )?;
            state.train_seconds -= t_loop.elapsed().as_secs_f64();
            last_ckpt = Some(d);
        }
        if stopped_early {
            break;
        }
        if opts.stop_after.is_some_and(|n| steps_this_run >= n) && !is_last {
            bar.finish();
            return Ok(RunSummary {
                output_dir: out,
                adapter_dir: None,
                merged_dir: None,
                steps: state.global_step,
                total_steps: total,
                losses,
                best_eval_loss: state.best_eval_loss,
                final_eval_loss: last_eval,
                seconds: t_start.elapsed().as_secs_f64(),
                trained_tokens_per_second: inv_trained as f64 / t_loop.elapsed().as_secs_f64(),
                tokens_per_second: inv_real as f64 / t_loop.elapsed().as_secs_f64(),
                resumed_from: resume_dir,
                stopped_early: false,
                interrupted: true,
            });
        }
    }
    bar.finish();
    let loop_secs = t_loop.elapsed().as_secs_f64();

    // Outputs.
    let adapter_dir = out.join("adapter");
    save_adapter(&model, &settings, &base_name, &adapter_dir)?;
    let merged_dir = if cfg.merge_lora {
        let d = out.join("merged");
        let adapter = read_adapter(&adapter_dir)?;
        let dtype = match cfg.export_dtype {
            names::ExportDtype::F32 => crate::export::safetensors::OutDtype::F32,
            names::ExportDtype::Bf16 => crate::export::safetensors::OutDtype::BF16,
            names::ExportDtype::F16 => crate::export::safetensors::OutDtype::F16,
            names::ExportDtype::Auto => stored_dtype(opened.source.as_ref()),
        };
        let base_gen = model_path
            .is_dir()
            .then(|| std::fs::read_to_string(model_path.join("generation_config.json")).ok())
            .flatten()
            .and_then(|t| serde_json::from_str(&t).ok());
        let eopts = crate::export::hf::MergedExportOptions {
            dtype,
            shard_size: Some(cfg.merged_shard_size.bytes),
            extra_eos_ids: tok.generation_stop_ids(),
            base_generation_config: base_gen,
        };
        let from_dir = model_path.is_dir();
        crate::export::merge::merge_to_folder(&opened, Some(&adapter), &d, &eopts, &|dst| {
            if from_dir {
                crate::export::hf::copy_tokenizer_files(&model_path, dst).map(|_| ())
            } else {
                tok.to_hf_files(dst)
            }
        })?;
        Some(d)
    } else {
        None
    };
    if let Ok(m) = super::report::read_metrics(&out) {
        let svg = loss_curve_svg(&m, &format!("loratune — {}", cfg.base_model));
        crate::export::atomic::write_atomic(&out.join("loss_curve.svg"), svg.as_bytes())?;
    }
    let summary = RunSummary {
        output_dir: out.clone(),
        adapter_dir: Some(adapter_dir),
        merged_dir,
        steps: state.global_step,
        total_steps: total,
        losses,
        best_eval_loss: state.best_eval_loss,
        final_eval_loss: last_eval,
        seconds: t_start.elapsed().as_secs_f64(),
        trained_tokens_per_second: inv_trained as f64 / loop_secs.max(1e-9),
        tokens_per_second: inv_real as f64 / loop_secs.max(1e-9),
        resumed_from: resume_dir,
        stopped_early,
        interrupted: false,
    };
    Ok(summary)
}

/// The dominant floating-point dtype a checkpoint stores (f32 for quantised GGUF bases).
fn stored_dtype(src: &dyn crate::model::TensorSource) -> crate::export::safetensors::OutDtype {
    use crate::export::safetensors::OutDtype;
    use crate::model::StoredDtype;
    let mut counts = [0usize; 3];
    for n in src.names() {
        match src.stored_dtype(&n) {
            Some(StoredDtype::BF16) => counts[1] += 1,
            Some(StoredDtype::F16) => counts[2] += 1,
            _ => counts[0] += 1,
        }
    }
    if counts[1] > counts[0] && counts[1] >= counts[2] {
        OutDtype::BF16
    } else if counts[2] > counts[0] {
        OutDtype::F16
    } else {
        OutDtype::F32
    }
}

/// `loratune eval`: eval loss and perplexity of the base model with an adapter on the config's eval set.
pub fn evaluate(cfg: &TrainConfig, adapter: Option<&Path>) -> Result<(f64, f64, usize)> {
    type Cpu = burn::backend::Flex;
    let model_path = resolve_model_path(cfg)?;
    let mut tok = tokenizer::load_for_model(&model_path)?;
    apply_special_tokens(cfg, &mut tok)?;
    let data = DataPipeline::from_config(cfg, &tok)?;
    let opened = model::open(&model_path)?;
    let device = Default::default();
    let mut m = CausalLm::<Cpu>::load(
        opened.config.clone(),
        opened.source.as_ref(),
        &device,
        DType::F32,
    )?;
    let default_adapter = cfg.output_dir.join("adapter");
    let adapter = adapter
        .map(Path::to_path_buf)
        .or_else(|| default_adapter.is_dir().then_some(default_adapter));
    if let Some(a) = &adapter {
        crate::lora::peft::load_adapter(&mut m, a)?;
    }
    let batches: Vec<Batch> = data.eval_batches()?.collect::<Result<_>>()?;
    if batches.is_empty() {
        return Err(Error::Config(
            "there is no evaluation set: set val_set_size (e.g. 0.05) or test_datasets in the config".into(),
        ));
    }
    let pairs: Vec<_> = batches
        .iter()
        .map(|b| (&b.tokens, b.labels.as_slice()))
        .collect();
    let (sum, n) = eval_loss(&m, &pairs);
    let l = sum / n.max(1) as f64;
    Ok((l, l.exp(), n))
}
