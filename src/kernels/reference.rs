//! The reference implementation of every kernel op, written with burn ops: correct on every backend, the default
//! of each [`Kernels`](super::Kernels) method and what the fused kernels are tested against.

use burn::tensor::{activation, backend::Backend, Bool, DType, Int, Tensor, TensorData};

use super::{Activation, AdapterRef, Attention, KvSlot, LinearRef, NormRef, Qkv, Rope, Targets};

fn to_f32<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() != DType::F32 {
        x.cast(DType::F32)
    } else {
        x
    }
}

fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() != dtype {
        x.cast(dtype)
    } else {
        x
    }
}

/// RMSNorm over the last dimension, in f32: `x / √(mean(x²) + eps) · (w + offset)`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    norm: &NormRef<'_, B>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = to_f32(x);
    let var = xf.clone().square().mean_dim(D - 1);
    let normed = xf * (var.add_scalar(norm.eps)).sqrt().recip();
    let mut w = norm.weight.clone().cast(DType::F32);
    if norm.offset != 0.0 {
        w = w.add_scalar(norm.offset);
    }
    let mut shape = [1usize; D];
    shape[D - 1] = w.dims()[0];
    to_dtype(normed * w.reshape(shape), dtype)
}

/// LayerNorm over the last dimension in f32 (mean-centred, `x̂·w + b`), as torch's `nn.LayerNorm`.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    bias: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = to_f32(x);
    let centred = xf.clone() - xf.mean_dim(D - 1);
    let var = centred.clone().square().mean_dim(D - 1);
    let normed = centred * var.add_scalar(eps).sqrt().recip();
    let mut shape = [1usize; D];
    shape[D - 1] = weight.dims()[0];
    let w = weight.clone().cast(DType::F32).reshape(shape);
    let b = bias.clone().cast(DType::F32).reshape(shape);
    to_dtype(normed * w + b, dtype)
}

/// `act(gate)·up` from gate|up side by side.
pub fn glu<B: Backend>(gate_up: Tensor<B, 2>, act: Activation) -> Tensor<B, 2> {
    let [n, two_i] = gate_up.dims();
    let i = two_i / 2;
    let gate = gate_up.clone().slice([0..n, 0..i]);
    let up = gate_up.slice([0..n, i..two_i]);
    activation_of(gate, act) * up
}

/// The activation alone (a non-gated MLP: Falcon's `dense_h_to_4h` → GELU).
pub fn activation_of<B: Backend>(gate: Tensor<B, 2>, act: Activation) -> Tensor<B, 2> {
    match act {
        Activation::Silu => activation::silu(gate),
        Activation::GeluTanh => activation::gelu_approximate(gate),
        // `x·(1 + erf(x/√2))/2` composed, not `activation::gelu`: burn 0.21's `gelu_backward` is the derivative of
        // the tanh approximation (off by up to ~1e-3 relative), erf's backward is exact (torch's gelu gradient).
        Activation::Gelu => gate
            .clone()
            .mul(
                gate.mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
                    .erf()
                    .add_scalar(1.0),
            )
            .mul_scalar(0.5),
    }
}

/// One module: `x·Wᵀ (+ b) + s·((x ∘ m)·Aᵀ)·Bᵀ`, the adapter in f32 whatever the base dtype. A quantized W is
/// dequantized whole for the call (a transient the autodiff graph keeps until the backward).
pub fn linear<B: Backend>(x: Tensor<B, 2>, m: &LinearRef<'_, B>) -> Tensor<B, 2> {
    let mut y = x.clone().matmul(m.weight.dense().transpose());
    if let Some(b) = m.bias {
        y = y + b.clone().unsqueeze_dim::<2>(0);
    }
    if let Some(ad) = &m.adapter {
        let base_dtype = x.dtype();
        let mut h = to_f32(x);
        if let Some(mask) = &ad.mask {
            h = h * mask.clone();
        }
        let low = h.matmul(ad.a.clone().transpose());
        let delta = low.matmul(ad.b.clone().transpose()).mul_scalar(ad.scale);
        y = y + to_dtype(delta, base_dtype);
    }
    y
}

/// The members' outputs side by side. When every member has an adapter reading the same input (no dropout
/// masks), the adapters' `A` factors are stacked into one GEMM: `x` is cast to f32 and read once for the group
/// instead of once per member (q|k|v: one adapter GEMM and one cast instead of three).
pub fn linear_group<B: Backend>(x: Tensor<B, 2>, members: &[LinearRef<'_, B>]) -> Tensor<B, 2> {
    let shared: Vec<&AdapterRef<'_, B>> = members
        .iter()
        .filter_map(|m| m.adapter.as_ref().filter(|a| a.mask.is_none()))
        .collect();
    match members {
        [one] => linear(x, one),
        _ if shared.len() == members.len() => {
            let n = x.dims()[0];
            let base_dtype = x.dtype();
            let a = Tensor::cat(shared.iter().map(|ad| ad.a.clone()).collect(), 0);
            let low = to_f32(x.clone()).matmul(a.transpose());
            let mut r0 = 0;
            let outs = members
                .iter()
                .zip(&shared)
                .map(|(m, ad)| {
                    let r = ad.a.dims()[0];
                    let lo = low.clone().slice([0..n, r0..r0 + r]);
                    r0 += r;
                    let frozen = LinearRef {
                        weight: m.weight,
                        bias: m.bias,
                        adapter: None,
                    };
                    let delta = lo.matmul(ad.b.clone().transpose()).mul_scalar(ad.scale);
                    linear(x.clone(), &frozen) + to_dtype(delta, base_dtype)
                })
                .collect();
            Tensor::cat(outs, 1)
        }
        _ => Tensor::cat(members.iter().map(|m| linear(x.clone(), m)).collect(), 1),
    }
}

/// Positions of a batch as a `[b, 1, s, rot]` cos / sin pair (rotate-half layout: frequencies duplicated).
fn rope_tables<B: Backend>(
    rope: &Rope,
    batch: usize,
    seq: usize,
    dtype: DType,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let half = rope.half;
    let rot = 2 * half;
    let dup = |t: &[f32]| {
        let mut v = Vec::with_capacity(batch * seq * rot);
        for row in t.chunks(half.max(1)).take(batch * seq) {
            v.extend_from_slice(row);
            v.extend_from_slice(row);
        }
        v
    };
    let mk = |v: Vec<f32>| {
        Tensor::<B, 4>::from_data(
            TensorData::new(v, [batch, 1, seq, rot]),
            (device, DType::F32),
        )
    };
    let (c, s) = (mk(dup(&rope.cos)), mk(dup(&rope.sin)));
    (to_dtype(c, dtype), to_dtype(s, dtype))
}

/// Rotate-half RoPE on `[b, h, s, hd]`, rotating the first `rot` dims.
fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, s, hd] = x.dims();
    let rot = cos.dims()[3];
    let half = rot / 2;
    let (xr, pass) = if rot < hd {
        (
            x.clone().slice([0..b, 0..h, 0..s, 0..rot]),
            Some(x.slice([0..b, 0..h, 0..s, rot..hd])),
        )
    } else {
        (x, None)
    };
    let x1 = xr.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = xr.clone().slice([0..b, 0..h, 0..s, half..rot]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let out = xr * cos.clone() + rotated * sin.clone();
    match pass {
        Some(p) => Tensor::cat(vec![out, p], 3),
        None => out,
    }
}

impl<B: Backend> Attention<B> {
    fn cos_sin(&self) -> &(Tensor<B, 4>, Tensor<B, 4>) {
        let s = &self.spec;
        self.tables
            .get_or_init(|| rope_tables::<B>(&s.rope, s.batch, s.seq, self.dtype, &self.device))
    }

    fn mask_tensor(&self) -> &Tensor<B, 4, Bool> {
        let s = &self.spec;
        self.mask.get_or_init(|| {
            Tensor::<B, 4, Bool>::from_data(
                TensorData::new(
                    s.masking.dense(s.batch, s.seq, s.keys, s.keys - s.seq),
                    [s.batch, 1, s.seq, s.keys],
                ),
                &self.device,
            )
        })
    }
}

/// RoPE + masked softmax attention from q `[b·s, nh·hd]`, k / v `[b·s, nkv·hd]` to `[b·s, nh·hd]`, extending
/// `cache` when given.
fn attention_core<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    att: &Attention<B>,
    cache: Option<&mut KvSlot<B>>,
) -> Tensor<B, 2> {
    let (q, mut k, mut v) = heads(q, k, v, att);
    if let Some(slot) = cache {
        if let Some((pk, pv)) = slot.take() {
            k = Tensor::cat(vec![pk, k], 2);
            v = Tensor::cat(vec![pv, v], 2);
        }
        *slot = Some((k.clone(), v.clone()));
    }
    let [b, nh, s, hd] = q.dims();
    attention_heads(q, k, v, att)
        .swap_dims(1, 2)
        .reshape([b * s, nh * hd])
}

/// Masked softmax attention of rotated q `[b, nh, s, hd]` over k / v `[b, nkv, t, hd]`, `[b, nh, s, hd]` out.
pub(crate) fn attention_heads<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    att: &Attention<B>,
) -> Tensor<B, 4> {
    let [b, nh, s, hd] = q.dims();
    let nkv = k.dims()[1];
    let g = nh / nkv;
    let t = k.dims()[2];
    let dtype = q.dtype();
    // GQA without copying k/v: fold the g query heads of each kv head into the row dimension.
    let q5 = q.reshape([b, nkv, g * s, hd]);
    let scores = q5.matmul(k.swap_dims(2, 3)).reshape([b, nh, s, t]);
    let mut scores = to_f32(scores).mul_scalar(att.spec.scale as f64);
    if let Some(cap) = att.spec.softcap {
        scores = scores.div_scalar(cap).tanh().mul_scalar(cap);
    }
    let mask = att.mask_tensor().clone();
    let scores = scores.mask_fill(mask.expand([b, nh, s, t]), f32::NEG_INFINITY);
    let probs = to_dtype(activation::softmax(scores, 3), dtype);
    let out = probs.reshape([b, nkv, g * s, t]).matmul(v);
    out.reshape([b, nh, s, hd])
}

/// q `[b, nh, s, hd]`, k / v `[b, nkv, s, hd]` from their `[b·s, heads·hd]` rows, RoPE applied to q and k.
fn heads<B: Backend>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    att: &Attention<B>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let (b, s, nh, nkv, hd) = att.spec.dims();
    let (cos, sin) = att.cos_sin();
    (
        apply_rope(q.reshape([b, s, nh, hd]).swap_dims(1, 2), cos, sin),
        apply_rope(k.reshape([b, s, nkv, hd]).swap_dims(1, 2), cos, sin),
        v.reshape([b, s, nkv, hd]).swap_dims(1, 2),
    )
}

/// [`heads`] from packed or separate q/k/v (no cache): what a fused attention kernel without RoPE reads.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn rope_heads<B: Backend>(
    qkv: Qkv<B>,
    att: &Attention<B>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let (q, k, v) = split_qkv(qkv, att);
    heads(q, k, v, att)
}

/// q, k and v as separate tensors.
fn split_qkv<B: Backend>(
    qkv: Qkv<B>,
    att: &Attention<B>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    match qkv {
        Qkv::Split(q, k, v) => (q, k, v),
        Qkv::Packed(t) => {
            let (_, s, nh, nkv, hd) = att.spec.dims();
            let n = att.spec.batch * s;
            let (qo, ko) = (nh * hd, nkv * hd);
            (
                t.clone().slice([0..n, 0..qo]),
                t.clone().slice([0..n, qo..qo + ko]),
                t.slice([0..n, qo + ko..qo + 2 * ko]),
            )
        }
    }
}

/// Attention without a cache, from packed or separate q/k/v.
pub fn attention<B: Backend>(qkv: Qkv<B>, att: &Attention<B>) -> Tensor<B, 2> {
    let (q, k, v) = split_qkv(qkv, att);
    attention_core(q, k, v, att, None)
}

/// Attention for new positions over a KV cache, which it extends.
pub fn attention_cached<B: Backend>(
    qkv: Qkv<B>,
    att: &Attention<B>,
    cache: &mut KvSlot<B>,
) -> Tensor<B, 2> {
    let (q, k, v) = split_qkv(qkv, att);
    attention_core(q, k, v, att, Some(cache))
}

/// Gather the trained rows, `lm_head` (through the backend's linear group), soft-cap, log-softmax, pick the
/// targets, sum.
pub fn lm_head_cross_entropy<B: super::Kernels>(
    hidden: Tensor<B, 2>,
    head: &LinearRef<'_, B>,
    t: &Targets<'_>,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let n = t.rows.len();
    let idx: Vec<i32> = t.rows.iter().map(|&r| r as i32).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &device);
    let h = hidden.select(0, idx);
    let mut logits = B::lora_linear_group(h, std::slice::from_ref(head));
    if let Some(cap) = t.softcap {
        logits = logits.div_scalar(cap).tanh().mul_scalar(cap);
    }
    nll_sum(logits, t.targets)
}

/// Σ −log softmax(logits)[row, target] over the rows of `logits` `[n, vocab]` (computed in f32).
pub fn nll_sum<B: Backend>(logits: Tensor<B, 2>, targets: &[usize]) -> Tensor<B, 1> {
    let n = targets.len();
    let device = logits.device();
    let logp = activation::log_softmax(to_f32(logits), 1);
    let tg: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(tg, [n, 1]), &device);
    logp.gather(1, tgt).sum().neg()
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};

    use super::{glu, Activation};

    /// Exact GELU's gradient is Φ(x) + x·φ(x) (what torch computes), not the tanh form's derivative burn 0.21's
    /// `gelu_backward` returns. Hand values at x = 1.5: Φ = 0.933 192 80, φ = 0.129 517 60.
    #[test]
    fn exact_gelu_has_the_exact_gradient() {
        type AD = Autodiff<Flex>;
        let dev = Default::default();
        let gu = Tensor::<AD, 2>::from_data(TensorData::new(vec![1.5f32, 1.0], [1, 2]), &dev)
            .require_grad();
        let y = glu(gu.clone(), Activation::Gelu);
        let g = gu.grad(&y.clone().sum().backward()).unwrap();
        let g = g.into_data().to_vec::<f32>().unwrap();
        let y = y.into_data().to_vec::<f32>().unwrap()[0];
        assert!((y - 1.5 * 0.933_192_8).abs() < 1e-6, "gelu(1.5) = {y}");
        let want = 0.933_192_8 + 1.5 * 0.129_517_6;
        assert!(
            (g[0] - want).abs() < 1e-6,
            "d gelu(1.5) = {}, want {want}",
            g[0]
        );
        assert!((g[1] - 1.5 * 0.933_192_8).abs() < 1e-6, "d up = {}", g[1]);
    }
}
