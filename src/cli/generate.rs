//! `loratune generate`: complete a prompt (raw or through the chat template) with the KV-cached decoder.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::backend::{Bf16, Device, InferJob, Placement};
use crate::generate::{encode_prompt, generate, GenerateOptions, StopReason, StreamDecoder};
use crate::kernels::Kernels;
use crate::model::{self, CausalLm};
use crate::quant::{BasePlan, BaseQuantization};
use crate::tokenizer::{self, LoadedTokenizer};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A Hugging Face model folder, a .gguf file, or ollama://NAME[:TAG] (a model in the local Ollama store).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template (and a generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object (prompt ids, generated ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, cuda:N or auto (a GPU when this build has CUDA and one is present).
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// A base stored quantized (GGUF blocks, bitsandbytes NF4): `keep` it so (the adapter runs unmerged on top)
    /// or `dequantize` it at load.
    #[arg(long, default_value = "keep")]
    pub base_quantization: crate::quant::BaseQuantization,
}

/// The generation, run on the backend the device asks for.
struct Job<'a>(&'a GenerateArgs);

impl InferJob for Job<'_> {
    type Output = Result<()>;
    fn run<B: Kernels>(self, device: B::Device, at: Placement) -> crate::Result<Result<()>> {
        let a = self.0;
        let t0 = std::time::Instant::now();
        let opened = model::open(&a.model)?;
        let tok = tokenizer::load_for_model(&a.model)?;
        let plan = match a.base_quantization {
            BaseQuantization::Keep => BasePlan::KEEP,
            BaseQuantization::Dequantize => BasePlan::DENSE,
        };
        let mut m = CausalLm::<B>::load_with(
            opened.config,
            opened.source.as_ref(),
            &device,
            at.dtype,
            plan,
        )?;
        if let Some(ad) = &a.adapter {
            crate::lora::peft::load_adapter(&mut m, ad)?;
        }
        let load_seconds = t0.elapsed().as_secs_f64();
        Ok(complete(a, &m, &tok, load_seconds))
    }
}

pub fn run(mut a: GenerateArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 {
        bail!(
            "--temperature must be ≥ 0 (0 = greedy), got {}",
            a.temperature
        );
    }
    if a.system.is_some() && !a.chat {
        bail!("--system needs --chat");
    }
    let shown = a.model.display().to_string();
    let (path, ollama) =
        crate::hub::resolve_model_arg(&a.model, &crate::hub::ollama::OllamaOptions::from_env())?;
    for n in ollama.iter().flat_map(|m| m.notes()) {
        eprintln!("note: {n}");
    }
    a.model = path;
    Placement::resolve(a.device, Bf16::Auto)?
        .infer(Job(&a))
        .with_context(|| format!("loading {shown}"))?
}

/// Encode the prompt, stream the completion, print it (or the JSON report).
fn complete<B: Kernels>(
    a: &GenerateArgs,
    model: &CausalLm<B>,
    tok: &LoadedTokenizer,
    load_seconds: f64,
) -> Result<()> {
    let (prompt_text, prompt_ids) = encode_prompt(tok, &a.prompt, a.system.as_deref(), a.chat)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: tok.generation_stop_ids(),
    };
    let t0 = std::time::Instant::now();
    let mut first_token_at = None;
    let mut stream = StreamDecoder::new();
    let quiet = a.json;
    let mut stdout = std::io::stdout();
    let (ids, reason) = generate(model, &prompt_ids, &opts, &mut |id| {
        if first_token_at.is_none() {
            first_token_at = Some(t0.elapsed().as_secs_f64());
        }
        if !quiet && !opts.stop_ids.contains(&id) {
            if let Some(s) = stream.push(id, tok) {
                let _ = write!(stdout, "{s}");
                let _ = stdout.flush();
            }
        }
    })?;
    let total = t0.elapsed().as_secs_f64();
    let text = tok.decode(&ids, true)?;
    let prefill = first_token_at.unwrap_or(total);
    let decode_tps = if ids.len() > 1 {
        (ids.len() - 1) as f64 / (total - prefill).max(1e-9)
    } else {
        0.0
    };
    if a.json {
        let v = serde_json::json!({
            "prompt": prompt_text,
            "prompt_ids": prompt_ids,
            "generated_ids": ids,
            "text": text,
            "stop_reason": format!("{reason:?}").to_lowercase(),
            "load_seconds": load_seconds,
            "prefill_seconds": prefill,
            "decode_tokens_per_second": decode_tps,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt tokens, {} generated ({}), load {:.2}s, prefill {:.2}s, {:.1} tokens/s]",
            prompt_ids.len(),
            ids.len(),
            match reason {
                StopReason::Stop => "stop token",
                StopReason::Length => "max-new-tokens",
                StopReason::Context => "context full",
            },
            load_seconds,
            prefill,
            decode_tps
        );
    }
    Ok(())
}
