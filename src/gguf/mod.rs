//! GGUF files (llama.cpp / Ollama): reading metadata and tensors, dequantisation, and writing exports.
//!
//! - [`GgufFile`] ([`reader`]): header, metadata, tensor infos, raw / dequantised tensor data, memory-mapped
//!   and bounds-checked.
//! - [`dequant`]: ggml block formats → f32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K).
//! - [`tensors`]: llama.cpp ↔ HF tensor names, llama q/k row (un)permutation, Gemma norm offsets.
//! - [`config`]: `{arch}.*` metadata → [`crate::model::ModelConfig`].
//! - [`GgufSource`] ([`source`]): a GGUF model as a [`crate::model::TensorSource`].
//! - [`GgufWriter`] ([`writer`]) and [`quant`]: writing GGUF v3 files (F32, F16, BF16, Q8_0, Q4_0 tensors).

pub mod config;
pub mod dequant;
pub mod quant;
pub mod reader;
pub mod source;
pub mod tensors;
pub mod types;
pub mod value;
pub mod writer;

#[cfg(test)]
mod tests;

pub use config::model_config;
pub use reader::{GgufFile, TensorInfo};
pub use source::GgufSource;
pub use types::GgmlType;
pub use value::MetaValue;
pub use writer::{GgufWriter, TensorPayload};

/// Whether `path` is a GGUF file: a `.gguf` name, or a file that starts with the GGUF magic (an Ollama blob,
/// `blobs/sha256-…`, has no extension). The one test every loader uses.
pub fn is_gguf_file(path: &std::path::Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == reader::GGUF_MAGIC
}
