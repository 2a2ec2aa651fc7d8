//! Data-parallel training on burn-collective, on the tiny Llama fixture: local peers (threads) and nodes
//! (processes on loopback) against the single-device run with the same global batch; a dead node ends the run
//! with a clear error within seconds, and the restarted pair resumes to the same adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loratune::config::TrainConfig;
use loratune::train::report::read_metrics;
use loratune::train::run::{train, ProgressMode, RunOptions};

use crate::common::*;

/// The run's config: micro-batches of 2, LoRA dropout on (its masks must not depend on the peers), an eval set,
/// 6 steps with checkpoints every 2 (or `STEPS`/`SAVE` in `extra`'s first lines: see [`long`]).
fn config_text(dir: &Path, out: &str, extra: &str) -> String {
    let (steps, save, extra) = match extra.strip_prefix("LONG\n") {
        Some(rest) => (200, 10, rest),
        None => (6, 2, extra),
    };
    format!(
        "base_model: {model}\n\
         datasets:\n  - path: {data}\n    type: chat_template\n\
         dataset_prepared_path: {cache}\n\
         sequence_len: 128\n\
         micro_batch_size: 2\n\
         lora_r: 8\n\
         lora_alpha: 16\n\
         lora_dropout: 0.1\n\
         lora_target_linear: true\n\
         learning_rate: 0.01\n\
         lr_scheduler: cosine\n\
         warmup_steps: 1\n\
         val_set_size: 6\n\
         max_steps: {steps}\n\
         save_steps: {save}\n\
         eval_steps: 3\n\
         seed: 11\n\
         output_dir: {out}\n\
         logging_steps: 1\n\
         {extra}\n",
        model = fixture("models/llama").display(),
        data = fixture("train/facts_chat.jsonl").display(),
        cache = dir.join("cache").display(),
        out = dir.join(out).display(),
    )
}

fn load(dir: &Path, name: &str, out: &str, extra: &str) -> (PathBuf, TrainConfig) {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, config_text(dir, out, extra)).unwrap();
    let cfg = TrainConfig::load(&p, &[]).unwrap();
    (p, cfg)
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: ProgressMode::Quiet,
        ..RunOptions::default()
    }
}

/// The adapter's tensors by name.
fn adapter(run: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = run.join("adapter/adapter_model.safetensors");
    ref_names(&f)
        .into_iter()
        .map(|n| {
            let v = read_ref(&f, &n).1;
            (n, v)
        })
        .collect()
}

/// max |a − b| over every tensor of two adapters with the same names.
fn adapter_diff(a: &Path, b: &Path) -> f32 {
    let (x, y) = (adapter(a), adapter(b));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    x.iter()
        .map(|(k, v)| max_abs_diff(v, &y[k]))
        .fold(0.0, f32::max)
}

/// (step, value) points of a curve.
type Curve = Vec<(u64, f64)>;

/// (step, loss) and (step, eval loss) from metrics.jsonl.
fn curves(run: &Path) -> (Curve, Curve) {
    let m = read_metrics(run).unwrap();
    (
        m.iter().filter_map(|l| Some((l.step, l.loss?))).collect(),
        m.iter()
            .filter_map(|l| Some((l.step, l.eval_loss?)))
            .collect(),
    )
}

fn max_curve_diff(a: &[(u64, f64)], b: &[(u64, f64)]) -> f64 {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.1 - y.1).abs())
        .fold(0.0, f64::max)
}

/// The single-device reference: 1 peer × micro-batch 2 × accumulation 4 (`long`: 200 steps).
fn reference(dir: &Path, long: bool) -> PathBuf {
    let extra = if long {
        "LONG\ngradient_accumulation_steps: 4"
    } else {
        "gradient_accumulation_steps: 4"
    };
    let (_, one) = load(dir, "one", "one", extra);
    train(&one, &quiet()).unwrap();
    dir.join("one")
}

#[test]
fn two_local_peers_equal_one_device_and_resume_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let one = reference(dir.path(), false);
    // 2 peers × micro-batch 2 × accumulation 2: the same 4 micro-batches per step.
    let (_, two) = load(
        dir.path(),
        "two",
        "two",
        "gradient_accumulation_steps: 2\ndevices: [cpu, cpu]",
    );
    assert_eq!(two.world_size(), 2);
    assert_eq!(two.micro_per_step(), 4);
    let s = train(&two, &quiet()).unwrap();
    assert_eq!(s.steps, 6);
    let two_dir = dir.path().join("two");
    let (l1, e1) = curves(&one);
    let (l2, e2) = curves(&two_dir);
    let dl = max_curve_diff(&l1, &l2);
    let de = max_curve_diff(&e1, &e2);
    let da = adapter_diff(&one, &two_dir);
    eprintln!("2 local peers vs 1 device: losses {dl:.2e}, eval losses {de:.2e}, adapter {da:.2e}");
    assert!(l1.len() == 6 && e1.len() == 2);
    assert!(dl < 1e-6 && de < 1e-6, "losses differ by {dl:e} / {de:e}");
    assert!(da < 1e-6, "adapters differ by {da:e}");
    // Every peer's memory in every training line; tokens/s over both peers.
    let m = read_metrics(&two_dir).unwrap();
    let trained: Vec<_> = m.iter().filter(|l| l.loss.is_some()).collect();
    assert!(trained.iter().all(|l| l
        .memory_mb
        .as_ref()
        .is_some_and(|v| v.len() == 2 && v.iter().all(|&x| x > 1.0))));
    // Only rank 0 wrote: one metrics line per step and eval, one lock-free run folder.
    assert_eq!(trained.len(), 6);

    // A checkpoint of 2 peers resumes on 1 peer × accumulation 4 (the same global batch) and ends where the
    // single-device run ended.
    let (_, first) = load(
        dir.path(),
        "cut",
        "cut",
        "gradient_accumulation_steps: 2\ndevices: [cpu, cpu]",
    );
    let cut = train(
        &first,
        &RunOptions {
            stop_after: Some(4),
            ..quiet()
        },
    )
    .unwrap();
    assert!(cut.interrupted && cut.steps == 4);
    assert!(dir.path().join("cut/checkpoint-4").is_dir());
    let (_, rest) = load(
        dir.path(),
        "cut",
        "cut",
        "gradient_accumulation_steps: 4\nauto_resume_from_checkpoints: true",
    );
    let s = train(&rest, &quiet()).unwrap();
    assert_eq!(s.steps, 6);
    assert!(s.resumed_from.is_some());
    let da = adapter_diff(&one, &dir.path().join("cut"));
    eprintln!("2 peers to step 4, then 1 peer: adapter {da:.2e}");
    assert!(da < 1e-6, "adapters differ by {da:e}");
}

#[test]
fn peer_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("devices: [cpu, cuda:0]", "same kind of device"),
        ("devices: []", "empty"),
        ("devices: [auto, auto]", "`auto` cannot be a peer"),
        ("devices: two", "list of devices"),
        ("nodes: 2", "coordinator"),
        (
            "nodes: 2\nnode_rank: 2\ncoordinator: 127.0.0.1:29500",
            "node_rank",
        ),
        ("nodes: 2\ncoordinator: 127.0.0.1", "host:port"),
        ("ddp_timeout: 0", "ddp_timeout"),
    ];
    for (extra, want) in bad {
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, config_text(dir.path(), "bad", extra)).unwrap();
        let e = TrainConfig::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
    // `device` and `devices` together: only `device: auto` (the example configs' value) may stay.
    let p = dir.path().join("both.yaml");
    std::fs::write(
        &p,
        config_text(dir.path(), "bad", "device: cpu\ndevices: [cpu, cpu]"),
    )
    .unwrap();
    let e = TrainConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("remove `device: cpu`"), "{e}");
    std::fs::write(&p, config_text(dir.path(), "ok", "device: auto")).unwrap();
    let c = TrainConfig::load(&p, &["devices=[cpu, cpu]".to_string()]).unwrap();
    assert_eq!(c.world_size(), 2);
}

/// A free port with the next two free too (the nodes' data services).
fn free_ports() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        drop(l);
        if p < 65000
            && (1..=2).all(|i| std::net::TcpListener::bind(("0.0.0.0", p + i)).is_ok())
            && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
        {
            return p;
        }
    }
    panic!("no free ports");
}

fn node(cfg: &Path, rank: usize, port: u16, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_loratune"))
        .args(["train", cfg.to_str().unwrap(), "--plain"])
        .args(["--set", "nodes=2"])
        .args(["--set", &format!("node_rank={rank}")])
        .args(["--set", &format!("coordinator=127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait(mut c: Child, limit: Duration, what: &str) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return (s, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_nodes_on_loopback_equal_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let one = reference(dir.path(), false);
    // Two processes, one peer each, × accumulation 2 = the reference's 4 micro-batches per step.
    let (cfg, _) = load(
        dir.path(),
        "nodes",
        "nodes",
        "gradient_accumulation_steps: 2",
    );
    let port = free_ports();
    let a = node(&cfg, 0, port, &dir.path().join("node0.log"));
    let b = node(&cfg, 1, port, &dir.path().join("node1.log"));
    let (sa, _) = wait(a, Duration::from_secs(300), "node 0");
    let (sb, _) = wait(b, Duration::from_secs(300), "node 1");
    let logs = |i: usize| std::fs::read_to_string(dir.path().join(format!("node{i}.log"))).unwrap();
    assert!(
        sa.success() && sb.success(),
        "node 0:\n{}\nnode 1:\n{}",
        logs(0),
        logs(1)
    );
    let out = dir.path().join("nodes");
    let (l1, e1) = curves(&one);
    let (l2, e2) = curves(&out);
    let dl = max_curve_diff(&l1, &l2);
    let de = max_curve_diff(&e1, &e2);
    let da = adapter_diff(&one, &out);
    eprintln!(
        "2 nodes on loopback vs 1 device: losses {dl:.2e}, eval losses {de:.2e}, adapter {da:.2e}"
    );
    assert!(dl < 1e-6 && de < 1e-6 && da < 1e-6, "{dl:e} {de:e} {da:e}");
    assert!(
        logs(0).contains("data-parallel: 2 peers (1 per node × 2 nodes)"),
        "{}",
        logs(0)
    );
}

/// Two nodes of `cfg` (logs `a.log`, `b.log` in `dir`), returned once `out` holds checkpoint-10: mid-run.
fn pair_at_checkpoint_10(cfg: &Path, dir: &Path, out: &Path) -> (Child, Child) {
    let port = free_ports();
    let a = node(cfg, 0, port, &dir.join("a.log"));
    let b = node(cfg, 1, port, &dir.join("b.log"));
    let t0 = Instant::now();
    while !out.join("checkpoint-10").is_dir() {
        assert!(t0.elapsed() < Duration::from_secs(240), "no checkpoint-10");
        std::thread::sleep(Duration::from_millis(5));
    }
    (a, b)
}

#[test]
fn a_dead_node_ends_the_run_and_the_pair_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let one = reference(dir.path(), true);
    // Long enough to be killed mid-run (200 steps, checkpoints every 10).
    let (cfg, _) = load(
        dir.path(),
        "fault",
        "fault",
        "LONG\ngradient_accumulation_steps: 2\nddp_timeout: 60\nauto_resume_from_checkpoints: true",
    );
    let out = dir.path().join("fault");
    let (a, mut b) = pair_at_checkpoint_10(&cfg, dir.path(), &out);
    b.kill().unwrap();
    b.wait().unwrap();
    let (s, took) = wait(a, Duration::from_secs(120), "node 0 after node 1 died");
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    eprintln!(
        "node 0 noticed the dead node 1 after {:.1} s",
        took.as_secs_f64()
    );
    assert!(!s.success(), "{log}");
    assert!(
        log.contains("node 1") && (log.contains("is gone") || log.contains("ddp_timeout")),
        "{log}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}: {log}");
    assert!(!out.join("adapter").is_dir());
    // Restarted, the pair resumes from the last checkpoint and ends where the single-device run ended.
    let port = free_ports();
    let a = node(&cfg, 0, port, &dir.path().join("a2.log"));
    let b = node(&cfg, 1, port, &dir.path().join("b2.log"));
    let (sa, _) = wait(a, Duration::from_secs(300), "node 0 (restarted)");
    let (sb, _) = wait(b, Duration::from_secs(300), "node 1 (restarted)");
    let log = std::fs::read_to_string(dir.path().join("a2.log")).unwrap();
    assert!(sa.success() && sb.success(), "{log}");
    assert!(log.contains("resuming from"), "{log}");
    let da = adapter_diff(&one, &out);
    eprintln!("killed and resumed pair vs 1 device: adapter {da:.2e}");
    assert!(da < 1e-6, "adapters differ by {da:e}");
    let (l1, _) = curves(&one);
    let (l2, _) = curves(&out);
    assert!(max_curve_diff(&l1, &l2) < 1e-6);
}

/// The real SmolLM2-135M (Q4_1 base kept quantized), 2 steps: 2 local peers × micro-batch 1 × accumulation 1 against
/// 1 × 1 × 2, with LoRA dropout.
#[test]
fn smollm2_two_local_peers_equal_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let text = |out: &str, extra: &str| {
        format!(
            "base_model: {model}\n\
             datasets:\n  - path: {data}\n    type: chat_template\n\
             dataset_prepared_path: {cache}\n\
             sequence_len: 96\n\
             micro_batch_size: 1\n\
             lora_r: 4\n\
             lora_alpha: 8\n\
             lora_dropout: 0.05\n\
             lora_target_modules: [q_proj, v_proj]\n\
             learning_rate: 0.001\n\
             max_steps: 2\n\
             seed: 3\n\
             output_dir: {out}\n\
             logging_steps: 1\n\
             {extra}\n",
            model = smollm2_gguf().display(),
            data = root().join("datasets/nimbrel/support_chat.jsonl").display(),
            cache = dir.path().join("cache").display(),
            out = dir.path().join(out).display(),
        )
    };
    let run = |name: &str, extra: &str| {
        let p = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&p, text(name, extra)).unwrap();
        train(&TrainConfig::load(&p, &[]).unwrap(), &quiet()).unwrap();
        dir.path().join(name)
    };
    let one = run("one", "gradient_accumulation_steps: 2");
    let two = run("two", "gradient_accumulation_steps: 1\ndevices: [cpu, cpu]");
    let (l1, _) = curves(&one);
    let (l2, _) = curves(&two);
    let dl = max_curve_diff(&l1, &l2);
    let da = adapter_diff(&one, &two);
    eprintln!("SmolLM2, 2 local peers vs 1 device: losses {dl:.2e} ({l1:?}), adapter {da:.2e}");
    assert!(dl < 1e-6 && da < 1e-6, "{dl:e} {da:e}");
}

/// A node that hangs (stopped with SIGSTOP: its port still accepts connections, so it looks alive) ends the run
/// on the other node after `ddp_timeout`.
#[test]
fn a_hung_node_ends_the_run_after_ddp_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = load(
        dir.path(),
        "hang",
        "hang",
        "LONG\ngradient_accumulation_steps: 2\nddp_timeout: 4",
    );
    let out = dir.path().join("hang");
    let (a, mut b) = pair_at_checkpoint_10(&cfg, dir.path(), &out);
    let stop = |sig: &str| {
        Command::new("kill")
            .args([sig, &b.id().to_string()])
            .status()
            .unwrap()
    };
    assert!(stop("-STOP").success());
    let (s, took) = wait(a, Duration::from_secs(60), "node 0 after node 1 hung");
    stop("-CONT");
    b.kill().unwrap();
    b.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    eprintln!(
        "node 0 gave up on the hung node 1 after {:.1} s",
        took.as_secs_f64()
    );
    assert!(!s.success(), "{log}");
    assert!(log.contains("waited 4 s (ddp_timeout)"), "{log}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

/// A node whose coordinator never answers stops after `ddp_timeout` with an error saying what to start.
#[test]
fn an_unreachable_coordinator_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = load(dir.path(), "alone", "alone", "ddp_timeout: 2");
    let port = free_ports();
    let b = node(&cfg, 1, port, &dir.path().join("b.log"));
    let (s, took) = wait(b, Duration::from_secs(60), "node 1 without a coordinator");
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(!s.success(), "{log}");
    assert!(
        log.contains(&format!(
            "coordinator 127.0.0.1:{port} did not answer within 2 s"
        )) && log.contains("start node 0"),
        "{log}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(
        !dir.path().join("alone/metrics.jsonl").exists(),
        "node 1 wrote the run folder"
    );
}
