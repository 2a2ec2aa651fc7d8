//! The base model: configuration, weights, and one decoder with per-family switches.

pub mod config;
pub mod weights;

pub use config::{Activation, Family, ModelConfig, RopeConfig, RopeScaling};
pub use weights::{SafetensorsSource, StoredDtype, TensorSource};
