//! LoRA: the adapter-carrying linear layer, target selection, initialisation, merge, PEFT import/export.

pub mod adapter;
pub mod init;
pub mod linear;
pub mod peft;
pub mod targets;

pub use adapter::{attach, merge_all, LoraInit, LoraReport, LoraSettings};
pub use linear::{InitialFactors, LoraAdapter, LoraLinear};
pub use targets::{TargetMatcher, TargetSpec};
