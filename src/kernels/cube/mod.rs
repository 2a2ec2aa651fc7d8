//! The fused kernels on CubeCL runtimes: written once as `#[cube]` kernels, generic over the runtime and float
//! type, so the same code runs on CUDA (`--features cuda`) and, in CI, on wgpu over Mesa's lavapipe
//! (`--features wgpu`). Each op registers its own backward in burn's autodiff graph, as the CPU kernels do.
//!
//! - [`norm`] — RMSNorm (Gemma's `1 + w` included), one cube per row, saving the input and one float per row;
//! - [`act`] — `act(gate)·up` (SiLU, GELU tanh / erf) on the packed `gate|up` rows, saving only its input;
//! - [`attention`] — masked softmax attention (causal, padding, packing, sliding window, soft-capping, grouped
//!   KV heads), FlashAttention-style in memory linear in the sequence length, forward and backward;
//! - [`xent`] — `lm_head` + cross-entropy (Gemma 2's final soft-cap included) swept in row chunks: one GEMM per
//!   chunk for the logits, one kernel for the rows' losses that turns the logits into their gradient in place,
//!   one GEMM for ∂loss/∂hidden; only `[n, hidden]` is kept for the backward, never `[tokens, vocab]` logits;
//! - [`quant`] — GGUF-quantized frozen weights (`Q4_0`, `Q4_1`, `Q8_0`, `Q4_K`, `Q5_K`, `Q6_K`) resident on the
//!   device in their blocks (uploaded once per matrix) and dequantized there tile by tile where a product reads
//!   them: the frozen product `x·Wᵀ` of a linear group is one autodiff node saving only the quantized handle, and a
//!   quantized head is dequantized on the device for the fused loss. NF4 too (codes + per-block absmax).
//! - [`gemm`] — the GEMM table (`bench --gemm`: cubek's strategies timed and checked on a step's products), and
//!   the dense frozen products and the loss's chunk GEMMs through one strategy when `LORATUNE_GEMM` names it.
//!
//! Attention runs [`super::blockwise`] (query blocks on the backend's GEMMs) unless `LORATUNE_ATTENTION=tile`
//! selects [`attention`]'s unit-per-row kernels. RoPE and the projections run burn's ops (cubek's default GEMM
//! strategy; burn's autotune with `--features autotune`); the reference's linear group
//! stacks the adapters' `A` factors of a group into one GEMM when no dropout mask separates their inputs.

/// Launch `$module::$kernel` with the float type chosen from the runtime dtype `$dtype`.
macro_rules! launch_float {
    ($dtype:expr, $module:ident::$kernel:ident, $($arg:expr),* $(,)?) => {
        match $dtype {
            DType::F32 => $module::$kernel::launch::<f32, R>($($arg),*),
            DType::F16 => $module::$kernel::launch::<half::f16, R>($($arg),*),
            DType::BF16 => $module::$kernel::launch::<half::bf16, R>($($arg),*),
            d => unreachable!("float kernel launched for {d:?} (callers check the dtype)"),
        }
    };
}

pub mod act;
pub mod attention;
pub mod dequant;
pub mod gemm;
pub mod norm;
pub mod quant;
mod reduce;
pub mod xent;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{DType, IndexingUpdateOp, Int, Shape, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;

use super::blockwise::rows;
use super::{reference, Attention, AttnSpec, Kernels, LinearRef, Qkv, Targets};

/// What the attention kernels read besides q / k / v: shapes, masking data and scalars.
#[derive(Debug, Clone)]
struct Call<R: CubeRuntime> {
    heads: u32,
    kv_heads: u32,
    seq: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    head_dim: usize,
    /// `[b·s]` i32: 1 for a real key.
    valid: CubeTensor<R>,
    /// `[b·s]` i32 packed-sample ids (zeros without packing).
    seg: CubeTensor<R>,
}

/// The largest head dim the kernels take (their per-unit arrays are sized at compile time, per head dim).
const MAX_HEAD_DIM: usize = 512;

/// Whether the kernels cover this call: the blockwise path's conditions (no KV cache, grouped heads), a supported
/// head dim, a float type.
fn covers(spec: &AttnSpec, dtype: DType) -> bool {
    super::blockwise::covers(spec)
        && spec.head_dim <= MAX_HEAD_DIM
        && is_float(dtype)
        && u32::try_from(spec.batch * spec.heads * spec.seq * spec.head_dim).is_ok()
}

fn i32_tensor<R: CubeRuntime>(like: &CubeTensor<R>, v: Vec<i32>) -> CubeTensor<R> {
    let n = v.len();
    let handle = like.client.create_from_slice(bytemuck::cast_slice(&v));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::new([n]),
        handle,
        DType::I32,
    )
}

impl<R: CubeRuntime> Call<R> {
    fn new(spec: &AttnSpec, like: &CubeTensor<R>) -> Self {
        let m = &spec.masking;
        let valid = m.key_valid.iter().map(|&v| v as i32).collect();
        let seg = match &m.segments {
            Some(s) => s.iter().map(|&x| x as i32).collect(),
            None => vec![0; spec.batch * spec.seq],
        };
        Call {
            heads: spec.heads as u32,
            kv_heads: spec.kv_heads as u32,
            seq: spec.seq as u32,
            window: m.window.map_or(0, |w| w.min(u32::MAX as usize) as u32),
            scale: spec.scale,
            softcap: spec.softcap.map_or(0.0, |c| c as f32),
            head_dim: spec.head_dim,
            valid: i32_tensor(like, valid),
            seg: i32_tensor(like, seg),
        }
    }
}

/// Every output buffer of the kernels here (a [`super::prof::peak_memory`] probe reads the device after each).
fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    super::prof::live(empty_device_contiguous_dtype(
        x.client.clone(),
        x.device.clone(),
        shape,
        dtype,
    ))
}

fn grid<R: CubeRuntime>(x: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&x.client, units);
    (
        cubecl::calculate_cube_count_elemwise(&x.client, units, dim),
        dim,
    )
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Forward: (o `[b, nh, s, hd]`, lse `[b·nh·s]` f32) from contiguous q, k, v.
fn forward<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    c: &Call<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let rows = q.meta.shape().num_elements() / c.head_dim;
    let o = empty_like(q, q.meta.shape().clone(), q.dtype);
    let lse = empty_like(q, Shape::new([rows]), DType::F32);
    let (count, dim) = grid(q, rows);
    launch_float!(
        q.dtype,
        attention::attn_fwd,
        &q.client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        c.valid.clone().into_tensor_arg(),
        c.seg.clone().into_tensor_arg(),
        o.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        c.heads,
        c.kv_heads,
        c.seq,
        c.window,
        c.scale,
        c.softcap,
        c.head_dim,
    );
    (o, lse)
}

/// What the backward keeps: the inputs, the output and its log-sum-exp (all linear in s).
#[derive(Debug, Clone)]
struct Saved<R: CubeRuntime> {
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    o: CubeTensor<R>,
    lse: CubeTensor<R>,
    call: Call<R>,
}

/// Backward: (dq, dk, dv) from dO.
fn backward<R: CubeRuntime>(
    d_o: CubeTensor<R>,
    st: &Saved<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let c = &st.call;
    let d_o = into_contiguous(d_o);
    let rows = st.q.meta.shape().num_elements() / c.head_dim;
    let krows = st.k.meta.shape().num_elements() / c.head_dim;
    let delta = empty_like(&st.q, Shape::new([rows]), DType::F32);
    let (count, dim) = grid(&st.q, rows);
    launch_float!(
        st.q.dtype,
        attention::attn_bwd_delta,
        &st.q.client,
        count.clone(),
        dim,
        d_o.clone().into_tensor_arg(),
        st.o.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        c.head_dim,
    );
    let dq = empty_like(&st.q, st.q.meta.shape().clone(), st.q.dtype);
    launch_float!(
        st.q.dtype,
        attention::attn_bwd_dq,
        &st.q.client,
        count,
        dim,
        st.q.clone().into_tensor_arg(),
        st.k.clone().into_tensor_arg(),
        st.v.clone().into_tensor_arg(),
        d_o.clone().into_tensor_arg(),
        st.lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        c.valid.clone().into_tensor_arg(),
        c.seg.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        c.heads,
        c.kv_heads,
        c.seq,
        c.window,
        c.scale,
        c.softcap,
        c.head_dim,
    );
    let dk = empty_like(&st.k, st.k.meta.shape().clone(), st.k.dtype);
    let dv = empty_like(&st.v, st.v.meta.shape().clone(), st.v.dtype);
    let (kcount, kdim) = grid(&st.k, krows);
    launch_float!(
        st.q.dtype,
        attention::attn_bwd_dkdv,
        &st.q.client,
        kcount,
        kdim,
        st.q.clone().into_tensor_arg(),
        st.k.clone().into_tensor_arg(),
        st.v.clone().into_tensor_arg(),
        d_o.into_tensor_arg(),
        st.lse.clone().into_tensor_arg(),
        delta.into_tensor_arg(),
        c.valid.clone().into_tensor_arg(),
        c.seg.clone().into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        c.heads,
        c.kv_heads,
        c.seq,
        c.window,
        c.scale,
        c.softcap,
        c.head_dim,
    );
    (dq, dk, dv)
}

#[derive(Debug)]
struct AttentionBackward;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<R, F, I, BT>, 3> for AttentionBackward
{
    type State = Saved<R>;

    fn backward(self, ops: Ops<Saved<R>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_o = grads.consume::<CubeBackend<R, F, I, BT>>(&ops.node);
        let (dq, dk, dv) = backward(d_o, &ops.state);
        for (p, d) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(p) = p {
                grads.register::<CubeBackend<R, F, I, BT>>(p.id, d);
            }
        }
    }
}

fn float<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// Cubes for one per row: a 2-D grid (a grid dimension holds at most 65 535 cubes); the kernels skip the extra.
fn row_cubes(rows: usize) -> CubeCount {
    let x = rows.clamp(1, 65_535);
    CubeCount::Static(x as u32, rows.div_ceil(x).max(1) as u32, 1)
}

/// RMSNorm forward on contiguous `[rows, h]` x and `[h]` w: (y, r per row).
fn rms_forward<R: CubeRuntime>(
    x: &CubeTensor<R>,
    w: &CubeTensor<R>,
    eps: f32,
    offset: f32,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let h = w.meta.shape().num_elements();
    let rows = x.meta.shape().num_elements() / h;
    let y = empty_like(x, x.meta.shape().clone(), x.dtype);
    let r = empty_like(x, Shape::new([rows]), DType::F32);
    launch_float!(
        x.dtype,
        norm::rms_fwd,
        &x.client,
        row_cubes(rows),
        CubeDim::new_1d(norm::BLOCK),
        x.clone().into_tensor_arg(),
        w.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        r.clone().into_tensor_arg(),
        eps,
        offset,
    );
    (y, r)
}

#[derive(Debug)]
struct RmsNormBackward;

/// The norm's input, weight, 1/rms per row, and the weight offset.
type RmsState<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>, f32);

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<R, F, I, BT>, 1> for RmsNormBackward
{
    type State = RmsState<R>;

    fn backward(self, ops: Ops<RmsState<R>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = into_contiguous(grads.consume::<CubeBackend<R, F, I, BT>>(&ops.node));
        let (x, w, r, offset) = ops.state;
        let rows = r.meta.shape().num_elements();
        let dx = empty_like(&x, x.meta.shape().clone(), x.dtype);
        launch_float!(
            x.dtype,
            norm::rms_bwd,
            &x.client,
            row_cubes(rows),
            CubeDim::new_1d(norm::BLOCK),
            dy.into_tensor_arg(),
            x.clone().into_tensor_arg(),
            w.into_tensor_arg(),
            r.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            offset,
        );
        if let Some(p) = &ops.parents[0] {
            grads.register::<CubeBackend<R, F, I, BT>>(p.id, dx);
        }
    }
}

/// Whether the fused RMSNorm covers this call: float input, the weight in the same dtype and frozen.
fn rms_covered<B: burn::tensor::backend::Backend, const D: usize>(
    x: &Tensor<B, D>,
    norm: &super::NormRef<'_, B>,
) -> bool {
    super::enabled()
        && is_float(x.dtype())
        && norm.weight.dtype() == x.dtype()
        && !norm.weight.is_require_grad()
        && x.dims()[D - 1] == norm.weight.dims()[0]
}

/// The kernels' compile-time code of an activation.
fn act_code(act: super::Activation) -> u32 {
    match act {
        super::Activation::Silu => act::SILU,
        super::Activation::GeluTanh => act::GELU_TANH,
        super::Activation::Gelu => act::GELU_ERF,
    }
}

/// `act(gate)·up` forward on a contiguous `[n, 2i]`.
fn glu_forward<R: CubeRuntime>(x: &CubeTensor<R>, act: u32) -> CubeTensor<R> {
    let [n, two_i] = x.meta.shape().dims::<2>();
    let i = two_i / 2;
    let y = empty_like(x, Shape::new([n, i]), x.dtype);
    let (count, dim) = grid(x, n * i);
    launch_float!(
        x.dtype,
        act::glu_fwd,
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        i as u32,
        act,
    );
    y
}

#[derive(Debug)]
struct GluBackward;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<R, F, I, BT>, 1> for GluBackward
{
    /// The packed input and the activation's code.
    type State = (CubeTensor<R>, u32);

    fn backward(
        self,
        ops: Ops<(CubeTensor<R>, u32), 1>,
        grads: &mut Gradients,
        _: &mut Checkpointer,
    ) {
        let dy = into_contiguous(grads.consume::<CubeBackend<R, F, I, BT>>(&ops.node));
        let (x, act) = ops.state;
        let dx = empty_like(&x, x.meta.shape().clone(), x.dtype);
        let (count, dim) = grid(&dy, dy.meta.shape().num_elements());
        launch_float!(
            x.dtype,
            act::glu_bwd,
            &x.client,
            count,
            dim,
            dy.into_tensor_arg(),
            x.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            (x.meta.shape().dims::<2>()[1] / 2) as u32,
            act,
        );
        if let Some(p) = &ops.parents[0] {
            grads.register::<CubeBackend<R, F, I, BT>>(p.id, dx);
        }
    }
}

/// Whether the fused `act(gate)·up` covers this call.
fn glu_covered(dtype: DType, dims: [usize; 2]) -> bool {
    super::enabled()
        && is_float(dtype)
        && dims[1].is_multiple_of(2)
        && u32::try_from(dims[0] * dims[1]).is_ok()
}

/// Rows of logits one chunk of the fused loss holds: at most 2^26 logits (256 MB in f32) at once, so the loss
/// never materialises `[tokens, vocab]` (at 2048 tokens × 128 256, the f32 logits alone are 1 GB).
fn xent_chunk_rows(vocab: usize) -> usize {
    ((1usize << 26) / vocab.max(1)).max(1)
}

/// The summed loss `[1]` and, when asked for, ∂loss/∂(selected rows).
type LossAndGrad<B> = (Tensor<B, 1>, Option<Tensor<B, 2>>);

/// `lm_head` + cross-entropy of the selected rows `h` `[n, d]` against the frozen head `w` `[V, d]`, `chunk` rows at
/// a time: per chunk one GEMM gives the logits, [`xent::xent_rows`] the rows' losses (and, with `grad`, turns the
/// logits into their gradient in place), a second GEMM ∂loss/∂h. Returns the summed loss `[1]` (f32) and, with
/// `grad`, ∂loss/∂h `[n, d]`.
fn lm_xent<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    h: Tensor<CubeBackend<R, F, I, BT>, 2>,
    w: &Tensor<CubeBackend<R, F, I, BT>, 2>,
    targets: &[usize],
    cap: f32,
    grad: bool,
    chunk: usize,
) -> LossAndGrad<CubeBackend<R, F, I, BT>> {
    let n = h.dims()[0];
    let vocab = w.dims()[0];
    let wt = w.clone().transpose();
    // The chunk's two GEMMs: burn's matmul, or the strategy `LORATUNE_GEMM` names.
    let mm = |a: Tensor<CubeBackend<R, F, I, BT>, 2>, b: Tensor<CubeBackend<R, F, I, BT>, 2>| {
        match gemm::chosen() {
            Some(g) => Tensor::from_primitive(TensorPrimitive::Float(gemm::matmul::<R, F, I, BT>(
                g,
                into_contiguous(float(a)),
                float(b),
            ))),
            None => a.matmul(b),
        }
    };
    let (mut losses, mut dh) = (Vec::new(), Vec::new());
    for r0 in (0..n).step_by(chunk.max(1)) {
        let r1 = (r0 + chunk.max(1)).min(n);
        let logits = into_contiguous(float(mm(h.clone().slice(r0..r1), wt.clone())));
        let tg = i32_tensor(&logits, targets[r0..r1].iter().map(|&t| t as i32).collect());
        let loss = empty_like(&logits, Shape::new([r1 - r0]), DType::F32);
        launch_float!(
            logits.dtype,
            xent::xent_rows,
            &logits.client,
            row_cubes(r1 - r0),
            CubeDim::new_1d(xent::BLOCK),
            logits.clone().into_tensor_arg(),
            tg.into_tensor_arg(),
            loss.clone().into_tensor_arg(),
            vocab as u32,
            cap,
            grad,
        );
        losses.push(Tensor::<CubeBackend<R, F, I, BT>, 1>::from_primitive(
            TensorPrimitive::Float(loss),
        ));
        if grad {
            let dl = Tensor::<CubeBackend<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(
                logits,
            ));
            dh.push(mm(dl, w.clone()));
        }
    }
    (
        Tensor::cat(losses, 0).sum(),
        grad.then(|| Tensor::cat(dh, 0)),
    )
}

/// Whether the fused loss covers this call: a plain frozen head (no adapter, no bias) in the hidden states' float
/// type, at least one row, every target inside the vocabulary.
fn xent_covered<B: burn::tensor::backend::Backend>(
    hidden: &Tensor<B, 2>,
    head: &LinearRef<'_, B>,
    t: &Targets<'_>,
) -> bool {
    let [n, d] = hidden.dims();
    // A quantized head (GGUF blocks or NF4) is dequantized on the device for the call.
    let plain_weight = match head.weight.as_dense() {
        Some(w) => !w.is_require_grad(),
        None => quant::is_device_quant(head.weight),
    };
    let [vocab, wd] = head.weight.dims();
    super::enabled()
        && head.adapter.is_none()
        && head.bias.is_none()
        && plain_weight
        && is_float(hidden.dtype())
        && head.weight.dtype() == hidden.dtype()
        && wd == d
        && !t.rows.is_empty()
        && t.rows.len() == t.targets.len()
        && t.rows.iter().all(|&r| r < n)
        && t.targets.iter().all(|&x| x < vocab)
        && u32::try_from(vocab).is_ok()
}

/// The selected rows as an index tensor.
fn row_index<B: burn::tensor::backend::Backend>(
    rows: &[usize],
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
    Tensor::from_data(TensorData::new(idx, [rows.len()]), device)
}

#[derive(Debug)]
struct XentBackward;

/// ∂loss/∂(selected rows), their indices, and the hidden states' shape.
type XentState<B> = (Tensor<B, 2>, Tensor<B, 1, Int>, [usize; 2]);

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<R, F, I, BT>, 1> for XentBackward
{
    type State = XentState<CubeBackend<R, F, I, BT>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
        let g = grads.consume::<B<R, F, I, BT>>(&ops.node);
        let (dh, idx, dims) = ops.state;
        let Some(p) = &ops.parents[0] else { return };
        let dtype = dh.dtype();
        let g = Tensor::<B<R, F, I, BT>, 1>::from_primitive(TensorPrimitive::Float(g))
            .cast(dtype)
            .reshape([1, 1]);
        let full = Tensor::<B<R, F, I, BT>, 2>::zeros(dims, (&dh.device(), dtype)).select_assign(
            0,
            idx,
            dh * g,
            IndexingUpdateOp::Add,
        );
        grads.register::<B<R, F, I, BT>>(p.id, float(full));
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Kernels
    for CubeBackend<R, F, I, BT>
{
    const CUBE_ATTENTION: bool = true;

    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        R::client(device)
            .memory_usage()
            .ok()
            .map(|m| m.bytes_reserved)
    }

    fn gemm_table(
        device: &Self::Device,
        dtype: DType,
        shapes: &[super::GemmShape],
        reps: usize,
        print: &mut dyn FnMut(&super::GemmRow),
    ) -> Option<Vec<super::GemmRow>> {
        Some(gemm::table::<R, F, I, BT>(
            device, dtype, shapes, reps, print,
        ))
    }

    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        norm: &super::NormRef<'_, Self>,
    ) -> Tensor<Self, D> {
        if !rms_covered(&x, norm) {
            return reference::rms_norm(x, norm);
        }
        let xp = into_contiguous(float(x));
        let w = into_contiguous(float(norm.weight.clone()));
        let (y, _) = rms_forward(&xp, &w, norm.eps as f32, norm.offset);
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    fn glu(gate_up: Tensor<Self, 2>, act: super::Activation) -> Tensor<Self, 2> {
        if !glu_covered(gate_up.dtype(), gate_up.dims()) {
            return reference::glu(gate_up, act);
        }
        let x = into_contiguous(float(gate_up));
        Tensor::from_primitive(TensorPrimitive::Float(glu_forward(&x, act_code(act))))
    }

    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        if !super::enabled() || !covers(&att.spec, att.dtype) {
            return reference::attention(qkv, att);
        }
        let (q, k, v) = reference::rope_heads(qkv, att);
        if let super::CubeAttention::Blockwise(block) = super::cube_attention() {
            return rows(super::blockwise::attention_forward(
                q, k, v, &att.spec, block,
            ));
        }
        let (q, k, v) = (
            into_contiguous(float(q)),
            into_contiguous(float(k)),
            into_contiguous(float(v)),
        );
        let call = Call::new(&att.spec, &q);
        let (o, _) = forward(&q, &k, &v, &call);
        rows(Tensor::from_primitive(TensorPrimitive::Float(o)))
    }

    fn lora_linear_group(x: Tensor<Self, 2>, members: &[LinearRef<'_, Self>]) -> Tensor<Self, 2> {
        if !quant::group_covered(&x, members) {
            return reference::linear_group(x, members);
        }
        quant::linear_group(x, members, quant::frozen_product::<R, F, I, BT>)
    }

    fn lm_head_cross_entropy(
        hidden: Tensor<Self, 2>,
        head: &LinearRef<'_, Self>,
        t: &Targets<'_>,
    ) -> Tensor<Self, 1> {
        if !xent_covered(&hidden, head, t) {
            return reference::lm_head_cross_entropy(hidden, head, t);
        }
        let vocab = head.weight.dims()[0];
        let idx = row_index(t.rows, &hidden.device());
        let h = hidden.select(0, idx);
        let cap = t.softcap.map_or(0.0, |c| c as f32);
        // Dense: the stored head; quantized: dequantized on the device for this call (a transient).
        let w = quant::dense_on_device(head.weight);
        lm_xent(h, &w, t.targets, cap, false, xent_chunk_rows(vocab)).0
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Kernels
    for Autodiff<CubeBackend<R, F, I, BT>>
{
    const CUBE_ATTENTION: bool = true;

    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        norm: &super::NormRef<'_, Self>,
    ) -> Tensor<Self, D> {
        if !rms_covered(&x, norm) {
            return reference::rms_norm(x, norm);
        }
        let x = float(x);
        let xp = into_contiguous(x.primitive.clone());
        let w = into_contiguous(float(norm.weight.clone()).primitive);
        let (y, r) = rms_forward(&xp, &w, norm.eps as f32, norm.offset);
        let out = match RmsNormBackward
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, w, r, norm.offset), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn glu(gate_up: Tensor<Self, 2>, act: super::Activation) -> Tensor<Self, 2> {
        if !glu_covered(gate_up.dtype(), gate_up.dims()) {
            return reference::glu(gate_up, act);
        }
        let x = float(gate_up);
        let xp = into_contiguous(x.primitive.clone());
        let code = act_code(act);
        let y = glu_forward(&xp, code);
        let out = match GluBackward
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, code), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        if !super::enabled() || !covers(&att.spec, att.dtype) {
            return reference::attention(qkv, att);
        }
        let (q, k, v) = reference::rope_heads(qkv, att);
        if let super::CubeAttention::Blockwise(block) = super::cube_attention() {
            return rows(super::blockwise::attention(q, k, v, &att.spec, block));
        }
        let (q, k, v) = (float(q), float(k), float(v));
        let (qp, kp, vp) = (
            into_contiguous(q.primitive.clone()),
            into_contiguous(k.primitive.clone()),
            into_contiguous(v.primitive.clone()),
        );
        let call = Call::new(&att.spec, &qp);
        let (o, lse) = forward(&qp, &kp, &vp, &call);
        let out = match AttentionBackward
            .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let saved = Saved {
                    q: qp,
                    k: kp,
                    v: vp,
                    o: o.clone(),
                    lse,
                    call,
                };
                prep.finish(saved, o)
            }
            OpsKind::UnTracked(prep) => prep.finish(o),
        };
        rows(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn lora_linear_group(x: Tensor<Self, 2>, members: &[LinearRef<'_, Self>]) -> Tensor<Self, 2> {
        if !quant::group_covered(&x, members) {
            return reference::linear_group(x, members);
        }
        quant::linear_group(x, members, quant::frozen_product_ad::<R, F, I, BT>)
    }

    fn lm_head_cross_entropy(
        hidden: Tensor<Self, 2>,
        head: &LinearRef<'_, Self>,
        t: &Targets<'_>,
    ) -> Tensor<Self, 1> {
        type Inner<R, F, I, BT> = CubeBackend<R, F, I, BT>;
        if !xent_covered(&hidden, head, t) {
            return reference::lm_head_cross_entropy(hidden, head, t);
        }
        let dims = hidden.dims();
        let vocab = head.weight.dims()[0];
        let cap = t.softcap.map_or(0.0, |c| c as f32);
        let x = float(hidden);
        let h = Tensor::<Inner<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(
            x.primitive.clone(),
        ));
        let idx = row_index::<Inner<R, F, I, BT>>(t.rows, &h.device());
        let h = h.select(0, idx.clone());
        // Dense: the stored head; quantized: dequantized on the device for this call (a transient the loss does not
        // keep: its backward holds only ∂loss/∂rows).
        let w = quant::dense_on_device(&head.weight.map(|w| w.inner()));
        let chunk = xent_chunk_rows(vocab);
        let out = match XentBackward
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, dh) = lm_xent(h, &w, t.targets, cap, true, chunk);
                let dh = dh.expect("asked for the gradient");
                prep.finish((dh, idx, dims), float(loss))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(float(lm_xent(h, &w, t.targets, cap, false, chunk).0))
            }
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests;
