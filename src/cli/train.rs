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
    /// Task metrics instead of eval loss: ask the questions of this JSONL file (greedy, batched) and score the
    /// answers (e.g. datasets/nimbrel/heldout.jsonl).
    #[arg(long, value_name = "FILE")]
    pub generate: Option<PathBuf>,
    /// With --generate: the field holding the question.
    #[arg(long, default_value = "question")]
    pub prompt_field: String,
    /// With --generate: the field holding the expected answer (a string) or facts (a list of strings).
    #[arg(long, default_value = "expected_facts")]
    pub answer_field: String,
    /// With --generate: metrics, comma-separated: exact, contains, regex, f1.
    #[arg(long, value_delimiter = ',', default_value = "contains,f1")]
    pub metrics: Vec<String>,
    /// With --generate: new tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// With --generate: questions per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// With --generate: the system message (default: the one the adapter was trained with, from its
    /// loratune.json; none for the base model).
    #[arg(long)]
    pub system: Option<String>,
    /// With --generate: the base model alone, even when <output_dir>/adapter exists (the baseline).
    #[arg(long)]
    pub base_only: bool,
    /// With --generate: write each question's answer and scores here (JSONL).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
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
    if let Some(file) = &a.generate {
        return run_eval_generate(&a, &cfg, file);
    }
    let e = evaluate(&cfg, a.adapter.as_deref())?;
    println!(
        "eval loss {:.4}  perplexity {:.3}  ({} tokens)",
        e.loss, e.perplexity, e.tokens
    );
    Ok(())
}

fn run_eval_generate(a: &EvalArgs, cfg: &TrainConfig, file: &std::path::Path) -> Result<()> {
    use crate::generate::score::{read_heldout, Metric, TaskOptions};
    let metrics = a
        .metrics
        .iter()
        .map(|m| {
            Metric::ALL
                .into_iter()
                .find(|x| x.name() == m.trim())
                .ok_or_else(|| {
                    anyhow::anyhow!("--metrics: unknown metric `{m}` (exact, contains, regex, f1)")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let items = read_heldout(file, &a.prompt_field, &a.answer_field)?;
    let opts = TaskOptions {
        metrics,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size.max(1),
        system: a.system.clone(),
    };
    let r = crate::train::run::evaluate_generate(
        cfg,
        a.adapter.as_deref(),
        a.base_only,
        &items,
        &opts,
    )?;
    for s in &r.samples {
        let scores: Vec<String> = s
            .scores
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        println!(
            "Q: {}\nA: {}\n   [{}] expected {:?}\n",
            s.prompt,
            s.answer,
            scores.join(", "),
            s.references
        );
    }
    let means: Vec<String> = r.means.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
    println!("{} questions: {}", r.samples.len(), means.join(", "));
    if let Some(out) = &a.out {
        let mut text = String::new();
        for s in &r.samples {
            text.push_str(&serde_json::to_string(s)?);
            text.push('\n');
        }
        crate::export::atomic::write_atomic(out, text.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
