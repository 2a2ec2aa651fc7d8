//! GGUF files (llama.cpp / Ollama): reading metadata and tensors, dequantisation, and writing exports.

pub mod value;

pub use value::MetaValue;
