//! Tokenizers (tokenizer.json or GGUF metadata) and HF chat templates.
