//! `sweep:` → the trials `loratune sweep` runs. The parameters are expanded (every combination, or seeded random
//! draws), each trial is named after what it changes, and each trial's config is loaded through the same path as
//! any config — so an unknown key or a bad value fails before any training, at its line and column in the sweep
//! block. [`crate::train::sweep`] runs the plan.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde_yaml::Value;

use super::issues::LoadOptions;
use super::load::{load_str, load_with_overrides};
use super::yaml::{locate, KeyPath, Override, Seg, Target};
use super::{ConfigErrors, ConfigIssue, SweepConfig, SweepGoal, SweepMethod, TrainConfig};
use crate::generate::score::Metric;

/// Keys a sweep cannot vary: where the trials write and resume from is the sweep's to set.
const NOT_SWEPT: &[&str] = &[
    "sweep",
    "output_dir",
    "resume_from_checkpoint",
    "auto_resume_from_checkpoints",
];

/// Short names for trial folders (`03-lr=2e-4,r=16`); other keys use their last path step.
const SHORT: &[(&str, &str)] = &[
    ("learning_rate", "lr"),
    ("lora_r", "r"),
    ("lora_alpha", "alpha"),
    ("lora_dropout", "dropout"),
    ("lora_target_modules", "targets"),
    ("lora_target_linear", "linear"),
    ("micro_batch_size", "mbs"),
    ("gradient_accumulation_steps", "ga"),
    ("num_epochs", "epochs"),
    ("weight_decay", "wd"),
    ("warmup_ratio", "warmup"),
    ("warmup_steps", "warmup"),
    ("lr_scheduler", "sched"),
    ("sequence_len", "seq"),
    ("lora_init", "init"),
];

/// What ranks a sweep's trials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepMetric {
    /// The last eval loss (the model at the end of the budget).
    EvalLoss,
    /// The last logged training loss.
    TrainLoss,
    /// The last mean of a task metric of `eval_generate`.
    Task(Metric),
}

impl SweepMetric {
    fn parse(s: &str) -> Option<SweepMetric> {
        let s = s.trim();
        let s = s.strip_prefix("task:").unwrap_or(s);
        match s {
            "eval_loss" => Some(SweepMetric::EvalLoss),
            "train_loss" | "loss" => Some(SweepMetric::TrainLoss),
            _ => Metric::ALL
                .into_iter()
                .find(|m| m.name() == s)
                .map(SweepMetric::Task),
        }
    }

    /// Its name in messages, `sweep.json` and `loratune runs --sort`.
    pub fn name(self) -> String {
        match self {
            SweepMetric::EvalLoss => "eval_loss".into(),
            SweepMetric::TrainLoss => "train_loss".into(),
            SweepMetric::Task(m) => format!("task:{}", m.name()),
        }
    }

    /// Minimize a loss, maximize a task score.
    pub fn default_goal(self) -> SweepGoal {
        match self {
            SweepMetric::Task(_) => SweepGoal::Maximize,
            _ => SweepGoal::Minimize,
        }
    }
}

/// One trial: an ordinary run of the config with some keys changed.
#[derive(Debug, Clone)]
pub struct Trial {
    /// 1-based.
    pub number: usize,
    /// Its folder name under `output_dir/trials/`, e.g. `03-lr=2e-4,r=16`.
    pub name: String,
    /// The swept keys and this trial's values, in the order the sweep lists them.
    pub params: Vec<(String, Value)>,
    /// The trial's config: `output_dir` is its folder, it resumes from its own checkpoints, no `sweep:`.
    pub config: TrainConfig,
}

impl Trial {
    /// `key=value` pairs, for messages.
    pub fn describe(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| format!("{k}={}", flow(v)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every trial of a sweep and how they are run.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    pub method: SweepMethod,
    pub metric: SweepMetric,
    pub goal: SweepGoal,
    /// `halving`: the fraction kept at each rung is 1/eta.
    pub eta: usize,
    /// `halving`: the optimizer-step budget of each rung, the last = `max_steps`. Empty for grid/random (each
    /// trial runs to its end).
    pub rungs: Vec<u64>,
    pub trials: Vec<Trial>,
    /// The sweep's folder (the config's `output_dir`): `trials/`, `sweep.json`.
    pub output_dir: PathBuf,
    /// Identifies the plan (method, metric, rungs, trial names and values) so that a resumed sweep can check it
    /// is the same sweep.
    pub fingerprint: String,
}

impl SweepPlan {
    /// Load `path` (with `--set` overrides) and expand its `sweep:` block; every trial's config is checked.
    pub fn load(path: &Path, overrides: &[String]) -> Result<SweepPlan, ConfigErrors> {
        let (label, text) = super::read_config_file(path)?;
        Self::from_str(&text, &label, overrides, &LoadOptions::default())
    }

    /// [`SweepPlan::load`] from YAML text.
    pub fn from_str(
        text: &str,
        label: &str,
        overrides: &[String],
        opts: &LoadOptions,
    ) -> Result<SweepPlan, ConfigErrors> {
        let fail = |issues: Vec<ConfigIssue>| ConfigErrors {
            file: label.to_string(),
            issues,
        };
        let issue = |path: KeyPath, target: Target, what: String, detail: String| ConfigIssue {
            key: path.to_string(),
            pos: locate(text, &path, target),
            from_override: None,
            what,
            detail: Some(detail),
        };
        // The user's overrides, then the raw sweep block (its values are read before the typed block exists: a
        // base config may leave out a key the sweep sets).
        let mut user = Vec::new();
        for raw in overrides {
            match Override::parse(raw) {
                Ok(o) => user.push(o),
                // Reported as any config reports a bad --set.
                Err(_) => return Err(reported(text, label, overrides, opts)),
            }
        }
        let mut doc: Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(_) => return Err(reported(text, label, overrides, opts)),
        };
        for o in &user {
            if o.apply(&mut doc).is_err() {
                return Err(reported(text, label, overrides, opts));
            }
        }
        let sweep_path = KeyPath::root().key("sweep");
        let params_path = sweep_path.key("parameters");
        let Some(raw_params) = doc
            .get("sweep")
            .and_then(|s| s.get("parameters"))
            .and_then(Value::as_mapping)
            .filter(|m| !m.is_empty())
        else {
            let what = if doc.get("sweep").is_some() {
                "the sweep has no parameters"
            } else {
                "the config has no `sweep:` block"
            };
            return Err(fail(vec![issue(
                if doc.get("sweep").is_some() {
                    sweep_path.clone()
                } else {
                    KeyPath::root()
                },
                Target::Key,
                what.into(),
                "add one, e.g.\n    sweep:\n      parameters:\n        learning_rate: [1.0e-4, 5.0e-4]\n        \
                 lora_r: [8, 16]\n  (see configs/README.md, Sweeps)"
                    .into(),
            )]));
        };
        let method: Option<SweepMethod> = doc
            .get("sweep")
            .and_then(|s| s.get("method"))
            .and_then(|m| serde_yaml::from_value(m.clone()).ok());
        let mut issues = Vec::new();
        let mut specs = Vec::new();
        for (k, v) in raw_params {
            let Some(key) = k.as_str() else {
                continue; // reported by the schema check below
            };
            let p = params_path.key(key);
            match Values::parse(v, method == Some(SweepMethod::Random)) {
                Ok(vals) => {
                    let top = key.split('.').next().unwrap_or(key);
                    if NOT_SWEPT.contains(&top) {
                        issues.push(issue(
                            p,
                            Target::Key,
                            format!("`{key}` cannot be swept"),
                            "each trial writes to its own folder under output_dir/trials/ and resumes from its \
                             own checkpoints; remove it from the parameters"
                                .into(),
                        ));
                    } else {
                        specs.push((key.to_string(), vals));
                    }
                }
                Err(why) => issues.push(issue(
                    p,
                    Target::Value,
                    format!("invalid `{params_path}.{key}`"),
                    why,
                )),
            }
        }
        if !issues.is_empty() {
            return Err(fail(issues));
        }

        // The first combination with the sweep block kept: the whole config checked once, the block's own keys
        // included.
        let first: Vec<(String, Value)> =
            specs.iter().map(|(k, v)| (k.clone(), v.first())).collect();
        let mut probe_ov = user.clone();
        probe_ov.extend(first.iter().map(|(k, v)| param_override(k, v)));
        let probe = load_with_overrides(text, label, probe_ov, opts)
            .map_err(|e| remap(e, text, &user, &specs, None))?;
        let sweep: SweepConfig = probe.sweep.clone().unwrap_or_default();

        // The typed block's rules.
        let metric = SweepMetric::parse(&sweep.metric);
        let Some(metric) = metric else {
            return Err(fail(vec![issue(
                sweep_path.key("metric"),
                Target::Value,
                format!("unknown sweep metric `{}`", sweep.metric),
                "use eval_loss, train_loss, or a task metric of eval_generate: contains, f1, exact, regex".into(),
            )]));
        };
        let goal = sweep.goal.unwrap_or(metric.default_goal());
        match metric {
            SweepMetric::EvalLoss if probe.val_set_size <= 0.0 && probe.test_datasets.is_empty() => {
                issues.push(issue(
                    sweep_path.key("metric"),
                    Target::Value,
                    "the sweep ranks trials by eval_loss, but the config has no eval set".into(),
                    "set val_set_size (e.g. 0.05) or test_datasets, or rank by train_loss or a task metric".into(),
                ))
            }
            SweepMetric::Task(m)
                if !probe
                    .eval_generate
                    .as_ref()
                    .is_some_and(|e| e.metrics.contains(&m)) =>
            {
                issues.push(issue(
                    sweep_path.key("metric"),
                    Target::Value,
                    format!("the sweep ranks trials by the task metric `{}`, which eval_generate does not score", m.name()),
                    format!(
                        "add an `eval_generate:` block whose metrics include {} (e.g. path: datasets/nimbrel/heldout.jsonl)",
                        m.name()
                    ),
                ))
            }
            _ => {}
        }
        if sweep.eta < 2 {
            issues.push(issue(
                sweep_path.key("eta"),
                Target::Value,
                "invalid `sweep.eta`".into(),
                "must be at least 2 (each rung keeps the best 1/eta of its trials)".into(),
            ));
        }
        if sweep.trials == Some(0) {
            issues.push(issue(
                sweep_path.key("trials"),
                Target::Value,
                "invalid `sweep.trials`".into(),
                "must be at least 1".into(),
            ));
        }
        if sweep.method == SweepMethod::Random && sweep.trials.is_none() {
            issues.push(issue(
                sweep_path.key("method"),
                Target::Value,
                "`method: random` needs `trials`".into(),
                "say how many trials to draw, e.g. `trials: 6`".into(),
            ));
        }
        let halving = sweep.method == SweepMethod::Halving;
        if halving {
            for key in ["max_steps", "num_epochs"] {
                if specs.iter().any(|(k, _)| k == key) {
                    issues.push(issue(
                        params_path.key(key),
                        Target::Key,
                        format!("`{key}` cannot be swept with method: halving"),
                        "halving gives every trial the same budget (max_steps) and its learning-rate schedule that \
                         horizon from the start; sweep it with grid or random"
                            .into(),
                    ));
                }
            }
            if probe.max_steps.is_none() {
                issues.push(issue(
                    sweep_path.key("method"),
                    Target::Value,
                    "`method: halving` needs `max_steps`".into(),
                    "set max_steps: the budget of the trials that reach the last rung (each rung's budget is a \
                     fraction of it, and every trial's schedule spans all of it)"
                        .into(),
                ));
            }
        }
        if !issues.is_empty() {
            return Err(fail(issues));
        }

        // The combinations.
        let seed = sweep.seed.unwrap_or(probe.seed);
        let combos = match (sweep.method, sweep.trials) {
            (SweepMethod::Grid, _) | (SweepMethod::Halving, None) => grid(&specs),
            (_, Some(n)) => match draw(&specs, n, seed) {
                Ok(c) => c,
                Err(why) => {
                    return Err(fail(vec![issue(
                        sweep_path.key("trials"),
                        Target::Value,
                        "invalid `sweep.trials`".into(),
                        why,
                    )]))
                }
            },
            (SweepMethod::Random, None) => unreachable!("checked above"),
        };
        let rungs = if halving {
            match rungs(
                combos.len(),
                sweep.eta,
                probe.max_steps.unwrap_or(1),
                sweep.min_steps,
            ) {
                Ok(r) => r,
                Err(why) => {
                    return Err(fail(vec![issue(
                        sweep_path.key("min_steps"),
                        Target::Value,
                        "invalid `sweep.min_steps`".into(),
                        why,
                    )]))
                }
            }
        } else {
            Vec::new()
        };

        // Each trial's config, loaded as any config; problems are reported once, at the sweep value that caused
        // them.
        let width = combos.len().to_string().len().max(2);
        let mut trials = Vec::new();
        let mut problems: Vec<ConfigIssue> = Vec::new();
        for (i, combo) in combos.into_iter().enumerate() {
            let number = i + 1;
            let name = trial_name(number, width, &combo);
            let dir = probe.output_dir.join("trials").join(&name);
            let mut ov = user.clone();
            ov.extend(combo.iter().map(|(k, v)| param_override(k, v)));
            ov.push(set("sweep", Value::Null));
            ov.push(set(
                "output_dir",
                Value::String(dir.to_string_lossy().into_owned()),
            ));
            ov.push(set("auto_resume_from_checkpoints", Value::Bool(true)));
            match load_with_overrides(text, label, ov, opts) {
                Ok(config) => trials.push(Trial {
                    number,
                    name,
                    params: combo,
                    config,
                }),
                Err(e) => {
                    for p in remap(e, text, &user, &specs, Some((number, &combo))).issues {
                        if !problems
                            .iter()
                            .any(|q| q.key == p.key && q.what == p.what && q.pos == p.pos)
                        {
                            problems.push(p);
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        let fingerprint = {
            let mut s = format!(
                "{:?}|{}|{:?}|{}|{:?}",
                sweep.method,
                metric.name(),
                goal,
                sweep.eta,
                rungs
            );
            for t in &trials {
                s.push_str(&format!("|{}:{}", t.name, t.describe()));
            }
            format!("{:016x}", super::fnv1a64(s.as_bytes()))
        };
        Ok(SweepPlan {
            method: sweep.method,
            metric,
            goal,
            eta: sweep.eta,
            rungs,
            trials,
            output_dir: probe.output_dir.clone(),
            fingerprint,
        })
    }
}

/// The error loading the config itself reports (a bad `--set`, invalid YAML).
fn reported(text: &str, label: &str, overrides: &[String], opts: &LoadOptions) -> ConfigErrors {
    match load_str(text, label, overrides, opts) {
        Err(e) => e,
        Ok(_) => ConfigErrors {
            file: label.to_string(),
            issues: vec![ConfigIssue {
                key: String::new(),
                pos: None,
                from_override: None,
                what: "the config cannot be read as a sweep".into(),
                detail: Some("check the --set arguments".into()),
            }],
        },
    }
}

/// One parameter's values.
#[derive(Debug, Clone)]
enum Values {
    List(Vec<Value>),
    /// `random` only: uniform (or log-uniform) between min and max; whole numbers with `int`.
    Range {
        min: f64,
        max: f64,
        log: bool,
        int: bool,
    },
}

impl Values {
    fn parse(v: &Value, random: bool) -> Result<Values, String> {
        match v {
            Value::Sequence(items) if items.is_empty() => {
                Err("the list is empty; give at least one value to try".into())
            }
            Value::Sequence(items) => Ok(Values::List(items.clone())),
            Value::Mapping(m) => {
                let num = |k: &str| m.get(k).and_then(Value::as_f64);
                let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
                if let Some(bad) = m
                    .keys()
                    .filter_map(Value::as_str)
                    .find(|k| !["min", "max", "log", "int"].contains(k))
                {
                    return Err(format!(
                        "unknown range key `{bad}`; a range is {{min: …, max: …, log: true|false, int: true|false}}"
                    ));
                }
                let (Some(min), Some(max)) = (num("min"), num("max")) else {
                    return Err("a range needs numbers `min` and `max`, e.g. {min: 1.0e-5, max: 1.0e-3, log: true}".into());
                };
                if !random {
                    return Err("a range is drawn from only with `method: random`; list the values to try instead \
                                (e.g. [1.0e-4, 2.0e-4, 5.0e-4])"
                        .into());
                }
                let log = flag("log");
                if min.partial_cmp(&max) != Some(std::cmp::Ordering::Less) {
                    return Err(format!("min ({min}) must be below max ({max})"));
                }
                if log && min <= 0.0 {
                    return Err(format!("a log range needs min > 0 (found {min})"));
                }
                Ok(Values::Range {
                    min,
                    max,
                    log,
                    int: flag("int"),
                })
            }
            other => Err(format!(
                "expected a list of values to try (e.g. [8, 16, 32]), found {}",
                super::yaml::describe(other)
            )),
        }
    }

    fn first(&self) -> Value {
        match self {
            Values::List(v) => v[0].clone(),
            Values::Range { min, int, .. } => number(*min, *int),
        }
    }
}

fn number(x: f64, int: bool) -> Value {
    if int {
        Value::Number((x.round() as i64).into())
    } else {
        Value::Number(x.into())
    }
}

/// Every combination, the first parameter varying slowest.
fn grid(specs: &[(String, Values)]) -> Vec<Vec<(String, Value)>> {
    let mut out: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (k, vals) in specs {
        let Values::List(vals) = vals else {
            unreachable!("ranges are refused outside random")
        };
        out = out
            .into_iter()
            .flat_map(|prefix| {
                vals.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((k.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    out
}

/// `n` seeded draws: distinct combinations of the grid when every parameter is a list, else independent draws.
fn draw(
    specs: &[(String, Values)],
    n: usize,
    seed: u64,
) -> Result<Vec<Vec<(String, Value)>>, String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    if specs.iter().all(|(_, v)| matches!(v, Values::List(_))) {
        let mut all = grid(specs);
        if n > all.len() {
            return Err(format!(
                "{n} trials asked, but the parameters have only {} distinct combinations; lower trials or add values",
                all.len()
            ));
        }
        // A seeded partial Fisher–Yates shuffle: the first n of a random permutation.
        for i in 0..n {
            let j = rng.random_range(i..all.len());
            all.swap(i, j);
        }
        all.truncate(n);
        return Ok(all);
    }
    Ok((0..n)
        .map(|_| {
            specs
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Values::List(vals) => vals[rng.random_range(0..vals.len())].clone(),
                        Values::Range { min, max, log, int } => {
                            let u: f64 = rng.random();
                            let x = if *log {
                                (min.ln() + u * (max.ln() - min.ln())).exp()
                            } else {
                                min + u * (max - min)
                            };
                            // Four significant digits: readable folder names, no false precision.
                            let x = if *int { x } else { round_sig(x, 4) };
                            number(x, *int)
                        }
                    };
                    (k.clone(), value)
                })
                .collect()
        })
        .collect())
}

fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// Synchronous successive halving: the rungs' budgets for `n` trials, the last = `max_steps`.
pub fn rungs(
    n: usize,
    eta: usize,
    max_steps: u64,
    min_steps: Option<u64>,
) -> Result<Vec<u64>, String> {
    // Rungs until one trial is left: n, n/eta, n/eta², … ≥ 1.
    let mut count = 1;
    let mut left = n;
    while left / eta >= 1 {
        left /= eta;
        count += 1;
    }
    let eta64 = eta as u64;
    let budgets: Vec<u64> = match min_steps {
        Some(m) => {
            if m == 0 || m >= max_steps {
                return Err(format!(
                    "must be at least 1 and below max_steps ({max_steps}), found {m}"
                ));
            }
            let mut b = vec![m];
            while b.len() + 1 < count && b[b.len() - 1] * eta64 < max_steps {
                b.push(b[b.len() - 1] * eta64);
            }
            b.push(max_steps);
            b
        }
        None => (0..count)
            .map(|k| max_steps / eta64.pow((count - 1 - k) as u32))
            .collect(),
    };
    if budgets[0] == 0 || budgets.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "max_steps ({max_steps}) is too small for {count} rungs of halving {n} trials by {eta}: raise max_steps \
             to at least {}, or set eta higher",
            eta64.pow((count - 1) as u32)
        ));
    }
    Ok(budgets)
}

/// How many of `n` trials go on to the next rung.
pub fn survivors(n: usize, eta: usize) -> usize {
    (n / eta).max(1)
}

fn param_override(key: &str, v: &Value) -> Override {
    Override {
        raw: format!("{key}={}", flow(v)),
        path: KeyPath(
            key.split('.')
                .map(|p| match p.parse::<usize>() {
                    Ok(i) => Seg::Index(i),
                    Err(_) => Seg::Key(p.to_string()),
                })
                .collect(),
        ),
        value: v.clone(),
    }
}

fn set(key: &str, v: Value) -> Override {
    param_override(key, &v)
}

/// A value on one line (YAML flow style).
pub fn flow(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let plain = serde_yaml::to_string(s).unwrap_or_default();
            plain.trim().to_string()
        }
        Value::Sequence(items) => format!(
            "[{}]",
            items.iter().map(flow).collect::<Vec<_>>().join(", ")
        ),
        Value::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", flow(k), flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Tagged(t) => flow(&t.value),
    }
}

/// A value as a folder-name fragment: numbers short (`2e-4`), lists joined by `+`, other characters `_`.
fn short_value(v: &Value) -> String {
    let text = match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(x)) if x != 0.0 && (x.abs() < 1e-2 || x.abs() >= 1e5) => format!("{x:e}"),
            (None, Some(x)) => x.to_string(),
            _ => n.to_string(),
        },
        Value::Sequence(items) => items.iter().map(short_value).collect::<Vec<_>>().join("+"),
        Value::String(s) => s.clone(),
        other => flow(other),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn short_key(key: &str) -> &str {
    SHORT
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, s)| *s)
        .unwrap_or_else(|| key.rsplit('.').next().unwrap_or(key))
}

/// `03-lr=2e-4,r=16` (at most about 100 characters).
fn trial_name(number: usize, width: usize, combo: &[(String, Value)]) -> String {
    let parts: Vec<String> = combo
        .iter()
        .map(|(k, v)| format!("{}={}", short_key(k), short_value(v)))
        .collect();
    let mut name = format!("{number:0width$}-{}", parts.join(","));
    if name.len() > 100 {
        let mut cut = 100;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

/// A trial's config errors, located at the sweep value that caused them (their `--set` origin otherwise).
fn remap(
    mut e: ConfigErrors,
    text: &str,
    user: &[Override],
    specs: &[(String, Values)],
    trial: Option<(usize, &[(String, Value)])>,
) -> ConfigErrors {
    let by_raw: HashMap<String, (&str, Option<usize>, Value)> = specs
        .iter()
        .flat_map(|(k, vals)| match vals {
            Values::List(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (param_override(k, v).raw, (k.as_str(), Some(i), v.clone())))
                .collect::<Vec<_>>(),
            Values::Range { .. } => Vec::new(),
        })
        .collect();
    let range_keys: HashMap<&str, ()> = specs
        .iter()
        .filter(|(_, v)| matches!(v, Values::Range { .. }))
        .map(|(k, _)| (k.as_str(), ()))
        .collect();
    let params = KeyPath::root().key("sweep").key("parameters");
    for issue in &mut e.issues {
        let Some(raw) = issue.from_override.clone() else {
            continue;
        };
        let found = by_raw.get(&raw).cloned().or_else(|| {
            let key = raw.split_once('=')?.0;
            range_keys
                .contains_key(key)
                .then(|| (key, None, Value::Null))
        });
        let Some((key, index, _)) = found else {
            continue; // the user's own --set
        };
        let is_key = issue.key == key && issue.what.starts_with("unknown key");
        let path = match (index, is_key) {
            (Some(i), false) => params.key(key).index(i),
            _ => params.key(key),
        };
        let target = if is_key { Target::Key } else { Target::Value };
        // A sweep block changed by the user's --set is not what the file says: name that --set instead.
        match user.iter().rev().find(|o| path.starts_with(&o.path)) {
            Some(o) => issue.from_override = Some(o.raw.clone()),
            None => {
                issue.pos = locate(text, &path, target);
                issue.from_override = None;
            }
        }
        if let (Some((n, combo)), false) = (trial, is_key) {
            let what: Vec<String> = combo
                .iter()
                .map(|(k, v)| format!("{k}={}", flow(v)))
                .collect();
            let d = issue.detail.take().unwrap_or_default();
            issue.detail = Some(format!("{d} (sweep trial {n}: {})", what.join(", ")));
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_follow_successive_halving() {
        // 6 trials, eta 3: 6 → 2 → (no third rung: 2/3 = 0)
        assert_eq!(rungs(6, 3, 90, None).unwrap(), vec![30, 90]);
        // 9 trials, eta 3: 9 → 3 → 1
        assert_eq!(rungs(9, 3, 90, None).unwrap(), vec![10, 30, 90]);
        // 6 trials, eta 2: 6 → 3 → 1
        assert_eq!(rungs(6, 2, 40, None).unwrap(), vec![10, 20, 40]);
        assert_eq!(rungs(6, 2, 40, Some(4)).unwrap(), vec![4, 8, 40]);
        assert_eq!(rungs(1, 3, 40, None).unwrap(), vec![40]);
        assert!(rungs(9, 3, 5, None).is_err());
        assert!(rungs(6, 2, 40, Some(40)).is_err());
        assert_eq!(survivors(6, 3), 2);
        assert_eq!(survivors(2, 3), 1);
        assert_eq!(survivors(9, 3), 3);
    }

    #[test]
    fn names_are_short_and_safe() {
        let c = vec![
            ("learning_rate".to_string(), Value::Number(0.0002.into())),
            ("lora_r".to_string(), Value::Number(16.into())),
            (
                "lora_target_modules".to_string(),
                serde_yaml::from_str("[q_proj, v_proj]").unwrap(),
            ),
            (
                "datasets.0.path".to_string(),
                Value::String("data/a b.jsonl".into()),
            ),
        ];
        assert_eq!(
            trial_name(3, 2, &c),
            "03-lr=2e-4,r=16,targets=q_proj+v_proj,path=data_a_b.jsonl"
        );
        assert_eq!(flow(&c[2].1), "[q_proj, v_proj]");
        assert_eq!(round_sig(0.000123456, 4), 0.0001235);
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    const BASE: &str = "base_model: models/tiny\n\
        datasets:\n  - path: data.jsonl\n    type: chat_template\n\
        learning_rate: 1.0e-3\n\
        lora_r: 8\n\
        val_set_size: 0.1\n\
        max_steps: 40\n\
        output_dir: runs/s\n";

    fn plan(sweep: &str) -> Result<SweepPlan, ConfigErrors> {
        let text = format!("{BASE}{sweep}");
        let opts = LoadOptions {
            check_files: false,
            ..LoadOptions::default()
        };
        SweepPlan::from_str(&text, "sweep.yaml", &[], &opts)
    }

    fn values(p: &SweepPlan) -> Vec<String> {
        p.trials.iter().map(|t| t.describe()).collect()
    }

    #[test]
    fn grid_is_every_combination_in_order() {
        let p = plan(
            "sweep:\n  parameters:\n    learning_rate: [1.0e-4, 2.0e-4, 5.0e-4]\n    lora_r: [8, 16]\n    \
             lora_target_modules: [[q_proj, v_proj], all-linear]\n",
        )
        .unwrap();
        assert_eq!(p.trials.len(), 12);
        assert_eq!(p.method, SweepMethod::Grid);
        assert!(p.rungs.is_empty());
        assert_eq!(
            values(&p)[..3],
            [
                "learning_rate=0.0001, lora_r=8, lora_target_modules=[q_proj, v_proj]",
                "learning_rate=0.0001, lora_r=8, lora_target_modules=all-linear",
                "learning_rate=0.0001, lora_r=16, lora_target_modules=[q_proj, v_proj]",
            ]
        );
        let t = &p.trials[11];
        assert_eq!(t.name, "12-lr=5e-4,r=16,targets=all-linear");
        // Each trial's config carries its values, its own folder and resumes from its own checkpoints.
        assert_eq!(t.config.learning_rate, 5e-4);
        assert_eq!(t.config.lora_r, 16);
        assert_eq!(
            t.config.output_dir,
            PathBuf::from("runs/s/trials").join(&t.name)
        );
        assert!(t.config.auto_resume_from_checkpoints);
        assert!(t.config.sweep.is_none());
        // Distinct folders.
        let mut names: Vec<&str> = p.trials.iter().map(|t| t.name.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), 12);
    }

    #[test]
    fn random_draws_are_seeded_distinct_and_counted() {
        let sweep = |seed: u64| {
            format!(
                "sweep:\n  method: random\n  trials: 5\n  seed: {seed}\n  parameters:\n    \
                 learning_rate: [1.0e-4, 2.0e-4, 5.0e-4]\n    lora_r: [8, 16, 32]\n"
            )
        };
        let a = values(&plan(&sweep(1)).unwrap());
        let b = values(&plan(&sweep(1)).unwrap());
        let c = values(&plan(&sweep(2)).unwrap());
        assert_eq!(a.len(), 5);
        assert_eq!(a, b, "the same seed draws the same trials");
        assert_ne!(a, c, "another seed draws others");
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 5, "draws from a grid are distinct: {a:?}");
        // More trials than combinations is refused.
        let e = plan(
            "sweep:\n  method: random\n  trials: 10\n  parameters:\n    lora_r: [8, 16, 32]\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("only 3 distinct combinations"),
            "{e}"
        );
        // Ranges: log-uniform learning rates within bounds, whole-number ranks.
        let p = plan(
            "sweep:\n  method: random\n  trials: 20\n  parameters:\n    \
             learning_rate: {min: 1.0e-5, max: 1.0e-3, log: true}\n    lora_r: {min: 4, max: 64, int: true}\n",
        )
        .unwrap();
        assert_eq!(p.trials.len(), 20);
        let lrs: Vec<f64> = p.trials.iter().map(|t| t.config.learning_rate).collect();
        assert!(lrs.iter().all(|&x| (1e-5..=1e-3).contains(&x)), "{lrs:?}");
        // Log-uniform: about half below the geometric middle 1e-4.
        let below = lrs.iter().filter(|&&x| x < 1e-4).count();
        assert!((4..=16).contains(&below), "{lrs:?}");
        assert!(p.trials.iter().all(|t| (4..=64).contains(&t.config.lora_r)));
    }

    #[test]
    fn halving_gets_rungs_and_needs_max_steps() {
        let p = plan(
            "sweep:\n  method: halving\n  parameters:\n    learning_rate: [1.0e-4, 2.0e-4, 5.0e-4]\n    \
             lora_r: [8, 16]\n",
        )
        .unwrap();
        assert_eq!(p.trials.len(), 6);
        assert_eq!(p.rungs, vec![13, 40]);
        assert!(p.trials.iter().all(|t| t.config.max_steps == Some(40)));
        let e = plan("sweep:\n  method: halving\n  parameters:\n    lora_r: [8, 16]\n")
            .map(|_| ())
            .and_then(|_| {
                SweepPlan::from_str(
                    &format!(
                        "{}sweep:\n  method: halving\n  parameters:\n    lora_r: [8, 16]\n",
                        BASE.replace("max_steps: 40\n", "num_epochs: 1\n")
                    ),
                    "sweep.yaml",
                    &[],
                    &LoadOptions {
                        check_files: false,
                        ..LoadOptions::default()
                    },
                )
                .map(|_| ())
            })
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("`method: halving` needs `max_steps`"),
            "{e}"
        );
        let e = plan("sweep:\n  method: halving\n  parameters:\n    max_steps: [10, 20]\n")
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot be swept with method: halving"),
            "{e}"
        );
    }

    #[test]
    fn bad_sweeps_fail_at_their_line_before_any_trial() {
        // An unknown key in the parameters: at the key, with a suggestion.
        let e = plan("sweep:\n  parameters:\n    lora_rr: [8, 16]\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("unknown key `lora_rr` at line 12 column 5"),
            "{s}"
        );
        assert!(s.contains("did you mean `lora_r`"), "{s}");
        // A value only one trial has: at that value, naming the trial.
        let e = plan("sweep:\n  parameters:\n    lora_r: [8, -4]\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("invalid `lora_r` at line 12 column 17"), "{s}");
        assert!(s.contains("sweep trial 2: lora_r=-4"), "{s}");
        // A typo in the block's own keys.
        let e = plan("sweep:\n  metirc: eval_loss\n  parameters:\n    lora_r: [8]\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown key `metirc` at line 11 column 3"),
            "{e}"
        );
        // Not a list; a range outside random; an empty list; where trials write.
        for (sweep, want) in [
            (
                "sweep:\n  parameters:\n    lora_r: 8\n",
                "expected a list of values to try",
            ),
            (
                "sweep:\n  parameters:\n    lora_r: {min: 4, max: 8}\n",
                "only with `method: random`",
            ),
            (
                "sweep:\n  parameters:\n    lora_r: []\n",
                "the list is empty",
            ),
            (
                "sweep:\n  parameters:\n    output_dir: [a, b]\n",
                "`output_dir` cannot be swept",
            ),
            (
                "sweep:\n  method: random\n  parameters:\n    lora_r: [8]\n",
                "`method: random` needs `trials`",
            ),
            (
                "sweep:\n  metric: bleu\n  parameters:\n    lora_r: [8]\n",
                "unknown sweep metric `bleu`",
            ),
            (
                "sweep:\n  metric: f1\n  parameters:\n    lora_r: [8]\n",
                "which eval_generate does not score",
            ),
            (
                "sweep:\n  eta: 1\n  parameters:\n    lora_r: [8]\n",
                "must be at least 2",
            ),
            ("seed: 3\n", "the config has no `sweep:` block"),
        ] {
            let e = plan(sweep).unwrap_err().to_string();
            assert!(e.contains(want), "{sweep}: {e}");
            assert!(
                e.contains("line ") || want.contains("no `sweep:`"),
                "no position: {e}"
            );
        }
        // eval_loss needs an eval set.
        let text = format!(
            "{}sweep:\n  parameters:\n    lora_r: [8]\n",
            BASE.replace("val_set_size: 0.1\n", "")
        );
        let opts = LoadOptions {
            check_files: false,
            ..LoadOptions::default()
        };
        let e = SweepPlan::from_str(&text, "s.yaml", &[], &opts).unwrap_err();
        assert!(e.to_string().contains("has no eval set"), "{e}");
    }
}
