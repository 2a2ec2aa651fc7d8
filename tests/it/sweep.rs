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
    assert_eq!(read_state(&plan.output_dir).unwrap(), s.state);

    // The winner, paused at 3 and 6 and continued from its checkpoints, is exactly the uninterrupted run.
    let straight_dir = tmp.path().join("straight");
    let mut straight = plan.trials[best].config.clone();
    straight.output_dir = straight_dir.clone();
    let r = train(
        &straight,
        &RunOptions {
            progress: ProgressMode::Quiet,
            ..RunOptions::default()
        },
    )
    .unwrap();
    assert_eq!(r.steps, 12);
    assert_eq!(losses(&straight_dir), losses(&dirs[best]));
    let a = std::fs::read(straight_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dirs[best].join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the continued winner's adapter differs from the uninterrupted run's"
    );

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
    let mut straight = plan.trials[1].config.clone();
    straight.output_dir = straight_dir.clone();
    train(
        &straight,
        &RunOptions {
            progress: ProgressMode::Quiet,
            ..RunOptions::default()
        },
    )
    .unwrap();
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
