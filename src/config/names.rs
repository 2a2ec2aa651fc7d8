//! The closed sets of names a config may use (schedulers, optimizers, chat templates, dataset types, …).
//!
//! Each set is an enum that (de)serialises as its canonical lower-case name, accepts a few documented aliases
//! (Axolotl / transformers spellings), and on an unknown name fails with a message that lists every supported
//! name plus a did-you-mean suggestion.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

use super::suggest::did_you_mean;

/// Declares a name enum: `Variant = "canonical" | "alias" …`, optional `reject { "name" => "why" }` entries
/// for names we know but refuse with a specific explanation.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $primary:literal $(| $alias:literal)* ),+ $(,)?
        }
        reject { $($rej:literal => $msg:literal),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// The canonical names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($primary),+];

            /// The canonical name (what the resolved config writes).
            pub fn as_str(&self) -> &'static str {
                match self { $( $name::$variant => $primary ),+ }
            }

            /// Parse a name (case-insensitive; aliases accepted). The error lists the supported names.
            pub fn parse(s: &str) -> Result<Self, String> {
                let lower = s.trim().to_ascii_lowercase();
                $(
                    if lower == $primary $(|| lower == $alias)* {
                        return Ok($name::$variant);
                    }
                )+
                $(
                    if lower == $rej {
                        return Err(format!("{} `{}` is not supported: {}", $what, s, $msg));
                    }
                )*
                let aliases: &[&str] = &[$($($alias,)*)+];
                let mut msg = format!("unknown {} `{}`; supported: {}", $what, s, Self::NAMES.join(", "));
                if !aliases.is_empty() {
                    msg.push_str(&format!(" (also accepted: {})", aliases.join(", ")));
                }
                if let Some(best) = did_you_mean(&lower, Self::NAMES.iter().copied().chain(aliases.iter().copied())) {
                    msg.push_str(&format!("; did you mean `{best}`?"));
                }
                Err(msg)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "one of {}", $name::NAMES.join(", "))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

named_enum! {
    /// `adapter`: the kind of adapter to train. Only LoRA (on an unquantised base) exists today.
    pub enum Adapter ("adapter") {
        /// Low-rank adapters on a bf16/f32 base (PEFT LoRA).
        Lora = "lora",
    }
    reject {
        "qlora" => "quantised training (QLoRA, a 4-bit base) is not supported yet; use `adapter: lora` (the base stays in bf16/f32)",
        "llama-adapter" => "only `adapter: lora` is implemented",
    }
}

named_enum! {
    /// `lr_scheduler`: the learning-rate schedule after warmup (transformers' `get_scheduler` semantics).
    pub enum LrScheduler ("learning-rate scheduler") {
        /// Constant after warmup (`constant_with_warmup` is the same thing here: warmup applies to every schedule).
        Constant = "constant" | "constant_with_warmup",
        /// Linear decay to 0 at the last step.
        Linear = "linear",
        /// Half-cosine decay to `cosine_min_lr_ratio × learning_rate` at the last step.
        Cosine = "cosine",
    }
    reject {}
}

named_enum! {
    /// `optimizer`: only AdamW (decoupled weight decay, torch semantics) is implemented.
    pub enum Optimizer ("optimizer") {
        /// torch.optim.AdamW semantics; `adamw`, `adamw_hf` and `adamw_torch_fused` are the same optimizer.
        AdamW = "adamw_torch" | "adamw" | "adamw_hf" | "adamw_torch_fused",
    }
    reject {}
}

named_enum! {
    /// `chat_template`: which chat template renders chat datasets.
    pub enum ChatTemplateName ("chat template") {
        /// The template shipped with the base model (tokenizer_config.json / chat_template.jinja / GGUF metadata).
        TokenizerDefault = "tokenizer_default",
        /// Built-in ChatML (`<|im_start|>role\n…<|im_end|>`).
        Chatml = "chatml",
        /// Built-in Llama 3 template.
        Llama3 = "llama3",
        /// Built-in Mistral `[INST]` template.
        Mistral = "mistral",
        /// Built-in Gemma template.
        Gemma = "gemma",
        /// Built-in Phi-3 template (Axolotl spells it `phi_3`).
        Phi3 = "phi3" | "phi_3",
        /// Built-in Alpaca-style template.
        Alpaca = "alpaca",
        /// The Jinja text given in `chat_template_jinja`.
        Jinja = "jinja",
    }
    reject {}
}

named_enum! {
    /// A dataset entry's `type`: how a record becomes a conversation / text.
    pub enum DatasetType ("dataset type") {
        /// `{instruction, input, output[, system]}` records.
        Alpaca = "alpaca",
        /// `{messages: [{role, content}]}` records rendered with the chat template (ShareGPT via field mappings).
        ChatTemplate = "chat_template" | "chat",
        /// `{prompt, completion}` records; the loss is on the completion unless `train_on_inputs`.
        Completion = "completion",
        /// Raw `{text}` records, trained on every token.
        Text = "text",
    }
    reject {
        "sharegpt" => "use `type: chat_template` with `field_messages: conversations` and `message_property_mappings: {role: from, content: value}` (Axolotl deprecated `sharegpt` the same way)",
        "pretrain" => "streaming pre-training datasets are not supported; use `type: text`",
    }
}

named_enum! {
    /// A dataset entry's `ds_type`: the file format (inferred from the extension when absent).
    pub enum DsType ("dataset file type") {
        /// JSON Lines (`.jsonl`) or a JSON array (`.json`).
        Json = "json" | "jsonl",
        /// Comma-separated values with a header row.
        Csv = "csv",
        /// Apache Parquet.
        Parquet = "parquet",
    }
    reject {
        "arrow" => "convert the dataset to Parquet or JSONL",
        "text" => "use JSONL with a `text` field and `type: text`",
    }
}

named_enum! {
    /// A chat dataset's `train_on_eos`: which end-of-turn tokens carry loss (Axolotl semantics).
    pub enum TrainOnEos ("train_on_eos value") {
        /// The end-of-turn token of every trained turn (Axolotl's default).
        Turn = "turn",
        /// Every end-of-turn token.
        All = "all",
        /// Only the last end-of-turn token of the conversation.
        Last = "last",
    }
    reject {}
}

named_enum! {
    /// `truncation`: what to do with a sample longer than `sequence_len`.
    pub enum Truncation ("truncation policy") {
        /// Drop the sample and count it (Axolotl's behaviour).
        Drop = "drop",
        /// Keep the first `sequence_len` tokens.
        Truncate = "truncate",
    }
    reject {}
}

named_enum! {
    /// `export_dtype`: dtype of the merged model written with `merge_lora: true`.
    pub enum ExportDtype ("export dtype") {
        /// The dtype the base model's floating-point weights are stored in (f32 for a quantised GGUF base).
        Auto = "auto",
        /// 32-bit float.
        F32 = "f32" | "float32",
        /// bfloat16.
        Bf16 = "bf16" | "bfloat16",
        /// IEEE half precision.
        F16 = "f16" | "float16",
    }
    reject {}
}

/// `device`: where to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// CUDA device 0 when this build has CUDA and a device is present, else the CPU.
    Auto,
    /// The CPU backend (burn-flex).
    Cpu,
    /// A CUDA device by index (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl Device {
    /// Parse `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => return Ok(Device::Auto),
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => return Ok(Device::Cuda(0)),
            _ => {}
        }
        if let Some(n) = lower.strip_prefix("cuda:") {
            if let Ok(i) = n.parse::<usize>() {
                return Ok(Device::Cuda(i));
            }
        }
        let mut msg =
            format!("unknown device `{s}`; supported: cpu, cuda, cuda:N (N = device index), auto");
        if let Some(best) = did_you_mean(&lower, ["cpu", "cuda", "auto"]) {
            msg.push_str(&format!("; did you mean `{best}`?"));
        }
        Err(msg)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(0) => f.write_str("cuda"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Device;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a device (cpu, cuda, cuda:N or auto)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Device, E> {
                Device::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// `bf16`: `true`, `false` or `auto` (Axolotl's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16 {
    /// bf16 base weights on a GPU that supports them, f32 on the CPU.
    Auto,
    /// Always keep the frozen base in bf16 (LoRA weights stay f32).
    True,
    /// Keep everything in f32.
    False,
}

impl Serialize for Bf16 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Bf16::Auto => s.serialize_str("auto"),
            Bf16::True => s.serialize_bool(true),
            Bf16::False => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Bf16 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Bf16;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or auto")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bf16, E> {
                Ok(if v { Bf16::True } else { Bf16::False })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bf16, E> {
                if v.eq_ignore_ascii_case("auto") {
                    Ok(Bf16::Auto)
                } else {
                    Err(E::custom(format!(
                        "expected true, false or auto, found `{v}`"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `lora_init`: PEFT's `init_lora_weights` (`true` = Kaiming-uniform A and zero B; `gaussian` = A ~ N(0, 1/r)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraInit {
    /// PEFT's default: A Kaiming-uniform (a = √5), B = 0.
    Default,
    /// A ~ N(0, 1/r), B = 0.
    Gaussian,
}

impl Serialize for LoraInit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LoraInit::Default => s.serialize_bool(true),
            LoraInit::Gaussian => s.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for LoraInit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = LoraInit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or gaussian")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<LoraInit, E> {
                if v {
                    Ok(LoraInit::Default)
                } else {
                    Err(E::custom(
                        "`false` (PEFT's random, non-identity initialisation) is not supported; use true or gaussian",
                    ))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LoraInit, E> {
                match v.to_ascii_lowercase().as_str() {
                    "gaussian" => Ok(LoraInit::Gaussian),
                    "true" | "default" => Ok(LoraInit::Default),
                    _ => Err(E::custom(format!("expected true or gaussian, found `{v}`"))),
                }
            }
        }
        d.deserialize_any(V)
    }
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

/// A byte size such as `2GB`, `500MB`, `1GiB` or a plain integer number of bytes, with transformers'
/// `convert_file_size_to_int` rules (GB = 10⁹, GiB = 2³⁰; a lower-case `b` as in `5Gb` means bits).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ByteSize {
    /// The text as written (what the resolved config writes back).
    pub text: String,
    /// The size in bytes.
    pub bytes: u64,
}

impl ByteSize {
    /// Parse a size string; the error says what forms are accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!("invalid size `{s}`; use an integer followed by a unit, e.g. 2GB, 500MB, 1GiB")
        };
        let upper = t.to_ascii_uppercase();
        let units: [(&str, u64, bool); 6] = [
            ("GIB", 1 << 30, false),
            ("MIB", 1 << 20, false),
            ("KIB", 1 << 10, false),
            ("GB", 1_000_000_000, true),
            ("MB", 1_000_000, true),
            ("KB", 1_000, true),
        ];
        for (unit, mult, bits_if_lower_b) in units {
            if upper.ends_with(unit) {
                let num = t[..t.len() - unit.len()].trim();
                let n: u64 = num.parse().map_err(|_| bad())?;
                let mut bytes = n.checked_mul(mult).ok_or_else(bad)?;
                if bits_if_lower_b && t.ends_with('b') {
                    bytes /= 8;
                }
                if bytes == 0 {
                    return Err(format!("size `{s}` must be greater than zero"));
                }
                return Ok(ByteSize {
                    text: t.to_string(),
                    bytes,
                });
            }
        }
        match t.parse::<u64>() {
            Ok(0) => Err(format!("size `{s}` must be greater than zero")),
            Ok(n) => Ok(ByteSize {
                text: t.to_string(),
                bytes: n,
            }),
            Err(_) => Err(bad()),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 2GB, 500MB or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                ByteSize::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_aliases_and_reject() {
        assert_eq!(
            LrScheduler::parse("constant_with_warmup"),
            Ok(LrScheduler::Constant)
        );
        assert_eq!(LrScheduler::parse("Cosine"), Ok(LrScheduler::Cosine));
        assert_eq!(Optimizer::parse("adamw_hf"), Ok(Optimizer::AdamW));
        assert_eq!(ChatTemplateName::parse("phi_3"), Ok(ChatTemplateName::Phi3));
        let e = LrScheduler::parse("cosinee").unwrap_err();
        assert!(e.contains("supported: constant, linear, cosine"), "{e}");
        assert!(e.contains("did you mean `cosine`?"), "{e}");
        let e = Optimizer::parse("sgd").unwrap_err();
        assert!(
            e.contains("unknown optimizer `sgd`; supported: adamw_torch"),
            "{e}"
        );
        assert!(e.contains("adamw_hf"), "{e}");
        let e = Adapter::parse("qlora").unwrap_err();
        assert!(e.contains("quantised training"), "{e}");
    }

    #[test]
    fn device_parse() {
        assert_eq!(Device::parse("cuda:3"), Ok(Device::Cuda(3)));
        assert_eq!(Device::parse("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(Device::parse("CPU"), Ok(Device::Cpu));
        let e = Device::parse("cdua").unwrap_err();
        assert!(e.contains("did you mean `cuda`?"), "{e}");
        assert!(Device::parse("cuda:x").is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn byte_size_follows_transformers() {
        assert_eq!(ByteSize::parse("2GB").unwrap().bytes, 2_000_000_000);
        assert_eq!(ByteSize::parse("1GiB").unwrap().bytes, 1 << 30);
        assert_eq!(ByteSize::parse("500MB").unwrap().bytes, 500_000_000);
        assert_eq!(ByteSize::parse("8Gb").unwrap().bytes, 1_000_000_000);
        assert_eq!(ByteSize::parse("12345").unwrap().bytes, 12345);
        assert!(ByteSize::parse("2 gigs").is_err());
        assert!(ByteSize::parse("0GB").is_err());
        assert!(ByteSize::parse("-1GB").is_err());
    }
}
