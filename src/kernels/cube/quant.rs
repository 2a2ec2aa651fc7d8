//! Quantized frozen weights on CubeCL runtimes: a quantized matrix ([`QMatrix`] with GGUF `Q4_0`, `Q4_1`, `Q8_0`,
//! `Q4_K`, `Q5_K` or `Q6_K` blocks, or bitsandbytes NF4) lives on the device in its storage format and is
//! dequantized there, a tile of rows at a time, where a product reads it.
//!
//! - **Device copy**: per `Arc<QMatrix>` and device, its blocks uploaded once as a `u32` buffer (byte length padded
//!   to a multiple of 4), cached by the `Arc`'s address with a `Weak` proving identity ([`device_blocks`]). An NF4
//!   matrix uploads its packed codes so, plus an f32 buffer: the 16 code values, then each block's absmax resolved
//!   on the host once at upload (`Nf4::block_absmax`). With double quantization that costs 0.5 bit per weight on
//!   the device (one f32 per 64 weights) where the host keeps 0.127 — a small price for a kernel that does one
//!   product per element.
//! - **Dequantization** ([`dequant`]): rows `r0..r1` into a dense tensor of the compute dtype by the kernels of
//!   [`super::dequant`], bit-exact with the host reference (`QMatrix::dequant_rows`) in f32.
//! - **The frozen product** `y = x·Wᵀ` ([`frozen_matmul`]), W dequantized into a transient tile of at most
//!   [`TILE_ELEMENTS`] elements at a time, one GEMM per tile; under autodiff a custom op ([`frozen_product_ad`])
//!   whose only parent is x and whose saved state is the quantized matrix's handle (the resident blocks), never a
//!   dense W: the backward dequantizes again, tile by tile, for `dx = dy·W`.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::dequant::{dequant_nf4, dequant_rows, type_code, NF4_TABLE};
use super::{empty_like, float, grid, is_float};
use crate::kernels::LinearRef;
use crate::quant::nf4::NF4_CODE;
use crate::quant::{Frozen, QMatrix};

// ---------------------------------------------------------------------------------------------------------------
// The device copy.
// ---------------------------------------------------------------------------------------------------------------

/// A quantized matrix resident on one device — its GGUF blocks or NF4 packed codes (`words`, a `u32` buffer) and,
/// for NF4, its f32 `table` (the 16 code values, then one absmax per block) — with the matrix's handle: what a
/// frozen product reads, and all its backward keeps.
#[derive(Debug, Clone)]
pub struct DeviceQ<R: CubeRuntime> {
    pub q: Arc<QMatrix>,
    pub words: CubeTensor<R>,
    pub table: Option<CubeTensor<R>>,
    layout: Layout,
}

/// How the kernels read a device copy.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// GGUF blocks: the kernel's type code, elements and bytes per block.
    Ggml {
        code: u32,
        block: usize,
        bytes: usize,
    },
    /// NF4: elements per block.
    Nf4 { block: usize },
}

/// One device's copy in the cache: the device, `words`, the NF4 table.
type DeviceCopy<R> = (
    <R as cubecl::Runtime>::Device,
    CubeTensor<R>,
    Option<CubeTensor<R>>,
);

/// The device copies, keyed by the `QMatrix` allocation's address: the `Weak` proves the key still names the
/// same matrix (an `Arc` cannot be reallocated at an address a `Weak` still holds), and each entry holds one
/// [`DeviceCopy`] per device and runtime it was uploaded to — never the matrix itself, which would
/// keep it alive. Entries whose matrix is gone are dropped, freeing their device buffers, on the next upload.
#[allow(clippy::type_complexity)]
static DEVICE_COPIES: Mutex<Option<HashMap<usize, (Weak<QMatrix>, Vec<Box<dyn Any + Send>>)>>> =
    Mutex::new(None);

/// Whether a frozen weight is quantized in a format the device kernels decode (NF4, or a GGUF type with a kernel).
pub fn is_device_quant<B: Backend>(w: &Frozen<B>) -> bool {
    w.quant().is_some_and(|q| device_layout(q))
}

fn device_layout(q: &QMatrix) -> bool {
    q.nf4_data().is_some()
        || q.ggml_blocks()
            .is_some_and(|(ty, _)| type_code(ty).is_some())
}

/// A `u32` buffer of `bytes` (zero-padded to a multiple of 4).
fn upload_words<R: CubeRuntime>(bytes: &[u8], device: &R::Device) -> CubeTensor<R> {
    let client = R::client(device);
    let handle = if bytes.len().is_multiple_of(4) {
        client.create_from_slice(bytes)
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        client.create_from_slice(&padded)
    };
    CubeTensor::new_contiguous(
        client,
        device.clone(),
        Shape::new([bytes.len().div_ceil(4)]),
        handle,
        DType::U32,
    )
}

/// The data of `q` on `device`, uploaded on first use. `None` for a matrix the kernels do not decode (a GGUF type
/// without a kernel).
pub fn device_blocks<R: CubeRuntime>(q: &Arc<QMatrix>, device: &R::Device) -> Option<DeviceQ<R>> {
    let (layout, bytes) = match (q.ggml_blocks(), q.nf4_data()) {
        (Some((ty, blocks)), _) => (
            Layout::Ggml {
                code: type_code(ty)?,
                block: ty.block_size(),
                bytes: ty.type_size(),
            },
            blocks,
        ),
        (None, Some(nf4)) => (
            Layout::Nf4 {
                block: nf4.blocksize,
            },
            &nf4.packed[..],
        ),
        (None, None) => return None,
    };
    let key = Arc::as_ptr(q) as usize;
    let mut guard = match DEVICE_COPIES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let map = guard.get_or_insert_with(Default::default);
    if let Some((weak, copies)) = map.get(&key) {
        if weak.upgrade().is_some_and(|a| Arc::ptr_eq(&a, q)) {
            for c in copies {
                if let Some((dev, words, table)) = c.downcast_ref::<DeviceCopy<R>>() {
                    if dev == device {
                        return Some(DeviceQ {
                            q: q.clone(),
                            words: words.clone(),
                            table: table.clone(),
                            layout,
                        });
                    }
                }
            }
        }
    }
    map.retain(|_, (weak, _)| weak.strong_count() > 0);
    let words = upload_words::<R>(bytes, device);
    let table = q.nf4_data().map(|nf4| {
        // The code values, then every block's absmax resolved once (double quantization included).
        let blocks = nf4.numel.div_ceil(nf4.blocksize);
        let mut t = Vec::with_capacity(NF4_TABLE + blocks);
        t.extend_from_slice(&NF4_CODE);
        t.extend((0..blocks).map(|b| nf4.block_absmax(b)));
        let client = R::client(device);
        let handle = client.create_from_slice(bytemuck::cast_slice(&t));
        CubeTensor::new_contiguous(
            client,
            device.clone(),
            Shape::new([t.len()]),
            handle,
            DType::F32,
        )
    });
    let dq = DeviceQ {
        q: q.clone(),
        words,
        table,
        layout,
    };
    let entry = map
        .entry(key)
        .or_insert_with(|| (Arc::downgrade(q), Vec::new()));
    if !entry.0.upgrade().is_some_and(|a| Arc::ptr_eq(&a, q)) {
        *entry = (Arc::downgrade(q), Vec::new());
    }
    let copy: DeviceCopy<R> = (device.clone(), dq.words.clone(), dq.table.clone());
    entry.1.push(Box::new(copy));
    Some(dq)
}

/// How many device copies of `q` the cache holds (tests).
#[cfg(test)]
pub fn cached_copies(q: &Arc<QMatrix>) -> usize {
    let guard = match DEVICE_COPIES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    guard
        .as_ref()
        .and_then(|m| m.get(&(Arc::as_ptr(q) as usize)))
        .filter(|(weak, _)| weak.upgrade().is_some_and(|a| Arc::ptr_eq(&a, q)))
        .map_or(0, |(_, copies)| copies.len())
}

/// Matrices the cache holds copies of, live or not yet swept (tests).
#[cfg(test)]
pub fn cached_matrices() -> usize {
    let guard = match DEVICE_COPIES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    guard.as_ref().map_or(0, |m| m.len())
}

/// Rows `r0..r1` of the matrix dequantized on the device, `[r1 − r0, cols]` in `dtype` (a float type).
pub fn dequant<R: CubeRuntime>(
    dq: &DeviceQ<R>,
    r0: usize,
    r1: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let cols = dq.q.cols();
    assert!(
        r0 <= r1 && r1 <= dq.q.rows() && is_float(dtype),
        "dequant: rows {r0}..{r1} of {:?} in {dtype:?}",
        dq.q
    );
    let out = empty_like(&dq.words, Shape::new([r1 - r0, cols]), dtype);
    let units = (r1 - r0) * cols;
    if units == 0 {
        return out;
    }
    let (count, dim) = grid(&out, units);
    let (words, o) = (
        dq.words.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    let client = &dq.words.client;
    let (code, block, bytes) = match dq.layout {
        Layout::Ggml { code, block, bytes } => (code, block, bytes),
        Layout::Nf4 { block } => {
            let start = u32::try_from(r0 * cols).expect("element index fits in u32");
            let table = dq
                .table
                .clone()
                .expect("an NF4 device copy has its table")
                .into_tensor_arg();
            match dtype {
                DType::F32 => {
                    dequant_nf4::launch::<f32, R>(client, count, dim, words, table, o, start, block)
                }
                DType::F16 => dequant_nf4::launch::<half::f16, R>(
                    client, count, dim, words, table, o, start, block,
                ),
                DType::BF16 => dequant_nf4::launch::<half::bf16, R>(
                    client, count, dim, words, table, o, start, block,
                ),
                d => unreachable!("dequant to {d:?} (checked above)"),
            };
            return out;
        }
    };
    let block0 = u32::try_from(r0 * cols / block).expect("block index fits in u32");
    match dtype {
        DType::F32 => dequant_rows::launch::<f32, R>(
            client, count, dim, words, o, block0, 0, code, block, bytes,
        ),
        DType::F16 => dequant_rows::launch::<half::f16, R>(
            client, count, dim, words, o, block0, 0, code, block, bytes,
        ),
        DType::BF16 => dequant_rows::launch::<half::bf16, R>(
            client, count, dim, words, o, block0, 0, code, block, bytes,
        ),
        d => unreachable!("dequant to {d:?} (checked above)"),
    };
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The frozen product.
// ---------------------------------------------------------------------------------------------------------------

/// The most elements of W a frozen product dequantizes at once (2^26: 128 MB in f16, 256 MB in f32): an 8B model's
/// lm_head (128 256 × 4096 = 2^29 elements) is never dense whole, while every projection of a 7–8B model
/// (≤ 14 336 × 4096) is one tile.
pub const TILE_ELEMENTS: usize = 1 << 26;

thread_local! {
    static TILE_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with at most `elements` elements of W per tile (tests: several tiles on small matrices).
#[cfg(test)]
pub fn with_tile_elements<T>(elements: usize, f: impl FnOnce() -> T) -> T {
    let prev = TILE_OVERRIDE.with(|t| t.replace(Some(elements)));
    let r = f();
    TILE_OVERRIDE.with(|t| t.set(prev));
    r
}

/// Rows of W per tile.
fn tile_rows(cols: usize) -> usize {
    let elements = TILE_OVERRIDE.with(|t| t.get()).unwrap_or(TILE_ELEMENTS);
    (elements / cols.max(1)).max(1)
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

fn tensor<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: CubeTensor<R>,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x·Wᵀ`, `[n, rows]` from `[n, cols]`, W dequantized to `dtype` `tile` rows at a time.
pub fn frozen_matmul<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<Cube<R, F, I, BT>, 2>,
    dq: &DeviceQ<R>,
    dtype: DType,
    tile: usize,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    let rows = dq.q.rows();
    let tile = tile.max(1);
    if rows <= tile {
        return x.matmul(tensor(dequant(dq, 0, rows, dtype)).transpose());
    }
    let outs = (0..rows)
        .step_by(tile)
        .map(|r0| {
            let w = tensor(dequant(dq, r0, (r0 + tile).min(rows), dtype));
            x.clone().matmul(w.transpose())
        })
        .collect();
    Tensor::cat(outs, 1)
}

/// `dy·W`, `[n, cols]` from `[n, rows]`, W dequantized `tile` rows at a time; several tiles accumulate in f32.
pub fn frozen_matmul_t<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    dy: Tensor<Cube<R, F, I, BT>, 2>,
    dq: &DeviceQ<R>,
    dtype: DType,
    tile: usize,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    let rows = dq.q.rows();
    let tile = tile.max(1);
    if rows <= tile {
        return dy.matmul(tensor(dequant(dq, 0, rows, dtype)));
    }
    let n = dy.dims()[0];
    let mut acc: Option<Tensor<Cube<R, F, I, BT>, 2>> = None;
    for r0 in (0..rows).step_by(tile) {
        let r1 = (r0 + tile).min(rows);
        let w = tensor(dequant(dq, r0, r1, dtype));
        let part = dy.clone().slice([0..n, r0..r1]).matmul(w).cast(DType::F32);
        acc = Some(match acc {
            Some(a) => a + part,
            None => part,
        });
    }
    let acc = acc.expect("at least two tiles");
    if acc.dtype() != dtype {
        acc.cast(dtype)
    } else {
        acc
    }
}

/// The frozen product's backward: `dx = dy·W`, W dequantized again tile by tile.
#[derive(Debug)]
struct FrozenMatmulBackward;

/// The resident blocks (with the matrix's handle), the compute dtype and the tile height: no dense W.
type FrozenState<R> = (DeviceQ<R>, DType, usize);

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Backward<Cube<R, F, I, BT>, 1>
    for FrozenMatmulBackward
{
    type State = FrozenState<R>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Cube<R, F, I, BT>>(&ops.node);
        let Some(p) = &ops.parents[0] else { return };
        let (dq, dtype, tile) = ops.state;
        let dx = frozen_matmul_t::<R, F, I, BT>(tensor(dy), &dq, dtype, tile);
        grads.register::<Cube<R, F, I, BT>>(p.id, float(dx));
    }
}

/// `x·Wᵀ` for a quantized frozen W on a CubeCL backend.
pub fn frozen_product<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<Cube<R, F, I, BT>, 2>,
    w: &Frozen<Cube<R, F, I, BT>>,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    if let (Frozen::Dense(t), Some(gemm)) = (w, super::gemm::chosen()) {
        let xt = super::into_contiguous(float(x));
        let wt = float(t.clone().transpose());
        return tensor(super::gemm::matmul::<R, F, I, BT>(gemm, xt, wt));
    }
    match w {
        Frozen::Quant { q, dtype, device } => match device_blocks::<R>(q, device) {
            Some(dq) => {
                let tile = tile_rows(q.cols());
                frozen_matmul(x, &dq, *dtype, tile)
            }
            None => x.matmul(w.dense().transpose()),
        },
        Frozen::Dense(t) => x.matmul(t.clone().transpose()),
    }
}

/// `x·Wᵀ` for a quantized frozen W under autodiff: one node whose parent is x, saving only the quantized
/// matrix's handle for its backward.
pub fn frozen_product_ad<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<Autodiff<Cube<R, F, I, BT>>, 2>,
    w: &Frozen<Autodiff<Cube<R, F, I, BT>>>,
) -> Tensor<Autodiff<Cube<R, F, I, BT>>, 2> {
    let (q, dtype, device) = match w {
        Frozen::Quant { q, dtype, device } => (q, *dtype, device),
        Frozen::Dense(t) => match super::gemm::chosen() {
            Some(gemm) => return dense_product_ad(x, t, gemm),
            None => return x.matmul(t.clone().transpose()),
        },
    };
    let Some(dq) = device_blocks::<R>(q, device) else {
        return x.matmul(w.dense().transpose());
    };
    let tile = tile_rows(q.cols());
    let x = float(x);
    let y = frozen_matmul(tensor::<R, F, I, BT>(x.primitive.clone()), &dq, dtype, tile);
    let out = match FrozenMatmulBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((dq, dtype, tile), float(y)),
        OpsKind::UnTracked(prep) => prep.finish(float(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// `x·Wᵀ` for a dense frozen W under autodiff with the GEMM strategy `LORATUNE_GEMM` chose
/// ([`super::gemm::chosen`]): one node whose parent is x, saving W's handle (no copy) for `dx = dy·W`.
fn dense_product_ad<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<Autodiff<Cube<R, F, I, BT>>, 2>,
    w: &Tensor<Autodiff<Cube<R, F, I, BT>>, 2>,
    gemm: usize,
) -> Tensor<Autodiff<Cube<R, F, I, BT>>, 2> {
    let x = float(x);
    let w = float(w.clone()).primitive;
    let wt = float(tensor::<R, F, I, BT>(w.clone()).transpose());
    let y =
        super::gemm::matmul::<R, F, I, BT>(gemm, super::into_contiguous(x.primitive.clone()), wt);
    let out = match DenseMatmulBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((w, gemm), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The dense frozen product's backward: `dx = dy·W` with the same strategy.
#[derive(Debug)]
struct DenseMatmulBackward;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Backward<Cube<R, F, I, BT>, 1>
    for DenseMatmulBackward
{
    type State = (CubeTensor<R>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Cube<R, F, I, BT>>(&ops.node);
        let Some(p) = &ops.parents[0] else { return };
        let (w, gemm) = ops.state;
        let dx = super::gemm::matmul::<R, F, I, BT>(gemm, super::into_contiguous(dy), w);
        grads.register::<Cube<R, F, I, BT>>(p.id, dx);
    }
}

/// A quantized head dequantized on the device whole, `[vocab, hidden]` in its compute dtype (the fused loss
/// reads it row chunk by row chunk and keeps nothing of it for its backward).
pub fn dense_on_device<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    w: &Frozen<Cube<R, F, I, BT>>,
) -> Tensor<Cube<R, F, I, BT>, 2> {
    match w {
        Frozen::Quant { q, dtype, device } => match device_blocks::<R>(q, device) {
            Some(dq) => tensor(dequant(&dq, 0, q.rows(), *dtype)),
            None => w.dense(),
        },
        Frozen::Dense(t) => t.clone(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The linear group.
// ---------------------------------------------------------------------------------------------------------------

/// Whether the quantized linear group covers this call: the fused kernels on, a float input, at least one member
/// with a device-decodable quantized W, and every such W computed in the input's dtype.
pub fn group_covered<B: Backend>(x: &Tensor<B, 2>, members: &[LinearRef<'_, B>]) -> bool {
    let dtype = x.dtype();
    crate::kernels::enabled()
        && is_float(dtype)
        && (members.iter().any(|m| is_device_quant(m.weight)) || dense_gemm_chosen())
        && members
            .iter()
            .filter(|m| is_device_quant(m.weight))
            .all(|m| m.weight.dtype() == dtype && m.weight.dims()[1] == x.dims()[1])
}

/// Whether `LORATUNE_GEMM` sends dense frozen products through a chosen strategy (CubeCL builds only).
fn dense_gemm_chosen() -> bool {
    super::gemm::chosen().is_some()
}

fn to_dtype<B: Backend>(x: Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
    if x.dtype() != dtype {
        x.cast(dtype)
    } else {
        x
    }
}

/// The members' outputs side by side: `frozen(x, W_j)` (+ b_j) + the adapter term as the reference computes it
/// (`s·((x ∘ m)·Aᵀ)·Bᵀ` in f32, cast back to x's dtype). `frozen` is the backend's frozen product.
pub fn linear_group<B: Backend>(
    x: Tensor<B, 2>,
    members: &[LinearRef<'_, B>],
    frozen: impl Fn(Tensor<B, 2>, &Frozen<B>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let base_dtype = x.dtype();
    // x in f32, cast once for every adapter of the group.
    let mut xf: Option<Tensor<B, 2>> = None;
    let mut outs: Vec<Tensor<B, 2>> = members
        .iter()
        .map(|m| {
            let mut y = frozen(x.clone(), m.weight);
            if let Some(b) = m.bias {
                y = y + b.clone().unsqueeze_dim::<2>(0);
            }
            if let Some(ad) = &m.adapter {
                let mut h = xf
                    .get_or_insert_with(|| to_dtype(x.clone(), DType::F32))
                    .clone();
                if let Some(mask) = &ad.mask {
                    h = h * mask.clone();
                }
                let low = h.matmul(ad.a.clone().transpose());
                let delta = low.matmul(ad.b.clone().transpose()).mul_scalar(ad.scale);
                y = y + to_dtype(delta, base_dtype);
            }
            y
        })
        .collect();
    if outs.len() == 1 {
        outs.pop().expect("one member")
    } else {
        Tensor::cat(outs, 1)
    }
}
