//! `loratune sweep` on the tiny Llama fixture: successive halving promotes the trials the metric ranks best and
//! continues them exactly; an interrupted sweep resumes without re-running finished trials.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loratune::config::sweep::SweepPlan;
use loratune::train::report::read_metrics;
use loratune::train::run::{train, ProgressMode, RunOptions};
use loratune::train::sweep::{read_state, run_sweep, SweepOptions};

use crate::common::*;

fn write_config(dir: &Path, extra: &str, sweep: &str) -> PathBuf {
    let yaml = format!(
        "base_model: {model}\n\
         datasets:\n  - path: {data}\n    type: chat_template\n\
         dataset_prepared_path: {cache}\n\
         sequence_len: 128\n\
         micro_batch_size: 4\n\
         lora_r: 8\n\
         lora_alpha: 16\n\
         lora_dropout: 0.1\n\
         lora_target_linear: true\n\
         learning_rate: 0.01\n\
         lr_scheduler: cosine\n\
         warmup_steps: 2\n\
         val_set_size: 8\n\
         seed: 7\n\
         output_dir: {out}\n\
         logging_steps: 1\n\
         {extra}\n\
         {sweep}",
        model = fixture("models/llama").display(),
        data = fixture("train/facts_chat.jsonl").display(),
        cache = dir.join("cache").display(),
        out = dir.join("sweep").display(),
    );
    let p = dir.join("sweep.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// `config` as a run of its own in `dir` (no pauses, no shared answers).
fn run_alone(
    config: &loratune::config::TrainConfig,
    dir: &Path,
) -> loratune::train::run::RunSummary {
    let mut c = config.clone();
    c.output_dir = dir.to_path_buf();
    train(
        &c,
        &RunOptions {
            progress: ProgressMode::Quiet,
            ..RunOptions::default()
        },
    )
    .unwrap()
}

fn quiet() -> SweepOptions {
    SweepOptions {
        progress: ProgressMode::Quiet,
        stop_after: None,
    }
}

/// The logged losses of a run folder, by step.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    read_metrics(dir)
        .unwrap()
        .iter()
        .filter_map(|m| m.loss.map(|l| (m.step, l)))
        .collect()
}

fn eval_at(dir: &Path, step: u64) -> f64 {
    read_metrics(dir)
        .unwrap()
        .iter()
        .rev()
        .find(|m| m.step == step && m.eval_loss.is_some())
        .and_then(|m| m.eval_loss)
        .unwrap_or_else(|| panic!("{}: no eval loss at step {step}", dir.display()))
}

#[test]
fn halving_promotes_the_best_trials_and_continues_them_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "max_steps: 12\nsave_steps: 100\neval_steps: 100",
        "sweep:\n  method: halving\n  eta: 2\n  parameters:\n    learning_rate: [1.0e-3, 1.0e-2, 3.0e-2]\n    \
         lora_r: [4, 8]\n",
    );
    let plan = SweepPlan::load(&cfg, &[]).unwrap();
    assert_eq!(plan.rungs, vec![3, 6, 12]);
    let s = run_sweep(&plan, &quiet()).unwrap();
    assert_eq!((s.ran, s.skipped), (6 + 3 + 1, 0));
    let dirs: Vec<PathBuf> = plan
        .trials
        .iter()
        .map(|t| t.config.output_dir.clone())
        .collect();

    // Rung 1: all six ran to step 3 and were measured there; the three lowest eval losses go on.
    let at3: Vec<f64> = dirs.iter().map(|d| eval_at(d, 3)).collect();
    let mut order: Vec<usize> = (0..6).collect();
    order.sort_by(|&a, &b| at3[a].total_cmp(&at3[b]));
    let mut second: Vec<usize> = order[..3].to_vec();
    second.sort();
    for (i, d) in dirs.iter().enumerate() {
        let last = losses(d).last().unwrap().0;
        let went_on = second.contains(&i);
        assert_eq!(last > 3, went_on, "trial {} ran to step {last}", i + 1);
        assert_eq!(s.state.trials[i].results[0], Some(at3[i]));
    }
    // Rung 2: of those, the best at step 6 goes on to 12 and is the sweep's best; the others stop at 6.
    let best = *second
        .iter()
        .min_by(|&&a, &&b| eval_at(&dirs[a], 6).total_cmp(&eval_at(&dirs[b], 6)))
        .unwrap();
    for &i in &second {
        let last = losses(&dirs[i]).last().unwrap().0;
        assert_eq!(last, if i == best { 12 } else { 6 }, "trial {}", i + 1);
        assert_eq!(dirs[i].join("adapter").is_dir(), i == best);
    }
    assert_eq!(s.state.best, Some(best + 1));
    assert!(s.state.finished);
    // sweep.json holds the same (JSON floats read back within an ulp).
    let saved = read_state(&plan.output_dir).unwrap();
    assert_eq!(
        (saved.best, saved.finished),
        (s.state.best, s.state.finished)
    );
    for (a, b) in saved.trials.iter().zip(&s.state.trials) {
        assert_eq!(a.results.len(), b.results.len());
        for (x, y) in a.results.iter().zip(&b.results) {
            assert!((x.unwrap() - y.unwrap()).abs() <= 1e-12 * y.unwrap().abs());
        }
    }

    // The winner, paused at 3 and 6 and continued from its checkpoints, is exactly the uninterrupted run.
    let straight_dir = tmp.path().join("straight");
    let r = run_alone(&plan.trials[best].config, &straight_dir);
    assert_eq!(r.steps, 12);
    assert_eq!(losses(&straight_dir), losses(&dirs[best]));
    let a = std::fs::read(straight_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dirs[best].join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the continued winner's adapter differs from the uninterrupted run's"
    );

    // The trials tokenise identically: one data cache served them all.
    let caches = std::fs::read_dir(tmp.path().join("cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(caches, 1);

    // Started again, a finished sweep runs nothing.
    let again = run_sweep(&plan, &quiet()).unwrap();
    assert_eq!(again.ran, 0);
    assert_eq!(again.state.best, s.state.best);
}

#[test]
fn a_killed_sweep_resumes_without_rerunning_finished_trials() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "max_steps: 300\nsave_steps: 10\neval_steps: 100",
        "sweep:\n  parameters:\n    learning_rate: [1.0e-3, 1.0e-2]\n",
    );
    let plan = SweepPlan::load(&cfg, &[]).unwrap();
    let (first, second) = (
        plan.trials[0].config.output_dir.clone(),
        plan.trials[1].config.output_dir.clone(),
    );
    let bin = env!("CARGO_BIN_EXE_loratune");
    let mut child = Command::new(bin)
        .args(["sweep", cfg.to_str().unwrap(), "--plain"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) once the second trial has written a checkpoint — mid-trial.
    let t0 = Instant::now();
    while !second.join("checkpoint-10").is_dir() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the second trial never checkpointed"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        first.join("adapter").is_dir(),
        "the first trial had finished"
    );
    assert!(
        !second.join("adapter").is_dir(),
        "the second trial was killed mid-way"
    );
    let killed_at = losses(&second).last().unwrap().0;
    assert!(killed_at < 300, "killed at step {killed_at}");
    let first_metrics = std::fs::read(first.join("metrics.jsonl")).unwrap();

    let o = Command::new(bin)
        .args(["sweep", cfg.to_str().unwrap(), "--plain"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("== trial 1/2 01-lr=1e-3: done earlier"),
        "{err}"
    );
    assert!(err.contains("resuming from"), "{err}");
    assert!(err.contains("1 run, 1 done earlier"), "{err}");
    assert_eq!(
        std::fs::read(first.join("metrics.jsonl")).unwrap(),
        first_metrics,
        "the finished trial was run again"
    );
    // The resumed trial logged each step once and ends exactly where an uninterrupted run does.
    let steps: Vec<u64> = losses(&second).iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=300).collect::<Vec<_>>());
    let straight_dir = tmp.path().join("straight");
    run_alone(&plan.trials[1].config, &straight_dir);
    let a = std::fs::read(straight_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(second.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed trial's adapter differs from the uninterrupted run's"
    );
    let state = read_state(&plan.output_dir).unwrap();
    assert!(state.finished);
    assert!(state.best.is_some());
}

#[test]
fn an_invalid_sweep_fails_before_any_trial_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        tmp.path(),
        "max_steps: 4",
        "sweep:\n  parameters:\n    learning_rate: [1.0e-3, 1.0e-2]\n    lora_r: [8, 0]\n",
    );
    let o = Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(["sweep", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("invalid `lora_r` at line 23 column 17"),
        "{err}"
    );
    assert!(
        err.contains("sweep trial 2: learning_rate=0.001, lora_r=0"),
        "{err}"
    );
    assert!(!tmp.path().join("sweep").exists(), "a trial started");
}

/// `loratune report` on a sweep with held-out questions: one row per trial, one curve per trial and quantity
/// (train loss, eval loss, each task metric), every trial's answers before and after, nothing fetched from the
/// network. (`scripts/test-report-browser.sh` renders the same kind of page in headless Chromium.)
#[test]
fn the_report_page_shows_every_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let held = root().join("datasets/nimbrel/heldout.jsonl");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "max_steps: 4\neval_steps: 2\neval_generate:\n  path: {}\n  max_new_tokens: 4\n  batch_size: 9\n  \
             metrics: [contains, f1]",
            held.display()
        ),
        "sweep:\n  metric: f1\n  parameters:\n    lora_r: [4, 8]\n    learning_rate: [1.0e-3, 1.0e-2]\n",
    );
    let plan = SweepPlan::load(&cfg, &[]).unwrap();
    assert_eq!(plan.goal, loratune::config::SweepGoal::Maximize);
    let s = run_sweep(&plan, &quiet()).unwrap();
    assert!(s.state.finished);
    let page = loratune::train::page::report_page(&plan.output_dir).unwrap();
    assert_eq!(page.runs, 4);
    // train loss, eval loss, contains, f1: four charts of four curves.
    assert_eq!(page.curves, 16);
    assert_eq!(page.answered, 4);
    let html = &page.html;
    assert_eq!(html.matches("<tr data-run=").count(), 4);
    assert_eq!(html.matches("<polyline class=\"curve\"").count(), 16);
    assert_eq!(html.matches("<section class=\"answers\"").count(), 4);
    // Every held-out question appears in each trial's before/after table.
    let questions = std::fs::read_to_string(&held).unwrap().lines().count();
    let first_q: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&held)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let q = first_q["question"].as_str().unwrap();
    assert_eq!(html.matches(q).count(), 4);
    assert_eq!(html.matches("<th>step 4 (after)</th>").count(), 4);
    assert!(html.matches("<div class=\"score\">").count() >= 4 * 2 * questions);
    // The best trial is marked and named.
    let best = &s.state.trials[s.state.best.unwrap() - 1];
    assert!(
        html.contains(&format!("Best: <b>{}</b>", best.name)),
        "no best line"
    );
    assert_eq!(html.matches("class=\"best\"").count(), 1);
    // The differing keys are columns; the shared ones are listed once.
    assert!(
        html.contains("<th title=\"sort\">lora_r</th>")
            && html.contains("<th title=\"sort\">learning_rate</th>")
    );
    assert!(html.contains("<td>sequence_len</td><td>128</td>"));
    // Self-contained: no scripts, styles or images from elsewhere.
    for bad in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(bad), "the page loads `{bad}`");
    }
}

/// Trials that differ only in LoRA and optimizer settings share the first trial's answers before training (the
/// base model's: every adapter starts as the identity); a trial run on its own, asking them itself, gets the same
/// answers and scores.
#[test]
fn trials_share_the_base_models_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let held = root().join("datasets/nimbrel/heldout.jsonl");
    let cfg = write_config(
        tmp.path(),
        &format!(
            "max_steps: 2\neval_generate:\n  path: {}\n  max_new_tokens: 6\n  batch_size: 9",
            held.display()
        ),
        "sweep:\n  parameters:\n    lora_r: [4, 16]\n    lora_target_modules: [[q_proj, v_proj], all-linear]\n",
    );
    let plan = SweepPlan::load(&cfg, &[]).unwrap();
    run_sweep(&plan, &quiet()).unwrap();
    let first = std::fs::read(
        plan.trials[0]
            .config
            .output_dir
            .join("eval_generate/step-0.jsonl"),
    )
    .unwrap();
    for t in &plan.trials[1..] {
        let own = std::fs::read(t.config.output_dir.join("eval_generate/step-0.jsonl")).unwrap();
        assert!(
            own == first,
            "trial {} did not get the shared baseline",
            t.number
        );
    }
    // The last trial (r=16, every linear module) asking the questions itself.
    let alone = tmp.path().join("alone");
    run_alone(&plan.trials[3].config, &alone);
    let own = std::fs::read(alone.join("eval_generate/step-0.jsonl")).unwrap();
    assert!(
        own == first,
        "the base model's answers differ with the adapter attached"
    );
}
