//! `loratune sweep CONFIG`: run the trials of the config's `sweep:` block.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::sweep::SweepPlan;
use crate::train::run::ProgressMode;
use crate::train::sweep::{run_sweep, task_before_after, SweepOptions};

#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// The YAML config with a `sweep:` block.
    pub config: PathBuf,
    /// Override a config key for every trial (repeatable), e.g. `--set max_steps=40`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Plain log lines instead of progress bars.
    #[arg(long)]
    pub plain: bool,
    /// List the trials (and halving's rungs) after checking every trial's config; train nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after this many optimizer steps of the first trial that runs (simulates an interruption).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

pub fn run(a: SweepArgs) -> Result<()> {
    let plan = SweepPlan::load(&a.config, &a.set)?;
    let n = plan.trials.len();
    if a.dry_run {
        println!(
            "{n} trial{} ({}, ranked by {}, {}){}:",
            if n == 1 { "" } else { "s" },
            plan.method.name(),
            plan.metric.name(),
            plan.goal.name(),
            if plan.rungs.is_empty() {
                String::new()
            } else {
                format!(
                    "; halving rungs at steps {:?}, keeping 1/{} each time",
                    plan.rungs, plan.eta
                )
            }
        );
        for t in &plan.trials {
            println!("  {}  {}", t.config.output_dir.display(), t.describe());
        }
        return Ok(());
    }
    let s = run_sweep(
        &plan,
        &SweepOptions {
            progress: if a.plain {
                ProgressMode::Plain
            } else {
                ProgressMode::Auto
            },
            stop_after: a.stop_after,
        },
    )?;
    eprintln!();
    eprintln!(
        "sweep of {n} trials: {} run, {} done earlier, {:.0}s",
        s.ran, s.skipped, s.seconds
    );
    for t in &s.state.trials {
        let results: Vec<String> = t
            .results
            .iter()
            .map(|v| v.map_or("—".into(), |x| format!("{x:.4}")))
            .collect();
        eprintln!(
            "  {:>3}  {:<40}  {} {}{}",
            t.number,
            t.name,
            s.state.metric,
            if results.is_empty() {
                "—".into()
            } else {
                results.join(" → ")
            },
            match &t.error {
                Some(e) => format!("  FAILED: {e}"),
                None => String::new(),
            }
        );
    }
    if let Some(best) = s.state.best {
        let t = &s.state.trials[best - 1];
        let v = t.results.last().copied().flatten();
        eprintln!(
            "best: trial {best} ({}): {} {}",
            plan.trials[best - 1].describe(),
            s.state.metric,
            v.map_or("—".into(), |x| format!("{x:.4}"))
        );
        eprintln!("  adapter  {}", t.dir.join("adapter").display());
        if let (Some(before), Some(after)) = task_before_after(&t.dir) {
            let line: Vec<String> = after
                .iter()
                .map(|(k, v)| match before.get(k) {
                    Some(b) => format!("{k} {b:.3} → {v:.3}"),
                    None => format!("{k} {v:.3}"),
                })
                .collect();
            eprintln!("  task metrics (base → best) {}", line.join(", "));
        }
    }
    eprintln!(
        "compare: loratune runs {} ; report: loratune report {}",
        s.output_dir.display(),
        s.output_dir.display()
    );
    let failed = s.failed();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} trial{} failed ({}); run the same command again to retry {} (finished trials are skipped)",
            failed.len(),
            if failed.len() == 1 { "" } else { "s" },
            failed
                .iter()
                .map(|t| t.number.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if failed.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}
