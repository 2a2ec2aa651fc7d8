//! Upper bounds on every count or size loratune reads from a file or a config, checked before anything is
//! allocated from it. One table: the readers (config.json, GGUF metadata, safetensors and GGUF headers, the
//! YAML config, PEFT adapters) all check against these values, and an error names the field and the bound.
//!
//! The bounds sit well above every released open-weight model (the largest dense models have 126 layers,
//! hidden 16384, intermediate 53248, 128 heads, head_dim 256, vocabularies of 262144), so a real model never
//! meets them; a corrupt or hostile file does, before it can ask for gigabytes.
//!
//! | field | bound | why |
//! |---|---|---|
//! | `num_hidden_layers` | 512 | llama.cpp's `LLAMA_MAX_LAYERS` |
//! | `vocab_size` | 2^20 | 4× the largest released vocabulary |
//! | `hidden_size` | 2^16 | 4× Llama 3.1 405B |
//! | `intermediate_size` | 2^18 | ~5× Llama 3.1 405B |
//! | `num_attention_heads`, `num_key_value_heads` | 1024 | 8× the most heads released |
//! | `head_dim` | 1024 | 4× Gemma's 256 |
//! | `max_position_embeddings`, `sliding_window` | 2^24 | 16 M positions (above the 10 M context claims) |
//! | `lora_r` | 4096 | far above useful ranks (8–256) |
//! | `sequence_len` | 2^20 | a million tokens per sample |
//! | `micro_batch_size`, `gradient_accumulation_steps` | 2^16 | |
//! | tensor rank | 8 (safetensors), 4 (GGUF, ggml's `GGML_MAX_DIMS`) | |
//! | safetensors header | 100 MB | the safetensors crate's `MAX_HEADER_SIZE` |
//! | GGUF strings, arrays | the bytes left in the file; 2^24 metadata values | |
//! | one chat-template render | 2^23 fuel (~8 M steps, ~512 MB of text) | minijinja's fuel |
//! | a template's `str.format` width, `str.replace` result | 64 MiB | built before fuel is charged |
//! | a template's `tojson` indent | 1024 | |

/// One bound: the largest accepted value of a named field, and where the number comes from.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub field: &'static str,
    pub max: u64,
    pub why: &'static str,
}

/// Bounds on the model hyper-parameters, by their `config.json` names (GGUF keys map onto these).
pub const MODEL: &[Bound] = &[
    Bound {
        field: "num_hidden_layers",
        max: 512,
        why: "llama.cpp's LLAMA_MAX_LAYERS",
    },
    Bound {
        field: "vocab_size",
        max: 1 << 20,
        why: "4× the largest released vocabulary",
    },
    Bound {
        field: "hidden_size",
        max: 1 << 16,
        why: "4× the largest released model",
    },
    Bound {
        field: "intermediate_size",
        max: 1 << 18,
        why: "5× the largest released model",
    },
    Bound {
        field: "num_attention_heads",
        max: 1024,
        why: "8× the most heads released",
    },
    Bound {
        field: "num_key_value_heads",
        max: 1024,
        why: "8× the most heads released",
    },
    Bound {
        field: "head_dim",
        max: 1024,
        why: "4× the largest released head",
    },
    Bound {
        field: "max_position_embeddings",
        max: 1 << 24,
        why: "16 M positions",
    },
    Bound {
        field: "sliding_window",
        max: 1 << 24,
        why: "16 M positions",
    },
    Bound {
        field: "num_local_experts",
        max: 512,
        why: "llama.cpp's LLAMA_MAX_EXPERTS",
    },
];

/// Largest LoRA rank (`lora_r`, or `r` in a PEFT `adapter_config.json`).
pub const LORA_RANK: Bound = Bound {
    field: "lora_r",
    max: 4096,
    why: "far above useful ranks (8–256)",
};

/// Longest training sample in tokens.
pub const SEQUENCE_LEN: Bound = Bound {
    field: "sequence_len",
    max: 1 << 20,
    why: "a million tokens per sample",
};

/// Largest micro-batch and accumulation count.
pub const BATCH: u64 = 1 << 16;

/// Most dimensions of a safetensors tensor (the real ones have at most 5).
pub const SAFETENSORS_RANK: usize = 8;

/// Largest safetensors JSON header in bytes (the safetensors crate's `MAX_HEADER_SIZE`).
pub const SAFETENSORS_HEADER: u64 = 100_000_000;

/// Fuel of one chat-template render (minijinja: about one unit per instruction and per 64 bytes created), so a
/// template that loops or doubles strings stops with an error: ~8 M instructions or ~512 MB of text, where the
/// templates of real models use a few thousand units per conversation.
pub const TEMPLATE_FUEL: u64 = 1 << 23;

/// Largest string a chat template's `str.format` field width or `str.replace` may build (pycompat allocates these
/// before fuel is charged).
pub const TEMPLATE_STRING: usize = 1 << 26;

/// Largest `tojson(indent=…)` a chat template may ask for.
pub const TEMPLATE_INDENT: usize = 1024;

/// Check `value` of `field` against `bound`; the message names both.
pub fn check(bound: &Bound, value: u64) -> std::result::Result<usize, String> {
    if value > bound.max {
        return Err(format!(
            "`{}` = {value} is above loratune's limit of {} ({}); the file is corrupt or not a model loratune supports",
            bound.field, bound.max, bound.why
        ));
    }
    usize::try_from(value)
        .map_err(|_| format!("`{}` = {value} does not fit this machine", bound.field))
}

/// The bound on a model hyper-parameter by its `config.json` name, if it has one.
pub fn model(field: &str) -> Option<&'static Bound> {
    MODEL.iter().find(|b| b.field == field)
}

/// Check a model hyper-parameter by name (fields without a bound pass through).
pub fn check_model_field(field: &str, value: u64) -> std::result::Result<usize, String> {
    match model(field) {
        Some(b) => check(b, value),
        None => usize::try_from(value).map_err(|_| format!("`{field}` = {value} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field_and_the_limit() {
        let e = check_model_field("num_hidden_layers", 1_000_000_000).unwrap_err();
        assert!(e.contains("`num_hidden_layers` = 1000000000"), "{e}");
        assert!(e.contains("512"), "{e}");
        assert_eq!(check_model_field("num_hidden_layers", 512), Ok(512));
        assert_eq!(check_model_field("rope_theta_like_unbounded", 7), Ok(7));
        assert!(check(&LORA_RANK, 4097).is_err());
        assert!(check(&SEQUENCE_LEN, 1 << 20).is_ok());
    }

    #[test]
    fn every_bound_is_above_the_largest_released_models() {
        // Llama 3.1 405B, Gemma 3, Qwen2.5 72B, Phi-3 medium: the biggest values of each field.
        for (f, v) in [
            ("num_hidden_layers", 126),
            ("hidden_size", 16384),
            ("intermediate_size", 53248),
            ("num_attention_heads", 128),
            ("num_key_value_heads", 64),
            ("head_dim", 256),
            ("vocab_size", 262_144),
            ("max_position_embeddings", 131_072),
        ] {
            assert!(check_model_field(f, v).is_ok(), "{f} {v}");
        }
    }
}
