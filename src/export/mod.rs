//! Writing results: atomic files and folders, safetensors, merged Hugging Face folders.

pub mod atomic;
pub mod hf;
pub mod merge;
pub mod safetensors;
