//! The fused kernels on CubeCL runtimes: written once as `#[cube]` kernels, generic over the runtime and float
//! type, so the same code runs on CUDA (`--features cuda`) and, in CI, on wgpu over Mesa's lavapipe
//! (`--features wgpu`). Each op registers its own backward in burn's autodiff graph, as the CPU kernels do.
//!
//! - [`norm`] — RMSNorm (Gemma's `1 + w` included), one cube per row, saving the input and one float per row;
//! - [`act`] — SiLU(gate)·up on the packed `gate|up` rows, saving only its input;
//! - [`attention`] — masked softmax attention (causal, padding, packing, sliding window, soft-capping, grouped
//!   KV heads), FlashAttention-style in memory linear in the sequence length, forward and backward.
//!
//! RoPE, GELU-gated MLPs, the projections and the loss still run burn's ops (the reference
//! implementations); the attention is where the memory was (every `[s, s]` score and probability tensor saved).

pub mod act;
pub mod attention;
pub mod norm;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;

use super::{reference, Attention, AttnSpec, Kernels, Qkv};

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

/// Whether the kernels cover this call: no KV cache, grouped heads, a supported head dim, a float type.
fn covers(spec: &AttnSpec, dtype: DType) -> bool {
    spec.keys == spec.seq
        && spec.kv_heads > 0
        && spec.heads.is_multiple_of(spec.kv_heads)
        && spec.head_dim <= MAX_HEAD_DIM
        && spec.masking.key_valid.len() == spec.batch * spec.seq
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

fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, dtype)
}

fn grid<R: CubeRuntime>(x: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&x.client, units);
    (
        cubecl::calculate_cube_count_elemwise(&x.client, units, dim),
        dim,
    )
}

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

/// `[b, nh, s, hd]` → o_proj's `[b·s, nh·hd]`.
fn rows<B: burn::tensor::backend::Backend>(o: Tensor<B, 4>) -> Tensor<B, 2> {
    let [b, nh, s, hd] = o.dims();
    o.swap_dims(1, 2).reshape([b * s, nh * hd])
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

/// SiLU(gate)·up forward on a contiguous `[n, 2i]`.
fn silu_mul_forward<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    let [n, two_i] = x.meta.shape().dims::<2>();
    let i = two_i / 2;
    let y = empty_like(x, Shape::new([n, i]), x.dtype);
    let (count, dim) = grid(x, n * i);
    launch_float!(
        x.dtype,
        act::silu_mul_fwd,
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        i as u32,
    );
    y
}

#[derive(Debug)]
struct SiluMulBackward;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Backward<CubeBackend<R, F, I, BT>, 1> for SiluMulBackward
{
    /// The packed input.
    type State = CubeTensor<R>;

    fn backward(self, ops: Ops<CubeTensor<R>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = into_contiguous(grads.consume::<CubeBackend<R, F, I, BT>>(&ops.node));
        let x = ops.state;
        let dx = empty_like(&x, x.meta.shape().clone(), x.dtype);
        let (count, dim) = grid(&dy, dy.meta.shape().num_elements());
        launch_float!(
            x.dtype,
            act::silu_mul_bwd,
            &x.client,
            count,
            dim,
            dy.into_tensor_arg(),
            x.clone().into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            (x.meta.shape().dims::<2>()[1] / 2) as u32,
        );
        if let Some(p) = &ops.parents[0] {
            grads.register::<CubeBackend<R, F, I, BT>>(p.id, dx);
        }
    }
}

/// Whether the fused SiLU·up covers this call.
fn glu_covered(act: super::Activation, dtype: DType, dims: [usize; 2]) -> bool {
    super::enabled()
        && act == super::Activation::Silu
        && is_float(dtype)
        && dims[1].is_multiple_of(2)
        && u32::try_from(dims[0] * dims[1]).is_ok()
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Kernels
    for CubeBackend<R, F, I, BT>
{
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
        if !glu_covered(act, gate_up.dtype(), gate_up.dims()) {
            return reference::glu(gate_up, act);
        }
        let x = into_contiguous(float(gate_up));
        Tensor::from_primitive(TensorPrimitive::Float(silu_mul_forward(&x)))
    }

    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        if !super::enabled() || !covers(&att.spec, att.dtype) {
            return reference::attention(qkv, att);
        }
        let (q, k, v) = reference::rope_heads(qkv, att);
        let (q, k, v) = (
            into_contiguous(float(q)),
            into_contiguous(float(k)),
            into_contiguous(float(v)),
        );
        let call = Call::new(&att.spec, &q);
        let (o, _) = forward(&q, &k, &v, &call);
        rows(Tensor::from_primitive(TensorPrimitive::Float(o)))
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Kernels
    for Autodiff<CubeBackend<R, F, I, BT>>
{
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
        if !glu_covered(act, gate_up.dtype(), gate_up.dims()) {
            return reference::glu(gate_up, act);
        }
        let x = float(gate_up);
        let xp = into_contiguous(x.primitive.clone());
        let y = silu_mul_forward(&xp);
        let out = match SiluMulBackward
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(xp, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn rope_attention(qkv: Qkv<Self>, att: &Attention<Self>) -> Tensor<Self, 2> {
        if !super::enabled() || !covers(&att.spec, att.dtype) {
            return reference::attention(qkv, att);
        }
        let (q, k, v) = reference::rope_heads(qkv, att);
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
}

#[cfg(all(test, feature = "wgpu"))]
mod tests;
