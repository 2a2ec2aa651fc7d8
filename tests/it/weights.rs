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
    v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = model::open(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("GPTNeoXForCausalLM")
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

/// The fixture's safetensors split into its JSON header (as a map) and its data bytes.
fn split_safetensors(bytes: &[u8]) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

/// Write a safetensors file from a header map (padded with spaces to 8 bytes, as the Python writer does) and
/// data bytes; `header_len_delta` misstates the header length.
fn join_safetensors(
    header: &serde_json::Map<String, serde_json::Value>,
    data: &[u8],
    header_len_delta: i64,
) -> Vec<u8> {
    let mut h = serde_json::to_string(header).unwrap();
    while !(h.len() + 8).is_multiple_of(8) || h.ends_with('}') {
        h.push(' ');
    }
    let n = (h.len() as i64 + header_len_delta) as u64;
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn offsets(h: &serde_json::Map<String, serde_json::Value>, name: &str) -> (u64, u64) {
    let o = h[name]["data_offsets"].as_array().unwrap();
    (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
}

#[test]
fn safetensors_tensors_must_tile_the_data_region() {
    let good = std::fs::read(fixture("models/llama/model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("models/llama"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let (header, data) = split_safetensors(&good);
    // The unchanged split-and-join loads: the cases below differ only in what they break.
    std::fs::write(&path, join_safetensors(&header, &data, 0)).unwrap();
    SafetensorsSource::open(tmp.path()).unwrap();

    let (a, b) = (
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
    );
    // Overlap: layer 1's norm reads layer 0's bytes (same size, so the byte count alone cannot tell).
    let mut h = header.clone();
    h[b]["data_offsets"] = header[a]["data_offsets"].clone();
    std::fs::write(&path, join_safetensors(&h, &data, 0)).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("corrupt safetensors") && e.contains("overlaps"),
        "{e}"
    );

    // Gap: 4 stray bytes after one tensor, every later offset shifted past them.
    let (_, end_a) = offsets(&header, a);
    let mut h = header.clone();
    for (_, info) in h.iter_mut().filter(|(k, _)| *k != "__metadata__") {
        let o = info["data_offsets"].as_array().unwrap();
        let (s, e) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
        if s >= end_a {
            info["data_offsets"] = serde_json::json!([s + 4, e + 4]);
        }
    }
    let mut d = data[..end_a as usize].to_vec();
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(&data[end_a as usize..]);
    std::fs::write(&path, join_safetensors(&h, &d, 0)).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("leaves a gap") && e.contains(a), "{e}");

    // A header length one short: still JSON (the padding absorbs it), but every tensor is read one byte early.
    std::fs::write(&path, join_safetensors(&header, &data, -1)).unwrap();
    let e = load_err(tmp.path());
    assert!(
        e.contains("1 bytes after the last tensor belong to no tensor"),
        "{e}"
    );

    // Extra bytes at the end of the file.
    let mut d = data.clone();
    d.extend_from_slice(&[0; 16]);
    std::fs::write(&path, join_safetensors(&header, &d, 0)).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("16 bytes after the last tensor"), "{e}");

    // A byte length that does not match dtype × shape, for a dtype loratune does not load (still checked).
    let mut h = header.clone();
    h[a]["dtype"] = serde_json::json!("I64");
    std::fs::write(&path, join_safetensors(&h, &data, 0)).unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains(a) && e.contains("needs"), "{e}");
}

#[test]
fn absurd_config_numbers_are_errors_before_anything_is_allocated() {
    // num_hidden_layers 1e9 once aborted on a 16 GB allocation, 2^63 panicked ("capacity overflow") and 1e6
    // took 20 s and 3.8 GB before failing. Each is now an error naming the key and the bound, at once.
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("models/llama/config.json")).unwrap(),
    )
    .unwrap();
    let cases: &[(&str, serde_json::Value, &str)] = &[
        (
            "num_hidden_layers",
            serde_json::json!(1_000_000_000u64),
            "512",
        ),
        ("num_hidden_layers", serde_json::json!(1u64 << 63), "512"),
        ("num_hidden_layers", serde_json::json!(1_000_000u64), "512"),
        ("vocab_size", serde_json::json!(1u64 << 40), "1048576"),
        ("hidden_size", serde_json::json!(1u64 << 32), "65536"),
        ("intermediate_size", serde_json::json!(u64::MAX), "262144"),
        ("num_attention_heads", serde_json::json!(1u64 << 20), "1024"),
        ("head_dim", serde_json::json!(1u64 << 30), "1024"),
        (
            "max_position_embeddings",
            serde_json::json!(1u64 << 40),
            "16777216",
        ),
    ];
    for (key, value, bound) in cases {
        let mut v = base.clone();
        v[*key] = value.clone();
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{key}` = {value}")) && e.contains(bound),
            "{key}={value}: {e}"
        );
    }
    // A token id beyond u32 is an error, not a silent wrap.
    let mut v = base.clone();
    v["eos_token_id"] = serde_json::json!(1u64 << 32);
    let e = ModelConfig::from_json(&v).unwrap_err().to_string();
    assert!(e.contains("eos_token_id"), "{e}");
}
