//! Weight-loading robustness: every mismatch is an error naming the tensor (and both shapes); corrupt or
//! truncated files are errors, never panics.

use std::path::Path;

use burn::tensor::DType;
use loratune::model::{self, CausalLm, ModelConfig, SafetensorsSource};

use crate::common::*;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    let device = Default::default();
    let cfg = match ModelConfig::from_file(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let src = match SafetensorsSource::open(dir) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    match CausalLm::<B>::load(cfg, &src, &device, DType::F32) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrite a fixture's model.safetensors through a filter over (name, shape, bytes).
fn rewrite(
    dir: &Path,
    f: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    use loratune::export::safetensors::{pt_metadata, write_safetensors, OutDtype, TensorEntry};
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries = Vec::new();
    for (name, t) in st.tensors() {
        if let Some((n, s, b)) = f(&name, t.shape().to_vec(), t.data().to_vec()) {
            entries.push(TensorEntry {
                name: n,
                dtype: OutDtype::F32,
                shape: s,
                bytes: b,
            });
        }
    }
    write_safetensors(&path, &entries, &pt_metadata()).unwrap();
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/qwen2"), tmp.path());
    rewrite(tmp.path(), |n, s, b| {
        (n != "model.layers.1.self_attn.k_proj.bias").then(|| (n.to_string(), s, b))
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("missing tensor `model.layers.1.self_attn.k_proj.bias`") && e.contains("[32]"),
        "{e}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/mistral"), tmp.path());
    rewrite(tmp.path(), |n, s, b| {
        if n == "model.norm.weight" {
            Some(("model.extra_head.weight".to_string(), s, b))
        } else {
            Some((n.to_string(), s, b))
        }
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("unexpected tensor `model.extra_head.weight`"),
        "{e}"
    );
    assert!(e.contains("missing tensor `model.norm.weight`"), "{e}");
    assert!(e.contains("2 problems"), "{e}");
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/llama"), tmp.path());
    rewrite(tmp.path(), |n, s, b| {
        if n == "model.layers.0.mlp.up_proj.weight" {
            // [128, 64] → [64, 128]: same bytes, transposed shape.
            Some((n.to_string(), vec![s[1], s[0]], b))
        } else {
            Some((n.to_string(), s, b))
        }
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight")
            && e.contains("[64, 128]")
            && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let good = std::fs::read(fixture("models/llama/model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/llama"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    // Cut at many points: inside the length prefix, the header, and the data.
    for cut in [0, 3, 8, 20, 100, 1000, good.len() / 2, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let e = load_err(tmp.path());
        assert!(
            e.contains("corrupt safetensors") || e.contains("truncated"),
            "cut {cut}: {e}"
        );
    }
    // A header length that points past the end, and a header that is not JSON.
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &bad).unwrap();
    assert!(load_err(tmp.path()).contains("exceeds the file size"));
    let mut bad = good.clone();
    bad[8] = b'#';
    std::fs::write(&path, &bad).unwrap();
    assert!(load_err(tmp.path()).contains("not JSON"));
}

#[test]
fn sharded_index_is_followed_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    // Produce a sharded copy through the exporter.
    let device = Default::default();
    let m = load_fixture_model::<B>(&fixture("models/gemma2"), &device);
    let opts = loratune::export::hf::MergedExportOptions {
        shard_size: Some(50_000),
        ..Default::default()
    };
    loratune::export::hf::save_merged(&m, &dir, &opts, &|_| Ok(())).unwrap();
    assert!(!dir.join("model.safetensors").exists());
    let opened = model::open(&dir).unwrap();
    let mm =
        CausalLm::<B>::load(opened.config, opened.source.as_ref(), &device, DType::F32).unwrap();
    let (batch, _) =
        crate::parity::reference_batch(&fixture("models/gemma2/reference.safetensors"));
    assert_eq!(to_vec(m.forward(&batch)), to_vec(mm.forward(&batch)));
    // An index naming a shard that lacks the tensor.
    let idx_path = dir.join("model.safetensors.index.json");
    let mut idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"]["model.norm.weight"] = serde_json::json!("model-00001-of-00009.safetensors");
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let e = SafetensorsSource::open(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("model.norm.weight"), "{e}");
}

#[test]
fn unknown_architecture_and_missing_folder_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/llama"), tmp.path());
    let p = tmp.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = model::open(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("MixtralForCausalLM")
            && e.contains("Gemma2ForCausalLM")
            && e.contains("config.json"),
        "{e}"
    );
    let e = model::open(&tmp.path().join("nope"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
}
