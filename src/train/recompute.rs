//! Gradient checkpointing by layer (`gradient_checkpointing: true`): the training step's forward keeps only each
//! layer's input, and the backward rebuilds one layer at a time.
//!
//! The method (segmented recompute, driven from the step rather than from inside burn's autodiff, whose
//! `Backward` steps cannot run a nested backward):
//!
//! 1. forward with every tensor untracked (the training backend's own operations, recording no graph), keeping
//!    each layer's input `x_l` — on the device, or in host memory with `offload` — and the dropout stream's state
//!    where the layer starts;
//! 2. the last segment with a graph: final norm, `lm_head`, cross-entropy from `x_L`; its backward gives the
//!    head's LoRA gradients and `dL/dx_L`;
//! 3. from the last layer down to the lowest one that carries an adapter: rebuild layer l on the autodiff backend
//!    from `x_l` (tracked), with its dropout stream replayed from the saved state so the masks are the ones the
//!    forward drew, and backpropagate `dy` through it as the gradient of `Σ y ∘ dy` (whose gradient with
//!    respect to y is dy exactly); that yields the layer's LoRA gradients and `dL/dx_l` for the layer below.
//!
//! Every kernel is deterministic, so the recomputed layer is the forward's layer bit for bit and the gradients
//! equal those of the plain step. Peak activation memory is the layer inputs (`layers × tokens × hidden`) plus one
//! layer's graph, instead of every layer's graph.

use std::fmt;

use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::balance::{Balance, Routing};
use super::loss::{loss_from_hidden, shift_labels};
use super::step::SeededDropout;
use crate::error::{Error, Result};
use crate::kernels::TrainBackend;
use crate::model::{CausalLm, TokenBatch};

/// `gradient_checkpointing`: `false`, `true` (recompute each layer in the backward, keeping its input on the
/// device) or `offload` (the same, with the layer inputs kept in host memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Checkpointing {
    #[default]
    Off,
    Layers,
    Offload,
}

impl Checkpointing {
    pub fn is_on(self) -> bool {
        self != Checkpointing::Off
    }
}

impl fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Checkpointing::Off => "false",
            Checkpointing::Layers => "true",
            Checkpointing::Offload => "offload",
        })
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "false" | "off" | "no" => Ok(Checkpointing::Off),
            "true" | "on" | "yes" => Ok(Checkpointing::Layers),
            "offload" => Ok(Checkpointing::Offload),
            _ => Err(format!("expected true, false or offload, found `{s}`")),
        }
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Checkpointing::Off => s.serialize_bool(false),
            Checkpointing::Layers => s.serialize_bool(true),
            Checkpointing::Offload => s.serialize_str("offload"),
        }
    }
}

impl<'de> Deserialize<'de> for Checkpointing {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Checkpointing;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or offload")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Checkpointing, E> {
                Ok(if v {
                    Checkpointing::Layers
                } else {
                    Checkpointing::Off
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Checkpointing, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A layer input kept for the backward: on the device, or in host memory.
enum Kept<B: burn::tensor::backend::Backend> {
    Device(Tensor<B, 2>),
    Host(TensorData, DType),
}

impl<B: burn::tensor::backend::Backend> Kept<B> {
    fn keep(x: Tensor<B, 2>, offload: bool) -> Self {
        if offload {
            let dtype = x.dtype();
            Kept::Host(x.into_data(), dtype)
        } else {
            Kept::Device(x)
        }
    }

    fn take(self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            Kept::Device(x) => x,
            Kept::Host(data, dtype) => Tensor::from_data(data, (device, dtype)),
        }
    }
}

/// The gradients of one micro-batch's loss (its token-loss sum divided by `total`, plus `aux_coef` times the
/// mixture of experts' balancing loss when `aux_coef > 0`) with respect to the LoRA factors, added into `acc` (in
/// [`crate::lora::adapter::lora_params`] order), by layer recompute. Returns the micro-batch's loss sum and its
/// balancing loss (0 when off). `drop` is the micro-batch's dropout stream, as the plain step would use it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate<B: TrainBackend>(
    model: &CausalLm<B>,
    tokens: &TokenBatch,
    labels: &[i64],
    total: usize,
    mut stream: SeededDropout,
    offload: bool,
    aux_coef: f64,
    acc: &mut [Option<Tensor<B::InnerBackend, 2>>],
) -> Result<(f64, f64)> {
    let params = crate::lora::adapter::lora_params(model);
    let n_layers = model.model.layers.len();
    // Where each layer's factors sit in `params`; the head's come last.
    let mut ranges = Vec::with_capacity(n_layers + 1);
    let mut at = 0;
    for layer in &model.model.layers {
        let k: usize = layer
            .linears()
            .iter()
            .filter_map(|l| l.lora.as_ref().map(|a| a.n_params()))
            .sum();
        ranges.push(at..at + k);
        at += k;
    }
    // The head's factors and a trained lm_head copy; a trained embedding copy (`modules_to_save`) comes last and
    // gets its gradient at the very end, from the lowest layer's input gradient.
    let embed_trained = model.saved.embed_tokens.is_some();
    let head_end = params.len() - usize::from(embed_trained);
    ranges.push(at..head_end);
    // Layers below the lowest adapted one need no graph at all (unless the embedding itself is trained).
    let lowest = if embed_trained {
        0
    } else {
        ranges[..n_layers]
            .iter()
            .position(|r| !r.is_empty())
            .unwrap_or(n_layers)
    };

    // 1. Forward without a graph (the same backend's operations, untracked), keeping each layer's input from the
    //    lowest adapted layer up.
    let frozen = model.detached();
    let specs = model.train_attention_specs(tokens);
    let mut x = frozen.embed(tokens);
    let settings = model.attention_settings(&specs, x.dtype());
    let mut kept = Vec::with_capacity(n_layers - lowest);
    // The routers' choices over the whole pass fix the balancing loss's weights (see `super::balance`).
    let mut routed = Vec::new();
    for li in 0..n_layers {
        if li >= lowest {
            kept.push((Kept::keep(x.clone().inner(), offload), stream.clone()));
        }
        if aux_coef > 0.0 {
            let mut routing = Routing::new(&mut stream);
            x = frozen.layer_at(li, x, &settings, &mut routing);
            routed.extend(routing.layers);
        } else {
            x = frozen.layer_at(li, x, &settings, &mut stream);
        }
    }
    let balance = (aux_coef > 0.0).then(|| Balance::new(model, &routed, &tokens.attention_mask));
    let aux_value = match &balance {
        Some(w) => routed
            .iter()
            .map(|(p, _)| {
                let v: f32 = w.term(p.clone()).into_scalar().elem();
                v as f64
            })
            .sum(),
        None => 0.0,
    };
    drop(routed);

    // 2. Final norm, head and loss from the last layer's output.
    let want_dx = lowest < n_layers;
    let x = Tensor::<B, 2>::from_inner(x.inner());
    let x = if want_dx { x.require_grad() } else { x };
    let targets = shift_labels(labels, tokens.batch, tokens.seq);
    let (sum, _) = loss_from_hidden(model, model.final_norm(x.clone()), &targets, &mut stream);
    let loss = sum.div_scalar(total as f64);
    let value: f32 = loss.clone().inner().into_scalar().elem();
    let grads = loss.backward();
    collect(&params, ranges[n_layers].clone(), &grads, acc)?;
    let mut dy = if want_dx {
        Some(x.grad(&grads).ok_or_else(|| {
            Error::Train("recompute: no gradient reached the last layer's output".into())
        })?)
    } else {
        None
    };
    drop(grads);

    // 3. Layer by layer, top down.
    for li in (lowest..n_layers).rev() {
        let (x_l, mut layer_stream) = kept.pop().expect("one kept input per recomputed layer");
        let x_l = Tensor::<B, 2>::from_inner(x_l.take(&model.device));
        let want_dx = li > lowest || embed_trained;
        let x_l = if want_dx { x_l.require_grad() } else { x_l };
        let mut routing = Routing::new(&mut layer_stream);
        let y = model.layer_at(li, x_l.clone(), &settings, &mut routing);
        let dy_l = Tensor::from_inner(dy.take().expect("dy of the layer above"));
        let mut objective = (y * dy_l).sum();
        if let Some(w) = &balance {
            for (probs, _) in routing.layers {
                objective = objective + w.term(probs).mul_scalar(aux_coef);
            }
        }
        let grads = objective.backward();
        collect(&params, ranges[li].clone(), &grads, acc)?;
        if want_dx {
            dy = Some(x_l.grad(&grads).ok_or_else(|| {
                Error::Train(format!(
                    "recompute: no gradient reached the input of layer {li}"
                ))
            })?);
        }
    }
    // 4. The trained embedding copy: the lookup rebuilt with a graph, given the lowest layer's input gradient.
    if embed_trained {
        let dx = Tensor::from_inner(dy.take().ok_or_else(|| {
            Error::Train("recompute: no gradient reached the embedding output".into())
        })?);
        let grads = (model.embed(tokens) * dx).sum().backward();
        collect(&params, head_end..params.len(), &grads, acc)?;
    }
    Ok((value as f64 * total as f64, aux_value))
}

/// Add the gradients of `params[range]` into `acc`.
fn collect<B: TrainBackend>(
    params: &[(String, Tensor<B, 2>)],
    range: std::ops::Range<usize>,
    grads: &<B as burn::tensor::backend::AutodiffBackend>::Gradients,
    acc: &mut [Option<Tensor<B::InnerBackend, 2>>],
) -> Result<()> {
    for i in range {
        let (key, p) = &params[i];
        super::step::add_gradient(&mut acc[i], key, p.grad(grads))?;
    }
    Ok(())
}
