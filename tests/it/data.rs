//! Data path × model: packed rows must give every sample exactly the logits and loss it gets alone.

use std::path::Path;
use std::sync::Arc;

use loratune::data::{
    Batch, DataFormat, DataOptions, DataPipeline, DatasetSource, SampleBuilder, SpecialToken, TextTokenizer,
};
use loratune::model::{NoDropout, TokenBatch};
use loratune::tokenizer::ChatTemplate;
use loratune::train::loss::lm_loss_sum;

use crate::common::{fixture, load_fixture_model, max_abs_diff, to_vec, B};

fn builder() -> SampleBuilder {
    let t = tokenizers::Tokenizer::from_file(fixture("tokenizer/tokenizer.json")).unwrap();
    let src = std::fs::read_to_string(fixture("templates/HuggingFaceTB-SmolLM2-135M-Instruct.jinja")).unwrap();
    SampleBuilder {
        tok: TextTokenizer {
            tokenizer: Arc::new(t),
            bos: None,
            eos: Some(SpecialToken {
                text: "<|im_end|>".into(),
                id: 2,
            }),
            pad_id: 3,
            add_bos: false,
            end_of_turn_ids: vec![2],
        },
        template: Some(Arc::new(ChatTemplate::new(&src, None, Some("<|im_end|>")).unwrap())),
        train_on_inputs: false,
    }
}

/// Short chat records (short enough that several share a 64-token row with the fixture tokenizer).
fn write_data(dir: &Path) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..12 {
        let rec = serde_json::json!({"messages": [
            {"role": "system", "content": "Hi."},
            {"role": "user", "content": format!("q{i}")},
            {"role": "assistant", "content": format!("a {}", "xy".repeat(i % 4))},
        ]});
        s.push_str(&rec.to_string());
        s.push('\n');
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

fn row_slice(t: &[f32], row: usize, seq: usize, vocab: usize, from: usize, len: usize) -> Vec<f32> {
    t[(row * seq + from) * vocab..(row * seq + from + len) * vocab].to_vec()
}

#[test]
fn packed_samples_see_only_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path());
    let opts = DataOptions {
        sample_packing: true,
        sequence_len: 64,
        micro_batch_size: 2,
        ..Default::default()
    };
    let p = DataPipeline::new(
        vec![DatasetSource::new(data.to_string_lossy(), DataFormat::Chat)],
        vec![],
        opts,
        builder(),
        dir.path().join("cache"),
    )
    .unwrap();
    let prep = p.prepared().unwrap();
    let plan = prep.epoch_plan(0);
    let device = Default::default();
    // llama: full attention; mistral: sliding window 5; gemma2: soft-capping + alternating window.
    for arch in ["llama", "mistral", "gemma2"] {
        let model = load_fixture_model::<B>(&fixture(&format!("models/{arch}")), &device);
        let vocab = model.config.vocab_size;
        let mut packed_rows = 0;
        for b in 0..plan.batches() {
            let rows = plan.batch_rows(b);
            let batch: Batch = prep.make_batch(&prep.train_cache, &rows, 0, b as u64).unwrap();
            let tb = &batch.tokens;
            let logits = to_vec(model.forward(tb));
            // The same grid without segment ids: what leaking attention would compute.
            let leaky = TokenBatch {
                segment_ids: None,
                ..tb.clone()
            };
            let leaky_logits = to_vec(model.forward(&leaky));
            let (packed_loss, packed_n) = lm_loss_sum(&model, tb, &batch.labels, &mut NoDropout);
            let packed_loss: f32 = to_vec(packed_loss)[0];
            assert_eq!(packed_n, batch.trained_tokens);
            let mut alone_loss = 0f32;
            let mut alone_n = 0usize;
            for (r, row) in rows.iter().enumerate() {
                packed_rows += (row.len() > 1) as usize;
                let mut at = 0usize;
                for (k, &s) in row.iter().enumerate() {
                    let single = prep.make_batch(&prep.train_cache, &[&[s][..]], 0, 0).unwrap();
                    let n = single.tokens.seq;
                    let alone = to_vec(model.forward(&single.tokens));
                    let got = row_slice(&logits, r, tb.seq, vocab, at, n);
                    let d = max_abs_diff(&got, &alone);
                    assert!(d < 1e-4, "{arch}: sample {s} (#{k} in row {r}) differs from its solo logits by {d}");
                    if k > 0 {
                        let leak = max_abs_diff(&row_slice(&leaky_logits, r, tb.seq, vocab, at, n), &alone);
                        assert!(leak > 1e-2, "{arch}: leaking attention would change logits by only {leak}");
                    }
                    let (l, c) = lm_loss_sum(&model, &single.tokens, &single.labels, &mut NoDropout);
                    alone_loss += to_vec(l)[0];
                    alone_n += c;
                    at += n;
                }
            }
            assert_eq!(packed_n, alone_n, "{arch}: loss targets");
            let rel = (packed_loss - alone_loss).abs() / alone_loss.abs().max(1e-6);
            assert!(rel < 1e-5, "{arch}: packed loss {packed_loss} vs samples alone {alone_loss}");
        }
        assert!(packed_rows >= 2, "{arch}: the test needs rows holding several samples");
    }
}
