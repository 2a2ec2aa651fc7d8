//! `loratune train` as a recipe: [`Run::setup`] builds every component from the config (resume point, model,
//! tokenizer, data, adapter, optimizer, schedule), [`Run::train`] is the loop, [`Run::finish`] writes the adapter,
//! the merged model and the loss curve. [`train`] runs the three on the backend the config's device asks for.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{self, TrainerState, FORMAT};
use super::optim::AdamW;
use super::parallel::{self, Layout, Peer};
use super::report::{loss_curve_svg, MetricLine, MetricsWriter};
use super::schedule::Schedule;
use super::step::{eval_loss, train_step_on, StepConfig, StepStats};
use crate::backend::{InferJob, PeersJob, Placement, TrainJob};
use crate::config::{ModelFacts, TrainConfig};
use crate::data::DATA_REPORT;
use crate::data::{Batch, LoaderState, TrainLoader};
use crate::error::{Error, Result};
use crate::export::atomic::{remove_stale_staging, write_atomic, FolderLock};
use crate::generate::score::{evaluate_task, read_heldout, Heldout, TaskOptions};
use crate::kernels::{Kernels, TrainBackend};
use crate::lora::adapter::{attach, lora_params, report, set_trainable, LoraSettings};
use crate::lora::peft::{apply_adapter, load_adapter, read_adapter, save_adapter};
use crate::model::{self, CausalLm, OpenedModel};
use crate::tokenizer::LoadedTokenizer;

/// How to run (things that are not part of the experiment's config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop abruptly (no final save, no export — as if the process were killed) after this many optimizer steps
    /// of this invocation. For testing resume.
    pub stop_after: Option<u64>,
    /// Progress display.
    pub progress: ProgressMode,
    /// Pause at this optimizer step (a sweep's rung): evaluate (eval loss; the task questions too with
    /// `pause_asks`) unless that step's evaluation already ran, save a checkpoint and stop without the final
    /// export. The schedule keeps its full horizon, so resuming continues exactly the uninterrupted run.
    pub pause_at: Option<u64>,
    /// Ask the `eval_generate` questions at the pause.
    pub pause_asks: bool,
    /// A run folder whose answers before training (`eval_generate/step-0.jsonl` and its means) are this run's too:
    /// a sweep's trials that differ only in what cannot change the model before its first update (a LoRA
    /// adapter starts as the identity) ask the base model the same questions once.
    pub baseline_from: Option<PathBuf>,
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
    /// No final save or export: `stop_after` or `pause_at` ended this invocation.
    pub interrupted: bool,
    /// `pause_at` ended it (a checkpoint at that step was written).
    pub paused: bool,
    /// The node this process is in a multi-node run (`None` on one node): only node 0 writes the run folder.
    pub peer_node: Option<usize>,
    /// `eval_generate`: the task metrics before training (step 0) and the last ones recorded.
    pub task_baseline: Option<std::collections::BTreeMap<String, f64>>,
    pub task_final: Option<std::collections::BTreeMap<String, f64>>,
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every step ran.
    Finished,
    /// Early stopping: the eval loss stopped improving.
    StoppedEarly,
    /// `stop_after` steps ran (as if the process had been killed: no final save, no export).
    Interrupted,
    /// `pause_at` was reached: evaluated, checkpointed, no export.
    Paused,
}

/// Train according to `cfg`: on one device, or as this node's peers of a data-parallel run (`devices`,
/// `nodes`, or torchrun's environment variables; see [`super::parallel`]).
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    struct Job<'a>(&'a TrainConfig, &'a RunOptions);
    impl TrainJob for Job<'_> {
        type Output = RunSummary;
        fn run<B: TrainBackend>(self, device: B::Device, at: Placement) -> Result<RunSummary> {
            let mut run = Run::<B>::setup(self.0, self.1, device, at)?;
            let outcome = run.train()?;
            run.finish(outcome)
        }
    }
    struct Peers(TrainConfig, RunOptions, Layout);
    impl PeersJob for Peers {
        type Output = RunSummary;
        fn run<B: TrainBackend>(
            self,
            devices: Vec<B::Device>,
            at: Placement,
        ) -> Result<RunSummary> {
            let Peers(cfg, opts, layout) = self;
            parallel::run_peers::<B::InnerBackend, _>(&layout, devices, move |peer, device| {
                let mut run = Run::<B>::setup_on(&cfg, &opts, device, at, Some(peer))?;
                let outcome = run.train()?;
                run.finish(outcome)
            })
        }
    }
    let mut cfg = cfg.clone();
    let launcher = parallel::apply_launcher_env(&mut cfg, |k| std::env::var(k).ok())?;
    let layout = Layout::of(&cfg)?;
    if cfg.devices == Some(crate::config::Devices::All) {
        // Resolved once: `micro_per_step` (every step) counts the list instead of reading /proc again.
        cfg.devices = Some(crate::config::Devices::List(layout.local.clone()));
    }
    let at = Placement::resolve(layout.local[0], cfg.bf16)?;
    if layout.world() == 1 {
        return at.train(Job(&cfg, opts));
    }
    if let (Some(note), false) = (launcher, opts.progress == ProgressMode::Quiet) {
        eprintln!("{note}");
    }
    let local = layout.local.clone();
    at.train_peers(&local, Peers(cfg, opts.clone(), layout))
}

/// A training run: everything [`Run::setup`] built, and the loop's counters.
pub struct Run<'a, B: TrainBackend> {
    cfg: &'a TrainConfig,
    opts: &'a RunOptions,
    model_path: PathBuf,
    base: OpenedModel,
    tokenizer: LoadedTokenizer,
    model: CausalLm<B>,
    settings: LoraSettings,
    opt: AdamW<B::InnerBackend>,
    schedule: Schedule,
    loader: TrainLoader,
    eval_batches: Vec<Batch>,
    metrics: MetricsWriter,
    /// What a checkpoint saves (step, optimizer step, data position, best eval loss, …).
    state: TrainerState,
    micro_per_epoch: u64,
    /// The router load-balancing coefficient (0 = off): the config's, or the model's when asked for.
    router_aux: f64,
    log_every: u64,
    eval_every: u64,
    save_every: u64,
    printer: Printer,
    resumed_from: Option<PathBuf>,
    last_checkpoint: Option<PathBuf>,
    counters: Counters,
    /// Held until the run ends.
    /// The system message most training conversations carried (for the Ollama Modelfile's SYSTEM).
    system_message: Option<(String, u64)>,
    /// `eval_generate`: the held-out questions and how they are asked.
    task: Option<(Vec<Heldout>, TaskOptions)>,
    /// This run as one peer of a data-parallel group; only rank 0 writes the run folder.
    peer: Option<Peer>,
    device: B::Device,
    _lock: Option<FolderLock>,
}

impl<'a, B: TrainBackend> Run<'a, B> {
    /// Resume point, model + tokenizer + data (prepared in the background while the model loads), adapter
    /// (attached fresh, or restored from the checkpoint), optimizer and schedule.
    pub fn setup(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        device: B::Device,
        at: Placement,
    ) -> Result<Self> {
        Self::setup_on(cfg, opts, device, at, None)
    }

    /// [`Run::setup`], as `peer` of a data-parallel group when given: every peer builds the same run (same
    /// data stream, same adapter, same resume point); only rank 0 locks and writes the run folder and prints.
    pub fn setup_on(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        device: B::Device,
        at: Placement,
        peer: Option<Peer>,
    ) -> Result<Self> {
        let t_start = Instant::now();
        let out = &cfg.output_dir;
        let writes = peer.as_ref().is_none_or(Peer::writes);
        let printer = Printer::new(if writes {
            opts.progress
        } else {
            ProgressMode::Quiet
        });
        // This node's peers set up one after another: the first tokenises and caches the data, the others read it.
        let turn = peer.as_ref().map(Peer::setup_turn);
        // One writer per run folder: lock it, then clear what killed runs left half-written.
        let lock = if writes {
            FolderLock::acquire(out)?
        } else {
            None
        };
        if writes && lock.is_none() {
            printer.line(&format!(
                "warning: {}: the file system does not support locks; make sure no other run writes here",
                out.display()
            ));
        }
        if writes {
            for p in remove_stale_staging(out, lock.is_some()) {
                printer.line(&format!(
                    "removed {} (left by an interrupted run)",
                    p.display()
                ));
            }
        }
        let (resume_dir, resume_state) = resume_point(cfg, &printer)?;
        if writes {
            cfg.write_resolved(out)?;
        }
        for line in cfg.findings() {
            printer.line(&line);
        }

        // Base model, tokenizer, data (prepared in the background).
        let model_path = cfg.base_model_path()?;
        let tokenizer = cfg.tokenizer(&model_path)?;
        let data = cfg.data_pipeline(&tokenizer)?;
        let base = model::open(&model_path)?;
        for w in cfg.check_model(&ModelFacts::of(&base.config, &tokenizer))? {
            printer.line(&format!("warning: {w}"));
        }

        // Model and adapter.
        let t_load = Instant::now();
        let mcfg = base.config.clone();
        let mut model = CausalLm::<B>::load_with(
            mcfg.clone(),
            base.source.as_ref(),
            &device,
            at.dtype,
            cfg.base_plan(),
        )?;
        let settings = cfg.lora_settings(mcfg.family);
        if cfg.router_aux_loss_coef.is_some_and(|c| c > 0.0) && mcfg.moe.is_none() {
            return Err(Error::Config(format!(
                "router_aux_loss_coef: {} is not a mixture of experts (it has no router to balance); remove the key",
                mcfg.architecture()
            )));
        }
        let lora = match &resume_dir {
            Some(d) => {
                let a = read_adapter(d)?;
                apply_adapter(&mut model, &a)?;
                report(&model, a.modules.keys().cloned().collect())
            }
            None => attach(&mut model, &settings)?,
        };
        set_trainable(&mut model);
        printer.line(&format!(
            "model {} ({}, {:?}) loaded in {:.1}s; {lora}",
            model_path.display(),
            mcfg.architecture(),
            at.dtype,
            t_load.elapsed().as_secs_f64()
        ));

        // Data: exact counts for the schedule, evaluation batches.
        let facts = data.data_facts()?;
        // Every record accounted for: the summary `data stats` prints, on screen and in the run folder.
        let stats = data.stats()?;
        printer.line(&stats.to_string());
        let report = serde_json::to_vec_pretty(&stats).map_err(|e| Error::Serialize {
            what: DATA_REPORT.into(),
            source: Box::new(e),
        })?;
        if writes {
            write_atomic(&out.join(DATA_REPORT), &report)?;
        }
        for w in cfg.check_data(&facts)? {
            printer.line(&format!("warning: {w}"));
        }
        let micro_per_epoch = data.batches_in_epoch(0)? as u64;
        let total = cfg.total_steps(micro_per_epoch);
        let schedule = cfg.schedule(total);
        let eval_batches: Vec<Batch> = data.eval_batches()?.collect::<Result<_>>()?;
        printer.line(&format!(
            "data: {} training {} ({} micro-batch{} of {} per epoch), {} eval samples; {} optimizer steps (warmup {})",
            facts.train_samples,
            if cfg.sample_packing { "packed rows" } else { "samples" },
            micro_per_epoch,
            if micro_per_epoch == 1 { "" } else { "es" },
            cfg.micro_batch_size,
            facts.eval_samples,
            total,
            schedule.warmup
        ));
        if let Some(p) = peer.as_ref().filter(|p| p.node > 0 && p.local == 0) {
            if opts.progress != ProgressMode::Quiet {
                eprintln!(
                    "node {}: {} joined ({} optimizer steps); node 0 prints the progress and writes {}",
                    p.node,
                    p.name(),
                    total,
                    out.display()
                );
            }
        }
        if let Some(p) = &peer {
            printer.line(&format!(
                "data-parallel: {} peers ({} per node × {} node{}), {} micro-batches per step, {} per peer",
                p.world,
                p.world / cfg.nodes.max(1),
                cfg.nodes,
                if cfg.nodes == 1 { "" } else { "s" },
                cfg.micro_per_step(),
                cfg.gradient_accumulation_steps.max(1)
            ));
        }
        printer.line(
            &model
                .memory(
                    cfg.micro_batch_size * cfg.sequence_len,
                    cfg.gradient_checkpointing != crate::train::recompute::Checkpointing::Off,
                    at.dtype.size(),
                )
                .to_string(),
        );

        // Optimizer and trainer state, restored exactly when resuming.
        let keys: Vec<String> = lora_params(&model).into_iter().map(|(k, _)| k).collect();
        let mut opt = AdamW::new(cfg.adamw(), keys.len());
        opt.lr_scale = cfg.lr_multipliers(&keys);
        let (state, loader) = match (&resume_state, &resume_dir) {
            (Some(st), Some(d)) => {
                checkpoint::load_optimizer(d, &keys, &mut opt, st.adam_step, &device)?;
                let ls: LoaderState =
                    serde_json::from_value(st.loader_state.clone()).map_err(|source| {
                        Error::Json {
                            path: d.join("trainer_state.json"),
                            source,
                        }
                    })?;
                printer.line(&format!(
                    "resuming from {} at step {}/{total}",
                    d.display(),
                    st.global_step
                ));
                (st.clone(), data.train_loader(Some(&ls))?)
            }
            _ => (fresh_state(cfg), data.train_loader(None)?),
        };
        let mut metrics = if writes {
            MetricsWriter::open(out, state.metrics_lines)?
        } else {
            MetricsWriter::sink()
        };
        if writes && cfg.tensorboard() {
            let resumed_at = resume_dir.is_some().then_some(state.global_step);
            let tb = super::tensorboard::EventWriter::create(
                &out.join(super::tensorboard::DIR),
                resumed_at,
            )?;
            printer.line(&format!("tensorboard: {}", tb.path().display()));
            metrics = metrics.with_tensorboard(tb);
        }
        let updates_per_epoch = micro_per_epoch.div_ceil(cfg.micro_per_step() as u64).max(1);
        drop(turn);
        let printer = printer.with_bar(total, state.global_step);
        Ok(Run {
            cfg,
            opts,
            model_path,
            base,
            tokenizer,
            model,
            settings,
            opt,
            schedule,
            loader,
            eval_batches,
            metrics,
            state,
            micro_per_epoch,
            router_aux: match mcfg.moe {
                Some(_) => cfg
                    .router_aux_coef(
                        mcfg.raw
                            .as_ref()
                            .and_then(|r| r.get("router_aux_loss_coef"))
                            .and_then(|v| v.as_f64()),
                    )
                    .unwrap_or(0.0),
                None => 0.0,
            },
            log_every: cfg.logging_steps_for(total).max(1),
            eval_every: cfg.eval_interval(total, updates_per_epoch),
            save_every: cfg.save_interval(total, updates_per_epoch),
            printer,
            last_checkpoint: resume_dir.clone(),
            resumed_from: resume_dir,
            counters: Counters::new(t_start),
            task: match &cfg.eval_generate {
                Some(eg) => Some((
                    read_heldout(
                        &cfg.resolve_path(&eg.path),
                        &eg.prompt_field,
                        &eg.answer_field,
                    )?,
                    TaskOptions {
                        metrics: eg.metrics.clone(),
                        max_new_tokens: eg.max_new_tokens,
                        batch_size: eg.batch_size,
                        system: eg
                            .system
                            .clone()
                            .or_else(|| facts.system_message.as_ref().map(|(m, _)| m.clone())),
                    },
                )),
                None => None,
            },
            system_message: facts.system_message.clone(),
            peer,
            device,
            _lock: lock,
        })
    }

    /// Whether this run writes the run folder (one device, or rank 0 of a group).
    fn writes(&self) -> bool {
        self.peer.as_ref().is_none_or(Peer::writes)
    }

    /// The loop: micro-batches → learning rate → step → log → eval when due → checkpoint when due → stop.
    pub fn train(&mut self) -> Result<Outcome> {
        if let Some(p) = &self.peer {
            p.handshake::<B::InnerBackend>(
                &self.cfg.config_hash(),
                self.state.global_step,
                &self.device,
            )?;
        }
        if self.state.global_step == 0 {
            // The baseline: the model before its first update (its adapters start as the identity). Before the
            // loop's clocks start, so that tokens/s and training time leave it out.
            self.ask_questions(self.state.train_seconds)?;
        }
        self.counters.t_loop = Instant::now();
        self.counters.window_start = self.counters.t_loop;
        while self.state.global_step < self.schedule.total {
            if self
                .opts
                .pause_at
                .is_some_and(|p| self.state.global_step >= p)
            {
                // Resumed at (or past) the pause point: nothing to do here.
                return Ok(Outcome::Paused);
            }
            // The step's micro-batches and learning rate.
            let micro = self.next_micro_batches()?;
            let lr = self.schedule.lr(self.state.global_step);
            // Forward, backward and AdamW; then count, log.
            let stats = self.step(&micro, lr)?;
            self.record(&stats, lr)?;
            // Evaluate and checkpoint when due.
            let last = self.state.global_step == self.schedule.total;
            let due = |every: u64, s: u64| s.is_multiple_of(every) || last;
            let due_eval = due(self.eval_every, self.state.global_step);
            let stop_early = due_eval && self.evaluate()? || self.counters.watchdog_tripped;
            let ask_every_eval = self
                .cfg
                .eval_generate
                .as_ref()
                .is_some_and(|e| e.at_eval_steps);
            let asked = last || stop_early || (due_eval && ask_every_eval);
            if asked {
                self.ask_questions(self.elapsed())?;
            }
            let saved = due(self.save_every, self.state.global_step) || stop_early;
            if saved {
                self.save_checkpoint()?;
            }
            // Stop early, or when interrupted.
            if stop_early {
                return Ok(Outcome::StoppedEarly);
            }
            if !last && self.opts.pause_at == Some(self.state.global_step) {
                // A sweep's rung: measure the model here (without touching early stopping's count) and save.
                if !due_eval {
                    self.measure_eval()?;
                }
                if self.opts.pause_asks && !asked {
                    self.ask_questions(self.elapsed())?;
                }
                if !saved {
                    self.save_checkpoint()?;
                }
                return Ok(Outcome::Paused);
            }
            let this_invocation = self.counters.losses.len() as u64;
            if !last && self.opts.stop_after.is_some_and(|n| this_invocation >= n) {
                return Ok(Outcome::Interrupted);
            }
        }
        Ok(Outcome::Finished)
    }

    /// The adapter, the merged model (`merge_lora`), the loss curve; and what the run did.
    pub fn finish(self, outcome: Outcome) -> Result<RunSummary> {
        self.printer.finish();
        let loop_seconds = self.counters.t_loop.elapsed().as_secs_f64();
        if matches!(outcome, Outcome::Interrupted | Outcome::Paused) || !self.writes() {
            return Ok(self.summary(outcome, None, None, loop_seconds));
        }
        let out = &self.cfg.output_dir;
        let adapter_dir = out.join("adapter");
        save_adapter(
            &self.model,
            &self.settings,
            &self.cfg.base_model,
            &adapter_dir,
        )?;
        crate::lora::peft::write_training_facts(
            &adapter_dir,
            &crate::lora::peft::TrainingFacts {
                system_message: self.system_message.clone(),
            },
        )?;
        let merged_dir = if self.cfg.merge_lora {
            let d = out.join("merged");
            crate::export::merge::write_merged_folder(
                &self.model_path,
                &self.base,
                Some(&read_adapter(&adapter_dir)?),
                &self.tokenizer,
                &d,
                self.cfg.export_dtype.resolve(self.base.source.as_ref()),
                Some(self.cfg.merged_shard_size.bytes),
            )?;
            Some(d)
        } else {
            None
        };
        if let Ok(m) = super::report::read_metrics(out) {
            let svg = loss_curve_svg(&m, &format!("loratune — {}", self.cfg.base_model));
            crate::export::atomic::write_atomic(&out.join("loss_curve.svg"), svg.as_bytes())?;
        }
        Ok(self.summary(outcome, Some(adapter_dir), merged_dir, loop_seconds))
    }

    /// The next optimizer step's micro-batches (`gradient_accumulation_steps` per peer: every peer reads them
    /// all and computes its share).
    fn next_micro_batches(&mut self) -> Result<Vec<Batch>> {
        (0..self.cfg.micro_per_step())
            .map(|_| {
                self.loader.next().unwrap_or_else(|| {
                    Err(Error::Train(
                        "the training data stream ended unexpectedly".into(),
                    ))
                })
            })
            .collect()
    }

    /// Forward, backward and AdamW over the micro-batches. A non-finite loss names the last good checkpoint.
    fn step(&mut self, micro: &[Batch], lr: f64) -> Result<StepStats> {
        let pairs: Vec<_> = micro
            .iter()
            .map(|b| (&b.tokens, b.labels.as_slice()))
            .collect();
        let settings = StepConfig {
            lr,
            max_grad_norm: self.cfg.max_grad_norm,
            seed: self.cfg.seed,
            step: self.state.global_step,
            recompute: self.cfg.gradient_checkpointing,
            router_aux_loss_coef: self.router_aux,
        };
        train_step_on(
            &mut self.model,
            &mut self.opt,
            &pairs,
            settings,
            self.peer.as_ref(),
        )
        .map_err(|e| match e {
            Error::NonFinite {
                step, what, value, ..
            } => Error::NonFinite {
                step,
                what,
                value,
                last_checkpoint: self.last_checkpoint.clone(),
            },
            other => other,
        })
    }

    /// Count the step, move the bar, write a metrics line every `logging_steps`.
    fn record(&mut self, stats: &StepStats, lr: f64) -> Result<()> {
        self.state.global_step += 1;
        self.state.adam_step = self.opt.step;
        self.state.trained_tokens += stats.trained_tokens as u64;
        let c = &mut self.counters;
        c.add(stats);
        let s = self.state.global_step;
        if stats.grad_norm == 0.0 && stats.trained_tokens > 0 && !c.warned_zero_grad {
            c.warned_zero_grad = true;
            self.printer.line(&format!(
                "warning: step {s}: the gradient norm is 0 — the adapter has stopped learning (a learning rate too \
                 high for AdamW saturates the model: lower learning_rate)"
            ));
        }
        let total = self.schedule.total;
        self.printer.step(
            s,
            format!(
                "loss {:.4} lr {} {:.0} tok/s{}",
                stats.loss,
                fmt_lr(lr),
                c.real as f64 / c.t_loop.elapsed().as_secs_f64(),
                c.memory
            ),
        );
        if !s.is_multiple_of(self.log_every) && s != total {
            return Ok(());
        }
        let (loss, tps) = c.take_window();
        if let Some(threshold) = self.cfg.loss_watchdog_threshold {
            // Axolotl's LossWatchDogCallback, on each logged loss.
            if loss > threshold {
                c.watchdog_violations += 1;
            } else {
                c.watchdog_violations = 0;
            }
            let patience = self.cfg.loss_watchdog_patience.unwrap_or(3);
            if c.watchdog_violations >= patience {
                c.watchdog_tripped = true;
                self.printer.line(&format!(
                    "warning: step {s}: the loss {loss:.4} has been above loss_watchdog_threshold {threshold} for \
                     {patience} logged steps; stopping the run (its checkpoint and adapter are written)"
                ));
            }
        }
        let epoch = self.epoch();
        let memory = self.memory_mb(s)?;
        self.metrics.write(&MetricLine {
            step: s,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(stats.grad_norm),
            aux_loss: stats.aux_loss,
            tokens_per_second: Some(tps),
            memory_mb: Some(memory.clone()),
            epoch: Some(epoch),
            elapsed_seconds: Some(self.elapsed()),
            ..MetricLine::default()
        })?;
        let mem: Vec<String> = memory.iter().map(|m| format!("{m:.0}")).collect();
        // The bar shows the last logged figures (every peer takes part in measuring them).
        self.counters.memory = format!(" mem {} MB", mem.join("/"));
        if !self.printer.has_bar() {
            self.printer.line(&format!(
                "step {s}/{total} loss {loss:.4} lr {} grad_norm {:.3} {tps:.0} tok/s epoch {epoch:.2}{}",
                fmt_lr(lr),
                stats.grad_norm,
                self.counters.memory
            ));
        }
        Ok(())
    }

    /// Memory per peer in MB (see [`MetricLine::memory_mb`]); every peer of a group takes part.
    fn memory_mb(&self, step: u64) -> Result<Vec<f64>> {
        let mine = <B::InnerBackend as Kernels>::memory_reserved(&self.device)
            .map_or_else(|| crate::heap::peak_rss_bytes() as f64, |b| b as f64)
            / (1024.0 * 1024.0);
        let Some(p) = &self.peer else {
            return Ok(vec![mine]);
        };
        let mut v = vec![0.0; p.world];
        v[p.rank] = mine;
        p.sum_f64::<B::InnerBackend>(&v, &format!("step {step}'s memory figures"), &self.device)
    }

    /// `eval_generate`: ask the held-out questions (greedy, batched), write each answer and its scores to
    /// `eval_generate/step-N.jsonl`, and record the means (with `elapsed` seconds of training).
    fn ask_questions(&mut self, elapsed: f64) -> Result<()> {
        let Some((items, opts)) = &self.task else {
            return Ok(());
        };
        if !self.writes() {
            // Rank 0 asks alone; the other peers go on to the next step's all-reduce and wait there.
            return Ok(());
        }
        let s = self.state.global_step;
        let shared = match (&self.opts.baseline_from, s) {
            (Some(d), 0) => shared_baseline(d, items.len()),
            _ => None,
        };
        let r = match &shared {
            Some(r) => r.clone(),
            None => evaluate_task(&self.model.valid(), &self.tokenizer, items, opts)?,
        };
        let mut text = String::new();
        for sample in &r.samples {
            let line = serde_json::to_string(sample).map_err(|e| Error::Serialize {
                what: "eval_generate results".into(),
                source: Box::new(e),
            })?;
            text.push_str(&line);
            text.push('\n');
        }
        let dir = self.cfg.output_dir.join("eval_generate");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        write_atomic(&dir.join(format!("step-{s}.jsonl")), text.as_bytes())?;
        self.metrics.write(&MetricLine {
            step: s,
            task: Some(r.means.clone()),
            epoch: Some(self.epoch()),
            elapsed_seconds: Some(elapsed),
            ..MetricLine::default()
        })?;
        let means: Vec<String> = r.means.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
        self.printer.line(&format!(
            "step {s}: task metrics on {} held-out questions: {}{}",
            r.samples.len(),
            means.join(", "),
            match (&shared, &self.opts.baseline_from) {
                (Some(_), Some(d)) =>
                    format!(" (the base model's answers, shared from {})", d.display()),
                _ => String::new(),
            }
        ));
        Ok(())
    }

    /// Eval loss and perplexity on the eval set (when there is one), recorded; true when early stopping says stop.
    fn evaluate(&mut self) -> Result<bool> {
        let Some(l) = self.measure_eval()? else {
            return Ok(false);
        };
        if self.state.best_eval_loss.is_none_or(|b| l < b) {
            self.state.best_eval_loss = Some(l);
            self.state.evals_without_improvement = 0;
        } else {
            self.state.evals_without_improvement += 1;
        }
        let stop = self
            .cfg
            .early_stopping_patience
            .is_some_and(|p| self.state.evals_without_improvement >= p);
        if stop {
            self.printer.line(&format!(
                "early stopping: eval loss has not improved for {} evaluations",
                self.state.evals_without_improvement
            ));
        }
        Ok(stop)
    }

    /// Eval loss and perplexity on the eval set (when there is one), recorded in the metrics and on screen.
    fn measure_eval(&mut self) -> Result<Option<f64>> {
        let eval = match &self.peer {
            None => eval_on(&self.model.valid(), &self.eval_batches),
            // The peers split the eval batches like a step's micro-batches and sum their losses and counts.
            Some(_) if self.eval_batches.is_empty() => None,
            Some(p) => {
                let mine = &self.eval_batches[p.share(self.eval_batches.len())];
                let pairs: Vec<_> = mine
                    .iter()
                    .map(|b| (&b.tokens, b.labels.as_slice()))
                    .collect();
                let (sum, n) = eval_loss(&self.model.valid(), &pairs);
                let t = p.sum_f64::<B::InnerBackend>(
                    &[sum, n as f64],
                    &format!("step {}'s eval loss", self.state.global_step),
                    &self.device,
                )?;
                (t[1] > 0.0).then(|| Eval {
                    loss: t[0] / t[1],
                    perplexity: (t[0] / t[1]).exp(),
                    tokens: t[1] as usize,
                })
            }
        };
        let Some(Eval {
            loss: l,
            perplexity: ppl,
            ..
        }) = eval
        else {
            return Ok(None);
        };
        self.counters.last_eval = Some(l);
        let s = self.state.global_step;
        self.metrics.write(&MetricLine {
            step: s,
            eval_loss: Some(l),
            eval_perplexity: Some(ppl),
            epoch: Some(self.epoch()),
            elapsed_seconds: Some(self.elapsed()),
            ..MetricLine::default()
        })?;
        self.printer
            .line(&format!("step {s}: eval loss {l:.4}, perplexity {ppl:.2}"));
        Ok(Some(l))
    }

    /// Seconds of training so far: earlier sessions' (from the checkpoint) plus this session's loop.
    fn elapsed(&self) -> f64 {
        self.state.train_seconds + self.counters.t_loop.elapsed().as_secs_f64()
    }

    /// Write a checkpoint (adapter, optimizer moments, trainer state with the data position).
    fn save_checkpoint(&mut self) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        self.state.loader_state =
            serde_json::to_value(self.loader.state()).map_err(|source| Error::Json {
                path: self.cfg.output_dir.join("trainer_state.json"),
                source,
            })?;
        let loop_seconds = self.counters.t_loop.elapsed().as_secs_f64();
        self.state.train_seconds += loop_seconds;
        self.state.metrics_lines = self.metrics.lines;
        let d = checkpoint::save(
            &self.cfg.output_dir,
            &self.model,
            &self.settings,
            &self.cfg.base_model,
            &self.opt,
            &self.state,
            self.cfg.save_total_limit,
        )?;
        self.state.train_seconds -= loop_seconds;
        self.last_checkpoint = Some(d);
        Ok(())
    }

    fn epoch(&self) -> f64 {
        self.state.global_step as f64 * self.cfg.micro_per_step() as f64
            / self.micro_per_epoch.max(1) as f64
    }

    fn summary(
        &self,
        outcome: Outcome,
        adapter_dir: Option<PathBuf>,
        merged_dir: Option<PathBuf>,
        loop_seconds: f64,
    ) -> RunSummary {
        let c = &self.counters;
        let tasks: Vec<MetricLine> = if self.task.is_some() {
            super::report::read_metrics(&self.cfg.output_dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l.task.is_some())
                .collect()
        } else {
            Vec::new()
        };
        RunSummary {
            output_dir: self.cfg.output_dir.clone(),
            adapter_dir,
            merged_dir,
            steps: self.state.global_step,
            total_steps: self.schedule.total,
            losses: c.losses.clone(),
            best_eval_loss: self.state.best_eval_loss,
            final_eval_loss: c.last_eval,
            seconds: c.t_start.elapsed().as_secs_f64(),
            trained_tokens_per_second: c.trained as f64 / loop_seconds.max(1e-9),
            tokens_per_second: c.real as f64 / loop_seconds.max(1e-9),
            resumed_from: self.resumed_from.clone(),
            stopped_early: outcome == Outcome::StoppedEarly,
            interrupted: matches!(outcome, Outcome::Interrupted | Outcome::Paused),
            paused: outcome == Outcome::Paused,
            peer_node: self
                .peer
                .as_ref()
                .filter(|_| self.cfg.nodes > 1)
                .map(|p| p.node),
            task_baseline: tasks
                .iter()
                .find(|l| l.step == 0)
                .and_then(|l| l.task.clone()),
            task_final: tasks.last().and_then(|l| l.task.clone()),
        }
    }
}

/// The answers before training recorded in run folder `dir` (its `eval_generate/step-0.jsonl` and the step-0
/// means of its metrics), when it has them for `questions` questions.
fn shared_baseline(dir: &Path, questions: usize) -> Option<crate::generate::score::TaskReport> {
    let text = std::fs::read_to_string(dir.join("eval_generate/step-0.jsonl")).ok()?;
    let samples: Vec<crate::generate::score::SampleResult> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let means = super::report::read_metrics(dir)
        .ok()?
        .into_iter()
        .find(|l| l.step == 0 && l.task.is_some())?
        .task?;
    (samples.len() == questions).then_some(crate::generate::score::TaskReport { samples, means })
}

/// The checkpoint to resume from (`resume_from_checkpoint`, or the newest one with
/// `auto_resume_from_checkpoints`), with its state; a checkpoint of another configuration is refused.
fn resume_point(
    cfg: &TrainConfig,
    printer: &Printer,
) -> Result<(Option<PathBuf>, Option<TrainerState>)> {
    let out = &cfg.output_dir;
    let dir = match (
        &cfg.resume_from_checkpoint,
        cfg.auto_resume_from_checkpoints,
    ) {
        (Some(d), _) => Some(d.clone()),
        (None, true) => checkpoint::list_checkpoints(out).pop().map(|(_, d)| d),
        (None, false) => None,
    };
    let Some(dir) = dir else {
        if !checkpoint::list_checkpoints(out).is_empty() {
            printer.line(&format!(
                "note: {} already holds checkpoints; they are not used (set auto_resume_from_checkpoints: true to continue)",
                out.display()
            ));
        }
        return Ok((None, None));
    };
    let state = checkpoint::read_state(&dir)?;
    let hash = cfg.config_hash();
    if state.config_hash != hash {
        return Err(Error::CheckpointMismatch {
            checkpoint: dir,
            found: state.config_hash,
            expected: hash,
        });
    }
    Ok((Some(dir), Some(state)))
}

fn fresh_state(cfg: &TrainConfig) -> TrainerState {
    TrainerState {
        format: FORMAT,
        global_step: 0,
        adam_step: 0,
        loader_state: serde_json::Value::Null,
        config_hash: cfg.config_hash(),
        best_eval_loss: None,
        evals_without_improvement: 0,
        trained_tokens: 0,
        train_seconds: 0.0,
        metrics_lines: 0,
    }
}

/// An evaluation: loss per token, perplexity, tokens scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Evaluate `model` on `batches` without a graph; `None` when no token is scored.
pub fn eval_on<B: Kernels>(model: &CausalLm<B>, batches: &[Batch]) -> Option<Eval> {
    let pairs: Vec<_> = batches
        .iter()
        .map(|b| (&b.tokens, b.labels.as_slice()))
        .collect();
    let (sum, n) = eval_loss(model, &pairs);
    (n > 0).then(|| {
        let loss = sum / n as f64;
        Eval {
            loss,
            perplexity: loss.exp(),
            tokens: n,
        }
    })
}

/// What this invocation has done: losses, token counts, the logging window, timings.
struct Counters {
    losses: Vec<f64>,
    trained: usize,
    real: usize,
    window_loss: f64,
    window_steps: u64,
    window_tokens: usize,
    window_start: Instant,
    last_eval: Option<f64>,
    t_start: Instant,
    t_loop: Instant,
    warned_zero_grad: bool,
    /// Logged losses in a row above `loss_watchdog_threshold`, and whether they reached the patience.
    watchdog_violations: u32,
    watchdog_tripped: bool,
    /// The last logged memory figures, for the progress bar (` mem 41/41 MB`, one per peer).
    memory: String,
}

impl Counters {
    fn new(t_start: Instant) -> Self {
        Counters {
            losses: Vec::new(),
            trained: 0,
            real: 0,
            window_loss: 0.0,
            window_steps: 0,
            window_tokens: 0,
            window_start: Instant::now(),
            last_eval: None,
            t_start,
            watchdog_violations: 0,
            watchdog_tripped: false,
            t_loop: Instant::now(),
            warned_zero_grad: false,
            memory: String::new(),
        }
    }

    fn add(&mut self, s: &StepStats) {
        self.losses.push(s.loss);
        self.trained += s.trained_tokens;
        self.real += s.real_tokens;
        self.window_loss += s.loss;
        self.window_steps += 1;
        self.window_tokens += s.real_tokens;
    }

    /// Mean loss and tokens/s since the last call.
    fn take_window(&mut self) -> (f64, f64) {
        let dt = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let r = (
            self.window_loss / self.window_steps.max(1) as f64,
            self.window_tokens as f64 / dt,
        );
        self.window_loss = 0.0;
        self.window_steps = 0;
        self.window_tokens = 0;
        self.window_start = Instant::now();
        r
    }
}

/// A learning rate for progress lines: `0` (first warmup step) or three significant digits (`2.000e-4`).
fn fmt_lr(lr: f64) -> String {
    if lr == 0.0 {
        "0".to_string()
    } else {
        format!("{lr:.3e}")
    }
}

/// Progress lines and, on a terminal, a bar.
struct Printer {
    bar: Option<ProgressBar>,
    mode: ProgressMode,
}

impl Printer {
    fn new(mode: ProgressMode) -> Self {
        Printer { bar: None, mode }
    }

    /// With a progress bar over `total` steps at `start` (on a terminal, in `auto` mode).
    fn with_bar(self, total: u64, start: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (self.mode == ProgressMode::Auto && tty).then(|| {
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
        Printer { bar, ..self }
    }

    fn has_bar(&self) -> bool {
        self.bar.is_some()
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

/// `loratune eval`: the eval loss, perplexity and token count of the base model with an adapter (`adapter`, else
/// `output_dir/adapter` when it exists) on the config's eval set, on the config's device.
pub fn evaluate(cfg: &TrainConfig, adapter: Option<&Path>) -> Result<Eval> {
    struct Job<'a>(&'a TrainConfig, Option<PathBuf>);
    impl InferJob for Job<'_> {
        type Output = Eval;
        fn run<B: Kernels>(self, device: B::Device, at: Placement) -> Result<Self::Output> {
            let (cfg, adapter) = (self.0, self.1);
            let (m, tokenizer) = load_for_eval::<B>(cfg, adapter.as_deref(), &device, at)?;
            let data = cfg.data_pipeline(&tokenizer)?;
            let batches: Vec<Batch> = data.eval_batches()?.collect::<Result<_>>()?;
            eval_on(&m, &batches).ok_or_else(|| {
                Error::Config(
                    "there is no evaluation set: set val_set_size (e.g. 0.05) or test_datasets in the config"
                        .into(),
                )
            })
        }
    }
    cfg.placement()?.infer(Job(cfg, eval_adapter(cfg, adapter)))
}

/// The config's base model (and tokenizer) on `device`, with `adapter` applied when given.
fn load_for_eval<B: Kernels>(
    cfg: &TrainConfig,
    adapter: Option<&Path>,
    device: &B::Device,
    at: Placement,
) -> Result<(CausalLm<B>, LoadedTokenizer)> {
    let model_path = cfg.base_model_path()?;
    let tokenizer = cfg.tokenizer(&model_path)?;
    let base = model::open(&model_path)?;
    let mut m = CausalLm::<B>::load_with(
        base.config,
        base.source.as_ref(),
        device,
        at.dtype,
        cfg.base_plan(),
    )?;
    if let Some(a) = adapter {
        load_adapter(&mut m, a)?;
    }
    Ok((m, tokenizer))
}

/// The adapter `loratune eval` applies: the one given, else `output_dir/adapter` when it exists, else none.
fn eval_adapter(cfg: &TrainConfig, adapter: Option<&Path>) -> Option<PathBuf> {
    let default_adapter = cfg.output_dir.join("adapter");
    adapter
        .map(Path::to_path_buf)
        .or_else(|| default_adapter.is_dir().then_some(default_adapter))
}

/// `loratune eval --generate`: task metrics on held-out questions of the base model with an adapter (as
/// [`evaluate`] picks it; none with `base_only`), on the config's device. Without a system message in `opts`, the
/// adapter's recorded training system message (its `loratune.json`) is used, so the model is asked as it was trained.
pub fn evaluate_generate(
    cfg: &TrainConfig,
    adapter: Option<&Path>,
    base_only: bool,
    items: &[crate::generate::score::Heldout],
    opts: &crate::generate::score::TaskOptions,
) -> Result<crate::generate::score::TaskReport> {
    use crate::generate::score::{evaluate_task, Heldout, TaskOptions, TaskReport};
    struct Job<'a>(&'a TrainConfig, Option<PathBuf>, &'a [Heldout], TaskOptions);
    impl InferJob for Job<'_> {
        type Output = TaskReport;
        fn run<B: Kernels>(self, device: B::Device, at: Placement) -> Result<Self::Output> {
            let (cfg, adapter, items, opts) = (self.0, self.1, self.2, self.3);
            let (m, tokenizer) = load_for_eval::<B>(cfg, adapter.as_deref(), &device, at)?;
            evaluate_task(&m, &tokenizer, items, &opts)
        }
    }
    let adapter = if base_only {
        None
    } else {
        eval_adapter(cfg, adapter)
    };
    let mut opts = opts.clone();
    if opts.system.is_none() {
        if let Some(a) = &adapter {
            opts.system = crate::lora::peft::read_training_facts(a)?
                .system_message
                .map(|(m, _)| m);
        }
    }
    cfg.placement()?.infer(Job(cfg, adapter, items, opts))
}
