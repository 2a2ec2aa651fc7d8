//! The training-step benchmark behind `loratune bench` (the CLI only parses and prints): the trainer's own
//! optimizer step timed on a real or random-weight model, tokens/s, MFU, peak RSS and GPU memory, a per-kernel
//! profile; and the parity-fixture check that runs every fixture's forward on a device against the CPU.
//!
//! The batch is `batch × seq` token ids from a fixed integer hash (the same ids `scripts/bench/torch_bench.py`
//! uses), labels = inputs, so both sides compute the same loss at step 0.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};

use crate::backend::{Device, InferJob, Placement, TrainJob};
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::kernels::{prof, Kernels, TrainBackend};
use crate::lora::adapter::{lora_params, set_trainable};
use crate::lora::{attach, LoraInit, LoraSettings, TargetSpec};
use crate::model::weights::f32_to_data;
use crate::model::{
    self, expected_tensors, CausalLm, ModelConfig, StoredDtype, TensorSource, TokenBatch,
};
use crate::quant::{BasePlan, QMatrix, QuantScheme};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::recompute::Checkpointing;
use crate::train::step::{train_step, StepConfig};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// A model folder or .gguf (weights used as they are) …
    pub model: Option<PathBuf>,
    /// … or a random-weight model of a named shape ([`shape_config`]).
    pub shape: Option<String>,
    pub batch: usize,
    pub seq: usize,
    /// LoRA rank (alpha = 2·rank).
    pub rank: usize,
    pub targets: TargetSpec,
    /// Untimed steps first.
    pub warmup: usize,
    pub steps: usize,
    /// Peak FLOP/s for MFU (default: 330e9 on the CPU — this 2-core AVX-512 machine's f32 FMA peak; 989e12 on
    /// CUDA — H100 SXM dense bf16).
    pub peak_flops: Option<f64>,
    /// Time each fused kernel.
    pub profile: bool,
    /// Gradient checkpointing (layer recompute).
    pub recompute: Checkpointing,
    /// How the base is held ([`base_choice`]).
    pub base: String,
    /// DoRA adapters (a magnitude per module) instead of plain LoRA.
    pub dora: bool,
    /// LoRA dropout on the adapters' input.
    pub dropout: f64,
}

/// `--base`: the load plan, and for random weights the GGUF block type they are made in.
pub fn base_choice(s: &str) -> Result<(BasePlan, Option<GgmlType>)> {
    let plan = |quantize| BasePlan {
        keep_stored: true,
        quantize,
    };
    Ok(match s.to_ascii_lowercase().as_str() {
        "keep" => (BasePlan::KEEP, None),
        "dequantize" | "dense" => (BasePlan::DENSE, None),
        "nf4" => (plan(Some(QuantScheme::Nf4 { double: true })), None),
        "nf4-nodq" => (plan(Some(QuantScheme::Nf4 { double: false })), None),
        "int8" => (plan(Some(QuantScheme::Int8)), None),
        _ => match crate::quant::KEPT_GGML
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
        {
            Some(t) => (BasePlan::KEEP, Some(*t)),
            None => {
                return Err(Error::Config(format!(
                "--base {s}: expected keep, dequantize, nf4, nf4-nodq, int8 or a GGUF type ({})",
                crate::quant::KEPT_GGML
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
            }
        },
    })
}

/// One row of the per-kernel profile (means over the timed steps).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProfileRow {
    pub kernel: String,
    pub seconds_per_step: f64,
    pub share: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_per_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
}

fn peak_rss_kb() -> u64 {
    crate::heap::peak_rss_bytes() / 1024
}

/// The named shapes `--shape` knows.
pub const SHAPES: &[&str] = &[
    "llama-3.2-1b",
    "llama-3.1-8b",
    "smollm2-135m",
    "mixtral-8x7b",
    "smollm2-moe-8x2",
];

/// `config.json` of the named shapes (random weights).
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let v = match name {
        "llama-3.2-1b" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "hidden_act": "silu", "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001
        }),
        "llama-3.1-8b" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001
        }),
        "smollm2-135m" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
            "hidden_act": "silu", "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
        }),
        // Mixtral 8x7B as published (46.7 B parameters, 12.9 B active per token).
        "mixtral-8x7b" => serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
        }),
        // SmolLM2-135M with its MLP split into 8 experts of half the width, 2 per token: the same active
        // parameters per token as smollm2-135m (plus the router), to measure what the sparse block costs.
        "smollm2-moe-8x2" => serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 768,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
            "num_local_experts": 8, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
            "hidden_act": "silu", "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
        }),
        other => {
            return Err(Error::Config(format!(
                "unknown shape `{other}`; known: {}",
                SHAPES.join(", ")
            )))
        }
    };
    ModelConfig::from_json(&v)
}

/// A tensor's random seed: FNV-1a of its name.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Random weights for a config: N(0, 0.02)-like linear/embedding weights (uniform with the same spread), norm
/// weights 1, biases 0. Deterministic per tensor name.
pub struct RandomSource {
    pub shapes: Vec<(String, Vec<usize>)>,
    /// Make the matrices (linear and embedding weights) as random blocks of this GGUF type instead, where their
    /// rows are a whole number of blocks.
    pub quant: Option<GgmlType>,
}

impl TensorSource for RandomSource {
    fn origin(&self) -> String {
        "random weights".into()
    }
    fn names(&self) -> Vec<String> {
        self.shapes.iter().map(|(n, _)| n.clone()).collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
    }
    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        self.shape(name).map(|_| StoredDtype::F32)
    }
    fn load_quantized(&self, name: &str) -> Result<Option<QMatrix>> {
        let (Some(ty), Some(shape)) = (self.quant, self.shape(name)) else {
            return Ok(None);
        };
        if shape.len() != 2 || name.ends_with("norm.weight") || shape[1] % ty.block_size() != 0 {
            return Ok(None);
        }
        QMatrix::random_ggml(ty, shape[0], shape[1], 0.02 * 3f32.sqrt(), name_seed(name))
            .map(Some)
            .map_err(Error::Weights)
    }

    fn load(&self, name: &str, dtype: DType) -> Result<TensorData> {
        let shape = self
            .shape(name)
            .ok_or_else(|| Error::Weights(format!("random weights: no tensor named `{name}`")))?;
        let n: usize = shape.iter().product();
        let values = if name.ends_with("norm.weight") {
            vec![1.0f32; n]
        } else if name.ends_with(".bias") {
            vec![0.0f32; n]
        } else {
            // splitmix64 keyed by the name; uniform in ±0.02·√3 (std 0.02).
            let mut state = name_seed(name);
            let amp = 0.02f32 * 3f32.sqrt();
            (0..n)
                .map(|_| {
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
                })
                .collect()
        };
        f32_to_data(values, shape, dtype, name)
    }
}

/// The benchmark's token ids: a fixed integer hash of the position (same formula in torch_bench.py).
pub fn bench_tokens(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| {
            (0..seq)
                .map(|i| {
                    let x = ((r * seq + i) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    ((x >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

fn open_model<B: burn::tensor::backend::Backend>(
    spec: &BenchSpec,
    device: &B::Device,
    dtype: DType,
) -> Result<CausalLm<B>> {
    match (&spec.model, &spec.shape) {
        (Some(path), _) => {
            let (plan, random) = base_choice(&spec.base)?;
            if random.is_some() {
                return Err(Error::Config(format!(
                    "--base {}: a GGUF type makes random weights; use it with --shape (a model file keeps its own types: --base keep)",
                    spec.base
                )));
            }
            let opened = model::open(path)?;
            CausalLm::<B>::load_with(opened.config, opened.source.as_ref(), device, dtype, plan)
        }
        (None, Some(shape)) => {
            let (plan, quant) = base_choice(&spec.base)?;
            let cfg = shape_config(shape)?;
            let src = RandomSource {
                shapes: expected_tensors(&cfg),
                quant,
            };
            CausalLm::<B>::load_with(cfg, &src, device, dtype, plan)
        }
        (None, None) => Err(Error::Config(
            "name a model (--model DIR|FILE.gguf) or a shape (--shape NAME)".into(),
        )),
    }
}

/// Time `spec` on `at`'s backend; `on_step(i, seconds, loss)` after every step. The report is the JSON
/// `loratune bench` prints (`profile` rows included when asked for).
pub fn run(
    spec: &BenchSpec,
    at: Placement,
    on_step: &mut dyn FnMut(usize, f64, f64),
) -> Result<serde_json::Value> {
    struct Job<'a>(&'a BenchSpec, &'a mut dyn FnMut(usize, f64, f64));
    impl TrainJob for Job<'_> {
        type Output = serde_json::Value;
        fn run<B: TrainBackend>(self, device: B::Device, at: Placement) -> Result<Self::Output> {
            run_on::<B>(self.0, device, at, self.1)
        }
    }
    if spec.steps == 0 {
        return Err(Error::Config("--steps must be at least 1".into()));
    }
    at.train(Job(spec, on_step))
}

fn run_on<B: TrainBackend>(
    spec: &BenchSpec,
    device: B::Device,
    at: Placement,
    on_step: &mut dyn FnMut(usize, f64, f64),
) -> Result<serde_json::Value> {
    let (default_peak, gpu_index) = match at.device {
        Device::Cuda(i) => (989e12, Some(i)),
        _ => (330e9, None),
    };
    let mut m = open_model::<B>(spec, &device, at.dtype)?;
    let settings = LoraSettings {
        r: spec.rank,
        alpha: 2.0 * spec.rank as f64,
        dropout: spec.dropout,
        use_rslora: false,
        targets: spec.targets.clone(),
        layers: None,
        init: LoraInit::Kaiming,
        seed: 0,
        use_dora: spec.dora,
        modules_to_save: Vec::new(),
    };
    let report = attach(&mut m, &settings)?;
    set_trainable(&mut m);
    let mut opt = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
    let rows = bench_tokens(spec.batch, spec.seq, m.config.vocab_size);
    let batch = TokenBatch::from_rows(&rows, None);
    let labels: Vec<i64> = batch.input_ids.iter().map(|&x| x as i64).collect();
    let mut times = Vec::new();
    let mut kernel_totals: Vec<(prof::Cat, f64, f64, u64)> = Vec::new();
    prof::set_enabled(spec.profile);
    let gpu_mem = gpu_index.map(GpuMemSampler::start);
    for i in 0..spec.warmup + spec.steps {
        prof::reset();
        let t0 = std::time::Instant::now();
        let s = train_step(
            &mut m,
            &mut opt,
            &[(&batch, &labels)],
            StepConfig {
                router_aux_loss_coef: 0.0,
                lr: 1e-4,
                max_grad_norm: 1.0,
                seed: 0,
                step: i as u64,
                recompute: spec.recompute,
            },
        )?;
        B::sync(&device).map_err(|e| Error::Train(format!("device sync failed: {e:?}")))?;
        let dt = t0.elapsed().as_secs_f64();
        if i >= spec.warmup {
            times.push(dt);
            let snap = prof::snapshot();
            if kernel_totals.is_empty() {
                kernel_totals = snap;
            } else {
                for (acc, s) in kernel_totals.iter_mut().zip(snap) {
                    acc.1 += s.1;
                    acc.2 += s.2;
                    acc.3 += s.3;
                }
            }
        }
        on_step(i, dt, s.loss);
    }
    prof::set_enabled(false);
    let mut sorted = times.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let median = sorted[sorted.len() / 2];
    let tokens = (spec.batch * spec.seq) as f64;
    let params = report.total_params as f64;
    // Frozen base: forward 2·P + backward (input grads only) 2·P per token, plus attention (q·kᵀ and P·v over
    // the full s×s, forward and twice that backward).
    let cfg = &m.config;
    let attn = 4.0
        * cfg.num_hidden_layers as f64
        * spec.seq as f64
        * (cfg.num_attention_heads * cfg.head_dim) as f64
        * 2.0;
    let flops_per_token = 4.0 * params + attn;
    let achieved = flops_per_token * tokens / median;
    let peak = spec.peak_flops.unwrap_or(default_peak);
    let mut v = serde_json::json!({
        "side": "loratune",
        "device": at.device.to_string(),
        "dtype": if at.dtype == DType::BF16 { "bf16" } else { "f32" },
        "fused_kernels": crate::kernels::enabled(),
        "gradient_checkpointing": spec.recompute.to_string(),
        "tokens_per_step": tokens,
        "step_seconds_median": median,
        "step_seconds_min": sorted[0],
        "step_seconds_max": sorted[sorted.len() - 1],
        "tokens_per_second": tokens / median,
        "achieved_gflops": achieved / 1e9,
        "mfu": achieved / peak,
        "peak_flops": peak,
        "peak_rss_mb": peak_rss_kb() as f64 / 1024.0,
        "trainable_params": report.trainable_params,
        "total_params": report.total_params,
    });
    v["memory"] = serde_json::to_value(m.memory(
        spec.batch * spec.seq,
        spec.recompute != Checkpointing::Off,
        at.dtype.size(),
    ))
    .unwrap_or_default();
    if let Some(bytes) = crate::heap::peak_bytes() {
        // Live heap bytes at their peak (the binary counts them): RSS minus what the allocator keeps after frees.
        v["peak_heap_mb"] = serde_json::json!(bytes as f64 / (1024.0 * 1024.0));
    }
    if let Some(sampler) = gpu_mem {
        if let Some(mb) = sampler.finish() {
            v["peak_gpu_used_mb"] = serde_json::json!(mb);
        }
    }
    if let Some(bytes) = <B::InnerBackend as Kernels>::memory_reserved(&device) {
        // What the device allocator's pools hold after the steps (they keep their pages: ≈ its peak); the CubeCL
        // backends only. Beside nvidia-smi's figure on CUDA, and the only one on wgpu (the dry run).
        v["device_reserved_mb"] = serde_json::json!(bytes as f64 / (1024.0 * 1024.0));
    }
    if spec.profile {
        let n = times.len() as f64;
        let step: f64 = times.iter().sum::<f64>() / n;
        let mut rows = Vec::new();
        let mut covered = 0.0;
        for (cat, secs, flops, calls) in &kernel_totals {
            let s = secs / n;
            covered += s;
            rows.push(ProfileRow {
                kernel: cat.name().to_string(),
                seconds_per_step: s,
                share: s / step,
                calls_per_step: Some(*calls as f64 / n),
                gflops: Some(if *secs > 0.0 && *flops > 0.0 {
                    flops / secs / 1e9
                } else {
                    0.0
                }),
            });
        }
        rows.push(ProfileRow {
            kernel:
                "other (burn ops: embedding, residual adds, grad accumulation, AdamW, clip, graph)"
                    .into(),
            seconds_per_step: step - covered,
            share: (step - covered) / step,
            calls_per_step: None,
            gflops: None,
        });
        v["profile"] = serde_json::to_value(&rows).unwrap_or_default();
        v["step_seconds_mean"] = serde_json::json!(step);
    }
    Ok(v)
}

/// One reference tensor of a fixture as f32 values.
fn read_ref(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = crate::error::read_file(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Weights(format!("{}: not a safetensors file: {e}", path.display())))?;
    let t = st
        .tensor(name)
        .map_err(|_| Error::Weights(format!("{}: no tensor `{name}`", path.display())))?;
    let d = t.data();
    let vals: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::Weights(format!(
                "{}: `{name}` has unsupported dtype {other:?}",
                path.display()
            )))
        }
    };
    Ok((t.shape().to_vec(), vals))
}

fn logits_f32<B: Kernels>(m: &CausalLm<B>, batch: &TokenBatch) -> Result<Vec<f32>> {
    m.forward(batch)
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| Error::Train(format!("reading logits: {e:?}")))
}

/// One fixture's forward on the device against the CPU and transformers.
#[derive(Debug, Clone)]
pub struct FixtureCheck {
    pub name: String,
    /// max |Δlogit| device vs CPU f32, device vs transformers, CPU vs transformers.
    pub device_vs_cpu: f32,
    pub device_vs_reference: f32,
    pub cpu_vs_reference: f32,
    /// The largest |logit| (the tolerance is relative to it).
    pub scale: f32,
    pub seconds: f64,
    pub ok: bool,
}

/// The tolerance on max |Δlogit| relative to the largest |logit|. f32 on a GPU: cubek-matmul stages f32 GEMMs in
/// TF32 on the tensor cores (10-bit mantissa, what torch does with allow_tf32), measured 1.4e-3–2.1e-3 on an H200
/// (1.1e-2 for gemma2, whose soft-capping amplifies it); 2.5e-2 allowed. bf16 weights and activations: a few 1e-2
/// on these tiny random models (the CPU's own bf16 path too); 1e-1 allowed.
pub fn fixture_tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        2.5e-2
    } else {
        1e-1
    }
}

/// The GEMM table on `at`'s device: every cubek strategy timed on the products of one training step at
/// `shape` with `m` token rows and LoRA rank `r` ([`crate::kernels::GemmShape::step`]), `reps` timed calls each;
/// rows go to `print` as they are measured. An error on the CPU (it has one GEMM).
pub fn gemm_table(
    shape: &str,
    m: usize,
    r: usize,
    reps: usize,
    at: Placement,
    print: &mut dyn FnMut(&crate::kernels::GemmRow),
) -> Result<Vec<crate::kernels::GemmRow>> {
    let c = shape_config(shape)?;
    let shapes =
        crate::kernels::GemmShape::step(m, c.hidden_size, c.intermediate_size, c.vocab_size, r);
    struct Job<'a> {
        shapes: Vec<crate::kernels::GemmShape>,
        reps: usize,
        print: &'a mut dyn FnMut(&crate::kernels::GemmRow),
    }
    impl InferJob for Job<'_> {
        type Output = Option<Vec<crate::kernels::GemmRow>>;
        fn run<B: Kernels>(self, device: B::Device, at: Placement) -> Result<Self::Output> {
            Ok(B::gemm_table(
                &device,
                at.dtype,
                &self.shapes,
                self.reps,
                self.print,
            ))
        }
    }
    at.infer(Job {
        shapes,
        reps,
        print,
    })?
    .ok_or_else(|| {
        Error::Config("--gemm times the GPU's GEMM strategies; use --device cuda".into())
    })
}

/// Every fused kernel against the reference on `at`'s backend and dtype ([`crate::kernels::check::all`]).
pub fn check_kernels(at: Placement) -> Result<Vec<crate::kernels::check::KernelCheck>> {
    struct Job;
    impl crate::backend::TrainJob for Job {
        type Output = Vec<crate::kernels::check::KernelCheck>;
        fn run<B: crate::kernels::TrainBackend>(
            self,
            device: B::Device,
            at: Placement,
        ) -> Result<Self::Output> {
            Ok(crate::kernels::check::all::<B>(&device, at.dtype))
        }
    }
    at.train(Job)
}

/// Every parity fixture under `dir` (tests/fixtures/models): its forward on `at`'s backend against the CPU f32
/// forward and the stored transformers logits.
pub fn check_fixtures(dir: &Path, at: Placement) -> Result<Vec<FixtureCheck>> {
    struct Job<'a>(&'a Path);
    impl InferJob for Job<'_> {
        type Output = Vec<FixtureCheck>;
        fn run<B: Kernels>(self, device: B::Device, at: Placement) -> Result<Self::Output> {
            check_fixtures_on::<B>(self.0, &device, at.dtype)
        }
    }
    at.infer(Job(dir))
}

fn check_fixtures_on<B: Kernels>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<Vec<FixtureCheck>> {
    type Cpu = crate::backend::Cpu;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Err(Error::Config(format!(
            "{}: no fixture folders (with reference.safetensors) here; pass tests/fixtures/models",
            dir.display()
        )));
    }
    let tol = fixture_tolerance(dtype);
    let mut out = Vec::new();
    for fx in &entries {
        let name = fx
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reference = fx.join("reference.safetensors");
        let (shape, ids) = read_ref(&reference, "input_ids")?;
        let (_, mask) = read_ref(&reference, "attention_mask")?;
        let (_, expected) = read_ref(&reference, "logits")?;
        let (b, s) = (shape[0], shape[1]);
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| ids[r * s..(r + 1) * s].iter().map(|&x| x as u32).collect())
            .collect();
        let masks: Vec<Vec<bool>> = (0..b)
            .map(|r| mask[r * s..(r + 1) * s].iter().map(|&x| x != 0.0).collect())
            .collect();
        let batch = TokenBatch::from_rows(&rows, Some(&masks));
        let open = || -> Result<(ModelConfig, crate::model::SafetensorsSource)> {
            let cfg = ModelConfig::from_file(&fx.join("config.json"))?;
            Ok((cfg, crate::model::SafetensorsSource::open(fx)?))
        };
        let (cfg, src) = open()?;
        let cpu = CausalLm::<Cpu>::load(cfg, &src, &Default::default(), DType::F32)?;
        let want = logits_f32(&cpu, &batch)?;
        let (cfg, src) = open()?;
        let dev = CausalLm::<B>::load(cfg, &src, device, dtype)?;
        let t0 = std::time::Instant::now();
        let got = logits_f32(&dev, &batch)?;
        let seconds = t0.elapsed().as_secs_f64();
        let v = cpu.config.vocab_size;
        let real: Vec<usize> = (0..b * s).filter(|&p| batch.attention_mask[p]).collect();
        let diff = |x: &[f32], y: &[f32]| {
            real.iter()
                .flat_map(|&p| (0..v).map(move |j| p * v + j))
                .map(|i| (x[i] - y[i]).abs())
                .fold(0f32, f32::max)
        };
        let scale = real
            .iter()
            .flat_map(|&p| want[p * v..(p + 1) * v].iter())
            .fold(1e-6f32, |m, x| m.max(x.abs()));
        let device_vs_cpu = diff(&got, &want);
        out.push(FixtureCheck {
            name,
            device_vs_cpu,
            device_vs_reference: diff(&got, &expected),
            cpu_vs_reference: diff(&want, &expected),
            scale,
            seconds,
            ok: device_vs_cpu / scale <= tol && got.iter().all(|x| x.is_finite()),
        });
    }
    Ok(out)
}

/// The peak of the GPU's used memory while the benchmark runs, as nvidia-smi samples it every 100 ms (device-wide,
/// the CUDA context included: the same figure `scripts/bench/compare.py` takes for torch).
pub struct GpuMemSampler {
    child: Option<std::process::Child>,
    reader: Option<std::thread::JoinHandle<Option<f64>>>,
}

impl GpuMemSampler {
    pub fn start(index: usize) -> Self {
        Self::start_with(
            "nvidia-smi",
            &[
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                &index.to_string(),
                "-lms",
                "100",
            ],
        )
    }

    /// Run `program args`, which prints one number (MB) per line until it is killed.
    fn start_with(program: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let child = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            return GpuMemSampler {
                child: None,
                reader: None,
            };
        };
        let out = child.stdout.take();
        let reader = out.map(|out| {
            std::thread::spawn(move || {
                let mut peak: Option<f64> = None;
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mb) = line.trim().parse::<f64>() {
                        peak = Some(peak.map_or(mb, |p| p.max(mb)));
                    }
                }
                peak
            })
        });
        GpuMemSampler {
            child: Some(child),
            reader,
        }
    }

    /// Stop sampling; the peak in MB, or None when nvidia-smi is missing or printed nothing usable.
    pub fn finish(mut self) -> Option<f64> {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reader.take().and_then(|r| r.join().ok().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::GpuMemSampler;

    #[test]
    fn gpu_memory_sampler_keeps_the_peak_and_stops_the_sampler() {
        let t0 = std::time::Instant::now();
        let s = GpuMemSampler::start_with(
            "sh",
            &[
                "-c",
                "echo 100; echo 250; echo oops; echo 30; exec sleep 30",
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(s.finish(), Some(250.0));
        assert!(t0.elapsed().as_secs() < 10, "the sampler was not stopped");
    }

    #[test]
    fn gpu_memory_sampler_without_the_program_reports_nothing() {
        let s = GpuMemSampler::start_with("/nonexistent/nvidia-smi", &[]);
        assert_eq!(s.finish(), None);
    }
}

#[cfg(test)]
mod shape_tests {
    use super::shape_config;

    /// The named shapes are the published models' configs: parameter counts as published (embeddings included;
    /// 8B untied, 1B and 135M tied).
    #[test]
    fn named_shapes_have_the_published_sizes() {
        let params = |name: &str| {
            let c = shape_config(name).unwrap();
            let (h, i, l, v) = (
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.vocab_size,
            );
            let kv = c.num_key_value_heads * c.head_dim;
            let q = c.num_attention_heads * c.head_dim;
            let (experts, active) = c.moe.map_or((1, 1), |m| (m.experts, m.top_k));
            let router = if c.moe.is_some() { h * experts } else { 0 };
            let attn = h * q + 2 * h * kv + q * h + 2 * h;
            let layer = attn + 3 * h * i * experts + router;
            let active_layer = attn + 3 * h * i * active + router;
            let heads = if c.tie_word_embeddings { 1 } else { 2 };
            (
                l * layer + heads * v * h + h,
                l * active_layer + heads * v * h + h,
            )
        };
        assert_eq!(params("llama-3.1-8b").0, 8_030_261_248);
        assert_eq!(params("llama-3.2-1b").0, 1_235_814_400);
        assert_eq!(params("smollm2-135m").0, 134_515_008);
        // Mixtral's model card: 46.7 B parameters, 12.9 B used per token.
        assert_eq!(params("mixtral-8x7b").0, 46_702_792_704);
        assert_eq!(params("mixtral-8x7b").1, 12_879_925_248);
        // the same active parameters as smollm2-135m, plus the routers
        let (_, active) = params("smollm2-moe-8x2");
        assert_eq!(active, params("smollm2-135m").0 + 30 * 8 * 576);
        assert!(shape_config("llama-9")
            .unwrap_err()
            .to_string()
            .contains("llama-3.1-8b"));
    }
}
