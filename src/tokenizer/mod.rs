//! Tokenizers (tokenizer.json or GGUF metadata) and HF chat templates.

pub mod chat_template;

pub use chat_template::{ChatTemplate, Message, BUILTIN_TEMPLATES};
