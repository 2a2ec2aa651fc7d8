//! A quantized frozen base is only a storage change: a training step (the loss and every LoRA gradient) on a
//! base kept in each supported format equals the step on the same weights dequantized to f32 — the fused CPU
//! GEMMs decode W a tile at a time, the dense path reads the f32 copy.

use std::sync::Arc;

use burn::tensor::{DType, Distribution, Tensor};
use loratune::bench::{bench_tokens, RandomSource};
use loratune::gguf::GgmlType;
use loratune::lora::adapter::{lora_params, set_lora_params, set_trainable};
use loratune::lora::{attach, LoraInit, LoraSettings, TargetSpec};
use loratune::model::{expected_tensors, CausalLm, ModelConfig, TokenBatch};
use loratune::quant::{BasePlan, Frozen, QuantScheme, KEPT_GGML};
use loratune::train::recompute::Checkpointing;
use loratune::train::step::{step_gradients, StepConfig};

use crate::common::*;

/// A small Llama whose matrices are a whole number of 256-element K-quant blocks per row, untied (so lm_head is
/// a quantized matrix of its own).
fn config() -> ModelConfig {
    ModelConfig::from_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 384, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "hidden_act": "silu", "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    }))
    .unwrap()
}

/// Every quantized matrix replaced by its dequantized f32 copy.
fn densified(m: &CausalLm<AD>) -> CausalLm<AD> {
    let mut d = m.clone();
    let dense = |w: &Frozen<AD>| Frozen::Dense(w.dense_f32());
    d.model.embed_tokens.weight = dense(&d.model.embed_tokens.weight);
    for (_, l) in d.linears_mut() {
        l.weight = dense(&l.weight);
    }
    d
}

/// (loss, gradients) of one step.
fn step(m: &CausalLm<AD>, recompute: Checkpointing) -> (f64, Vec<Vec<f32>>) {
    let cfg = &m.config;
    let rows = bench_tokens(2, 40, cfg.vocab_size);
    let batch = TokenBatch::from_rows(&rows, None);
    let labels: Vec<i64> = batch.input_ids.iter().map(|&x| x as i64).collect();
    let g = step_gradients(
        m,
        &[(&batch, &labels)],
        StepConfig {
            router_aux_loss_coef: 0.0,
            lr: 1e-4,
            max_grad_norm: 1.0,
            seed: 0,
            step: 0,
            recompute,
        },
    )
    .unwrap();
    (g.loss, g.grads.into_iter().flatten().map(to_vec).collect())
}

/// Load under `plan` (random weights, GGUF blocks of `random` when given), attach an all-linear adapter with
/// non-zero B, and compare a step against the densified model.
fn check(what: &str, random: Option<GgmlType>, plan: BasePlan, recompute: Checkpointing) {
    let cfg = config();
    let src = RandomSource {
        shapes: expected_tensors(&cfg),
        quant: random,
    };
    let device = Default::default();
    let mut q = CausalLm::<AD>::load_with(cfg, &src, &device, DType::F32, plan).unwrap();
    let n_quant = q
        .linears()
        .iter()
        .filter(|(_, l)| l.weight.quant().is_some())
        .count();
    let expected = if plan.quantize.is_some() { 14 } else { 15 };
    assert_eq!(n_quant, expected, "{what}: quantized linears");
    assert_eq!(
        q.model.embed_tokens.weight.quant().is_some(),
        random.is_some(),
        "{what}: embedding kept as stored"
    );
    let settings = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: TargetSpec::AllLinear,
        layers: None,
        init: LoraInit::Kaiming,
        seed: 5,
        use_dora: false,
        modules_to_save: Vec::new(),
    };
    attach(&mut q, &settings).unwrap();
    <AD as burn::tensor::backend::Backend>::seed(&device, 11);
    let params: Vec<Tensor<AD, 2>> = lora_params(&q)
        .into_iter()
        .map(|(k, p)| {
            if k.contains("lora_B") {
                Tensor::random(p.dims(), Distribution::Normal(0.0, 0.05), &device)
            } else {
                p
            }
        })
        .collect();
    set_lora_params(&mut q, params);
    set_trainable(&mut q);
    let d = densified(&q);
    let (lq, gq) = step(&q, recompute);
    let (ld, gd) = step(&d, recompute);
    assert!(
        ((lq - ld) / ld).abs() <= 1e-5,
        "{what}: loss {lq} vs dequantized {ld}"
    );
    assert_eq!(gq.len(), gd.len());
    for (i, (a, b)) in gq.iter().zip(&gd).enumerate() {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            scale > 0.0 && worst <= 1e-5 * scale,
            "{what}: gradient {i}: max |Δ| {worst} vs max |g| {scale}"
        );
    }
}

#[test]
fn a_step_on_gguf_blocks_equals_the_step_on_their_dequantized_weights() {
    for &ty in KEPT_GGML {
        check(ty.name(), Some(ty), BasePlan::KEEP, Checkpointing::Off);
    }
    check(
        "Q4_K + recompute",
        Some(GgmlType::Q4_K),
        BasePlan::KEEP,
        Checkpointing::Layers,
    );
}

#[test]
fn a_step_on_a_base_quantized_at_load_equals_the_step_on_its_dequantized_weights() {
    for scheme in [
        QuantScheme::Nf4 { double: true },
        QuantScheme::Nf4 { double: false },
        QuantScheme::Int8,
    ] {
        let plan = BasePlan {
            keep_stored: true,
            quantize: Some(scheme),
        };
        check(&scheme.to_string(), None, plan, Checkpointing::Off);
    }
}

/// The quantized model holds its matrices at their storage size and shares the quantized data with its
/// autodiff-free and detached views (no copies).
#[test]
fn quantized_matrices_are_shared_not_copied() {
    let cfg = config();
    let src = RandomSource {
        shapes: expected_tensors(&cfg),
        quant: Some(GgmlType::Q4_K),
    };
    let m = CausalLm::<AD>::load_with(cfg, &src, &Default::default(), DType::F32, BasePlan::KEEP)
        .unwrap();
    let mem = m.memory(80, false, 4);
    // 4.5 bits per weight for every matrix; only the norms are f32.
    let ratio = mem.base_bytes as f64 / mem.base_f32_bytes as f64;
    assert!(ratio > 0.14 && ratio < 0.145, "{ratio}");
    assert_eq!(mem.formats["Q4_K"].0, 16, "{:?}", mem.formats);
    let v = m.valid();
    let (a, b) = (&m.linears()[0].1.weight, &v.linears()[0].1.weight);
    assert!(Arc::ptr_eq(a.quant().unwrap(), b.quant().unwrap()));
}
