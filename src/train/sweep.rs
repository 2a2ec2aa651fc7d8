//! `loratune sweep`: a [`SweepPlan`]'s trials run one after another in this process, each an ordinary [`train`]
//! in its own folder. Grid and random run every trial to its end; `halving` runs every trial to the first rung's
//! budget (a checkpoint), keeps the best 1/eta, continues those from their checkpoints to the next budget, and so
//! on. Every trial's schedule spans `max_steps` from the start, so a continued trial is exactly the run it would
//! have been uninterrupted. `sweep.json` records each trial's metric per rung: a sweep started again skips what
//! is recorded, and a trial that was interrupted resumes from its newest checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::report::read_metrics;
use super::run::{train, ProgressMode, RunOptions};
use crate::config::sweep::{survivors, SweepMetric, SweepPlan};
use crate::config::SweepGoal;
use crate::error::{Error, Result};
use crate::export::atomic::{write_atomic, FolderLock};

/// The sweep's record in its folder.
pub const STATE_FILE: &str = "sweep.json";

/// `sweep.json`: the plan's identity and what each trial reached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepState {
    pub fingerprint: String,
    pub method: String,
    pub metric: String,
    pub goal: String,
    /// `halving`'s rung budgets (optimizer steps); empty for grid/random.
    pub rungs: Vec<u64>,
    pub trials: Vec<TrialRecord>,
    /// The best trial's number once the sweep has finished.
    pub best: Option<usize>,
    pub finished: bool,
}

/// One trial in `sweep.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrialRecord {
    pub number: usize,
    pub name: String,
    /// Its folder (relative paths as the config wrote `output_dir`).
    pub dir: PathBuf,
    /// The swept keys and values.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The metric at the end of each rung it ran (`null`: not measurable, e.g. a NaN loss).
    pub results: Vec<Option<f64>>,
    /// The last error, if its last attempt failed (it is tried again when the sweep is started again).
    pub error: Option<String>,
    /// Wall seconds spent on it by this and earlier invocations.
    pub seconds: f64,
    /// Early stopping ended it before its budget: later rungs keep its last result and do not run it.
    #[serde(default)]
    pub stopped_early: bool,
}

/// How to run a sweep (not part of its config).
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    /// Progress display of each trial.
    pub progress: ProgressMode,
    /// Stop (as if killed) after this many optimizer steps of the current trial — testing only.
    pub stop_after: Option<u64>,
}

/// What a sweep did.
#[derive(Debug, Clone)]
pub struct SweepSummary {
    pub state: SweepState,
    pub output_dir: PathBuf,
    /// Trials run (or continued) by this invocation.
    pub ran: usize,
    /// Trials skipped because `sweep.json` already held their result.
    pub skipped: usize,
    pub seconds: f64,
}

impl SweepSummary {
    /// Trials whose last attempt failed.
    pub fn failed(&self) -> Vec<&TrialRecord> {
        self.state
            .trials
            .iter()
            .filter(|t| t.error.is_some())
            .collect()
    }
}

fn state_path(plan: &SweepPlan) -> PathBuf {
    plan.output_dir.join(STATE_FILE)
}

/// Read a sweep folder's `sweep.json`.
pub fn read_state(dir: &Path) -> Result<SweepState> {
    let path = dir.join(STATE_FILE);
    let text = crate::error::read_to_string(&path)?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path, source })
}

fn save_state(plan: &SweepPlan, state: &SweepState) -> Result<()> {
    let text = serde_json::to_vec_pretty(state).map_err(|e| Error::Serialize {
        what: STATE_FILE.into(),
        source: Box::new(e),
    })?;
    write_atomic(&state_path(plan), &text)
}

fn fresh_state(plan: &SweepPlan) -> SweepState {
    SweepState {
        fingerprint: plan.fingerprint.clone(),
        method: plan.method.name().into(),
        metric: plan.metric.name(),
        goal: plan.goal.name().into(),
        rungs: plan.rungs.clone(),
        trials: plan
            .trials
            .iter()
            .map(|t| TrialRecord {
                number: t.number,
                name: t.name.clone(),
                dir: t.config.output_dir.clone(),
                params: t
                    .params
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                        )
                    })
                    .collect(),
                results: Vec::new(),
                error: None,
                seconds: 0.0,
                stopped_early: false,
            })
            .collect(),
        best: None,
        finished: false,
    }
}

/// The metric of a run folder: its last value at or before `at` (the whole run when `None`).
pub fn metric_of(dir: &Path, metric: SweepMetric, at: Option<u64>) -> Option<f64> {
    let lines = read_metrics(dir).ok()?;
    lines
        .iter()
        .rev()
        .filter(|l| at.is_none_or(|a| l.step <= a))
        .find_map(|l| match metric {
            SweepMetric::EvalLoss => l.eval_loss,
            SweepMetric::TrainLoss => l.loss,
            SweepMetric::Task(m) => l.task.as_ref().and_then(|t| t.get(m.name()).copied()),
        })
        .filter(|v| v.is_finite())
}

/// The order of `entrants` from best to worst by their result at `rung` (unmeasured last, ties by number).
pub fn ranked(state: &SweepState, entrants: &[usize], rung: usize, goal: SweepGoal) -> Vec<usize> {
    let value = |i: usize| state.trials[i].results.get(rung).copied().flatten();
    let mut order = entrants.to_vec();
    order.sort_by(|&a, &b| {
        let o = match (value(a), value(b)) {
            (Some(x), Some(y)) => match goal {
                SweepGoal::Minimize => x.total_cmp(&y),
                SweepGoal::Maximize => y.total_cmp(&x),
            },
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        o.then(a.cmp(&b))
    });
    order
}

/// Keys that cannot change a model before its first update: the adapter starts as the identity (B = 0) whatever
/// its rank, scale, dropout or targets, and the rest only shapes the training.
const TRAINING_ONLY_KEYS: &[&str] = &[
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "peft_use_rslora",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_epochs",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optimizer",
    "loraplus_lr_ratio",
    "loraplus_lr_embedding",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "seed",
];

/// The earlier trial whose answers before training trial `i` can reuse: the first trial, when the two differ
/// only in [`TRAINING_ONLY_KEYS`] (and where runs write), and the adapter starts as the identity (standard
/// initialisation; not DoRA, whose magnitude is recomputed, nor PiSSA/OLoRA, which change the base).
fn baseline_donor(plan: &SweepPlan, i: usize) -> Option<PathBuf> {
    let (first, this) = (&plan.trials.first()?.config, &plan.trials[i].config);
    if i == 0 || first.eval_generate.is_none() {
        return None;
    }
    let identity = |c: &crate::config::TrainConfig| !c.peft_use_dora && !c.lora_init.is_principal();
    if !identity(first) || !identity(this) {
        return None;
    }
    let strip = |c: &crate::config::TrainConfig| {
        let mut v = serde_json::to_value(c).ok()?;
        let obj = v.as_object_mut()?;
        for k in TRAINING_ONLY_KEYS
            .iter()
            .chain(crate::config::TrainConfig::HASH_EXCLUDED_KEYS)
        {
            obj.remove(*k);
        }
        Some(v)
    };
    (strip(first)? == strip(this)?).then(|| first.output_dir.clone())
}

/// Successive halving's step: the best 1/eta of `entrants` by their result at `rung` (at least one), in trial
/// order.
pub fn promoted(
    state: &SweepState,
    entrants: &[usize],
    rung: usize,
    goal: SweepGoal,
    eta: usize,
) -> Vec<usize> {
    let mut keep = ranked(state, entrants, rung, goal);
    keep.truncate(survivors(entrants.len(), eta));
    keep.sort();
    keep
}

/// Run (or continue) the sweep.
pub fn run_sweep(plan: &SweepPlan, opts: &SweepOptions) -> Result<SweepSummary> {
    let t0 = Instant::now();
    let out = &plan.output_dir;
    let nodes = plan.trials.first().map_or(1, |t| t.config.nodes);
    if nodes > 1 || std::env::var("WORLD_SIZE").is_ok_and(|w| w.trim() != "1") {
        return Err(Error::Config(
            "a sweep runs its trials on this machine (its `devices` train each trial data-parallel); it cannot \
             span several nodes — remove `nodes` (and torchrun's WORLD_SIZE), or run each trial's config with \
             `loratune train` on every node"
                .into(),
        ));
    }
    // One sweep per folder at a time; trials lock their own folders.
    let _lock = FolderLock::acquire(out)?;
    let mut state = if state_path(plan).is_file() {
        let s = read_state(out)?;
        if s.fingerprint != plan.fingerprint {
            return Err(Error::Config(format!(
                "{}: this folder holds another sweep (its method, metric, rungs or trials differ from the config's); \
                 set another output_dir, or delete {} to start this one over",
                out.display(),
                state_path(plan).display()
            )));
        }
        s
    } else {
        let s = fresh_state(plan);
        save_state(plan, &s)?;
        s
    };
    let say = |line: &str| {
        if opts.progress != ProgressMode::Quiet {
            eprintln!("{line}");
        }
    };
    let budgets: Vec<Option<u64>> = if plan.rungs.is_empty() {
        vec![None]
    } else {
        plan.rungs.iter().copied().map(Some).collect()
    };
    say(&format!(
        "sweep: {} trials ({}), ranked by {} ({}){}; folder {}",
        plan.trials.len(),
        state.method,
        state.metric,
        state.goal,
        if plan.rungs.is_empty() {
            String::new()
        } else {
            format!(
                ", rungs at {} steps keeping 1/{} each time",
                plan.rungs
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(" → "),
                plan.eta
            )
        },
        out.display()
    ));
    let (mut ran, mut skipped) = (0, 0);
    let mut entrants: Vec<usize> = (0..plan.trials.len()).collect();
    for (r, budget) in budgets.iter().enumerate() {
        let last_rung = r + 1 == budgets.len();
        for &i in &entrants {
            let trial = &plan.trials[i];
            let rec = &state.trials[i];
            if rec.results.len() > r {
                skipped += 1;
                say(&format!(
                    "== trial {}/{} {}: done earlier ({} {})",
                    trial.number,
                    plan.trials.len(),
                    trial.name,
                    state.metric,
                    show(rec.results[r])
                ));
                continue;
            }
            if rec.stopped_early {
                let v = rec.results.last().copied().flatten();
                state.trials[i].results.push(v);
                save_state(plan, &state)?;
                continue;
            }
            say(&format!(
                "== trial {}/{}{} {}",
                trial.number,
                plan.trials.len(),
                match budget {
                    Some(b) if budgets.len() > 1 =>
                        format!(" (rung {}/{}: to step {b})", r + 1, budgets.len()),
                    _ => String::new(),
                },
                trial.describe()
            ));
            let t = Instant::now();
            let run_opts = RunOptions {
                stop_after: opts.stop_after,
                progress: opts.progress,
                pause_at: if last_rung { None } else { *budget },
                pause_asks: matches!(plan.metric, SweepMetric::Task(_)),
                baseline_from: baseline_donor(plan, i),
            };
            let outcome = train(&trial.config, &run_opts);
            let rec = &mut state.trials[i];
            rec.seconds += t.elapsed().as_secs_f64();
            ran += 1;
            match outcome {
                Ok(s) if s.interrupted && !s.paused => {
                    // `stop_after`: as if killed; nothing is recorded.
                    save_state(plan, &state)?;
                    return Ok(SweepSummary {
                        state,
                        output_dir: out.clone(),
                        ran,
                        skipped,
                        seconds: t0.elapsed().as_secs_f64(),
                    });
                }
                Ok(s) => {
                    rec.stopped_early = s.stopped_early;
                    let v = metric_of(&trial.config.output_dir, plan.metric, *budget);
                    rec.results.truncate(r);
                    rec.results.push(v);
                    rec.error = None;
                    say(&format!(
                        "== trial {} {}: {} {}",
                        trial.number,
                        trial.name,
                        state.metric,
                        show(v)
                    ));
                }
                Err(e) => {
                    say(&format!(
                        "== trial {} {} failed: {e}",
                        trial.number, trial.name
                    ));
                    rec.error = Some(e.to_string());
                }
            }
            save_state(plan, &state)?;
        }
        if last_rung {
            break;
        }
        let order = ranked(&state, &entrants, r, plan.goal);
        let next = promoted(&state, &entrants, r, plan.goal, plan.eta);
        let keep = next.len();
        say(&format!(
            "== rung {}/{} (step {}): {} go on — {}",
            r + 1,
            budgets.len(),
            budget.unwrap_or(0),
            keep,
            order
                .iter()
                .map(|&i| format!(
                    "{}{} {}",
                    if next.contains(&i) { "✓ " } else { "" },
                    plan.trials[i].number,
                    show(state.trials[i].results.get(r).copied().flatten())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        entrants = next;
    }
    let last = budgets.len() - 1;
    let finalists: Vec<usize> = (0..plan.trials.len())
        .filter(|&i| {
            state.trials[i]
                .results
                .get(last)
                .copied()
                .flatten()
                .is_some()
        })
        .collect();
    state.best = ranked(&state, &finalists, last, plan.goal)
        .first()
        .map(|&i| plan.trials[i].number);
    state.finished = state.trials.iter().all(|t| t.error.is_none());
    save_state(plan, &state)?;
    Ok(SweepSummary {
        state,
        output_dir: out.clone(),
        ran,
        skipped,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn show(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{x:.4}"))
}

/// Task metric → mean score.
pub type TaskMeans = BTreeMap<String, f64>;

/// The task metrics of a run before training (step 0) and at its end, from its metrics.jsonl.
pub fn task_before_after(dir: &Path) -> (Option<TaskMeans>, Option<TaskMeans>) {
    let lines: Vec<_> = read_metrics(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.task.is_some())
        .collect();
    (
        lines
            .iter()
            .find(|l| l.step == 0)
            .and_then(|l| l.task.clone()),
        lines
            .last()
            .filter(|l| l.step > 0)
            .and_then(|l| l.task.clone()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_only_keys_are_config_keys() {
        for k in TRAINING_ONLY_KEYS {
            assert!(crate::config::TrainConfig::known_keys().contains(k), "{k}");
        }
    }

    fn state(results: &[&[Option<f64>]]) -> SweepState {
        SweepState {
            fingerprint: String::new(),
            method: "halving".into(),
            metric: "eval_loss".into(),
            goal: "minimize".into(),
            rungs: vec![],
            trials: results
                .iter()
                .enumerate()
                .map(|(i, r)| TrialRecord {
                    number: i + 1,
                    name: format!("t{i}"),
                    dir: PathBuf::new(),
                    params: Default::default(),
                    results: r.to_vec(),
                    error: None,
                    seconds: 0.0,
                    stopped_early: false,
                })
                .collect(),
            best: None,
            finished: false,
        }
    }

    /// A deterministic fake metric: trial i scores (i·7 mod 9) at the first rung, so the order is known by hand.
    #[test]
    fn halving_keeps_the_best_third_then_the_best() {
        let first: Vec<Option<f64>> = (0..9).map(|i| Some(((i * 7) % 9) as f64)).collect();
        // scores: t0 0, t1 7, t2 5, t3 3, t4 1, t5 8, t6 6, t7 4, t8 2
        let rows: Vec<Vec<Option<f64>>> = first.iter().map(|v| vec![*v]).collect();
        let refs: Vec<&[Option<f64>]> = rows.iter().map(|r| r.as_slice()).collect();
        let s = state(&refs);
        let all: Vec<usize> = (0..9).collect();
        assert_eq!(promoted(&s, &all, 0, SweepGoal::Minimize, 3), vec![0, 4, 8]);
        assert_eq!(promoted(&s, &all, 0, SweepGoal::Maximize, 3), vec![1, 5, 6]);
        assert_eq!(
            promoted(&s, &all, 0, SweepGoal::Minimize, 2),
            vec![0, 3, 4, 8]
        );
        // An unmeasured trial (NaN loss, failure) ranks last; ties go to the lower number.
        let s = state(&[&[Some(1.0)], &[None], &[Some(1.0)], &[Some(0.5)]]);
        assert_eq!(
            promoted(&s, &[0, 1, 2, 3], 0, SweepGoal::Minimize, 2),
            vec![0, 3]
        );
        assert_eq!(
            promoted(&s, &[0, 1, 2, 3], 0, SweepGoal::Maximize, 2),
            vec![0, 2]
        );
        assert_eq!(promoted(&s, &[1], 0, SweepGoal::Minimize, 3), vec![1]);
    }
}
