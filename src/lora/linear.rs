//! `LoraLinear`: a frozen linear layer with an optional PEFT-style low-rank adapter.
//!
//! y = x·Wᵀ (+ b) + scale · (dropout(x)·Aᵀ)·Bᵀ, with W `[out, in]` (torch layout, never transposed in memory)
//! frozen, and A `[r, in]`, B `[out, r]` trainable (kept in f32 whatever the base dtype). W + scale·B·A is never
//! materialised during training: the adapter costs two thin GEMMs.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::kernels::{AdapterRef, Kernels, LinearRef};
use crate::quant::Frozen;

/// A LoRA adapter's factors, in PEFT's torch layout.
#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A.weight`, `[r, in]`, f32.
    pub a: Tensor<B, 2>,
    /// `lora_B.weight`, `[out, r]`, f32.
    pub b: Tensor<B, 2>,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub scale: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// DoRA's magnitude, when this is a DoRA adapter (PEFT `use_dora`).
    pub dora: Option<Dora<B>>,
    /// PiSSA / OLoRA: the factors the adapter started from (the base weight holds W − s·B₀·A₀). The export turns
    /// the trained adapter into a plain LoRA of rank 2r on the original W with them (PEFT's conversion).
    pub initial: Option<std::sync::Arc<InitialFactors>>,
}

/// A₀ `[r, in]` and B₀ `[out, r]` of a PiSSA / OLoRA adapter, row-major f32 on the host (read only by exports).
#[derive(Debug, Clone, PartialEq)]
pub struct InitialFactors {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// DoRA (weight-decomposed LoRA, PEFT's `DoraLinearLayer`): the adapted weight's rows are rescaled to a learned
/// magnitude, W′ = m ⊙ (W + s·B·A) / ‖W + s·B·A‖ (row norms). The norm is a constant of the step (PEFT detaches it),
/// computed without forming W + s·B·A: ‖W_o‖² + 2s·(W·Aᵀ)_o·B_o + s²·B_o·(A·Aᵀ)·B_oᵀ.
#[derive(Debug, Clone)]
pub struct Dora<B: Backend> {
    /// PEFT's `lora_magnitude_vector`, `[1, out]`, f32, trainable.
    pub magnitude: Tensor<B, 2>,
    /// ‖W_o‖² of the frozen weight's rows, `[1, out]`, f32 (computed once).
    pub w_sq: Tensor<B, 2>,
    /// While merged: the row scales m / ‖W + s·B·A‖ the merge applied, `[out, 1]` (to unmerge).
    pub merged_scale: Option<Tensor<B, 2>>,
}

impl<B: Backend> Dora<B> {
    /// A fresh magnitude for a zero B: the frozen weight's row norms (PEFT's initialisation).
    pub fn init(weight: &Frozen<B>) -> Self {
        let w_sq = row_sq(weight);
        Dora {
            magnitude: w_sq.clone().sqrt(),
            w_sq,
            merged_scale: None,
        }
    }

    /// A given magnitude (`[out]` values) for `weight`.
    pub fn with_magnitude(weight: &Frozen<B>, magnitude: Tensor<B, 2>) -> Self {
        Dora {
            magnitude,
            w_sq: row_sq(weight),
            merged_scale: None,
        }
    }
}

/// ‖W_o‖² per row, `[1, out]` f32 (a quantized W is dequantized once, here).
fn row_sq<B: Backend>(weight: &Frozen<B>) -> Tensor<B, 2> {
    let [out, _] = weight.dims();
    weight.dense_f32().square().sum_dim(1).reshape([1, out])
}

impl<B: Backend> LoraAdapter<B> {
    /// Rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// Trainable tensors: A and B, and DoRA's magnitude.
    pub fn n_params(&self) -> usize {
        2 + usize::from(self.dora.is_some())
    }
}

/// A linear layer of the base model, possibly carrying a LoRA adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear<B: Backend> {
    /// The module path (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub path: String,
    /// `weight`, `[out, in]` (torch layout). Frozen; dense or quantized.
    pub weight: Frozen<B>,
    /// Optional `bias`, `[out]`. Frozen.
    pub bias: Option<Tensor<B, 1>>,
    /// The adapter, when this module is a LoRA target.
    pub lora: Option<LoraAdapter<B>>,
    /// True when the adapter's delta has been added into `weight` (the forward then skips the adapter path).
    pub merged: bool,
    /// `weight` is the embedding matrix (a tied `lm_head`).
    pub tied: bool,
}

impl<B: Backend> LoraLinear<B> {
    /// A plain (adapter-less) linear.
    pub fn new(path: impl Into<String>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::frozen(path, Frozen::Dense(weight), bias)
    }

    /// A plain linear over a dense or quantized frozen weight.
    pub fn frozen(path: impl Into<String>, weight: Frozen<B>, bias: Option<Tensor<B, 1>>) -> Self {
        LoraLinear {
            path: path.into(),
            weight,
            bias,
            lora: None,
            merged: false,
            tied: false,
        }
    }

    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// This module as a kernel reads it, with the dropout keep mask (`keep / (1 - p)`, `[n, in]`) of an unmerged
    /// adapter.
    pub fn as_ref(&self, dropout_mask: Option<Tensor<B, 2>>) -> LinearRef<'_, B> {
        LinearRef {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            adapter: match (&self.lora, self.merged) {
                (Some(l), false) => Some(AdapterRef {
                    a: &l.a,
                    b: &l.b,
                    scale: l.scale,
                    mask: dropout_mask,
                }),
                _ => None,
            },
        }
    }

    /// scale·B·A in f32, `[out, in]`.
    fn delta(l: &LoraAdapter<B>) -> Tensor<B, 2> {
        l.b.clone().matmul(l.a.clone()).mul_scalar(l.scale)
    }

    /// W + scale·B·A in f32 (not rounded to W's dtype; a quantized W dequantized): what exports encode. With DoRA,
    /// its rows rescaled to the magnitude (PEFT's merge: m / ‖W + s·B·A‖ times W + s·B·A).
    pub fn merged_weight_f32(&self) -> Tensor<B, 2> {
        self.merged_f32_and_scale().0
    }

    /// [`LoraLinear::merged_weight_f32`] and, for DoRA, the row scales `[out, 1]` it applied.
    fn merged_f32_and_scale(&self) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
        let w = self.weight.dense_f32();
        let Some(l) = self.lora.as_ref().filter(|_| !self.merged) else {
            return (w, None);
        };
        let m = w + Self::delta(l);
        match &l.dora {
            Some(d) => {
                let [out, _] = m.dims();
                let g =
                    d.magnitude.clone().reshape([out, 1]) / m.clone().square().sum_dim(1).sqrt();
                (m * g.clone(), Some(g))
            }
            None => (m, None),
        }
    }

    /// W + scale·B·A computed in f32, rounded (to nearest even, as torch) back to W's dtype — what PEFT's
    /// `merge_and_unload` does.
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        match (&self.lora, self.merged) {
            (Some(_), false) => round_to_dtype(self.merged_weight_f32(), self.weight.dtype()),
            _ => self.weight.dense(),
        }
    }

    /// Add the adapter into W (keeping the adapter so it can be unmerged). A quantized W becomes dense (the sum
    /// is not representable in its format); keep the adapter unmerged to stay quantized.
    pub fn merge(&mut self) {
        if self.lora.is_some() && !self.merged {
            let (merged, scale) = self.merged_f32_and_scale();
            self.weight = Frozen::Dense(round_to_dtype(merged, self.weight.dtype()));
            self.merged = true;
            if let Some(d) = self.lora.as_mut().and_then(|l| l.dora.as_mut()) {
                d.merged_scale = scale;
            }
        }
    }

    /// Subtract a merged adapter back out of W (exact up to the weight dtype's rounding).
    pub fn unmerge(&mut self) {
        if let (Some(l), true) = (&self.lora, self.merged) {
            let dtype = self.weight.dtype();
            let merged = match l.dora.as_ref().and_then(|d| d.merged_scale.clone()) {
                Some(g) => self.weight.dense_f32() / g,
                None => self.weight.dense_f32(),
            };
            self.weight = Frozen::Dense(round_to_dtype(merged - Self::delta(l), dtype));
            self.merged = false;
            if let Some(d) = self.lora.as_mut().and_then(|l| l.dora.as_mut()) {
                d.merged_scale = None;
            }
        }
    }

    /// Merge and drop the adapter (inference / export).
    pub fn merge_and_unload(&mut self) {
        self.merge();
        self.lora = None;
        self.merged = false;
    }
}

impl<B: Kernels> LoraLinear<B> {
    /// Forward on a `[n, in]` input, with the adapter's dropout keep mask.
    pub fn forward(&self, x: Tensor<B, 2>, dropout_mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        B::lora_linear_group(x, &[self.as_ref(dropout_mask)])
    }

    /// DoRA's row scales g = m / ‖W + s·B·A‖, `[1, out]` f32, for an unmerged DoRA adapter; the norm is detached
    /// (PEFT's `weight_norm.detach()`), so only m receives this path's gradient. W + s·B·A is never formed: the norm
    /// comes from ‖W_o‖², the frozen layer applied to A (A·Wᵀ) and the r×r Gram matrix A·Aᵀ.
    pub fn dora_scale(&self) -> Option<Tensor<B, 2>> {
        let l = self.lora.as_ref().filter(|_| !self.merged)?;
        let d = l.dora.as_ref()?;
        let out = self.out_features();
        let (a, b) = (l.a.clone().detach(), l.b.clone().detach());
        let plain = LinearRef {
            weight: &self.weight,
            bias: None,
            adapter: None,
        };
        // [r, out] = A·Wᵀ, in the layer's compute dtype, read back as f32.
        let aw =
            B::lora_linear_group(a.clone().cast(self.weight.dtype()), &[plain]).cast(DType::F32);
        let cross = (aw.transpose() * b.clone()).sum_dim(1);
        let gram = a.clone().matmul(a.transpose());
        let bgb = (b.clone().matmul(gram) * b).sum_dim(1);
        let s = l.scale;
        let n_sq =
            d.w_sq.clone().reshape([out, 1]) + cross.mul_scalar(2.0 * s) + bgb.mul_scalar(s * s);
        let norm = n_sq.clamp_min(0.0).sqrt().reshape([1, out]).detach();
        Some(d.magnitude.clone() / norm)
    }
}

/// Cast an f32 tensor to `dtype` with round-to-nearest-even (torch's rounding). Burn-flex's own f32→bf16 cast
/// goes through f64 and drops sticky bits, so lossy casts of weights are done here on the host.
pub fn round_to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if !matches!(dtype, DType::BF16 | DType::F16) || t.dtype() == dtype {
        return t.cast(dtype);
    }
    let device = t.device();
    let shape = t.dims();
    let v = t
        .cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    let data = if dtype == DType::BF16 {
        TensorData::new(
            v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(),
            shape,
        )
    } else {
        TensorData::new(
            v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(),
            shape,
        )
    };
    Tensor::from_data(data, (&device, dtype))
}

/// Build an f32 tensor from host values with a shape check that names the tensor.
pub fn tensor_from_f32<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
    name: &str,
) -> Result<Tensor<B, D>> {
    let n: usize = shape.iter().product();
    if values.len() != n {
        return Err(Error::Lora(format!(
            "tensor `{name}`: {} values for shape {shape:?}",
            values.len()
        )));
    }
    Ok(Tensor::from_data(
        TensorData::new(values, shape),
        (device, DType::F32),
    ))
}
