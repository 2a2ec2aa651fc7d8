//! `loratune train CONFIG` and `loratune eval CONFIG`.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::TrainConfig;
use crate::train::run::{evaluate, train, ProgressMode, RunOptions};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The YAML config (Axolotl key names).
    pub config: PathBuf,
    /// Override a config key, e.g. `--set max_steps=20 --set datasets.0.path=data.jsonl` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub plain: bool,
    /// Stop after this many optimizer steps without the final save (simulates an interruption).
    #[arg(long, hide = true)]
    pub stop_after: Option<u64>,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The YAML config of the run.
    pub config: PathBuf,
    /// Adapter folder (default: <output_dir>/adapter if present, else the base model alone).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run_train(a: TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(&a.config, &a.set)?;
    let opts = RunOptions {
        stop_after: a.stop_after,
        progress: if a.plain {
            ProgressMode::Plain
        } else {
            ProgressMode::Auto
        },
    };
    let s = train(&cfg, &opts)?;
    let first = s.losses.first().copied().unwrap_or(f64::NAN);
    let last_n = s.losses.len().min(10);
    let last = s.losses[s.losses.len() - last_n..].iter().sum::<f64>() / last_n.max(1) as f64;
    eprintln!();
    eprintln!(
        "{} after {}/{} steps in {:.1}s",
        if s.interrupted { "stopped" } else { "finished" },
        s.steps,
        s.total_steps,
        s.seconds
    );
    eprintln!("  train loss      {first:.4} (first step) → {last:.4} (mean of the last {last_n})");
    if let Some(b) = s.best_eval_loss {
        eprintln!("  best eval loss  {b:.4} (perplexity {:.2})", b.exp());
    }
    eprintln!(
        "  throughput      {:.0} tokens/s ({:.0} trained tokens/s)",
        s.tokens_per_second, s.trained_tokens_per_second
    );
    if let Some(r) = &s.resumed_from {
        eprintln!("  resumed from    {}", r.display());
    }
    if s.stopped_early {
        eprintln!("  early stopping  eval loss stopped improving");
    }
    if let Some(d) = &s.adapter_dir {
        eprintln!("  adapter (PEFT)  {}", d.display());
    }
    if let Some(d) = &s.merged_dir {
        eprintln!("  merged model    {}", d.display());
    }
    eprintln!(
        "  metrics         {}",
        s.output_dir.join("metrics.jsonl").display()
    );
    if !s.interrupted {
        eprintln!(
            "  loss curve      {}",
            s.output_dir.join("loss_curve.svg").display()
        );
    }
    Ok(())
}

pub fn run_eval(a: EvalArgs) -> Result<()> {
    let cfg = TrainConfig::load(&a.config, &a.set)?;
    let e = evaluate(&cfg, a.adapter.as_deref())?;
    println!(
        "eval loss {:.4}  perplexity {:.3}  ({} tokens)",
        e.loss, e.perplexity, e.tokens
    );
    Ok(())
}
