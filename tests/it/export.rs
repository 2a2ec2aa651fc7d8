//! Exports that other tools load: a loratune-trained adapter in PEFT and a merged folder in transformers.
//!
//! The adapter and merged folders below are produced deterministically by loratune and committed under
//! tests/fixtures/loratune_export/<arch>/; scripts/reference/check_loratune_exports.py loaded them with
//! PEFT 0.21.2 / transformers 5.24.0 and stored those libraries' logits next to them. These tests (1) re-create
//! the exports and require them to be byte-identical to the committed ones (so the Python verdict still applies)
//! and (2) compare loratune's logits with PEFT's / transformers' logits on the same files.
//! Regenerate with `LORATUNE_REGEN_EXPORT_FIXTURES=1 cargo test --release --test it export::` then rerun the script.

use loratune::quant::Frozen;
use std::path::Path;

use loratune::export::hf::{save_merged, MergedExportOptions};
use loratune::export::safetensors::OutDtype;
use loratune::lora::adapter::{lora_params, set_lora_params};
use loratune::lora::peft::{load_adapter, save_adapter};
use loratune::lora::{attach, LoraInit, LoraSettings, TargetSpec};
use loratune::model::{self, CausalLm, TokenBatch};
use rand::{Rng, SeedableRng};

use crate::common::*;
use crate::parity::reference_batch;

fn settings() -> LoraSettings {
    LoraSettings {
        r: 4,
        alpha: 16.0,
        dropout: 0.05,
        use_rslora: false,
        targets: TargetSpec::AllLinear,
        layers: None,
        init: LoraInit::Kaiming,
        seed: 1234,
        use_dora: false,
        modules_to_save: Vec::new(),
    }
}

/// A fixture base with a loratune adapter whose B factors are non-zero (as after training).
fn adapted(arch: &str) -> CausalLm<B> {
    let device = Default::default();
    let mut m = load_fixture_model::<B>(&fixture(&format!("models/{arch}")), &device);
    attach(&mut m, &settings()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let params: Vec<_> = lora_params(&m)
        .into_iter()
        .map(|(k, t)| {
            if k.contains("lora_B") {
                let [o, r] = t.dims();
                let v: Vec<f32> = (0..o * r).map(|_| rng.random_range(-0.3f32..0.3)).collect();
                burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [o, r]), &device)
            } else {
                t
            }
        })
        .collect();
    set_lora_params(&mut m, params);
    m
}

fn files_equal(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert!(x == y, "{} differs from the committed {}: exports are not deterministic, or the fixture is stale (regenerate, rerun the Python check)", a.display(), b.display());
}

fn real_max_diff(a: &[f32], b: &[f32], batch: &TokenBatch, v: usize) -> f32 {
    (0..batch.batch * batch.seq)
        .filter(|&p| batch.attention_mask[p])
        .map(|p| max_abs_diff(&a[p * v..(p + 1) * v], &b[p * v..(p + 1) * v]))
        .fold(0.0, f32::max)
}

fn check(arch: &str) {
    let fx = fixture(&format!("loratune_export/{arch}"));
    let regen = std::env::var("LORATUNE_REGEN_EXPORT_FIXTURES").is_ok();
    let tmp = tempfile::tempdir().unwrap();
    let out = if regen {
        fx.clone()
    } else {
        tmp.path().to_path_buf()
    };
    let m = adapted(arch);
    let (batch, _) = reference_batch(&fixture(&format!("models/{arch}/reference.safetensors")));
    let v = m.config.vocab_size;
    let logits = to_vec(m.forward(&batch));

    // Adapter: PEFT layout, then reload into a fresh base: identical logits.
    save_adapter(
        &m,
        &settings(),
        &format!("tests/fixtures/models/{arch}"),
        &out.join("adapter"),
    )
    .unwrap();
    let device = Default::default();
    let mut fresh = load_fixture_model::<B>(&fixture(&format!("models/{arch}")), &device);
    let a = load_adapter(&mut fresh, &out.join("adapter")).unwrap();
    assert_eq!(a.settings.r, 4);
    let reloaded = to_vec(fresh.forward(&batch));
    assert_eq!(
        max_abs_diff(&logits, &reloaded),
        0.0,
        "adapter round trip changed logits"
    );

    // Merged f32 folder, reloaded through the public loading path.
    let mut merged_src = adapted(arch);
    loratune::lora::merge_all(&mut merged_src);
    let opts = MergedExportOptions {
        extra_eos_ids: vec![2],
        ..Default::default()
    };
    let tok_src = fixture(&format!("models/{arch}"));
    save_merged(&merged_src, &out.join("merged"), &opts, &|d| {
        loratune::export::hf::copy_tokenizer_files(&tok_src, d).map(|_| ())
    })
    .unwrap();
    let opened = model::open(&out.join("merged")).unwrap();
    let mm = CausalLm::<B>::load(
        opened.config,
        opened.source.as_ref(),
        &device,
        burn::tensor::DType::F32,
    )
    .unwrap();
    let merged_logits = to_vec(mm.forward(&batch));
    let dm = real_max_diff(&logits, &merged_logits, &batch, v);
    println!("{arch}: merged (reloaded) vs base+adapter max |Δlogit| = {dm:.3e}");
    assert!(dm <= 1e-4);
    assert!(!out.join("merged/model.safetensors").as_os_str().is_empty());
    if m.config.tie_word_embeddings {
        let names = ref_names(&out.join("merged/model.safetensors"));
        assert!(
            !names.iter().any(|n| n == "lm_head.weight"),
            "tied model exported an lm_head"
        );
    }

    if regen {
        write_logits(
            &fx.join("loratune_logits.safetensors"),
            &logits,
            &[batch.batch, batch.seq, v],
        );
        println!("regenerated {}", fx.display());
        return;
    }
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/generation_config.json",
    ] {
        files_equal(&out.join(f), &fx.join(f));
    }
    // What PEFT and transformers computed on these very files.
    let (_, peft) = read_ref(&fx.join("external_logits.safetensors"), "peft_logits");
    let (_, hf_merged) = read_ref(
        &fx.join("external_logits.safetensors"),
        "transformers_merged_logits",
    );
    let dp = real_max_diff(&logits, &peft, &batch, v);
    let dh = real_max_diff(&logits, &hf_merged, &batch, v);
    println!("{arch}: loratune vs PEFT (our adapter) {dp:.3e}; vs transformers (our merged folder) {dh:.3e}");
    assert!(
        dp <= 1e-4,
        "PEFT disagrees with loratune on loratune's adapter: {dp}"
    );
    assert!(
        dh <= 1e-4,
        "transformers disagrees with loratune on loratune's merged folder: {dh}"
    );
}

fn write_logits(path: &Path, v: &[f32], shape: &[usize]) {
    use loratune::export::safetensors::{encode, pt_metadata, write_safetensors, TensorEntry};
    let e = TensorEntry {
        name: "logits".into(),
        dtype: OutDtype::F32,
        shape: shape.to_vec(),
        bytes: encode(v, OutDtype::F32),
    };
    write_safetensors(path, &[e], &pt_metadata()).unwrap();
}

#[test]
fn export_llama_adapter_and_merged_load_in_peft_and_transformers() {
    check("llama");
}

#[test]
fn export_qwen2_adapter_and_merged_load_in_peft_and_transformers() {
    check("qwen2");
}

#[test]
fn export_phi3_adapter_and_merged_load_in_peft_and_transformers() {
    check("phi3");
}

/// Falcon's new decoder architecture (grouped query_key_value, biases, ln_attn + ln_mlp) with adapters on every
/// linear.
#[test]
fn export_falcon_adapter_and_merged_load_in_peft_and_transformers() {
    check("falcon-new");
}

/// Mixtral with adapters on every linear (attention, the router, every expert's w1/w2/w3): the adapter in the
/// per-expert layout (PEFT on transformers 4, vLLM; PEFT 0.21 converts it onto transformers 5's fused experts).
#[test]
fn export_mixtral_adapter_and_merged_load_in_peft_and_transformers() {
    check("mixtral");
}

/// Sharded bf16 export: index + shards reload; logits within bf16 rounding of the f32 merge.
#[test]
fn sharded_bf16_merged_export_reloads() {
    let mut m = adapted("qwen2");
    let (batch, _) = reference_batch(&fixture("models/qwen2/reference.safetensors"));
    let base = to_vec(m.forward(&batch));
    loratune::lora::merge_all(&mut m);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("merged");
    let opts = MergedExportOptions {
        dtype: OutDtype::BF16,
        shard_size: Some(100_000),
        ..Default::default()
    };
    save_merged(&m, &dir, &opts, &|_| Ok(())).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() >= 3, "expected several shards, got {files:?}");
    let total = index["metadata"]["total_size"].as_u64().unwrap();
    let n_params = m.config.num_parameters() as u64;
    assert_eq!(
        total,
        2 * n_params,
        "total_size must count bf16 bytes of every tensor"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let opened = model::open(&dir).unwrap();
    assert_eq!(
        opened.source.stored_dtype("model.norm.weight"),
        Some(loratune::model::StoredDtype::BF16)
    );
    let device = Default::default();
    let mm = CausalLm::<B>::load(
        opened.config,
        opened.source.as_ref(),
        &device,
        burn::tensor::DType::F32,
    )
    .unwrap();
    let got = to_vec(mm.forward(&batch));
    let d = real_max_diff(&base, &got, &batch, m.config.vocab_size);
    // The exact expectation: the f32 merge with every tensor rounded to bf16 (round-to-nearest-even).
    use loratune::lora::linear::round_to_dtype;
    let bf = burn::tensor::DType::BF16;
    let f = burn::tensor::DType::F32;
    let r2 = |t: burn::tensor::Tensor<B, 2>| round_to_dtype(t, bf).cast(f);
    let r1 = |t: burn::tensor::Tensor<B, 1>| round_to_dtype(t, bf).cast(f);
    m.model.embed_tokens.weight = Frozen::Dense(r2(m.model.embed_tokens.weight.dense()));
    for (_, l) in m.linears_mut() {
        l.weight = Frozen::Dense(r2(l.weight.dense()));
        l.bias = l.bias.clone().map(r1);
    }
    for layer in &mut m.model.layers {
        layer.input_norm.weight = r1(layer.input_norm.weight.clone());
        if let Some(n) = &mut layer.mlp_in_norm {
            n.weight = r1(n.weight.clone());
        }
    }
    m.model.norm.weight = r1(m.model.norm.weight.clone());
    let rounded = to_vec(m.forward(&batch));
    let dr = real_max_diff(&rounded, &got, &batch, m.config.vocab_size);
    println!("qwen2 bf16 sharded export: max |Δlogit| vs f32 merge {d:.3e}, vs bf16-rounded merge {dr:.3e}");
    assert!(d > 1e-3, "bf16 export looks like f32 ({d})");
    assert!(
        dr <= 1e-5,
        "bf16 export differs from the rounded merge by {dr}"
    );
}

/// Unmerge restores the pre-merge weights (f32 base: exact up to f32 rounding of W + Δ − Δ).
#[test]
fn merge_then_unmerge_restores_weights() {
    let mut m = adapted("llama");
    let before: Vec<Vec<f32>> = m
        .linears()
        .iter()
        .map(|(_, l)| to_vec(l.weight.dense()))
        .collect();
    for (_, l) in m.linears_mut() {
        l.merge();
    }
    let (batch, _) = reference_batch(&fixture("models/llama/reference.safetensors"));
    for (_, l) in m.linears_mut() {
        l.unmerge();
    }
    let after: Vec<Vec<f32>> = m
        .linears()
        .iter()
        .map(|(_, l)| to_vec(l.weight.dense()))
        .collect();
    let d = before
        .iter()
        .zip(&after)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(d < 1e-6, "unmerge drifted by {d}");
    let _ = m.forward(&batch);
}

/// The streaming merge (`loratune merge`) writes exactly what the in-memory merge wrote, and transformers
/// loaded that folder to loratune's logits (external_logits.safetensors).
#[test]
fn streaming_merge_equals_in_memory_merge() {
    for arch in ["llama", "phi3"] {
        let fx = fixture(&format!("loratune_export/{arch}"));
        let base = model::open(&fixture(&format!("models/{arch}"))).unwrap();
        let adapter = loratune::lora::peft::read_adapter(&fx.join("adapter")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let opts = MergedExportOptions {
            extra_eos_ids: vec![2],
            ..Default::default()
        };
        loratune::export::merge::merge_to_folder(
            &base,
            Some(&adapter),
            &tmp.path().join("m"),
            &opts,
            &|_| Ok(()),
        )
        .unwrap();
        files_equal(
            &tmp.path().join("m/model.safetensors"),
            &fx.join("merged/model.safetensors"),
        );
        files_equal(
            &tmp.path().join("m/config.json"),
            &fx.join("merged/config.json"),
        );
    }
}

/// `loratune merge` keeps the base's dtype by default, as PEFT's `merge_and_unload` does: an f32 base gives exactly
/// the f32 merge (it used to be rounded to bf16), a bf16 base a bf16 folder; `--dtype` still overrides.
#[test]
fn cli_merge_keeps_the_base_dtype_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture("loratune_export/llama");
    let merge = |base: &str, out: &str, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_loratune"))
            .arg("merge")
            .arg("--model")
            .arg(fixture(base))
            .arg("--adapter")
            .arg(fx.join("adapter"))
            .arg("--out")
            .arg(tmp.path().join(out))
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(out).join("config.json")).unwrap(),
        )
        .unwrap();
        let src = model::open(&tmp.path().join(out)).unwrap();
        let dtypes: std::collections::BTreeSet<String> = src
            .source
            .names()
            .iter()
            .map(|n| src.source.stored_dtype(n).unwrap().to_string())
            .collect();
        (cfg["torch_dtype"].as_str().unwrap().to_string(), dtypes)
    };
    let (name, dtypes) = merge("models/llama", "f32", &[]);
    assert_eq!(name, "float32");
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), vec!["F32"]);
    files_equal(
        &tmp.path().join("f32/model.safetensors"),
        &fx.join("merged/model.safetensors"),
    );
    let (name, dtypes) = merge("models/llama-bf16", "bf16", &[]);
    assert_eq!(name, "bfloat16");
    assert_eq!(dtypes.into_iter().collect::<Vec<_>>(), vec!["BF16"]);
    let (name, _) = merge("models/llama", "override", &["--dtype", "f16"]);
    assert_eq!(name, "float16");
}

#[test]
fn attach_refuses_an_absurd_rank_before_allocating() {
    let device = Default::default();
    let mut m = load_fixture_model::<B>(&fixture("models/llama"), &device);
    let s = LoraSettings {
        r: 1_000_000_000,
        ..settings()
    };
    let e = attach(&mut m, &s).unwrap_err().to_string();
    assert!(e.contains("lora_r") && e.contains("4096"), "{e}");
}
