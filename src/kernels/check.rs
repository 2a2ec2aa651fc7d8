//! Every fused kernel against the reference implementation on one backend and dtype: values and gradients,
//! every attention mask variant, ragged sizes, several head dims. The same suite is what the GPU-kernel tests
//! assert on wgpu over lavapipe (f32, f16) and what `loratune bench --check-kernels` prints on a real device
//! (bf16, tensor cores), so a kernel is checked the same way everywhere.
//!
//! Each case runs the op twice on the same inputs, fused ([`with_fused`]`(true)`) and reference, backpropagates
//! the same upstream gradient through both, and reports the largest difference relative to the reference's
//! largest magnitude. On a backend without a fused kernel for a case both runs are the reference: difference 0.

use std::sync::Arc;

use burn::tensor::{DType, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use crate::gguf::GgmlType;
use crate::quant::{Frozen, QMatrix};

use super::{
    reference, with_cube_attention, with_fused, Activation, Attention, AttnSpec, CubeAttention,
    LinearRef, Masking, NormRef, Qkv, Rope, Targets, TrainBackend,
};

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub case: String,
    pub dtype: DType,
    /// Max |fused − reference| / max |reference| of the output.
    pub value: f32,
    /// The same for the input gradient(s).
    pub grad: f32,
    pub tol: f32,
    /// Every fused value and gradient finite.
    pub finite: bool,
}

impl KernelCheck {
    pub fn passed(&self) -> bool {
        self.finite && self.value <= self.tol && self.grad <= self.tol
    }
}

/// The relative tolerance per dtype: f32 1e-4, f16 1e-2; bf16 (7-bit mantissa, both sides rounding their own
/// intermediates) 4e-2.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 4e-2,
    }
}

/// Max |a − b| relative to max |b|.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub(crate) fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(
    v: &[f32],
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), (device, dtype))
}

/// `Σ y ∘ up` in f32, the scalar every case backpropagates.
fn dot<B: burn::tensor::backend::Backend, const D: usize>(
    y: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, 1> {
    (y.cast(DType::F32) * up.cast(DType::F32)).sum()
}

fn outcome(
    case: String,
    dtype: DType,
    (yf, gf): (Vec<f32>, Vec<f32>),
    (yr, gr): (Vec<f32>, Vec<f32>),
) -> KernelCheck {
    KernelCheck {
        value: rel_diff(&yf, &yr),
        grad: rel_diff(&gf, &gr),
        finite: yf.iter().chain(&gf).all(|v| v.is_finite()),
        tol: tolerance(dtype),
        case,
        dtype,
    }
}

/// An attention case.
#[derive(Debug, Clone, Copy)]
pub struct AttnCase {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    pub packed: bool,
    pub padded: bool,
    pub softcap: Option<f64>,
}

/// Causal, the last row's final fifth padded, grouped heads (2 query heads per kv head), head dim 64, a length
/// that is not a multiple of any tile.
pub const ATTN_BASE: AttnCase = AttnCase {
    batch: 2,
    seq: 70,
    heads: 4,
    kv_heads: 2,
    head_dim: 64,
    window: None,
    packed: false,
    padded: true,
    softcap: None,
};

/// The attention call of a case: RoPE tables, and the masking — padding on the last fifth of the last row,
/// packing into two samples per row (a cut at a third), the window.
pub fn case_spec(c: &AttnCase) -> AttnSpec {
    let (b, s, hd) = (c.batch, c.seq, c.head_dim);
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    let positions: Vec<u32> = (0..b).flat_map(|_| 0..s as u32).collect();
    let mut key_valid = vec![true; b * s];
    if c.padded {
        for v in key_valid[b * s - s / 5..].iter_mut() {
            *v = false;
        }
    }
    let segments: Option<Vec<u32>> = c
        .packed
        .then(|| (0..b * s).map(|p| u32::from(p % s >= s / 3)).collect());
    AttnSpec {
        batch: b,
        seq: s,
        keys: s,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: c.softcap,
        rope: Arc::new(Rope::new(&inv_freq, &positions)),
        masking: Arc::new(Masking {
            key_valid,
            segments,
            window: c.window,
        }),
    }
}

/// RoPE + attention from packed q|k|v: the output on real rows and d(q|k|v). `imp` is the CubeCL backends'
/// attention the fused run uses (other backends have one fused attention and ignore it).
pub fn attention<B: TrainBackend>(
    device: &B::Device,
    dtype: DType,
    c: AttnCase,
    imp: CubeAttention,
) -> KernelCheck {
    let (b, s, nh, nkv, hd) = (c.batch, c.seq, c.heads, c.kv_heads, c.head_dim);
    let n = b * s;
    let spec = case_spec(&c);
    let key_valid: Vec<Vec<bool>> = spec
        .masking
        .key_valid
        .chunks(s)
        .map(<[bool]>::to_vec)
        .collect();
    let width = (nh + 2 * nkv) * hd;
    // Scores of a few units: the softmax is neither flat nor one-hot.
    let x: Vec<f32> = rand_vec(n * width, 7).iter().map(|v| v * 2.0).collect();
    // The upstream gradient of padding rows is zero, as in a model (padding never reaches the loss): a padding
    // row with no open key (its window holds only padding) attends to itself in the reference mask and to
    // nothing in the GPU kernel, a difference no gradient can see.
    let dy: Vec<f32> = rand_vec(n * nh * hd, 8)
        .chunks(nh * hd)
        .enumerate()
        .flat_map(|(t, r)| {
            let real = key_valid[t / s][t % s];
            r.iter().map(move |&v| if real { v } else { 0.0 })
        })
        .collect();
    let run = |fused: bool| {
        with_fused(fused, || {
            with_cube_attention(imp, || {
                let att = Attention::<B>::new(
                    spec.clone(),
                    dtype,
                    device,
                    Attention::<B>::shared_tables(),
                );
                let t = tensor::<B, 2>(&x, [n, width], device, dtype).require_grad();
                let y = if fused {
                    B::rope_attention(Qkv::Packed(t.clone()), &att)
                } else {
                    reference::attention(Qkv::Packed(t.clone()), &att)
                };
                let g = dot(y.clone(), tensor(&dy, [n, nh * hd], device, dtype)).backward();
                let real: Vec<f32> = to_vec(y)
                    .chunks(nh * hd)
                    .enumerate()
                    .filter(|(t, _)| key_valid[t / s][t % s])
                    .flat_map(|(_, r)| r.to_vec())
                    .collect();
                (real, t.grad(&g).map(to_vec).unwrap_or_default())
            })
        })
    };
    let name = format!(
        "attention{} b{b} s{s} h{nh}/{nkv} hd{hd}{}{}{}{}",
        match imp {
            _ if !B::CUBE_ATTENTION => String::new(),
            CubeAttention::Tile => " tile".to_string(),
            CubeAttention::Blockwise(r) => format!(" blocks of {r}"),
        },
        c.window.map_or(String::new(), |w| format!(" window {w}")),
        if c.packed { " packed" } else { "" },
        if c.padded { " padded" } else { "" },
        c.softcap.map_or(String::new(), |x| format!(" softcap {x}")),
    );
    outcome(name, dtype, run(true), run(false))
}

/// `act(gate)·up` on packed rows `[37, 2·50]`: the output and d(gate|up).
pub fn glu<B: TrainBackend>(device: &B::Device, dtype: DType, act: Activation) -> KernelCheck {
    let (n, i) = (37, 50);
    let x: Vec<f32> = rand_vec(n * 2 * i, 11).iter().map(|v| v * 4.0).collect();
    let dy = rand_vec(n * i, 12);
    let run = |fused: bool| {
        with_fused(fused, || {
            let t = tensor::<B, 2>(&x, [n, 2 * i], device, dtype).require_grad();
            let y = if fused {
                B::glu(t.clone(), act)
            } else {
                reference::glu(t.clone(), act)
            };
            let g = dot(y.clone(), tensor(&dy, [n, i], device, dtype)).backward();
            (to_vec(y), t.grad(&g).map(to_vec).unwrap_or_default())
        })
    };
    outcome(format!("glu {act:?} 37x50"), dtype, run(true), run(false))
}

/// RMSNorm over the last dim of `dims` (token rows `[n, h]`, or per-head rows `[b, s, heads, hd]` as the q/k
/// norms use it), the weight plus `offset` (Gemma's `1 + w`): the output and dx.
pub fn rms_norm<B: TrainBackend>(
    device: &B::Device,
    dtype: DType,
    dims: [usize; 4],
    offset: f32,
) -> KernelCheck {
    let n: usize = dims.iter().product();
    let h = dims[3];
    let x: Vec<f32> = rand_vec(n, 21).iter().map(|v| v * 3.0).collect();
    let w = rand_vec(h, 22);
    let dy = rand_vec(n, 23);
    let run = |fused: bool| {
        with_fused(fused, || {
            let weight = tensor::<B, 1>(&w, [h], device, dtype);
            let norm = NormRef {
                weight: &weight,
                eps: 1e-6,
                offset,
            };
            let t = tensor::<B, 1>(&x, [n], device, dtype).require_grad();
            let xin = t.clone().reshape(dims);
            let y = if fused {
                B::rms_norm(xin, &norm)
            } else {
                reference::rms_norm(xin, &norm)
            };
            let g = dot(
                y.clone(),
                tensor::<B, 1>(&dy, [n], device, dtype).reshape(dims),
            )
            .backward();
            (to_vec(y), t.grad(&g).map(to_vec).unwrap_or_default())
        })
    };
    outcome(
        format!("rms_norm {dims:?} offset {offset}"),
        dtype,
        run(true),
        run(false),
    )
}

/// `lm_head` + cross-entropy: 23 hidden rows of width 40, a vocabulary of 1001 (not a multiple of any cube),
/// every fifth row without a target (its gradient must be exactly zero), an upstream gradient of 0.5: the summed
/// loss and d(hidden).
pub fn lm_head_xent<B: TrainBackend>(
    device: &B::Device,
    dtype: DType,
    softcap: Option<f64>,
) -> KernelCheck {
    let (n, d, vocab) = (23, 40, 1001);
    let rows: Vec<usize> = (0..n).filter(|r| r % 5 != 4).collect();
    let targets: Vec<usize> = rows.iter().map(|r| (r * 7919 + 13) % vocab).collect();
    let h: Vec<f32> = rand_vec(n * d, 31).iter().map(|v| v * 2.0).collect();
    let w = rand_vec(vocab * d, 32);
    let t = Targets {
        rows: &rows,
        targets: &targets,
        softcap,
    };
    let run = |fused: bool| {
        with_fused(fused, || {
            let weight = Frozen::Dense(tensor::<B, 2>(&w, [vocab, d], device, dtype));
            let head = LinearRef {
                weight: &weight,
                bias: None,
                adapter: None,
            };
            let x = tensor::<B, 2>(&h, [n, d], device, dtype).require_grad();
            let loss = if fused {
                B::lm_head_cross_entropy(x.clone(), &head, &t)
            } else {
                reference::lm_head_cross_entropy(x.clone(), &head, &t)
            };
            let g = loss.clone().mul_scalar(0.5).backward();
            (to_vec(loss), x.grad(&g).map(to_vec).unwrap_or_default())
        })
    };
    let fused = run(true);
    let mut check = outcome(
        format!(
            "lm_head + xent 23x40 vocab 1001{}",
            softcap.map_or(String::new(), |c| format!(" softcap {c}"))
        ),
        dtype,
        fused.clone(),
        run(false),
    );
    let leaked = (0..n).filter(|r| !rows.contains(r)).any(|r| {
        fused
            .1
            .get(r * d..(r + 1) * d)
            .is_none_or(|g| g.iter().any(|&v| v != 0.0))
    });
    if leaked {
        check.grad = f32::INFINITY;
        check.case += " (rows without a target got a gradient)";
    }
    check
}

/// A linear group's outputs side by side — fused, or member by member with [`reference::linear`] — and, under the
/// upstream gradient `dy`, the gradients of x and of every adapter's A and B.
fn group_run<B: TrainBackend>(
    fused: bool,
    xt: &Tensor<B, 2>,
    members: &[LinearRef<'_, B>],
    params: &[(Tensor<B, 2>, Tensor<B, 2>)],
    dy: Tensor<B, 2>,
) -> (Vec<f32>, Vec<f32>) {
    let y = if fused {
        B::lora_linear_group(xt.clone(), members)
    } else {
        Tensor::cat(
            members
                .iter()
                .map(|m| reference::linear(xt.clone(), m))
                .collect(),
            1,
        )
    };
    let g = dot(y.clone(), dy).backward();
    let mut grads = xt.grad(&g).map(to_vec).unwrap_or_default();
    for (a, b) in params {
        grads.extend(a.grad(&g).map(to_vec).unwrap_or_default());
        grads.extend(b.grad(&g).map(to_vec).unwrap_or_default());
    }
    (to_vec(y), grads)
}

/// Three linear modules sharing one input `[29, 48]` (outputs 48 / 16 / 16, ranks 8 / 4 / 8, different scales,
/// one bias — q|k|v with grouped heads), each with a LoRA adapter (f32 factors), with or without dropout masks,
/// against the members computed one by one with [`reference::linear`]: the outputs side by side, and the
/// gradients of the input and of every A and B.
pub fn lora_group<B: TrainBackend>(device: &B::Device, dtype: DType, dropout: bool) -> KernelCheck {
    let (n, d) = (29, 48);
    let shapes = [(48usize, 8usize, 2.0f64), (16, 4, 0.5), (16, 8, 1.0)];
    let x = rand_vec(n * d, 41);
    let dy_width: usize = shapes.iter().map(|s| s.0).sum();
    let dy = rand_vec(n * dy_width, 42);
    let run = |fused: bool| {
        with_fused(fused, || {
            let xt = tensor::<B, 2>(&x, [n, d], device, dtype).require_grad();
            let mut params = Vec::new();
            let mut frozen = Vec::new();
            for (j, &(out, r, _)) in shapes.iter().enumerate() {
                let seed = 50 + 10 * j as u64;
                let w = Frozen::Dense(tensor::<B, 2>(
                    &rand_vec(out * d, seed),
                    [out, d],
                    device,
                    dtype,
                ));
                let bias = (j == 1)
                    .then(|| tensor::<B, 1>(&rand_vec(out, seed + 1), [out], device, dtype));
                let a = tensor::<B, 2>(&rand_vec(r * d, seed + 2), [r, d], device, DType::F32)
                    .require_grad();
                let b = tensor::<B, 2>(&rand_vec(out * r, seed + 3), [out, r], device, DType::F32)
                    .require_grad();
                // Keep masks of 0 and 2 (p = 0.5), one per member.
                let mask = dropout.then(|| {
                    let m: Vec<f32> = rand_vec(n * d, seed + 4)
                        .iter()
                        .map(|v| if *v > 0.0 { 2.0 } else { 0.0 })
                        .collect();
                    tensor::<B, 2>(&m, [n, d], device, DType::F32)
                });
                frozen.push((w, bias, mask));
                params.push((a, b));
            }
            let members: Vec<LinearRef<'_, B>> = frozen
                .iter()
                .zip(&params)
                .zip(&shapes)
                .map(|(((w, bias, mask), (a, b)), &(_, _, scale))| LinearRef {
                    weight: w,
                    bias: bias.as_ref(),
                    adapter: Some(super::AdapterRef {
                        a,
                        b,
                        scale,
                        mask: mask.clone(),
                    }),
                })
                .collect();
            let dy = tensor(&dy, [n, dy_width], device, dtype);
            group_run(fused, &xt, &members, &params, dy)
        })
    };
    outcome(
        format!(
            "lora group 29x48 -> 48|16|16, r 8|4|8{}",
            if dropout { " dropout" } else { "" }
        ),
        dtype,
        run(true),
        run(false),
    )
}

/// The GGUF block types a quantized base keeps, checked one by one.
pub const QUANT_CASES: &[GgmlType] = crate::quant::KEPT_GGML;

/// A linear group over a quantized base: a member whose W is `ty` blocks (with an adapter and a bias) beside a
/// dense one (with an adapter), against the reference on the same weights dequantized — outputs and the gradients
/// of x, A and B. The fused path decodes W where its GEMMs read it; the values must not change.
pub fn quant_group<B: TrainBackend>(device: &B::Device, dtype: DType, ty: GgmlType) -> KernelCheck {
    let (n, d, r) = (29, 256, 4);
    let outs = [64usize, 32];
    let x = rand_vec(n * d, 71);
    let width: usize = outs.iter().sum();
    let dy = rand_vec(n * width, 72);
    let q = match QMatrix::random_ggml(ty, outs[0], d, 0.5, 73) {
        Ok(q) => Arc::new(q),
        Err(e) => unreachable!("random {ty} blocks: {e}"),
    };
    let run = |fused: bool| {
        with_fused(fused, || {
            let xt = tensor::<B, 2>(&x, [n, d], device, dtype).require_grad();
            let quant = Frozen::Quant {
                q: q.clone(),
                dtype,
                device: device.clone(),
            };
            // The reference reads the dequantized copy of the same blocks.
            let w0 = if fused {
                quant
            } else {
                Frozen::Dense(quant.dense())
            };
            let w1 = Frozen::Dense(tensor::<B, 2>(
                &rand_vec(outs[1] * d, 74),
                [outs[1], d],
                device,
                dtype,
            ));
            let bias = tensor::<B, 1>(&rand_vec(outs[0], 75), [outs[0]], device, dtype);
            let params: Vec<(Tensor<B, 2>, Tensor<B, 2>)> = outs
                .iter()
                .enumerate()
                .map(|(j, &out)| {
                    let s = 76 + 2 * j as u64;
                    (
                        tensor::<B, 2>(&rand_vec(r * d, s), [r, d], device, DType::F32)
                            .require_grad(),
                        tensor::<B, 2>(&rand_vec(out * r, s + 1), [out, r], device, DType::F32)
                            .require_grad(),
                    )
                })
                .collect();
            let members = [
                LinearRef {
                    weight: &w0,
                    bias: Some(&bias),
                    adapter: Some(super::AdapterRef {
                        a: &params[0].0,
                        b: &params[0].1,
                        scale: 2.0,
                        mask: None,
                    }),
                },
                LinearRef {
                    weight: &w1,
                    bias: None,
                    adapter: Some(super::AdapterRef {
                        a: &params[1].0,
                        b: &params[1].1,
                        scale: 0.5,
                        mask: None,
                    }),
                },
            ];
            let dy = tensor(&dy, [n, width], device, dtype);
            group_run(fused, &xt, &members, &params, dy)
        })
    };
    outcome(
        format!("quantized group {ty} 29x256 -> 64|32 (dense), r 4"),
        dtype,
        run(true),
        run(false),
    )
}

/// `lm_head` + cross-entropy with the head in `ty` blocks against the reference on the dequantized head.
pub fn quant_head_xent<B: TrainBackend>(
    device: &B::Device,
    dtype: DType,
    ty: GgmlType,
) -> KernelCheck {
    let (n, d, vocab) = (21, 256, 300);
    let rows: Vec<usize> = (0..n).filter(|r| r % 4 != 3).collect();
    let targets: Vec<usize> = rows.iter().map(|r| (r * 7919 + 5) % vocab).collect();
    let h: Vec<f32> = rand_vec(n * d, 81);
    let q = match QMatrix::random_ggml(ty, vocab, d, 0.5, 82) {
        Ok(q) => Arc::new(q),
        Err(e) => unreachable!("random {ty} blocks: {e}"),
    };
    let t = Targets {
        rows: &rows,
        targets: &targets,
        softcap: None,
    };
    let run = |fused: bool| {
        with_fused(fused, || {
            let quant = Frozen::Quant {
                q: q.clone(),
                dtype,
                device: device.clone(),
            };
            let weight = if fused {
                quant
            } else {
                Frozen::Dense(quant.dense())
            };
            let head = LinearRef {
                weight: &weight,
                bias: None,
                adapter: None,
            };
            let x = tensor::<B, 2>(&h, [n, d], device, dtype).require_grad();
            let loss = if fused {
                B::lm_head_cross_entropy(x.clone(), &head, &t)
            } else {
                reference::lm_head_cross_entropy(x.clone(), &head, &t)
            };
            let g = loss.clone().backward();
            (to_vec(loss), x.grad(&g).map(to_vec).unwrap_or_default())
        })
    };
    outcome(
        format!("quantized lm_head {ty} + xent 21x256 -> 300"),
        dtype,
        run(true),
        run(false),
    )
}

/// The whole suite in one dtype.
pub fn all<B: TrainBackend>(device: &B::Device, dtype: DType) -> Vec<KernelCheck> {
    let base = ATTN_BASE;
    let mut cases = vec![
        base,
        AttnCase {
            window: Some(17),
            packed: true,
            ..base
        },
        AttnCase {
            softcap: Some(50.0),
            ..base
        },
        AttnCase {
            window: Some(9),
            softcap: Some(20.0),
            packed: true,
            kv_heads: 1,
            ..base
        },
    ];
    for (hd, seq) in [(80, 33), (128, 65), (256, 19)] {
        cases.push(AttnCase {
            head_dim: hd,
            seq,
            heads: 2,
            kv_heads: 2,
            ..base
        });
    }
    let mut out = Vec::new();
    // Both CubeCL attentions; blocks of 16 rows so every case spans several (ragged) blocks. Other backends
    // have one fused attention.
    let imps: &[CubeAttention] = if B::CUBE_ATTENTION {
        &[CubeAttention::Blockwise(16), CubeAttention::Tile]
    } else {
        &[CubeAttention::Blockwise(16)]
    };
    for &imp in imps {
        out.extend(cases.iter().map(|&c| attention::<B>(device, dtype, c, imp)));
    }
    for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
        out.push(glu::<B>(device, dtype, act));
    }
    out.push(rms_norm::<B>(device, dtype, [1, 1, 37, 300], 0.0));
    out.push(rms_norm::<B>(device, dtype, [1, 1, 37, 300], 1.0));
    out.push(rms_norm::<B>(device, dtype, [2, 5, 3, 64], 0.0));
    out.push(lm_head_xent::<B>(device, dtype, None));
    out.push(lm_head_xent::<B>(device, dtype, Some(3.0)));
    out.push(lora_group::<B>(device, dtype, false));
    out.push(lora_group::<B>(device, dtype, true));
    for &ty in QUANT_CASES {
        out.push(quant_group::<B>(device, dtype, ty));
        out.push(quant_head_xent::<B>(device, dtype, ty));
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::DType;

    /// The suite on the CPU: the fused CPU kernels (f32) against the reference (cases a CPU kernel does not cover
    /// run the reference twice and must agree exactly).
    #[test]
    fn cpu_kernels_match_the_reference() {
        let checks = super::all::<Autodiff<Flex>>(&Default::default(), DType::F32);
        for c in &checks {
            assert!(c.passed(), "{c:?}");
        }
        assert_eq!(checks.len(), 17 + 2 * super::QUANT_CASES.len());
        // bf16 has no CPU kernel: the grouped reference (stacked A factors) against the members one by one.
        let c = super::lora_group::<Autodiff<Flex>>(&Default::default(), DType::BF16, false);
        assert!(c.passed(), "{c:?}");
    }

    /// A broken kernel is caught: a difference beyond tolerance, a non-finite value, a length mismatch.
    #[test]
    fn the_comparison_can_fail() {
        assert!(super::rel_diff(&[1.0, 2.0], &[1.0, 2.001]) > 1e-4);
        assert_eq!(super::rel_diff(&[1.0], &[1.0, 2.0]), f32::INFINITY);
        let c = super::KernelCheck {
            case: "x".into(),
            dtype: DType::F32,
            value: 0.0,
            grad: 0.0,
            tol: 1e-4,
            finite: false,
        };
        assert!(!c.passed());
    }
}
