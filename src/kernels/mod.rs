//! The kernel facade: the few operations a training step spends its time in, each one function with its
//! implementations behind it. The decoder calls these and reads as math; it never sees which implementation ran.
//!
//! | op | what |
//! |---|---|
//! | [`Kernels::rms_norm`] | RMSNorm over the last dimension (`x̂·(w + offset)`) |
//! | [`Kernels::glu`] | the gated MLP activation `act(gate)·up` on a packed `gate|up` |
//! | [`Kernels::lora_linear_group`] | frozen linears plus their LoRA adapters sharing one input, outputs side by side |
//! | [`Kernels::rope_attention`] | rotate-half RoPE + masked softmax attention with grouped KV heads |
//! | [`Kernels::rope_attention_cached`] | the same over a KV cache (incremental decoding) |
//! | [`Kernels::lm_head_cross_entropy`] | `lm_head` + summed cross-entropy on the trained rows |
//!
//! # How an implementation is chosen
//!
//! Each op is a method of the [`Kernels`] backend trait, as in burn's custom-kernel example: the trait's default
//! method is the reference implementation written with burn ops ([`reference`]), correct on every backend; a
//! backend that has something faster overrides the method. The choice is made by the type system, once, here:
//!
//! - `Flex` and `Autodiff<Flex>` run the fused CPU kernels ([`cpu`]), each with its own backward registered in
//!   burn's autodiff graph, and fall back to the reference inside the method for inputs a kernel does not cover
//!   (a dtype other than f32, a tracked frozen weight, soft-capping, a KV cache).
//! - CubeCL backends (`CubeBackend<R, …>` for every runtime R: CUDA, and wgpu in tests) and their autodiff wrapper
//!   run the fused GPU kernels ([`cube`]: attention, RMSNorm, the gated activation, the loss, and the products of
//!   GGUF-quantized weights, decoded on the device tile by tile) and the reference for the rest.
//!
//! Why a trait bound rather than a run-time type check: fused GPU kernels (CubeCL, with their own backward)
//! are written once for every CubeCL runtime — `impl<R: CubeRuntime…> Kernels for CubeBackend<R…>` and its
//! autodiff wrapper — so the same code runs on CUDA and, in CI, on wgpu over Mesa lavapipe; a type check would
//! have to list every concrete backend type. Quantized weights depend on the weight's representation, not on the
//! backend: kernels branch on [`LinearRef::weight`] ([`Frozen::Dense`] or [`Frozen::Quant`]); the CPU and CubeCL
//! kernels dequantize a tile of rows where their GEMMs read it (nothing dense is kept for the backward), the
//! reference dequantizes the whole matrix on the host for the call (bf16 compute on the CPU).
//! The cost is one bound, `B: Kernels`, on code that runs the model ([`TrainBackend`] bundles it for training).
//!
//! `LORATUNE_FUSED=0` (or [`with_fused`] / [`set_enabled`]) sends every op to the reference, for comparisons.

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu", test)), allow(dead_code))]
pub(crate) mod blockwise;
pub mod check;
pub(crate) mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod cube;
#[cfg(feature = "fusion")]
mod fusion;
pub mod prof;
pub mod reference;

use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, Tensor};

use crate::quant::Frozen;

/// The gated MLP activation (`hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new` / `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

/// One linear module of a group: a frozen weight `[out, in]` (torch layout; dense, or quantized on the host), an
/// optional frozen bias, an optional unmerged LoRA adapter. All tensors on the same backend.
pub struct LinearRef<'a, B: Backend> {
    pub weight: &'a Frozen<B>,
    pub bias: Option<&'a Tensor<B, 1>>,
    pub adapter: Option<AdapterRef<'a, B>>,
}

/// A LoRA adapter as a kernel reads it: `s·((x ∘ mask)·Aᵀ)·Bᵀ`.
pub struct AdapterRef<'a, B: Backend> {
    /// `lora_A`, `[r, in]`.
    pub a: &'a Tensor<B, 2>,
    /// `lora_B`, `[out, r]`.
    pub b: &'a Tensor<B, 2>,
    pub scale: f64,
    /// The dropout keep mask, already scaled by 1/(1 − p), `[n, in]`.
    pub mask: Option<Tensor<B, 2>>,
}

/// An RMSNorm as a kernel reads it: the weight, epsilon, and what is added to the weight (1 for Gemma's `(1 + w)`).
pub struct NormRef<'a, B: Backend> {
    pub weight: &'a Tensor<B, 1>,
    pub eps: f64,
    pub offset: f32,
}

/// What a loss is computed on: the rows of the hidden states that have a next token, their targets, and Gemma 2's
/// final soft-cap.
pub struct Targets<'a> {
    pub rows: &'a [usize],
    pub targets: &'a [usize],
    pub softcap: Option<f64>,
}

/// Attention inputs: q|k|v side by side in one `[b·s, (nh + 2·nkv)·hd]` tensor (what a grouped projection
/// produces), or three tensors (after per-head q/k norms).
pub enum Qkv<B: Backend> {
    Packed(Tensor<B, 2>),
    Split(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>),
}

/// Rotate-half RoPE tables for every token of a batch: `cos` / `sin` `[b·s, half]` (the rotated width is 2·half).
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl Rope {
    /// Tables for the given positions (angle = position · inv_freq, in f32 as transformers computes them).
    pub fn new(inv_freq: &[f32], positions: &[u32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rope { cos, sin, half }
    }

    /// The tables of one token.
    pub(crate) fn row(&self, token: usize) -> (&[f32], &[f32]) {
        let r = token * self.half..(token + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// Shapes and masking of one attention call, on the host.
#[derive(Debug, Clone)]
pub struct AttnSpec {
    pub batch: usize,
    /// Query positions per row.
    pub seq: usize,
    /// Key positions per row (`seq`, plus the cached ones when decoding).
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Gemma 2's tanh soft-capping of the scores.
    pub softcap: Option<f64>,
    pub rope: Arc<Rope>,
    /// What the mask is made of besides causality. Kernels mask on the fly ([`Masking::row_into`]); only the
    /// reference builds the dense `[batch, seq, keys]` mask ([`Masking::dense`]), so nothing quadratic in the
    /// sequence length exists on the fused paths.
    pub masking: Arc<Masking>,
}

/// The causes of an attention mask besides causality: padding, packing, a sliding window.
#[derive(Debug, Clone, Default)]
pub struct Masking {
    /// `[batch·keys]`: false for padding (never attended to).
    pub key_valid: Vec<bool>,
    /// `[batch·seq]` packed-sample ids (training: no cache, keys = queries); attention stays inside a sample.
    pub segments: Option<Vec<u32>>,
    /// A query at position i sees keys j with i − j < window.
    pub window: Option<usize>,
}

impl Masking {
    /// The boolean mask `[batch, seq, keys]` (true = blocked) for queries at absolute positions
    /// `offset..offset + seq` over keys `0..keys`: causal, plus padding, packing and the window.
    pub fn dense(&self, batch: usize, seq: usize, keys: usize, offset: usize) -> Vec<bool> {
        let mut m = vec![false; batch * seq * keys];
        for b in 0..batch {
            for i in 0..seq {
                let row = &mut m[(b * seq + i) * keys..(b * seq + i + 1) * keys];
                self.row_into(b, offset + i, keys, row);
            }
        }
        m
    }

    /// Keys `0..row.len()` of the mask row (true = blocked) of the query at absolute position `qi` in batch row
    /// `b`, over `keys` keys per batch row. A query with nothing to attend to (a fully padded row) attends to
    /// itself: finite, unused. Keys after the query are blocked, so any prefix longer than `qi` is the whole row's
    /// answer.
    pub fn row_into(&self, b: usize, qi: usize, keys: usize, row: &mut [bool]) {
        let key_valid = &self.key_valid[b * keys..(b + 1) * keys];
        let mut any_open = false;
        for (j, cell) in row.iter_mut().enumerate() {
            let mut blocked = j > qi || !key_valid[j];
            if let Some(w) = self.window {
                blocked |= qi >= j + w;
            }
            if let Some(seg) = &self.segments {
                // Packing is a training-time layout: no cache, so q and k index the same grid.
                blocked |= seg[b * keys + j] != seg[b * keys + qi.min(keys - 1)];
            }
            *cell = blocked;
            any_open |= !blocked;
        }
        if !any_open && qi < row.len() {
            row[qi] = false;
        }
    }
}

impl AttnSpec {
    /// (batch, seq, heads, kv_heads, head_dim).
    pub fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.batch,
            self.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        )
    }
}

/// One attention setting of a forward pass (one per sliding window), shared by the layers that use it: the
/// host [`AttnSpec`] plus the tensors the reference implementation builds from it on first use.
pub struct Attention<B: Backend> {
    pub spec: AttnSpec,
    pub(crate) dtype: DType,
    pub(crate) device: B::Device,
    /// cos / sin `[b, 1, s, rot]`, shared by every window of the forward.
    pub(crate) tables: Rc<OnceCell<(Tensor<B, 4>, Tensor<B, 4>)>>,
    pub(crate) mask: OnceCell<Tensor<B, 4, Bool>>,
}

impl<B: Backend> Attention<B> {
    /// `tables` is shared between the windows of one forward (see [`Attention::shared_tables`]).
    pub fn new(
        spec: AttnSpec,
        dtype: DType,
        device: &B::Device,
        tables: Rc<OnceCell<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Self {
        Attention {
            spec,
            dtype,
            device: device.clone(),
            tables,
            mask: OnceCell::new(),
        }
    }

    /// An empty slot for the RoPE tables of one forward.
    pub fn shared_tables() -> Rc<OnceCell<(Tensor<B, 4>, Tensor<B, 4>)>> {
        Rc::new(OnceCell::new())
    }
}

/// A layer's cached keys and values `[b, nkv, t, hd]` (RoPE applied), for incremental decoding.
pub type KvSlot<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// The backends the model runs on, with the implementation of each hot op. Every method has the reference
/// implementation as its default; see the module documentation for which backend overrides what.
pub trait Kernels: Backend {
    /// Whether [`with_cube_attention`] selects this backend's attention (the CubeCL backends).
    const CUBE_ATTENTION: bool = false;

    /// Bytes this backend's memory pools hold on `device` (≈ its peak: pools keep their pages), when it can
    /// tell — the CubeCL backends; `None` on the CPU, where the process's peak RSS is the measure.
    fn memory_reserved(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// RMSNorm over the last dimension, computed in f32: `x / √(mean(x²) + eps) · (w + offset)`.
    fn rms_norm<const D: usize>(x: Tensor<Self, D>, norm: &NormRef<'_, Self>) -> Tensor<Self, D> {
        reference::rms_norm(x, norm)
    }

    /// `act(gate)·up` from gate|up side by side, `[n, 2i]` → `[n, i]`.
    fn glu(gate_up: Tensor<Self, 2>, act: Activation) -> Tensor<Self, 2> {
        reference::glu(gate_up, act)
    }

    /// The members' outputs `x·W_jᵀ (+ b_j) + s_j·((x ∘ m_j)·A_jᵀ)·B_jᵀ` side by side, `[n, Σ out_j]`.
    fn lora_linear_group(x: Tensor<Self, 2>, members: &[LinearRef<'_, Self>]) -> Tensor<Self, 2> {
        reference::linear_group(x, members)
    }

    /// RoPE + masked softmax attention, `[b·s, nh·hd]` out (the layout o_proj reads).
    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        reference::attention(qkv, att)
    }

    /// [`Kernels::rope_attention`] for new positions over a KV cache, which it extends.
    fn rope_attention_cached(
        qkv: Qkv<Self>,
        att: &Attention<Self>,
        cache: &mut KvSlot<Self>,
    ) -> Tensor<Self, 2> {
        reference::attention_cached(qkv, att, cache)
    }

    /// Summed cross-entropy of `lm_head(hidden[rows])` against the targets, a `[1]` tensor. The head's dropout mask,
    /// if any, covers the selected rows.
    fn lm_head_cross_entropy(
        hidden: Tensor<Self, 2>,
        head: &LinearRef<'_, Self>,
        t: &Targets<'_>,
    ) -> Tensor<Self, 1> {
        reference::lm_head_cross_entropy(hidden, head, t)
    }

    /// The GEMM table (`bench --gemm`): each GEMM strategy timed on `shapes`; `None` where the backend has one
    /// GEMM (the CPU). Rows go to `print` as they are measured.
    fn gemm_table(
        _device: &Self::Device,
        _dtype: DType,
        _shapes: &[GemmShape],
        _reps: usize,
        _print: &mut dyn FnMut(&GemmRow),
    ) -> Option<Vec<GemmRow>> {
        None
    }
}

/// One product of the GEMM table: `[m, k] · [k, n]`, the right side stored `[n, k]` and read transposed (a frozen
/// `x·Wᵀ`) or stored `[k, n]` (its backward `dy·W`).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmShape {
    pub name: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub rhs_transposed: bool,
}

impl GemmShape {
    pub fn label(&self) -> String {
        let t = if self.rhs_transposed { "ᵀ" } else { "" };
        format!(
            "{} {}x{}·{}x{}{t}",
            self.name, self.m, self.k, self.k, self.n
        )
    }

    /// The products of one training step at a model's shape with `m` token rows and LoRA rank `r`.
    pub fn step(m: usize, hidden: usize, inter: usize, vocab: usize, r: usize) -> Vec<GemmShape> {
        let g = |name, m, k, n, rhs_transposed| GemmShape {
            name,
            m,
            k,
            n,
            rhs_transposed,
        };
        // The fused loss sweeps the head in chunks of at most 2^26 logits.
        let head_rows = ((1usize << 26) / vocab).clamp(1, m);
        vec![
            g("x·Wq", m, hidden, hidden, true),
            g("x·Wup", m, hidden, inter, true),
            g("dy·Wdown", m, hidden, inter, false),
            g("x·Wdown", m, inter, hidden, true),
            g("x·A", m, hidden, r, true),
            g("xA·B", m, r, hidden, true),
            g("lm_head", head_rows, hidden, vocab, true),
        ]
    }
}

/// One timed strategy of the GEMM table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GemmRow {
    pub shape: String,
    pub strategy: String,
    /// The first call, kernel compilation included.
    pub first_ms: f64,
    pub median_ms: f64,
    pub tflops: f64,
    /// max |out − f32 product| / max |f32 product| (the output's own rounding included: ~4e-3 in bf16).
    pub max_rel: f64,
    /// Why the strategy does not run this product (then no times).
    pub error: Option<String>,
}

/// A backend to train on: autodiff over a backend the model runs on, both with their kernels.
pub trait TrainBackend: AutodiffBackend<InnerBackend: Kernels> + Kernels {}
impl<B: AutodiffBackend<InnerBackend: Kernels> + Kernels> TrainBackend for B {}

/// The fused CPU kernels for `Flex` and `Autodiff<Flex>`: each op tries its kernel, else the reference.
macro_rules! cpu_kernels {
    ($backend:ty) => {
        impl Kernels for $backend {
            fn rms_norm<const D: usize>(
                x: Tensor<Self, D>,
                norm: &NormRef<'_, Self>,
            ) -> Tensor<Self, D> {
                match enabled().then(|| cpu::norm::rms_norm(&x, norm)).flatten() {
                    Some(y) => y,
                    None => reference::rms_norm(x, norm),
                }
            }

            fn glu(gate_up: Tensor<Self, 2>, act: Activation) -> Tensor<Self, 2> {
                let fused = (enabled() && act == Activation::Silu)
                    .then(|| cpu::act::silu_mul_packed(&gate_up))
                    .flatten();
                match fused {
                    Some(y) => y,
                    None => reference::glu(gate_up, act),
                }
            }

            fn lora_linear_group(
                x: Tensor<Self, 2>,
                members: &[LinearRef<'_, Self>],
            ) -> Tensor<Self, 2> {
                match enabled()
                    .then(|| cpu::lora::linear_group(&x, members))
                    .flatten()
                {
                    Some(y) => y,
                    None => reference::linear_group(x, members),
                }
            }

            fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
                match enabled()
                    .then(|| cpu::attention::attention(&qkv, &att.spec))
                    .flatten()
                {
                    Some(y) => y,
                    None => reference::attention(qkv, att),
                }
            }

            fn lm_head_cross_entropy(
                hidden: Tensor<Self, 2>,
                head: &LinearRef<'_, Self>,
                t: &Targets<'_>,
            ) -> Tensor<Self, 1> {
                let plain_head =
                    head.adapter.is_none() && head.bias.is_none() && t.softcap.is_none();
                let fused = (enabled() && plain_head)
                    .then(|| cpu::xent::lm_xent(&hidden, head.weight, t.rows, t.targets))
                    .flatten();
                match fused {
                    Some(loss) => loss,
                    None => reference::lm_head_cross_entropy(hidden, head, t),
                }
            }
        }
    };
}

cpu_kernels!(Flex);
cpu_kernels!(Autodiff<Flex>);

static ENABLED: AtomicU8 = AtomicU8::new(2);

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the fused kernels on or off for calls made from this thread (tests compare both paths without
/// touching the process-wide switch).
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let prev = OVERRIDE.with(|o| o.replace(Some(on)));
    let r = f();
    OVERRIDE.with(|o| o.set(prev));
    r
}

/// Whether the fused kernels are used (default yes; `LORATUNE_FUSED=0` in the environment or
/// [`set_enabled`]`(false)` turns them off).
pub fn enabled() -> bool {
    if let Some(on) = OVERRIDE.with(|o| o.get()) {
        return on;
    }
    match ENABLED.load(Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => {
            let on = std::env::var("LORATUNE_FUSED").map_or(true, |v| v != "0" && v != "false");
            ENABLED.store(on as u8, Ordering::Relaxed);
            on
        }
    }
}

/// The attention the CubeCL backends run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubeAttention {
    /// The unit-per-row CubeCL kernels ([`cube::attention`], `LORATUNE_ATTENTION=tile`).
    Tile,
    /// Blocks of this many query rows on the backend's GEMMs ([`blockwise`], the default).
    Blockwise(usize),
}

thread_local! {
    static ATTN_OVERRIDE: std::cell::Cell<Option<CubeAttention>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the CubeCL backends' attention set to `a` for calls made from this thread (the kernel suite
/// checks each; other backends ignore it).
pub fn with_cube_attention<R>(a: CubeAttention, f: impl FnOnce() -> R) -> R {
    let prev = ATTN_OVERRIDE.with(|o| o.replace(Some(a)));
    let r = f();
    ATTN_OVERRIDE.with(|o| o.set(prev));
    r
}

/// The attention the CubeCL backends run now: [`with_cube_attention`]'s, else `LORATUNE_ATTENTION=tile`, else
/// blockwise with [`blockwise::BLOCK_ROWS`] rows.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn cube_attention() -> CubeAttention {
    ATTN_OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        if std::env::var("LORATUNE_ATTENTION").is_ok_and(|v| v == "tile") {
            CubeAttention::Tile
        } else {
            CubeAttention::Blockwise(blockwise::BLOCK_ROWS)
        }
    })
}

/// Turn the fused kernels on or off for the whole process (benchmarks compare both paths).
pub fn set_enabled(on: bool) {
    ENABLED.store(on as u8, Ordering::Relaxed);
}
