//! Forward parity with transformers on the tiny per-architecture fixtures (tests/fixtures/models/*),
//! produced by scripts/reference/make_fixtures.py: max |Δlogit| ≤ 1e-4 and loss within 1e-5.

use std::path::Path;

use loratune::kernels::Kernels;
use loratune::model::{CausalLm, TokenBatch};

use crate::common::*;

/// The reference batch of a fixture as a TokenBatch plus labels (-100 on padding).
pub fn reference_batch(reference: &std::path::Path) -> (TokenBatch, Vec<i64>) {
    let (shape, ids) = read_ref(reference, "input_ids");
    let (_, mask) = read_ref(reference, "attention_mask");
    let (b, s) = (shape[0], shape[1]);
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|r| ids[r * s..(r + 1) * s].iter().map(|&x| x as u32).collect())
        .collect();
    let masks: Vec<Vec<bool>> = (0..b)
        .map(|r| mask[r * s..(r + 1) * s].iter().map(|&x| x != 0.0).collect())
        .collect();
    let batch = TokenBatch::from_rows(&rows, Some(&masks));
    let labels = ids
        .iter()
        .zip(&mask)
        .map(|(&i, &m)| if m != 0.0 { i as i64 } else { -100 })
        .collect();
    (batch, labels)
}

/// transformers' causal-LM loss: logits[:, :-1] predict labels[:, 1:], mean over labels != -100.
pub fn hf_loss(logits: &[f32], labels: &[i64], b: usize, s: usize, v: usize) -> f64 {
    let mut sum = 0.0f64;
    let mut n = 0usize;
    for r in 0..b {
        for i in 0..s - 1 {
            let t = labels[r * s + i + 1];
            if t < 0 {
                continue;
            }
            let row = &logits[(r * s + i) * v..(r * s + i + 1) * v];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - row[t as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn check_arch(arch: &str) {
    let dir = fixture(&format!("models/{arch}"));
    let model = load_fixture_model::<B>(&dir, &Default::default());
    check_logits(arch, &model, &dir.join("reference.safetensors"));
}

/// The model's logits on a fixture's reference batch against transformers': every real position within 1e-4,
/// the loss within 1e-5, and the padded row alone (unpadded) within 1e-4. Returns the batch's logits.
pub fn check_logits<Bk: Kernels>(what: &str, model: &CausalLm<Bk>, reference: &Path) -> Vec<f32> {
    let (batch, labels) = reference_batch(reference);
    let logits = to_vec(model.forward(&batch));
    let (_, expected) = read_ref(reference, "logits");
    let v = model.config.vocab_size;
    // Compare real positions only: at padded query positions transformers' values depend on how it fills
    // fully-masked rows (it attends uniformly), which no caller uses.
    let d = (0..batch.batch * batch.seq)
        .filter(|&p| batch.attention_mask[p])
        .map(|p| max_abs_diff(&logits[p * v..(p + 1) * v], &expected[p * v..(p + 1) * v]))
        .fold(0.0f32, f32::max);
    let loss = hf_loss(&logits, &labels, batch.batch, batch.seq, v);
    let (_, exp_loss) = read_ref(reference, "loss");
    println!(
        "{what}: max |Δlogit| = {d:.3e}, loss {loss:.6} vs {:.6}",
        exp_loss[0]
    );
    assert!(d <= 1e-4, "{what}: max |Δlogit| = {d}");
    assert!(
        (loss - exp_loss[0] as f64).abs() <= 1e-5,
        "{what}: loss {loss} vs {}",
        exp_loss[0]
    );

    // The padded row alone, unpadded, gives the same logits at its real positions.
    let (shape, single) = read_ref(reference, "logits_single");
    let len = shape[1];
    let row: Vec<u32> = batch.input_ids[batch.seq..batch.seq + len].to_vec();
    let alone = to_vec(model.forward(&TokenBatch::from_rows(&[row], None)));
    let d1 = max_abs_diff(&alone, &single);
    assert!(d1 <= 1e-4, "{what}: unpadded row max |Δlogit| = {d1}");
    logits
}

macro_rules! parity_tests {
    ($($name:ident => $arch:literal),* $(,)?) => {
        $(#[test] fn $name() { check_arch($arch); })*
    };
}

parity_tests! {
    parity_llama => "llama",
    parity_mistral => "mistral",
    parity_qwen2 => "qwen2",
    parity_qwen3 => "qwen3",
    parity_phi3 => "phi3",
    parity_gemma => "gemma",
    parity_gemma2 => "gemma2",
    parity_mixtral => "mixtral",
    parity_falcon_7b_layout => "falcon",
    parity_falcon_new_decoder_architecture => "falcon-new",
    parity_falcon_sequential => "falcon-seq",
    parity_llama_bf16_weights_loaded_as_f32 => "llama-bf16",
}

/// Greedy continuations (KV-cached decoding) equal transformers' argmax steps over full forwards
/// (scripts/reference/moe_fixture.py, falcon_fixture.py): Mixtral across its sliding window of 5 with routing per
/// new token, and the three Falcon layouts.
#[test]
fn greedy_ids_equal_transformers() {
    use loratune::generate::{generate, GenerateOptions};
    for arch in ["mixtral", "falcon", "falcon-new", "falcon-seq"] {
        let dir = fixture(&format!("models/{arch}"));
        let reference = dir.join("reference.safetensors");
        let model = load_fixture_model::<B>(&dir, &Default::default());
        let ids = |name| -> Vec<u32> {
            read_ref(&reference, name)
                .1
                .iter()
                .map(|&x| x as u32)
                .collect()
        };
        let (prompt, want) = (ids("greedy_prompt"), ids("greedy_ids"));
        let opts = GenerateOptions {
            max_new_tokens: want.len(),
            stop_ids: Vec::new(),
            ..Default::default()
        };
        let (got, _) = generate(&model, &prompt, &opts, &mut |_| {}).unwrap();
        assert_eq!(got, want, "{arch}");
    }
}
