//! loratune's integration tests: one test binary (one link) with a module per concern.

mod axolotl;
mod bnb;
mod cli;
mod common;
mod config;
mod data;
mod export;
mod fused;
mod generate;
mod gguf_export;
mod hub;
mod lora;
mod ollama;
mod parallel;
mod parity;
mod quant;
mod sweep;
mod train;
mod weights;
