//! loratune's integration tests: one test binary (one link) with a module per concern.

mod common;
mod data;
mod lora;
mod parity;
