//! The closed sets of names a config may use (schedulers, optimizers, chat templates, dataset types, …).
//!
//! The sets owned by another module (dataset types and file kinds, truncation, `train_on_eos`, schedulers, export
//! dtypes, LoRA init, devices, sizes) live there; these are the ones only the config has.
//!
//! Each set is an enum that (de)serialises as its canonical lower-case name, accepts a few documented aliases
//! (Axolotl / transformers spellings), and on an unknown name fails with a message that lists every supported
//! name plus a did-you-mean suggestion.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use crate::names::named_enum;

named_enum! {
    /// `adapter`: the kind of adapter to train.
    pub enum Adapter ("adapter") {
        /// Low-rank adapters (PEFT LoRA) on the base as loaded.
        Lora = "lora",
        /// LoRA on a 4-bit NF4 base (QLoRA): `lora` plus `load_in_4bit: true`.
        Qlora = "qlora",
    }
    reject {
        "llama-adapter" => "only `adapter: lora` and `adapter: qlora` are implemented",
    }
}

named_enum! {
    /// `optimizer`: only AdamW (decoupled weight decay, torch semantics) is implemented.
    pub enum Optimizer ("optimizer") {
        /// torch.optim.AdamW semantics; `adamw`, `adamw_hf` and `adamw_torch_fused` are the same optimizer.
        /// Axolotl's low-bit and paged variants (`adamw_bnb_8bit`, `adamw_8bit`, `paged_adamw_8bit`,
        /// `paged_adamw_32bit`, `paged_adamw`, `adamw_torch_4bit`, `adamw_torch_8bit`) run as this exact AdamW too.
        AdamW = "adamw_torch" | "adamw" | "adamw_hf" | "adamw_torch_fused" | "adamw_bnb_8bit" | "adamw_8bit"
            | "paged_adamw_8bit" | "paged_adamw_32bit" | "paged_adamw" | "adamw_torch_4bit" | "adamw_torch_8bit",
    }
    reject {}
}

/// The low-bit and paged AdamW names of Axolotl configs (aliases of [`Optimizer::AdamW`] above).
pub const LOW_BIT_ADAMW: &[&str] = &[
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw",
    "adamw_torch_4bit",
    "adamw_torch_8bit",
];

named_enum! {
    /// `chat_template`: which chat template renders chat datasets.
    pub enum ChatTemplateName ("chat template") {
        /// The template shipped with the base model (tokenizer_config.json / chat_template.jinja / GGUF metadata).
        TokenizerDefault = "tokenizer_default",
        /// Built-in ChatML (`<|im_start|>role\n…<|im_end|>`).
        Chatml = "chatml",
        /// Built-in Llama 3 template.
        Llama3 = "llama3",
        /// Built-in Mistral `[INST]` template (Mistral-7B-Instruct-v0.1's; Axolotl's `mistral_v1`).
        Mistral = "mistral" | "mistral_v1",
        /// Built-in Gemma template.
        Gemma = "gemma",
        /// Built-in Phi-3 template (Axolotl spells it `phi_3`).
        Phi3 = "phi3" | "phi_3" | "phi_35",
        /// Built-in Qwen2.5 template (ChatML with Qwen's default system prompt and tools; Axolotl's `qwen_25`).
        Qwen25 = "qwen2_5" | "qwen_25" | "qwen2.5",
        /// Built-in Qwen3 template (ChatML with `<think>` handling and tools).
        Qwen3 = "qwen3",
        /// Built-in Alpaca-style template.
        Alpaca = "alpaca",
        /// The Jinja text given in `chat_template_jinja`.
        Jinja = "jinja",
    }
    reject {}
}

/// `lora_target_modules`: a list of module names (`[q_proj, v_proj]`) or one string — `all-linear`
/// (PEFT's spelling) or a regular expression matched against the full module path (PEFT's `re.fullmatch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetModules {
    /// Module names; a module is targeted when its path equals a name or ends with `.name`.
    List(Vec<String>),
    /// A single string: `all-linear` or a regex.
    Pattern(String),
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TargetModules::List(v) => v.serialize(s),
            TargetModules::Pattern(p) => s.serialize_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = TargetModules;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of module names or one string (all-linear or a regex)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetModules, E> {
                Ok(TargetModules::Pattern(v.to_string()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TargetModules, A::Error> {
                let mut out = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    out.push(name);
                }
                Ok(TargetModules::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `lora_layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct LayerList(pub Vec<usize>);

impl<'de> Deserialize<'de> for LayerList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = LayerList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a layer index or a list of layer indices (integers ≥ 0)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LayerList, E> {
                usize::try_from(v)
                    .map(|i| LayerList(vec![i]))
                    .map_err(|_| E::custom("layer index too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LayerList, E> {
                if v < 0 {
                    Err(E::custom(format!("layer indices are ≥ 0, found {v}")))
                } else {
                    self.visit_u64(v as u64)
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<LayerList, A::Error> {
                let mut out = Vec::new();
                while let Some(i) = seq.next_element::<usize>()? {
                    out.push(i);
                }
                Ok(LayerList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A floating-point value that also accepts a numeric string (`"2e-4"`), as Axolotl does for `learning_rate`
/// (PyYAML reads `2e-4` without a dot as a string, so such configs exist in the wild).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(transparent)]
pub struct LenientF64(pub f64);

impl<'de> Deserialize<'de> for LenientF64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = LenientF64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<LenientF64, E> {
                Ok(LenientF64(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LenientF64, E> {
                Ok(LenientF64(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LenientF64, E> {
                Ok(LenientF64(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LenientF64, E> {
                v.trim()
                    .parse::<f64>()
                    .map(LenientF64)
                    .map_err(|_| E::custom(format!("expected a number, found string `{v}`")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::schedule::ScheduleKind;

    #[test]
    fn names_parse_aliases_and_reject() {
        assert_eq!(
            ScheduleKind::parse("constant_with_warmup"),
            Ok(ScheduleKind::Constant)
        );
        assert_eq!(ScheduleKind::parse("Cosine"), Ok(ScheduleKind::Cosine));
        assert_eq!(Optimizer::parse("adamw_hf"), Ok(Optimizer::AdamW));
        assert_eq!(ChatTemplateName::parse("phi_3"), Ok(ChatTemplateName::Phi3));
        let e = ScheduleKind::parse("cosinee").unwrap_err();
        assert!(e.contains("supported: constant, linear, cosine"), "{e}");
        assert!(e.contains("did you mean `cosine`?"), "{e}");
        let e = Optimizer::parse("sgd").unwrap_err();
        assert!(
            e.contains("unknown optimizer `sgd`; supported: adamw_torch"),
            "{e}"
        );
        assert!(e.contains("adamw_hf"), "{e}");
        assert_eq!(Adapter::parse("QLoRA"), Ok(Adapter::Qlora));
        let e = Adapter::parse("llama-adapter").unwrap_err();
        assert!(e.contains("`adapter: qlora` are implemented"), "{e}");
        for name in LOW_BIT_ADAMW {
            assert_eq!(Optimizer::parse(name), Ok(Optimizer::AdamW), "{name}");
        }
    }
}
