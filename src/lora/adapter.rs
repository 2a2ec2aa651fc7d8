//! Attaching adapters to a model (PEFT-style init), counting parameters, merging.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::init::{olora, pissa, Mat};
use super::linear::{round_to_dtype, Dora, InitialFactors, LoraAdapter, LoraLinear};
use super::targets::{TargetMatcher, TargetSpec};
use crate::error::{Error, Result};
use crate::model::weights::host_f32;
use crate::model::CausalLm;
use crate::quant::Frozen;

/// How the adapter starts: PEFT's `init_lora_weights` (the config key `lora_init`, Axolotl's
/// `peft_init_lora_weights`). Kaiming and Gaussian draw A and zero B, so the adapter starts as the identity; PiSSA and
/// OLoRA start it as the weight's principal part and leave the residual in the base ([`super::init`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights: true`): A ~ Kaiming-uniform(a=√5) = U(-1/√in, 1/√in).
    Kaiming,
    /// PEFT's `"gaussian"`: A ~ N(0, (1/r)²).
    Gaussian,
    /// PEFT's `"pissa"`: A, B from W's top-r singular triplets; W becomes W − s·B·A. PEFT's fast
    /// `"pissa_niter_K"` (a randomized SVD with K power iterations) is read as `pissa`: loratune's truncated SVD
    /// runs to convergence.
    Pissa,
    /// PEFT's `"olora"`: A = R[:r], B = Q[:, :r] of W = Q·R; W becomes W − s·B·A.
    Olora,
}

impl LoraInit {
    /// The PEFT / config spelling.
    pub fn name(self) -> &'static str {
        match self {
            LoraInit::Kaiming => "true",
            LoraInit::Gaussian => "gaussian",
            LoraInit::Pissa => "pissa",
            LoraInit::Olora => "olora",
        }
    }

    /// PiSSA or OLoRA: the adapter starts non-zero and the base weight is replaced by the residual.
    pub fn is_principal(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::Olora)
    }

    /// Parse PEFT's string values (`true` is the boolean elsewhere).
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        let low = v.to_ascii_lowercase();
        match low.as_str() {
            "gaussian" => Ok(LoraInit::Gaussian),
            "true" | "default" => Ok(LoraInit::Kaiming),
            "pissa" => Ok(LoraInit::Pissa),
            "olora" => Ok(LoraInit::Olora),
            _ if low
                .strip_prefix("pissa_niter_")
                .is_some_and(|k| k.parse::<u32>().is_ok()) =>
            {
                Ok(LoraInit::Pissa)
            }
            _ => Err(format!(
                "expected true, gaussian, pissa (or pissa_niter_K) or olora, found `{v}` (PEFT's loftq, corda, eva \
                 and orthogonal initialisations are not supported)"
            )),
        }
    }
}

impl serde::Serialize for LoraInit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LoraInit::Kaiming => s.serialize_bool(true),
            other => s.serialize_str(other.name()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for LoraInit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = LoraInit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, gaussian, pissa or olora")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<LoraInit, E> {
                if v {
                    Ok(LoraInit::Kaiming)
                } else {
                    Err(E::custom(
                        "`false` (PEFT's random, non-identity initialisation) is not supported; use true, gaussian, pissa or olora",
                    ))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<LoraInit, E> {
                LoraInit::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Everything that defines an adapter.
#[derive(Debug, Clone)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: TargetSpec,
    /// Restrict to these decoder layers.
    pub layers: Option<Vec<usize>>,
    pub init: LoraInit,
    pub seed: u64,
    /// DoRA (PEFT `use_dora`): each adapted module also learns a magnitude per output row.
    pub use_dora: bool,
    /// PEFT's `modules_to_save`: modules trained in full (a copy each) besides the adapters.
    pub modules_to_save: Vec<SavedModule>,
}

/// A module `lora_modules_to_save` can train in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SavedModule {
    EmbedTokens,
    LmHead,
}

impl SavedModule {
    pub const ALL: [SavedModule; 2] = [SavedModule::EmbedTokens, SavedModule::LmHead];

    /// The name PEFT's `modules_to_save` lists.
    pub fn name(self) -> &'static str {
        match self {
            SavedModule::EmbedTokens => "embed_tokens",
            SavedModule::LmHead => "lm_head",
        }
    }

    /// `embed_tokens`, `lm_head`, or a longer path ending in one of them (`model.embed_tokens`).
    pub fn parse(s: &str) -> Option<SavedModule> {
        let last = s.trim().rsplit('.').next().unwrap_or(s);
        SavedModule::ALL.into_iter().find(|m| m.name() == last)
    }

    /// Its module path in the model (the HF name).
    pub fn path<B: Backend>(self, model: &CausalLm<B>) -> &str {
        match self {
            SavedModule::EmbedTokens => &model.model.embed_tokens.path,
            SavedModule::LmHead => &model.model.lm_head.path,
        }
    }

    /// Its key in a PEFT adapter file: `base_model.model.<path>.weight`.
    pub fn peft_key<B: Backend>(self, model: &CausalLm<B>) -> String {
        format!("base_model.model.{}.weight", self.path(model))
    }

    /// The model's trained copy, if it has one.
    pub fn copy<B: Backend>(self, model: &CausalLm<B>) -> Option<&Tensor<B, 2>> {
        match self {
            SavedModule::EmbedTokens => model.saved.embed_tokens.as_ref(),
            SavedModule::LmHead => model.saved.lm_head.as_ref(),
        }
    }

    fn slot<B: Backend>(self, model: &mut CausalLm<B>) -> &mut Option<Tensor<B, 2>> {
        match self {
            SavedModule::EmbedTokens => &mut model.saved.embed_tokens,
            SavedModule::LmHead => &mut model.saved.lm_head,
        }
    }

    /// Put a trained copy (`[vocab, hidden]`, f32) on the model, checking its shape.
    pub fn set<B: Backend>(self, model: &mut CausalLm<B>, w: Tensor<B, 2>) -> Result<()> {
        let want = [model.config.vocab_size, model.config.hidden_size];
        if w.dims() != want {
            return Err(Error::Lora(format!(
                "modules_to_save `{}`: the saved weight is {:?}, the model's is {want:?} (an adapter for another base                  model or vocabulary?)",
                self.name(),
                w.dims()
            )));
        }
        *self.slot(model) = Some(w);
        Ok(())
    }

    /// A fresh copy of the module's current weight, f32 (dequantized when the base is kept quantized). A new tensor
    /// with its own identity: a tied model's two copies must not share a node of the autodiff graph (their
    /// gradients would be summed, training them as one).
    pub fn fresh<B: Backend>(self, model: &CausalLm<B>) -> Tensor<B, 2> {
        let w = match self {
            SavedModule::EmbedTokens => model.model.embed_tokens.weight.dense_f32(),
            SavedModule::LmHead => model.model.lm_head.weight.dense_f32(),
        };
        Tensor::from_data(w.into_data(), (&model.device, DType::F32))
    }
}

impl LoraSettings {
    /// alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The rank is at least 1.
    pub fn check_rank(r: usize) -> std::result::Result<(), String> {
        if r == 0 {
            return Err("the LoRA rank must be at least 1, got 0 (typical: 8–64)".into());
        }
        crate::limits::check(&crate::limits::LORA_RANK, r as u64).map(|_| ())
    }

    /// Alpha is a positive number.
    pub fn check_alpha(alpha: f64) -> std::result::Result<(), String> {
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(format!(
                "must be greater than 0, got {alpha} (a common choice is 2 × lora_r)"
            ));
        }
        Ok(())
    }

    /// Dropout is a probability below 1.
    pub fn check_dropout(p: f64) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&p) {
            return Err(format!("must be in [0, 1), got {p} (typical: 0.0–0.1)"));
        }
        Ok(())
    }

    /// Range checks, with the key names users write.
    pub fn validate(&self) -> Result<()> {
        for (key, check) in [
            ("lora_r", Self::check_rank(self.r)),
            ("lora_alpha", Self::check_alpha(self.alpha)),
            ("lora_dropout", Self::check_dropout(self.dropout)),
        ] {
            check.map_err(|m| Error::Lora(format!("{key}: {m}")))?;
        }
        Self::check_init(self.init, self.use_dora)
            .map_err(|m| Error::Lora(format!("lora_init: {m}")))
    }

    /// PiSSA / OLoRA do not combine with DoRA.
    pub fn check_init(init: LoraInit, use_dora: bool) -> std::result::Result<(), String> {
        if init.is_principal() && use_dora {
            return Err(format!(
                "{} with peft_use_dora: DoRA on a PiSSA/OLoRA residual base is not supported; choose one",
                init.name()
            ));
        }
        Ok(())
    }
}

/// What `attach` did.
#[derive(Debug, Clone)]
pub struct LoraReport {
    /// Module paths that received an adapter, in model order.
    pub modules: Vec<String>,
    pub trainable_params: usize,
    pub total_params: usize,
}

impl std::fmt::Display for LoraReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoRA on {} modules: {} trainable / {} total parameters ({:.3}%)",
            self.modules.len(),
            self.trainable_params,
            self.total_params,
            100.0 * self.trainable_params as f64 / self.total_params.max(1) as f64
        )
    }
}

/// Attach fresh adapters to every selected module. Deterministic for a given seed.
pub fn attach<B: Backend>(model: &mut CausalLm<B>, s: &LoraSettings) -> Result<LoraReport> {
    s.validate()?;
    let matcher = TargetMatcher::new(s.targets.clone(), s.layers.clone())?;
    let paths: Vec<String> = model.linears().into_iter().map(|(p, _)| p).collect();
    let chosen = matcher.select(&paths)?;
    if chosen.iter().any(|p| p == "lm_head") && model.config.tie_word_embeddings {
        return Err(Error::Lora(
            "lm_head shares its weight with embed_tokens in this model (tied embeddings): an adapter on it would \
             also change the embeddings when merged. Remove lm_head from lora_target_modules."
                .into(),
        ));
    }
    if s.use_dora && chosen.iter().any(|p| p == "lm_head") {
        return Err(Error::Lora(
            "DoRA on lm_head is not supported (its loss kernel applies lm_head without forming the logits); remove \
             lm_head from lora_target_modules"
                .into(),
        ));
    }
    let device = model.device.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let scale = s.scale();
    let r = s.r;
    let mut initial = if s.init.is_principal() {
        let jobs = model
            .linears_mut()
            .into_iter()
            .filter(|(p, l)| chosen.contains(p) && l.lora.is_none())
            .map(|(_, l)| (l, r, scale))
            .collect();
        principal_init_many(jobs, s.init)?
    } else {
        BTreeMap::new()
    };
    for (path, lin) in model.linears_mut() {
        if !chosen.contains(&path) {
            continue;
        }
        if lin.lora.is_some() {
            return Err(Error::Lora(format!(
                "module `{path}` already has an adapter"
            )));
        }
        let (inf, outf) = (lin.in_features(), lin.out_features());
        let (a, b, initial) = match s.init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (inf as f64).sqrt();
                let a = (0..r * inf)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                (a, vec![0f32; outf * r], None)
            }
            LoraInit::Gaussian => {
                let std = 1.0 / r as f64;
                let a = (0..r * inf)
                    .map(|_| (normal(&mut rng) * std) as f32)
                    .collect();
                (a, vec![0f32; outf * r], None)
            }
            LoraInit::Pissa | LoraInit::Olora => {
                let f = initial.remove(&path).ok_or_else(|| {
                    Error::Lora(format!("module `{path}`: no {} factors", s.init.name()))
                })?;
                (f.a.clone(), f.b.clone(), Some(std::sync::Arc::new(f)))
            }
        };
        lin.lora = Some(LoraAdapter {
            a: Tensor::from_data(TensorData::new(a, [r, inf]), (&device, DType::F32)),
            b: Tensor::from_data(TensorData::new(b, [outf, r]), (&device, DType::F32)),
            scale,
            dropout: s.dropout,
            dora: s.use_dora.then(|| Dora::init(&lin.weight)),
            initial,
        });
    }
    if s.modules_to_save.contains(&SavedModule::LmHead) && chosen.iter().any(|p| p == "lm_head") {
        return Err(Error::Lora(
            "lm_head is both a LoRA target and in modules_to_save; train it one way: remove it from              lora_target_modules (modules_to_save trains all of it) or from lora_modules_to_save"
                .into(),
        ));
    }
    for m in &s.modules_to_save {
        let w = m.fresh(model);
        m.set(model, w)?;
    }
    Ok(report(model, chosen))
}

/// PiSSA / OLoRA on several modules, each with its rank and scale: every weight is replaced by its residual
/// W − s·B₀·A₀ (rounded to the weight's dtype, as PEFT does), and the initial factors are returned by module path.
/// The host math runs a few modules at a time in parallel (each holds its weight and Gram matrix in f64).
pub fn principal_init_many<B: Backend>(
    mut jobs: Vec<(&mut LoraLinear<B>, usize, f64)>,
    init: LoraInit,
) -> Result<BTreeMap<String, InitialFactors>> {
    use rayon::prelude::*;
    for (lin, r, _) in &jobs {
        let (path, r) = (&lin.path, *r);
        let (inf, outf) = (lin.in_features(), lin.out_features());
        if lin.weight.as_dense().is_none() {
            return Err(Error::Lora(format!(
                "lora_init: {} needs a dense base weight, but `{path}` is kept quantized ({}): the residual \
                 W − s·B·A is not representable in its format. Load the base dequantized (base_quantization: \
                 dequantize, no load_in_4bit) or use lora_init: true",
                init.name(),
                lin.weight.quant().map(|q| q.format()).unwrap_or_default()
            )));
        }
        if r > inf.min(outf) {
            return Err(Error::Lora(format!(
                "lora_init: {} takes the top r = {r} directions of `{path}` ({outf} × {inf}), which has only {}; \
                 lower lora_r",
                init.name(),
                inf.min(outf)
            )));
        }
    }
    let mut out = BTreeMap::new();
    let parallel = rayon::current_num_threads().clamp(1, 4);
    for chunk in jobs.chunks_mut(parallel) {
        let hosts = chunk
            .iter()
            .map(|(lin, _, _)| host_f32(lin.weight.dense_f32()))
            .collect::<Result<Vec<_>>>()?;
        let shapes: Vec<(usize, usize, usize, f64)> = chunk
            .iter()
            .map(|(lin, r, s)| (lin.out_features(), lin.in_features(), *r, *s))
            .collect();
        let results: Vec<super::init::Principal> = hosts
            .par_iter()
            .zip(shapes.par_iter())
            .map(|(w, &(outf, inf, r, scale))| principal_host(w, outf, inf, init, r, scale))
            .collect();
        for ((lin, _, _), p) in chunk.iter_mut().zip(results) {
            let [outf, inf] = lin.weight.dims();
            let dtype = lin.weight.dtype();
            let device = lin
                .weight
                .as_dense()
                .map(|t| t.device())
                .unwrap_or_default();
            let residual: Vec<f32> = p.residual.iter().map(|&x| x as f32).collect();
            let res = Tensor::<B, 2>::from_data(
                TensorData::new(residual, [outf, inf]),
                (&device, DType::F32),
            );
            lin.weight = Frozen::Dense(round_to_dtype(res, dtype));
            out.insert(lin.path.clone(), InitialFactors { a: p.a, b: p.b });
        }
    }
    Ok(out)
}

/// PiSSA / OLoRA of a row-major `[out, in]` weight (see [`super::init`]).
pub fn principal_host(
    w: &[f32],
    outf: usize,
    inf: usize,
    init: LoraInit,
    r: usize,
    scale: f64,
) -> super::init::Principal {
    let w = Mat::from_row_major(outf, inf, w);
    match init {
        LoraInit::Olora => olora(&w, r, scale),
        _ => pissa(&w, r, scale, PISSA_SEED),
    }
}

/// The truncated SVD's start vectors (fixed, so a resumed run re-derives the same residual base bit for bit).
const PISSA_SEED: u64 = 0x0005_155A;

/// Parameter counts for the model as it stands.
pub fn report<B: Backend>(model: &CausalLm<B>, modules: Vec<String>) -> LoraReport {
    let trainable = model
        .linears()
        .iter()
        .filter_map(|(_, l)| {
            l.lora.as_ref().map(|a| {
                a.a.dims()[0] * (a.a.dims()[1] + a.b.dims()[0])
                    + a.dora.as_ref().map_or(0, |_| a.b.dims()[0])
            })
        })
        .sum::<usize>();
    let trainable = trainable
        + SavedModule::ALL
            .iter()
            .filter_map(|m| m.copy(model))
            .map(|w| w.dims()[0] * w.dims()[1])
            .sum::<usize>();
    LoraReport {
        modules,
        trainable_params: trainable,
        total_params: model.config.num_parameters() + trainable,
    }
}

/// Standard normal by Box-Muller (deterministic, portable).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Merge every adapter into its base weight (f32 math, cast back to the weight dtype) and drop the adapters.
pub fn merge_all<B: Backend>(model: &mut CausalLm<B>) {
    for (_, lin) in model.linears_mut() {
        lin.merge_and_unload();
    }
    // A tied lm_head can never carry an adapter (attach refuses), so the sharing is intact.
}

/// Remove adapters without merging (switching adapters on a base that was never merged into).
pub fn detach_all<B: Backend>(model: &mut CausalLm<B>) {
    for (_, lin) in model.linears_mut() {
        lin.lora = None;
    }
}

/// The PEFT key of a factor: `base_model.model.<path>.lora_A.weight` / `lora_B`.
pub fn peft_key(path: &str, which: char) -> String {
    format!("base_model.model.{path}.lora_{which}.weight")
}

/// The PEFT key of a DoRA magnitude: `base_model.model.<path>.lora_magnitude_vector` (1-D, `[out]`, as PEFT saves it).
pub fn magnitude_key(path: &str) -> String {
    format!("base_model.model.{path}.lora_magnitude_vector")
}

/// All adapter factors with their PEFT keys, in model order (A then B per module).
pub fn lora_params<B: Backend>(model: &CausalLm<B>) -> Vec<(String, Tensor<B, 2>)> {
    let mut out = Vec::new();
    for (path, lin) in model.linears() {
        if let Some(l) = &lin.lora {
            out.push((peft_key(&path, 'A'), l.a.clone()));
            out.push((peft_key(&path, 'B'), l.b.clone()));
            if let Some(d) = &l.dora {
                out.push((magnitude_key(&path), d.magnitude.clone()));
            }
        }
    }
    // modules_to_save last: lm_head, then the embedding (layer recompute reaches it last).
    for m in [SavedModule::LmHead, SavedModule::EmbedTokens] {
        if let Some(w) = m.copy(model) {
            out.push((m.peft_key(model), w.clone()));
        }
    }
    out
}

/// Replace the adapter factors (same order as [`lora_params`]).
pub fn set_lora_params<B: Backend>(model: &mut CausalLm<B>, mut values: Vec<Tensor<B, 2>>) {
    values.reverse();
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            if let (Some(a), Some(b)) = (values.pop(), values.pop()) {
                l.a = a;
                l.b = b;
            }
            if let Some(d) = &mut l.dora {
                if let Some(m) = values.pop() {
                    d.magnitude = m;
                }
            }
        }
    }
    for m in [SavedModule::LmHead, SavedModule::EmbedTokens] {
        if m.copy(model).is_some() {
            if let Some(w) = values.pop() {
                *m.slot(model) = Some(w);
            }
        }
    }
}

/// Mark every adapter factor as requiring gradients (autodiff backends); base weights stay frozen.
pub fn set_trainable<B: burn::tensor::backend::AutodiffBackend>(model: &mut CausalLm<B>) {
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            l.a = l.a.clone().require_grad();
            l.b = l.b.clone().require_grad();
            if let Some(d) = &mut l.dora {
                d.magnitude = d.magnitude.clone().require_grad();
            }
        }
    }
    for m in SavedModule::ALL {
        if let Some(w) = m.slot(model).take() {
            *m.slot(model) = Some(w.require_grad());
        }
    }
}
