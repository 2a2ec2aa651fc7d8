//! loratune: LoRA fine-tuning for open-weight LLMs on Burn.
//!
//! The data flow, one module per stage: [`config`] → [`model`] → [`lora`] → [`data`] → [`train`] → [`export`],
//! plus [`kernels`] (the hot operations behind one facade), [`backend`] (which backend and device a job runs on),
//! [`hub`] (downloads), [`gguf`] (llama.cpp files), [`tokenizer`] (tokenizers and chat templates), [`generate`]
//! (sampling), [`bench`] (the step benchmark) and [`cli`] (argument parsing and printing).

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod heap;
pub mod hub;
pub mod kernels;
pub mod limits;
pub mod lora;
pub mod model;
mod names;
pub mod quant;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
