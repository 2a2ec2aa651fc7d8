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
    /// answers (e.g. datasets/nimbrel/heldout.jsonl). Without FILE: the config's `eval_generate` block. The options
    /// below override that block's values.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub generate: Option<Option<PathBuf>>,
    /// With --generate: the field holding the question (default `question`).
    #[arg(long)]
    pub prompt_field: Option<String>,
    /// With --generate: the field holding the expected answer (a string) or facts (a list of strings); default
    /// `expected_facts`.
    #[arg(long)]
    pub answer_field: Option<String>,
    /// With --generate: metrics, comma-separated: exact, contains, regex, f1 (default contains,f1).
    #[arg(long, value_delimiter = ',')]
    pub metrics: Option<Vec<String>>,
    /// With --generate: new tokens per answer (default 128).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// With --generate: questions per generation batch (default 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// With --generate: the system message (default: the config's, else the one the adapter was trained with,
    /// from its loratune.json; none for the base model).
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
    if cfg.sweep.is_some() {
        eprintln!(
            "note: {}: the `sweep:` block is run by `loratune sweep`; `train` runs the config as written, without it",
            a.config.display()
        );
    }
    let opts = RunOptions {
        stop_after: a.stop_after,
        progress: if a.plain {
            ProgressMode::Plain
        } else {
            ProgressMode::Auto
        },
        ..RunOptions::default()
    };
    let s = train(&cfg, &opts)?;
    if let Some(node) = s.peer_node.filter(|&n| n > 0) {
        eprintln!(
            "node {node}: {} after {}/{} steps in {:.1}s; node 0 wrote the run folder {}",
            if s.interrupted { "stopped" } else { "finished" },
            s.steps,
            s.total_steps,
            s.seconds,
            s.output_dir.display()
        );
        return Ok(());
    }
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
    if let Some(f) = &s.task_final {
        let line: Vec<String> = f
            .iter()
            .map(
                |(k, v)| match s.task_baseline.as_ref().and_then(|b| b.get(k)) {
                    Some(b) => format!("{k} {b:.3} → {v:.3}"),
                    None => format!("{k} {v:.3}"),
                },
            )
            .collect();
        eprintln!(
            "  task metrics    {} (held-out questions, before → after)",
            line.join(", ")
        );
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
        return run_eval_generate(&a, &cfg, file.as_deref());
    }
    let e = evaluate(&cfg, a.adapter.as_deref())?;
    println!(
        "eval loss {:.4}  perplexity {:.3}  ({} tokens)",
        e.loss, e.perplexity, e.tokens
    );
    Ok(())
}

fn run_eval_generate(
    a: &EvalArgs,
    cfg: &TrainConfig,
    file: Option<&std::path::Path>,
) -> Result<()> {
    use crate::generate::score::{read_heldout, Metric, TaskOptions};
    // The config's block (or the defaults), then the command line's values.
    let mut eg = cfg.eval_generate.clone().unwrap_or_default();
    if file.is_none() && cfg.eval_generate.is_none() {
        anyhow::bail!(
            "--generate without a FILE uses the config's `eval_generate:` block, and {} has none; give the \
             questions file (e.g. --generate datasets/nimbrel/heldout.jsonl)",
            a.config.display()
        );
    }
    if let Some(m) = &a.metrics {
        eg.metrics = m
            .iter()
            .map(|m| {
                Metric::ALL
                    .into_iter()
                    .find(|x| x.name() == m.trim())
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--metrics: unknown metric `{m}` (exact, contains, regex, f1)"
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
    }
    eg.prompt_field = a.prompt_field.clone().unwrap_or(eg.prompt_field);
    eg.answer_field = a.answer_field.clone().unwrap_or(eg.answer_field);
    eg.max_new_tokens = a.max_new_tokens.unwrap_or(eg.max_new_tokens);
    eg.batch_size = a.batch_size.unwrap_or(eg.batch_size).max(1);
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => cfg.resolve_path(&eg.path),
    };
    let items = read_heldout(&path, &eg.prompt_field, &eg.answer_field)?;
    let opts = TaskOptions {
        metrics: eg.metrics,
        max_new_tokens: eg.max_new_tokens,
        batch_size: eg.batch_size,
        system: a.system.clone().or(eg.system),
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
