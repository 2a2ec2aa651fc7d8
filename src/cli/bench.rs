//! `loratune bench`: time the trainer's own optimizer step (forward, backward, AdamW) on a real or random model.

use std::path::PathBuf;

use anyhow::{bail, Result};
use burn::tensor::DType;
use rand::{Rng, SeedableRng};

use crate::lora::adapter::{lora_params, set_trainable};
use crate::lora::{attach, LoraInit, LoraSettings, TargetSpec};
use crate::model::{self, CausalLm, TokenBatch};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{train_step, StepConfig};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A model folder or .gguf (weights are used as they are).
    #[arg(long)]
    pub model: PathBuf,
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
    /// Peak FLOP/s of the machine for MFU (default: 330e9, this 2-core AVX-512 machine's f32 FMA peak).
    #[arg(long, default_value_t = 330e9)]
    pub peak_flops: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    type AD = burn::backend::Autodiff<burn::backend::Flex>;
    let opened = model::open(&a.model)?;
    let device = Default::default();
    let mut m = CausalLm::<AD>::load(opened.config, opened.source.as_ref(), &device, DType::F32)?;
    let targets = if a.targets == "all-linear" {
        TargetSpec::AllLinear
    } else {
        TargetSpec::Names(a.targets.split(',').map(|s| s.trim().to_string()).collect())
    };
    let settings = LoraSettings {
        r: a.rank,
        alpha: 2.0 * a.rank as f64,
        dropout: 0.0,
        use_rslora: false,
        targets,
        layers: None,
        init: LoraInit::Kaiming,
        seed: 0,
    };
    let report = attach(&mut m, &settings)?;
    set_trainable(&mut m);
    let mut opt = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let vocab = m.config.vocab_size as u32;
    let rows: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| (0..a.seq).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let batch = TokenBatch::from_rows(&rows, None);
    let labels: Vec<i64> = batch.input_ids.iter().map(|&x| x as i64).collect();
    let mut times = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t0 = std::time::Instant::now();
        let s = train_step(
            &mut m,
            &mut opt,
            &[(&batch, &labels)],
            StepConfig {
                lr: 1e-4,
                max_grad_norm: 1.0,
                seed: 0,
                step: i as u64,
            },
        )?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= a.warmup {
            times.push(dt);
        }
        if !a.json {
            eprintln!("step {i}: {dt:.3}s loss {:.4}", s.loss);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let median = sorted[sorted.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    let params = report.total_params as f64;
    // Frozen base: forward 2·P + backward (input grads only) 2·P per token, plus attention.
    let cfg = &m.config;
    let attn = 4.0
        * cfg.num_hidden_layers as f64
        * a.seq as f64
        * (cfg.num_attention_heads * cfg.head_dim) as f64
        * 2.0;
    let flops_per_token = 4.0 * params + attn;
    let achieved = flops_per_token * tokens / median;
    let v = serde_json::json!({
        "tokens_per_step": tokens,
        "step_seconds_median": median,
        "step_seconds_min": sorted[0],
        "step_seconds_max": sorted[sorted.len() - 1],
        "tokens_per_second": tokens / median,
        "achieved_gflops": achieved / 1e9,
        "mfu": achieved / a.peak_flops,
        "peak_rss_mb": peak_rss_kb() as f64 / 1024.0,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
    });
    if a.json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
