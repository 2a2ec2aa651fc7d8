//! Writing results: atomic files and folders, safetensors, merged Hugging Face folders, GGUF (llama.cpp) files
//! and Ollama folders.

pub mod atomic;
pub mod gguf;
pub mod hf;
pub mod merge;
pub mod ollama;
pub mod safetensors;
pub mod size;

pub use safetensors::{ExportDtype, OutDtype};
pub use size::ByteSize;
