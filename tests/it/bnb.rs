//! A pre-quantized bitsandbytes 4-bit checkpoint as transformers saves it (tests/fixtures/models/llama-bnb4bit,
//! made by scripts/reference/bnb4bit_fixture.py: the llama fixture quantized to NF4 + double quantization by
//! `BitsAndBytesConfig(load_in_4bit=True, …)` and `save_pretrained`): loaded kept as NF4 and dequantized, both
//! give transformers' logits of the 4-bit model (the parity tests' tolerances: max |Δlogit| ≤ 1e-4, loss 1e-5).

use std::path::Path;

use burn::tensor::DType;
use loratune::model::{open, CausalLm};
use loratune::quant::BasePlan;

use crate::common::*;
use crate::parity::check_logits;

fn dir() -> std::path::PathBuf {
    fixture("models/llama-bnb4bit")
}

fn load(dir: &Path, plan: BasePlan) -> loratune::error::Result<CausalLm<B>> {
    let opened = open(dir)?;
    CausalLm::<B>::load_with(
        opened.config,
        &*opened.source,
        &Default::default(),
        DType::F32,
        plan,
    )
}

#[test]
fn transformers_bnb_4bit_checkpoint_loads_kept_as_nf4_and_dequantized_with_its_logits() {
    let kept = load(&dir(), BasePlan::KEEP).unwrap();
    let linears = kept.linears();
    assert_eq!(
        linears.len(),
        2 * 7 + 1,
        "{:?}",
        linears.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, l) in &linears {
        if path == "lm_head" {
            assert!(l.tied, "the fixture's lm_head is tied");
            assert!(l.weight.quant().is_none(), "lm_head must stay dense");
        } else {
            assert_eq!(
                l.weight.quant().map(|q| q.format()).as_deref(),
                Some("NF4+DQ"),
                "{path}: not kept as bitsandbytes NF4"
            );
        }
    }
    assert!(
        kept.model.embed_tokens.weight.quant().is_none(),
        "embeddings must be dense"
    );
    let logits_kept = check_logits(
        "bnb-4bit kept as NF4",
        &kept,
        &dir().join("reference.safetensors"),
    );

    let dense = load(&dir(), BasePlan::DENSE).unwrap();
    for (path, l) in dense.linears() {
        assert!(
            l.weight.quant().is_none(),
            "{path}: DENSE kept a quantized weight"
        );
    }
    let logits_dense = check_logits(
        "bnb-4bit dequantized",
        &dense,
        &dir().join("reference.safetensors"),
    );

    // The two paths hold the same weights: the NF4 matrix dequantized equals the dense copy bit for bit.
    for ((path, k), (_, d)) in kept.linears().iter().zip(dense.linears()) {
        let a = to_vec(k.weight.dense_f32());
        let b = to_vec(d.weight.dense_f32());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{path}: dequantized NF4 differs from the DENSE load"
        );
    }
    println!(
        "kept vs dequantized: max |Δlogit| = {:.3e}",
        max_abs_diff(&logits_kept, &logits_dense)
    );
}

/// A checkpoint missing one companion tensor (`….absmax`) fails, naming the missing key, kept or dequantized.
#[test]
fn bnb_4bit_checkpoint_missing_an_absmax_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let missing = "model.layers.1.mlp.up_proj.weight.absmax";
    let bytes = std::fs::read(dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().contains(&missing), "fixture lacks {missing}");
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != missing)
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();

    for plan in [BasePlan::KEEP, BasePlan::DENSE] {
        let err = match load(tmp.path(), plan) {
            Ok(_) => panic!("{plan:?}: a checkpoint without {missing} loaded"),
            Err(e) => e.to_string(),
        };
        println!("{plan:?}: {err}");
        assert!(
            err.contains(missing),
            "{plan:?}: error does not name {missing}: {err}"
        );
    }
}
