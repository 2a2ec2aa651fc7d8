//! `loratune bench`: argument parsing and printing for [`crate::bench`] (the trainer's step timed on a real or
//! random-weight model, and the hidden parity-fixture check on a device).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::backend::{Bf16, Device, Placement};
use crate::bench::{check_fixtures, check_kernels, fixture_tolerance, run as run_bench, BenchSpec};
use crate::lora::TargetSpec;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A model folder, .gguf or ollama://NAME[:TAG] (weights are used as they are).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// A random-weight model of a named shape instead: llama-3.2-1b, llama-3.1-8b, smollm2-135m, mixtral-8x7b,
    /// smollm2-moe-8x2 (SmolLM2-135M with 8 experts of half width, 2 per token: its active parameters).
    #[arg(long)]
    pub shape: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Comma-separated target modules, or all-linear.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: String,
    /// Warm-up steps (not timed).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// cpu or cuda[:N] (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Base-model compute dtype: f32 or bf16 (LoRA factors stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Peak FLOP/s for MFU (default: 330e9 on the CPU — this 2-core AVX-512 machine's f32 FMA peak; 989e12 on
    /// CUDA — H100 SXM dense bf16).
    #[arg(long)]
    pub peak_flops: Option<f64>,
    /// Turn the fused CPU kernels off (burn ops only), for comparisons.
    #[arg(long)]
    pub plain: bool,
    /// Gradient checkpointing: false, true (recompute each layer in the backward) or offload.
    #[arg(long, default_value = "false")]
    pub gradient_checkpointing: crate::train::recompute::Checkpointing,
    /// How the frozen base is held: `keep` (stored quantized matrices stay so), `dequantize`, `nf4` / `nf4-nodq`
    /// / `int8` (decoder linears quantized at load), or with `--shape` a GGUF block type (`Q4_K`, `Q4_0`, …) for
    /// random weights stored in that type.
    #[arg(long, default_value = "keep")]
    pub base: String,
    /// Print where each step's time goes (per fused kernel, forward / backward, GFLOP/s).
    #[arg(long)]
    pub profile: bool,
    /// DoRA adapters (PEFT `use_dora`) instead of plain LoRA.
    #[arg(long)]
    pub dora: bool,
    /// LoRA dropout (DoRA with dropout runs each adapted layer once more on the dropped input, as PEFT does).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Check mode: run the forward of every parity fixture under this folder (tests/fixtures/models) on
    /// --device in --dtype and compare with the CPU f32 result and the stored transformers logits.
    #[arg(long, hide = true)]
    pub check_fixtures: Option<PathBuf>,
    /// Check mode: every fused kernel (attention, RMSNorm, gated activation, loss) against the reference
    /// implementation on --device in --dtype, values and gradients; fails when one is off beyond tolerance.
    #[arg(long, conflicts_with = "check_fixtures")]
    pub check_kernels: bool,
    /// GEMM table: time each of cubek's matmul strategies (first call with compilation, median of --steps calls)
    /// on the products of one step at --shape with --batch × --seq rows and --rank (GPU backends only).
    #[arg(long, conflicts_with_all = ["check_fixtures", "check_kernels"], requires = "shape")]
    pub gemm: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.plain {
        crate::kernels::set_enabled(false);
    }
    let bf16 = match a.dtype.as_str() {
        "f32" | "fp32" | "float32" => Bf16::False,
        "bf16" | "bfloat16" => Bf16::True,
        other => bail!("unknown --dtype `{other}`; use f32 or bf16"),
    };
    if matches!(a.device, Device::Cuda(_))
        && !crate::backend::cuda_available()
        && cfg!(feature = "cuda")
    {
        bail!(
            "--device {}: no NVIDIA driver on this machine (no /dev/nvidiactl); use --device cpu",
            a.device
        );
    }
    let at = Placement::resolve(a.device, bf16)?;
    if let Some(dir) = &a.check_fixtures {
        return print_fixture_checks(dir, at);
    }
    if a.check_kernels {
        return print_kernel_checks(at);
    }
    if a.gemm {
        let shape = a.shape.as_deref().unwrap_or_default();
        let mut header = Some(format!(
            "{:<34} {:<52} {:>10} {:>10} {:>8} {:>9}",
            format!("{shape} on {} in {:?}", at.device, at.dtype),
            "strategy",
            "first ms",
            "median ms",
            "TFLOP/s",
            "max rel"
        ));
        let mut print = |r: &crate::kernels::GemmRow| {
            if let Some(h) = header.take() {
                println!("{h}");
            }
            match &r.error {
                None => println!(
                    "{:<34} {:<52} {:>10.2} {:>10.3} {:>8.1} {:>9.1e}",
                    r.shape, r.strategy, r.first_ms, r.median_ms, r.tflops, r.max_rel
                ),
                Some(e) => println!(
                    "{:<34} {:<52} {:>10.2} unavailable: {}",
                    r.shape,
                    r.strategy,
                    r.first_ms,
                    e.chars().take(100).collect::<String>()
                ),
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
        };
        crate::bench::gemm_table(shape, a.batch * a.seq, a.rank, a.steps, at, &mut print)?;
        return Ok(());
    }
    let spec = BenchSpec {
        model: a
            .model
            .as_ref()
            .map(|m| {
                crate::hub::resolve_model_arg(m, &crate::hub::ollama::OllamaOptions::from_env())
                    .map(|(p, _)| p)
            })
            .transpose()?,
        shape: a.shape.clone(),
        batch: a.batch,
        seq: a.seq,
        rank: a.rank,
        targets: if a.targets == "all-linear" {
            TargetSpec::AllLinear
        } else {
            TargetSpec::Names(a.targets.split(',').map(|s| s.trim().to_string()).collect())
        },
        warmup: a.warmup,
        steps: a.steps,
        peak_flops: a.peak_flops,
        profile: a.profile,
        recompute: a.gradient_checkpointing,
        base: a.base.clone(),
        dora: a.dora,
        dropout: a.dropout,
    };
    // Every step on stderr, with --json too: a run cut off by a timeout still says how far it got.
    let v = run_bench(&spec, at, &mut |i, dt, loss| {
        eprintln!("step {i}: {dt:.3}s loss {loss:.4}");
    })?;
    if matches!(at.device, Device::Cuda(_)) && v.get("peak_gpu_used_mb").is_none() {
        eprintln!("note: nvidia-smi gave no reading; peak GPU memory not reported");
    }
    if let (Some(rows), false) = (v["profile"].as_array(), a.json) {
        eprintln!(
            "\n{:<52} {:>9} {:>7} {:>7} {:>8}",
            "per step (mean of timed steps)", "seconds", "share", "calls", "GFLOP/s"
        );
        for r in rows {
            eprintln!(
                "{:<52} {:>9.3} {:>6.1}% {:>7} {:>8}",
                r["kernel"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(52)
                    .collect::<String>(),
                r["seconds_per_step"].as_f64().unwrap_or(0.0),
                100.0 * r["share"].as_f64().unwrap_or(0.0),
                r["calls_per_step"]
                    .as_f64()
                    .map_or(String::new(), |c| format!("{c:.0}")),
                r["gflops"]
                    .as_f64()
                    .map_or(String::new(), |g| format!("{g:.0}")),
            );
        }
        eprintln!(
            "{:<52} {:>9.3}",
            "step",
            v["step_seconds_mean"].as_f64().unwrap_or(0.0)
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

fn print_fixture_checks(dir: &std::path::Path, at: Placement) -> Result<()> {
    let tol = fixture_tolerance(at.dtype);
    let checks = check_fixtures(dir, at)?;
    let mut worst = 0f32;
    for c in &checks {
        worst = worst.max(c.device_vs_cpu / c.scale);
        println!(
            "{:<12} max |Δlogit| device vs cpu {:.3e} ({:.2e} of max |logit| {:.2}), device vs \
             transformers {:.3e} (cpu vs transformers {:.3e}), {:.2}s  {}",
            c.name,
            c.device_vs_cpu,
            c.device_vs_cpu / c.scale,
            c.scale,
            c.device_vs_reference,
            c.cpu_vs_reference,
            c.seconds,
            if c.ok { "ok" } else { "FAIL" }
        );
    }
    println!(
        "{} fixtures, worst device-vs-cpu max |Δlogit| / max |logit| = {worst:.3e} (tolerance {tol:e}, dtype \
         {:?})",
        checks.len(),
        at.dtype
    );
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fixtures off beyond tolerance: {}", failed.join(", "));
    }
    Ok(())
}

fn print_kernel_checks(at: Placement) -> Result<()> {
    let checks = check_kernels(at)?;
    println!(
        "{:<58} {:>10} {:>10} {:>9}",
        format!("fused vs reference on {} in {:?}", at.device, at.dtype),
        "output",
        "gradient",
        "tolerance"
    );
    for c in &checks {
        println!(
            "{:<58} {:>10.2e} {:>10.2e} {:>9.0e}  {}",
            c.case,
            c.value,
            c.grad,
            c.tol,
            if c.passed() { "ok" } else { "FAIL" }
        );
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.case.as_str())
        .collect();
    println!("{} cases, {} failed", checks.len(), failed.len());
    if !failed.is_empty() {
        bail!("kernels off beyond tolerance: {}", failed.join("; "));
    }
    Ok(())
}
