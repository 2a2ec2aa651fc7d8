//! `loratune runs DIR…`: a table of finished, interrupted or running runs — the config keys that differ between
//! them, losses, perplexity, throughput, training time and status — read from each run folder's resolved `config.yaml` and
//! `metrics.jsonl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::report::{read_metrics, MetricLine};
use crate::error::{Error, Result};

/// Config keys that differ between any two runs by nature (where they write, resume from, cache), never shown
/// as a difference.
const PER_RUN_KEYS: &[&str] = &[
    "output_dir",
    "resume_from_checkpoint",
    "auto_resume_from_checkpoints",
    "dataset_prepared_path",
];

/// One run's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub run: PathBuf,
    /// `finished` (adapter written), `running` (its folder lock is held), `interrupted` (checkpoints, no
    /// adapter) or `incomplete` (neither).
    pub status: String,
    /// The config keys whose values differ between the listed runs, as `key → value`.
    pub differs: BTreeMap<String, String>,
    /// The last optimizer step logged.
    pub steps: u64,
    /// `max_steps` when the config sets it.
    pub max_steps: Option<u64>,
    pub final_train_loss: Option<f64>,
    pub best_eval_loss: Option<f64>,
    pub best_eval_step: Option<u64>,
    pub final_eval_loss: Option<f64>,
    /// exp(best eval loss).
    pub best_eval_perplexity: Option<f64>,
    /// Median of the logged tokens/s.
    pub tokens_per_second: Option<f64>,
    /// Seconds of training up to the last logged line (resumed sessions summed).
    pub wall_seconds: Option<f64>,
    /// The last task metrics recorded (`eval_generate`): metric → mean score.
    pub task: BTreeMap<String, f64>,
}

/// A run folder: it holds the resolved `config.yaml` and `metrics.jsonl` a run writes.
pub fn is_run(dir: &Path) -> bool {
    dir.join("config.yaml").is_file() && dir.join("metrics.jsonl").is_file()
}

/// The run folders named: each argument that is a run, else the runs directly inside it (a sweep's `trials/`
/// included), sorted by path.
pub fn find_runs(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for a in args {
        if is_run(a) {
            out.push(a.clone());
            continue;
        }
        if !a.is_dir() {
            return Err(Error::Config(format!(
                "{}: no such run folder (a run folder holds config.yaml and metrics.jsonl)",
                a.display()
            )));
        }
        let mut found = Vec::new();
        for parent in [a.clone(), a.join("trials")] {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                if is_run(&e.path()) {
                    found.push(e.path());
                }
            }
        }
        if found.is_empty() {
            return Err(Error::Config(format!(
                "{}: neither a run folder nor a folder of runs (no config.yaml + metrics.jsonl in it or its \
                 subfolders)",
                a.display()
            )));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// A YAML value flattened to `key → text` (nested keys joined by `.`, lists of scalars as `[a, b]`).
fn flatten(prefix: &str, v: &serde_yaml::Value, out: &mut BTreeMap<String, String>) {
    use serde_yaml::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = match k {
                    Value::String(s) => s.clone(),
                    other => scalar(other),
                };
                flatten(&key(&k), v, out);
            }
        }
        Value::Sequence(items)
            if items
                .iter()
                .all(|i| !matches!(i, Value::Mapping(_) | Value::Sequence(_))) =>
        {
            let parts: Vec<String> = items.iter().map(scalar).collect();
            out.insert(prefix.to_string(), format!("[{}]", parts.join(", ")));
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&key(&i.to_string()), item, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), scalar(other));
        }
    }
}

fn scalar(v: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// A run folder's resolved config, flattened.
pub(crate) fn config_of(dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = dir.join("config.yaml");
    let text = crate::error::read_to_string(&path)?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    flatten("", &v, &mut out);
    Ok(out)
}

fn status_of(dir: &Path) -> String {
    if crate::export::atomic::FolderLock::is_held(dir) {
        return "running".into();
    }
    if dir.join("adapter/adapter_config.json").is_file() {
        "finished".into()
    } else if super::checkpoint::list_checkpoints(dir).is_empty() {
        "incomplete".into()
    } else {
        "interrupted".into()
    }
}

fn summarize(run: PathBuf, metrics: &[MetricLine], config: &BTreeMap<String, String>) -> RunRow {
    let last = |f: fn(&MetricLine) -> Option<f64>| metrics.iter().rev().find_map(f);
    let best = metrics
        .iter()
        .filter_map(|m| m.eval_loss.map(|l| (l, m.step)))
        .min_by(|a, b| a.0.total_cmp(&b.0));
    let mut tps: Vec<f64> = metrics.iter().filter_map(|m| m.tokens_per_second).collect();
    tps.sort_by(f64::total_cmp);
    RunRow {
        status: status_of(&run),
        run,
        differs: BTreeMap::new(),
        steps: metrics.iter().map(|m| m.step).max().unwrap_or(0),
        max_steps: config.get("max_steps").and_then(|v| v.parse().ok()),
        final_train_loss: last(|m| m.loss),
        best_eval_loss: best.map(|b| b.0),
        best_eval_step: best.map(|b| b.1),
        final_eval_loss: last(|m| m.eval_loss),
        best_eval_perplexity: best.map(|b| b.0.exp()),
        tokens_per_second: (!tps.is_empty()).then(|| tps[tps.len() / 2]),
        wall_seconds: metrics
            .iter()
            .filter_map(|m| m.elapsed_seconds)
            .max_by(f64::total_cmp),
        task: metrics
            .iter()
            .rev()
            .find_map(|m| m.task.clone())
            .unwrap_or_default(),
    }
}

/// The task metrics any row has, in one order (`task:<metric>` columns).
pub(crate) fn task_columns(rows: &[RunRow]) -> Vec<String> {
    let set: std::collections::BTreeSet<&String> =
        rows.iter().flat_map(|r| r.task.keys()).collect();
    set.into_iter().cloned().collect()
}

/// The rows of `runs`, each with the config keys whose values are not the same in all of them.
pub fn table(runs: &[PathBuf]) -> Result<Vec<RunRow>> {
    let mut configs = Vec::new();
    let mut rows = Vec::new();
    for r in runs {
        let config = config_of(r)?;
        rows.push(summarize(r.clone(), &read_metrics(r)?, &config));
        configs.push(config);
    }
    let keys: std::collections::BTreeSet<&String> = configs.iter().flat_map(|c| c.keys()).collect();
    for key in keys {
        if PER_RUN_KEYS
            .iter()
            .any(|p| key == p || key.starts_with(&format!("{p}.")))
        {
            continue;
        }
        let values: Vec<Option<&String>> = configs.iter().map(|c| c.get(key)).collect();
        if values.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        for (row, v) in rows.iter_mut().zip(values) {
            row.differs
                .insert(key.clone(), v.cloned().unwrap_or_else(|| "—".into()));
        }
    }
    Ok(rows)
}

/// Sort rows by a column: `eval_loss` (best eval loss), `train_loss` (final), `tokens_per_second` (descending),
/// `steps`, `run`, a task metric `task:<metric>` (descending), or a config key; runs without the value last.
pub fn sort(rows: &mut [RunRow], by: &str) -> Result<()> {
    let tasks = task_columns(rows);
    let key = |r: &RunRow| -> Option<f64> {
        if let Some(m) = by.strip_prefix("task:") {
            return r.task.get(m).map(|v| -v);
        }
        match by {
            "eval_loss" => r.best_eval_loss,
            "train_loss" => r.final_train_loss,
            "tokens_per_second" => r.tokens_per_second.map(|t| -t),
            "steps" => Some(r.steps as f64),
            _ => r.differs.get(by).and_then(|v| v.parse().ok()),
        }
    };
    let known = [
        "eval_loss",
        "train_loss",
        "tokens_per_second",
        "steps",
        "run",
    ];
    let task_known = by
        .strip_prefix("task:")
        .is_some_and(|m| tasks.iter().any(|t| t == m));
    if !known.contains(&by) && !task_known && !rows.iter().any(|r| r.differs.contains_key(by)) {
        let task_cols: Vec<String> = tasks.iter().map(|t| format!("task:{t}")).collect();
        return Err(Error::Config(format!(
            "--sort {by}: not a column; use one of {}, or a config key that differs between the runs",
            known.iter().map(|k| k.to_string()).chain(task_cols).collect::<Vec<_>>().join(", ")
        )));
    }
    if by == "run" {
        rows.sort_by(|a, b| a.run.cmp(&b.run));
        return Ok(());
    }
    rows.sort_by(|a, b| match (key(a), key(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.differs.get(by).cmp(&b.differs.get(by)),
    });
    Ok(())
}

pub(crate) fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// The fixed columns after the differing config keys.
pub(crate) const COLUMNS: [&str; 8] = [
    "status",
    "steps",
    "train loss",
    "best eval",
    "final eval",
    "eval ppl",
    "tok/s",
    "wall",
];

/// Seconds as `h:mm:ss` (`m:ss` under an hour).
fn hms(s: f64) -> String {
    let t = s.round() as u64;
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

pub(crate) fn cells(r: &RunRow) -> Vec<String> {
    vec![
        r.status.clone(),
        match r.max_steps {
            Some(m) => format!("{}/{m}", r.steps),
            None => r.steps.to_string(),
        },
        num(r.final_train_loss, 4),
        match (r.best_eval_loss, r.best_eval_step) {
            (Some(l), Some(s)) => format!("{l:.4} @{s}"),
            _ => "—".into(),
        },
        num(r.final_eval_loss, 4),
        num(r.best_eval_perplexity, 2),
        num(r.tokens_per_second, 0),
        r.wall_seconds.map_or("—".into(), hms),
    ]
}

/// The differing keys, in one order for every row.
pub(crate) fn key_columns(rows: &[RunRow]) -> Vec<String> {
    rows.first()
        .map(|r| r.differs.keys().cloned().collect())
        .unwrap_or_default()
}

/// The table as aligned text.
pub fn render_text(rows: &[RunRow]) -> String {
    let keys = key_columns(rows);
    let tasks = task_columns(rows);
    let mut header = vec!["run".to_string()];
    header.extend(keys.iter().cloned());
    header.extend(COLUMNS.iter().map(|s| s.to_string()));
    header.extend(tasks.iter().map(|t| format!("task:{t}")));
    let mut lines = vec![header];
    for r in rows {
        let mut line = vec![r.run.display().to_string()];
        line.extend(
            keys.iter()
                .map(|k| r.differs.get(k).cloned().unwrap_or_default()),
        );
        line.extend(cells(r));
        line.extend(tasks.iter().map(|t| num(r.task.get(t).copied(), 3)));
        lines.push(line);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The table as CSV (a header row, then one row per run).
pub fn render_csv(rows: &[RunRow]) -> Result<String> {
    let keys = key_columns(rows);
    let tasks = task_columns(rows);
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["run".to_string()];
    header.extend(keys.iter().cloned());
    header.extend(
        [
            "status",
            "steps",
            "max_steps",
            "final_train_loss",
            "best_eval_loss",
            "best_eval_step",
            "final_eval_loss",
            "best_eval_perplexity",
            "tokens_per_second",
            "wall_seconds",
        ]
        .map(String::from),
    );
    header.extend(tasks.iter().map(|t| format!("task_{t}")));
    let csv_err = |e: csv::Error| Error::Config(format!("writing CSV: {e}"));
    w.write_record(&header).map_err(csv_err)?;
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
    for r in rows {
        let mut rec = vec![r.run.display().to_string()];
        rec.extend(
            keys.iter()
                .map(|k| r.differs.get(k).cloned().unwrap_or_default()),
        );
        rec.extend([
            r.status.clone(),
            r.steps.to_string(),
            r.max_steps.map_or(String::new(), |m| m.to_string()),
            opt(r.final_train_loss),
            opt(r.best_eval_loss),
            r.best_eval_step.map_or(String::new(), |s| s.to_string()),
            opt(r.final_eval_loss),
            opt(r.best_eval_perplexity),
            opt(r.tokens_per_second),
            opt(r.wall_seconds),
        ]);
        rec.extend(tasks.iter().map(|t| opt(r.task.get(t).copied())));
        w.write_record(&rec).map_err(csv_err)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::Config(format!("writing CSV: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
