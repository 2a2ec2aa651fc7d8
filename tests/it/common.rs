//! Shared helpers: fixture paths, reading reference tensors, comparing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor};
use loratune::model::{CausalLm, ModelConfig, SafetensorsSource};

pub type B = burn::backend::Flex;
pub type AD = burn::backend::Autodiff<B>;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The real SmolLM2 GGUF. Fails (never skips) with the fix when it is absent.
pub fn smollm2_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("LORATUNE_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh (or set LORATUNE_SMOLLM2_GGUF)",
        p.display()
    );
    p
}

/// A tensor from a reference safetensors file, as (shape, f32 values); integer tensors are converted.
pub fn read_ref(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{}: no tensor {name}", path.display()));
    let shape = t.shape().to_vec();
    let d = t.data();
    let vals: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        safetensors::Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("unsupported reference dtype {other:?}"),
    };
    (shape, vals)
}

/// Names of all tensors in a safetensors file.
pub fn ref_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(|s| s.to_string()).collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn to_vec<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

/// Load a fixture model folder in f32 on the CPU backend.
pub fn load_fixture_model<Bk: burn::tensor::backend::Backend>(
    dir: &Path,
    device: &Bk::Device,
) -> CausalLm<Bk> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let src = SafetensorsSource::open(dir).unwrap();
    CausalLm::load(cfg, &src, device, DType::F32).unwrap()
}
