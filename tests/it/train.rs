//! The training step: gradient accumulation normalised per token, determinism, NaN guard.

use loratune::lora::adapter::{lora_params, set_trainable};
use loratune::lora::peft::load_adapter;
use loratune::model::TokenBatch;
use loratune::train::optim::{AdamW, AdamWConfig};
use loratune::train::step::{train_step, StepConfig};

use crate::common::*;
use crate::parity::reference_batch;

fn model_with_adapter() -> loratune::model::CausalLm<AD> {
    let device = Default::default();
    let mut m = load_fixture_model::<AD>(&fixture("models/llama"), &device);
    load_adapter(&mut m, &fixture("adapters/llama")).unwrap();
    set_trainable(&mut m);
    m
}

fn params(m: &loratune::model::CausalLm<AD>) -> Vec<Vec<f32>> {
    lora_params(m)
        .into_iter()
        .map(|(_, t)| to_vec(t.inner()))
        .collect()
}

/// Rows of the reference batch as separate unpadded micro-batches.
fn split_rows(batch: &TokenBatch, labels: &[i64]) -> Vec<(TokenBatch, Vec<i64>)> {
    (0..batch.batch)
        .map(|r| {
            let len = (0..batch.seq)
                .filter(|&i| batch.attention_mask[r * batch.seq + i])
                .count();
            let ids = batch.input_ids[r * batch.seq..r * batch.seq + len].to_vec();
            let lab = labels[r * batch.seq..r * batch.seq + len].to_vec();
            (TokenBatch::from_rows(&[ids], None), lab)
        })
        .collect()
}

#[test]
fn gradient_accumulation_is_normalised_per_token_not_per_micro_batch() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    let cfg = StepConfig {
        lr: 1e-2,
        max_grad_norm: 0.0,
        seed: 0,
        step: 0,
    };

    // One micro-batch holding both rows (padded).
    let mut a = model_with_adapter();
    let mut oa = AdamW::new(AdamWConfig::default(), lora_params(&a).len());
    let sa = train_step(&mut a, &mut oa, &[(&batch, &labels)], cfg).unwrap();

    // The same rows as two micro-batches of different lengths (15 and 10 trained tokens).
    let parts = split_rows(&batch, &labels);
    let mut b = model_with_adapter();
    let mut ob = AdamW::new(AdamWConfig::default(), lora_params(&b).len());
    let micro: Vec<(&TokenBatch, &[i64])> = parts.iter().map(|(t, l)| (t, l.as_slice())).collect();
    let sb = train_step(&mut b, &mut ob, &micro, cfg).unwrap();

    assert_eq!(sa.trained_tokens, sb.trained_tokens);
    assert!(
        (sa.loss - sb.loss).abs() < 1e-6,
        "{} vs {}",
        sa.loss,
        sb.loss
    );
    assert!(
        (sa.grad_norm - sb.grad_norm).abs() / sa.grad_norm < 1e-5,
        "{} vs {}",
        sa.grad_norm,
        sb.grad_norm
    );
    let d = params(&a)
        .iter()
        .zip(params(&b))
        .map(|(x, y)| max_abs_diff(x, &y))
        .fold(0.0, f32::max);
    assert!(d < 1e-6, "accumulated update differs by {d}");

    // The reference loss of the fixture (transformers, the same two rows) is the per-token mean.
    let (_, exp) = read_ref(&fixture("adapters/llama/reference.safetensors"), "loss");
    assert!((sa.loss - exp[0] as f64).abs() < 1e-5);

    // A mean of per-micro-batch means would differ here (unequal token counts): the check above has teeth.
    let per: Vec<f64> = parts
        .iter()
        .map(|(t, l)| {
            let m = model_with_adapter();
            let (s, n) = loratune::train::loss::lm_loss_sum(
                &m.valid(),
                t,
                l,
                &mut loratune::model::NoDropout,
            );
            to_vec(s)[0] as f64 / n as f64
        })
        .collect();
    let mean_of_means = (per[0] + per[1]) / 2.0;
    assert!(
        (mean_of_means - sa.loss).abs() > 1e-3,
        "test data cannot tell the two normalisations apart"
    );
}

#[test]
fn steps_are_deterministic_with_dropout() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    let run = || {
        let mut m = model_with_adapter();
        for (_, l) in m.linears_mut() {
            if let Some(a) = &mut l.lora {
                a.dropout = 0.1;
            }
        }
        let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
        let mut losses = Vec::new();
        for step in 0..3 {
            let s = train_step(
                &mut m,
                &mut o,
                &[(&batch, &labels)],
                StepConfig {
                    lr: 1e-2,
                    max_grad_norm: 1.0,
                    seed: 5,
                    step,
                },
            )
            .unwrap();
            losses.push(s.loss);
        }
        (losses, params(&m))
    };
    let (l1, p1) = run();
    let (l2, p2) = run();
    assert_eq!(l1, l2);
    assert_eq!(p1, p2);
    // Dropout is active: the first loss differs from the dropout-free reference loss.
    let (_, exp) = read_ref(&fixture("adapters/llama/reference.safetensors"), "loss");
    assert!((l1[0] - exp[0] as f64).abs() > 1e-4);
}

#[test]
fn nan_loss_stops_without_touching_the_adapter() {
    let (batch, labels) = reference_batch(&fixture("adapters/llama/reference.safetensors"));
    // An infinite adapter scale makes the forward overflow: the loss is not finite.
    let mut m = model_with_adapter();
    let before = params(&m);
    let mut o = AdamW::new(AdamWConfig::default(), lora_params(&m).len());
    for (_, l) in m.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.scale = f64::INFINITY;
        }
    }
    let e = train_step(
        &mut m,
        &mut o,
        &[(&batch, &labels)],
        StepConfig {
            lr: 1e-3,
            max_grad_norm: 1.0,
            seed: 0,
            step: 0,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("training stopped") && e.contains("learning_rate"),
        "{e}"
    );
    assert_eq!(params(&m), before, "a failed step changed the adapter");
}
