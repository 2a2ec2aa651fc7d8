//! GGUF files (llama.cpp / Ollama): reading metadata and tensors, dequantisation, and writing exports.
//!
//! - [`GgufFile`] ([`reader`]): header, metadata, tensor infos, raw / dequantised tensor data, memory-mapped
//!   and bounds-checked.
//! - [`dequant`]: ggml block formats → f32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K).
//! - [`tensors`]: llama.cpp ↔ HF tensor names, llama q/k row (un)permutation, Gemma norm offsets.
//! - [`config`]: `{arch}.*` metadata → [`crate::model::ModelConfig`].
//! - [`GgufSource`] ([`source`]): a GGUF model as a [`crate::model::TensorSource`].

pub mod config;
pub mod dequant;
pub mod reader;
pub mod source;
pub mod tensors;
pub mod types;
pub mod value;

#[cfg(test)]
mod tests;

pub use config::model_config;
pub use reader::{GgufFile, TensorInfo};
pub use source::GgufSource;
pub use types::GgmlType;
pub use value::MetaValue;
