//! One optimizer step: gradient accumulation with the loss normalised over every trained token of the step
//! (not a mean of per-micro-batch means), global grad-norm clipping, a NaN/Inf guard, AdamW on the LoRA
//! factors only. Deterministic: LoRA dropout masks come from a ChaCha8 stream keyed by (seed, step, micro-batch).

use burn::tensor::{backend::Backend, DType, ElementConversion, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::balance::Routing;
use super::loss::{lm_loss_sum, shift_labels, IGNORE_INDEX};
use super::optim::{clip_grad_norm, AdamW};
use super::parallel::Peer;
use super::recompute::{self, Checkpointing};
use crate::error::{Error, Result};
use crate::kernels::{Kernels, TrainBackend};
use crate::lora::adapter::{lora_params, set_lora_params};
use crate::model::decoder::DropoutSource;
use crate::model::{CausalLm, TokenBatch};

/// LoRA dropout masks from a seeded ChaCha8 stream (cloned, it replays the same masks: layer recompute).
#[derive(Clone)]
pub struct SeededDropout {
    rng: ChaCha8Rng,
}

impl SeededDropout {
    /// The stream for micro-batch `micro` of optimizer step `step`.
    pub fn new(seed: u64, step: u64, micro: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c6f_7261_7475_6e65);
        rng.set_stream(step.wrapping_mul(1 << 20).wrapping_add(micro));
        SeededDropout { rng }
    }
}

impl<B: Backend> DropoutSource<B> for SeededDropout {
    fn mask(
        &mut self,
        n: usize,
        features: usize,
        p: f64,
        device: &B::Device,
    ) -> Option<Tensor<B, 2>> {
        if p <= 0.0 {
            return None;
        }
        let keep = (1.0 / (1.0 - p)) as f32;
        // 16-bit thresholds: P(drop) = round(p·65536)/65536.
        let threshold = (p * 65536.0).round() as u32;
        let total = n * features;
        let mut v = Vec::with_capacity(total);
        while v.len() < total {
            let r: u64 = self.rng.random();
            for k in 0..4 {
                if v.len() == total {
                    break;
                }
                let x = ((r >> (16 * k)) & 0xffff) as u32;
                v.push(if x < threshold { 0.0 } else { keep });
            }
        }
        Some(Tensor::from_data(
            TensorData::new(v, [n, features]),
            (device, DType::F32),
        ))
    }
}

/// Number of positions that contribute to the loss (after the shift).
pub fn trained_tokens(tokens: &TokenBatch, labels: &[i64]) -> usize {
    shift_labels(labels, tokens.batch, tokens.seq)
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count()
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss per trained token over all micro-batches of the step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The load-balancing loss (see [`StepGradients::aux_loss`]).
    pub aux_loss: Option<f64>,
    /// Trained tokens in the step.
    pub trained_tokens: usize,
    /// Real (non-padding) tokens processed.
    pub real_tokens: usize,
}

/// Settings of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub lr: f64,
    /// 0 = no clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    pub step: u64,
    /// Gradient checkpointing: recompute each layer in the backward.
    pub recompute: Checkpointing,
    /// Weight of a mixture of experts' load-balancing loss (0 = off; see [`super::balance`]).
    pub router_aux_loss_coef: f64,
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    let v: f32 = t.into_scalar().elem();
    v as f64
}

/// The gradients of one optimizer step, before clipping: the micro-batches' summed token losses divided by the
/// step's trained-token count, differentiated with respect to the LoRA factors (in
/// [`crate::lora::adapter::lora_params`] order).
pub struct StepGradients<B: TrainBackend> {
    /// Mean loss per trained token over the micro-batches (the language-modelling loss alone).
    pub loss: f64,
    /// The load-balancing loss (before its coefficient), the micro-batches' values weighted by their real tokens;
    /// `None` when off.
    pub aux_loss: Option<f64>,
    /// Per LoRA parameter (in [`lora_params`] order); `None` for an expert's adapter no token was routed to.
    pub grads: Vec<Option<Tensor<B::InnerBackend, 2>>>,
    /// Trained tokens in the step.
    pub trained_tokens: usize,
    /// Real (non-padding) tokens processed.
    pub real_tokens: usize,
}

/// Forward and backward over the micro-batches (with layer recompute when `cfg.recompute` says so),
/// accumulating the LoRA gradients; nothing is updated.
pub fn step_gradients<B: TrainBackend>(
    model: &CausalLm<B>,
    micro: &[(&TokenBatch, &[i64])],
    cfg: StepConfig,
) -> Result<StepGradients<B>> {
    let mut g = step_gradients_of(model, micro, 0..micro.len(), cfg)?;
    g.grads = g.grads.into_iter().map(|t| t.map(to_f32)).collect();
    Ok(g)
}

/// A gradient back in f32 (the LoRA factors' dtype) from its accumulator (see [`add_gradient`]).
fn to_f32<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 2> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// [`step_gradients`] over the micro-batches `mine` of the step's `micro` (one data-parallel peer's share): the
/// loss is still divided by the whole step's trained tokens, and each micro-batch keeps its dropout stream (keyed
/// by its index in the step), so the peers' summed gradients, losses and load-balancing losses are the whole
/// step's. The gradients come back in their accumulation dtype (f64 where the backend has it).
pub fn step_gradients_of<B: TrainBackend>(
    model: &CausalLm<B>,
    micro: &[(&TokenBatch, &[i64])],
    mine: std::ops::Range<usize>,
    cfg: StepConfig,
) -> Result<StepGradients<B>> {
    let total: usize = micro.iter().map(|(t, l)| trained_tokens(t, l)).sum();
    let real: usize = micro
        .iter()
        .map(|(t, _)| t.attention_mask.iter().filter(|&&m| m).count())
        .sum();
    if total == 0 {
        return Err(Error::Train(format!(
            "step {}: the micro-batches of this step contain no trained token (every label is masked); check \
             train_on_inputs / roles_to_train and the data preview (`loratune data preview`)",
            cfg.step + 1
        )));
    }
    let params = lora_params(model);
    if params.is_empty() {
        return Err(Error::Train(
            "the model carries no LoRA adapter to train".into(),
        ));
    }
    let mut acc: Vec<Option<Tensor<B::InnerBackend, 2>>> = vec![None; params.len()];
    let mut loss_sum = 0.0f64;
    let mut aux_sum = 0.0f64;
    let balance = cfg.router_aux_loss_coef > 0.0 && model.config.moe.is_some();
    for (mi, (tokens, labels)) in micro.iter().enumerate() {
        if !mine.contains(&mi) {
            continue;
        }
        let mut drop = SeededDropout::new(cfg.seed, cfg.step, mi as u64);
        if cfg.recompute.is_on() {
            let offload = cfg.recompute == Checkpointing::Offload;
            let aux_coef = if balance {
                cfg.router_aux_loss_coef * micro_share(tokens, real)
            } else {
                0.0
            };
            let (l, aux) = recompute::accumulate(
                model, tokens, labels, total, drop, offload, aux_coef, &mut acc,
            )?;
            loss_sum += l;
            aux_sum += aux * micro_share(tokens, real);
            continue;
        }
        let (loss, aux) = if balance {
            let mut routing = Routing::new(&mut drop);
            let (sum, _) = lm_loss_sum(model, tokens, labels, &mut routing);
            let aux = routing.balancing_loss(model, tokens);
            (sum, Some(aux))
        } else {
            (lm_loss_sum(model, tokens, labels, &mut drop).0, None)
        };
        let mut loss = loss.div_scalar(total as f64);
        loss_sum += scalar(loss.clone().inner()) * total as f64;
        if let Some(aux) = aux {
            let share = micro_share(tokens, real);
            aux_sum += scalar(aux.clone().inner()) * share;
            loss = loss + aux.mul_scalar(cfg.router_aux_loss_coef * share);
        }
        let grads = loss.backward();
        for (slot, (key, p)) in acc.iter_mut().zip(&params) {
            add_gradient(slot, key, p.grad(&grads))?;
        }
    }
    Ok(StepGradients {
        loss: loss_sum / total as f64,
        aux_loss: balance.then_some(aux_sum),
        grads: acc,
        trained_tokens: total,
        real_tokens: real,
    })
}

/// A micro-batch's share of the step's real (non-padding) tokens: the weight of its load-balancing loss, so
/// that a step split into micro-batches weighs each token's routing as one batch would.
fn micro_share(tokens: &TokenBatch, real: usize) -> f64 {
    tokens.attention_mask.iter().filter(|&&m| m).count() as f64 / real.max(1) as f64
}

/// Add a parameter's gradient from one backward pass into its accumulator. Only an expert's adapter may have
/// none (no token of the pass was routed to the expert); anywhere else a missing gradient is a broken graph.
///
/// The accumulator is f64 where the backend has f64 (the CPU, CUDA): the few f32 terms of a step then sum
/// almost always to the correctly rounded value whatever their order, so a step split over any number of
/// data-parallel peers (each summing its share, then the peers' sums added) gives the f32 gradient one device
/// gives — and AdamW, which divides by √v, does not amplify a last-bit difference of a near-cancelled gradient.
pub(crate) fn add_gradient<B: Backend>(
    slot: &mut Option<Tensor<B, 2>>,
    key: &str,
    g: Option<Tensor<B, 2>>,
) -> Result<()> {
    match g {
        Some(g) => {
            let g = if B::supports_dtype(&g.device(), DType::F64) {
                g.cast(DType::F64)
            } else {
                g
            };
            *slot = Some(match slot.take() {
                Some(a) => a + g,
                None => g,
            });
            Ok(())
        }
        None if key.contains(&format!(".{}.experts.", crate::model::tree::MOE_BLOCK)) => Ok(()),
        None => Err(Error::Train(format!("no gradient reached {key}"))),
    }
}

/// Run forward/backward over the micro-batches and update the adapters in place.
/// On a NaN/Inf loss or gradient nothing is updated and an error is returned.
pub fn train_step<B: TrainBackend>(
    model: &mut CausalLm<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro: &[(&TokenBatch, &[i64])],
    cfg: StepConfig,
) -> Result<StepStats> {
    train_step_on(model, opt, micro, cfg, None)
}

/// [`train_step`] as one peer of a data-parallel group: this peer's share of the step's micro-batches, the
/// gradients (and losses) summed across the peers, then the same clipping and AdamW update on every peer.
pub fn train_step_on<B: TrainBackend>(
    model: &mut CausalLm<B>,
    opt: &mut AdamW<B::InnerBackend>,
    micro: &[(&TokenBatch, &[i64])],
    cfg: StepConfig,
    peer: Option<&Peer>,
) -> Result<StepStats> {
    let mine = match peer {
        Some(p) => p.share(micro.len()),
        None => 0..micro.len(),
    };
    let mut g = step_gradients_of(model, micro, mine, cfg)?;
    if let Some(p) = peer {
        let shapes: Vec<[usize; 2]> = lora_params(model).iter().map(|(_, t)| t.dims()).collect();
        p.sum_gradients::<B>(&mut g, &shapes, cfg.step + 1)?;
    }
    g.grads = g.grads.into_iter().map(|t| t.map(to_f32)).collect();
    let StepGradients {
        loss,
        aux_loss,
        mut grads,
        trained_tokens,
        real_tokens,
    } = g;
    let grad_norm = if cfg.max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, cfg.max_grad_norm)
    } else {
        super::optim::global_norm(&grads)
    };
    for (what, value) in [("loss", loss), ("gradient norm", grad_norm)] {
        if !value.is_finite() {
            return Err(Error::NonFinite {
                step: cfg.step + 1,
                what,
                value,
                last_checkpoint: None,
            });
        }
    }
    let inner: Vec<_> = lora_params(model)
        .into_iter()
        .map(|(_, p)| p.inner())
        .collect();
    let updated = opt.step(cfg.lr, inner, grads);
    set_lora_params(
        model,
        updated
            .into_iter()
            .map(|t| Tensor::from_inner(t).require_grad())
            .collect(),
    );
    Ok(StepStats {
        loss,
        grad_norm,
        aux_loss,
        trained_tokens,
        real_tokens,
    })
}

/// Evaluation: (sum of token losses, token count) over batches, no graph.
pub fn eval_loss<B: Kernels>(
    model: &CausalLm<B>,
    batches: &[(&TokenBatch, &[i64])],
) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for (t, l) in batches {
        let (s, c) = lm_loss_sum(model, t, l, &mut crate::model::NoDropout);
        sum += scalar(s);
        n += c;
    }
    (sum, n)
}
