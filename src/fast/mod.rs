//! Fused CPU kernels for the training step on burn-flex (`Flex` and `Autodiff<Flex>`).
//!
//! The model code is generic over the backend. For the two CPU backends we ship, a handful of hot blocks run as
//! hand-written kernels instead of chains of burn ops, each with its own backward pass registered in burn's
//! autodiff graph (burn-autodiff's `Backward` trait):
//!
//! - [`norm`] — RMSNorm (one pass forward, one pass backward, rows in parallel);
//! - [`act`] — SiLU(gate)·up;
//! - [`lora`] — a frozen linear plus its LoRA adapter, `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, with GEMMs accumulating in place;
//! - [`attention`] — RoPE + causal/padded/packed/windowed softmax attention with grouped KV heads, reading q/k/v in
//!   the projections' `[tokens, heads·dim]` layout and writing o_proj's input layout (no transposes), blocked
//!   to skip the causally masked half, (batch, kv-head) pairs in parallel;
//! - [`xent`] — `lm_head` + cross-entropy, chunked over rows, never keeping vocabulary-sized logits: the gradient
//!   with respect to the hidden states is formed chunk by chunk during the forward (the loss is the graph's
//!   root, so the backward only scales it).
//!
//! Every entry point returns `Err(inputs)` when it does not apply (another backend such as CUDA, a dtype other
//! than f32, a tracked frozen weight, a feature the kernel does not cover); the caller then runs the plain burn
//! implementation, which stays the reference: each kernel is tested against it (values and gradients).
//! `LORATUNE_FUSED=0` turns every kernel off (for comparisons).

pub mod act;
pub mod attention;
mod gemm;
pub mod lora;
pub mod norm;
pub mod prof;
mod simd;
pub mod xent;

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor, TensorPrimitive};

/// The training backend the kernels are registered for.
pub type AD = Autodiff<Flex>;
pub(crate) type AdTensor = <AD as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

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

/// Turn the fused kernels on or off for the whole process (benchmarks compare both paths).
pub fn set_enabled(on: bool) {
    ENABLED.store(on as u8, Ordering::Relaxed);
}

/// Move a value into another type when both are the same type.
pub(crate) fn cast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    if TypeId::of::<A>() != TypeId::of::<T>() {
        return Err(a);
    }
    let mut slot = Some(a);
    let taken = (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<T>>()
        .and_then(Option::take);
    match taken {
        Some(t) => Ok(t),
        None => Err(slot.expect("cast: the value is still in place when the downcast failed")),
    }
}

/// Which of the two CPU backends `B` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Autodiff,
    Plain,
}

pub(crate) fn kind<B: Backend>() -> Option<Kind> {
    if !enabled() {
        return None;
    }
    if TypeId::of::<B>() == TypeId::of::<AD>() {
        Some(Kind::Autodiff)
    } else if TypeId::of::<B>() == TypeId::of::<Flex>() {
        Some(Kind::Plain)
    } else {
        None
    }
}

/// The autodiff primitive of a tensor known to live on `Autodiff<Flex>`.
pub(crate) fn ad_prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
    let t: Tensor<AD, D> = cast(t).unwrap_or_else(|_| unreachable!("backend checked by kind()"));
    t.into_primitive().tensor()
}

/// The flex primitive of a tensor known to live on `Flex`.
pub(crate) fn flex_prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    let t: Tensor<Flex, D> = cast(t).unwrap_or_else(|_| unreachable!("backend checked by kind()"));
    t.into_primitive().tensor()
}

/// Wrap an autodiff primitive back into a `Tensor<B, D>` (B = Autodiff<Flex>).
pub(crate) fn from_ad<B: Backend, const D: usize>(p: AdTensor) -> Tensor<B, D> {
    let t = Tensor::<AD, D>::from_primitive(TensorPrimitive::Float(p));
    cast(t).unwrap_or_else(|_| unreachable!("backend checked by kind()"))
}

/// Wrap a flex primitive back into a `Tensor<B, D>` (B = Flex).
pub(crate) fn from_flex<B: Backend, const D: usize>(p: FlexTensor) -> Tensor<B, D> {
    let t = Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(p));
    cast(t).unwrap_or_else(|_| unreachable!("backend checked by kind()"))
}

/// The primitive of `t` as a flex tensor, with whether it is tracked by autodiff (plain tensors never are).
pub(crate) fn flex_of<B: Backend, const D: usize>(t: &Tensor<B, D>, k: Kind) -> (FlexTensor, bool) {
    match k {
        Kind::Autodiff => {
            let p = ad_prim(t.clone());
            let tracked = p.is_tracked();
            (p.primitive, tracked)
        }
        Kind::Plain => (flex_prim(t.clone()), false),
    }
}

/// A new contiguous f32 flex tensor.
pub(crate) fn flex_f32(v: Vec<f32>, shape: &[usize]) -> FlexTensor {
    debug_assert_eq!(v.len(), shape.iter().product::<usize>());
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(shape.to_vec())),
        DType::F32,
    )
}

/// A 2-D f32 matrix view of a flex tensor: `(storage, offset, rows, cols, row stride)` with unit column stride.
/// Non-matching layouts are copied to a contiguous tensor first (kept alive in `hold`).
pub(crate) struct Rows {
    hold: FlexTensor,
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl Rows {
    /// View `t` (any rank ≥ 1) as `[product of leading dims, last dim]`.
    pub fn of(t: &FlexTensor) -> Rows {
        let shape = t.layout().shape().clone();
        let d = shape.num_dims();
        let cols = if d == 0 { 1 } else { shape[d - 1] };
        let rows: usize = (0..d.saturating_sub(1)).map(|i| shape[i]).product();
        let strides = t.layout().strides();
        // Accept: unit column stride and leading dims that collapse into one row stride.
        let ok = d >= 1 && (strides[d - 1] == 1 || cols == 1) && {
            let mut expect: Option<isize> = None;
            let mut good = true;
            for i in (0..d - 1).rev() {
                if shape[i] == 1 {
                    continue;
                }
                match expect {
                    None => {
                        if strides[i] < cols as isize {
                            good = false;
                        }
                        expect = Some(strides[i] * shape[i] as isize);
                    }
                    Some(e) => {
                        if strides[i] != e {
                            good = false;
                        }
                        expect = Some(e * shape[i] as isize);
                    }
                }
            }
            good
        };
        let hold = if ok { t.clone() } else { t.to_contiguous() };
        let strides = hold.layout().strides();
        let rs = (0..d.saturating_sub(1))
            .rev()
            .find(|&i| shape[i] != 1)
            .map_or(cols, |i| strides[i] as usize);
        Rows {
            off: hold.layout().start_offset(),
            rows,
            cols,
            rs,
            hold,
        }
    }

    /// Columns `c0..c1` of every row (no copy).
    pub fn col_range(&self, c0: usize, c1: usize) -> Rows {
        assert!(c0 <= c1 && c1 <= self.cols, "column range");
        Rows {
            hold: self.hold.clone(),
            off: self.off + c0,
            rows: self.rows,
            cols: c1 - c0,
            rs: self.rs,
        }
    }

    pub fn data(&self) -> &[f32] {
        self.hold.storage::<f32>()
    }

    /// Row `i` as a slice.
    pub fn row(&self, i: usize) -> &[f32] {
        let s = self.off + i * self.rs;
        &self.data()[s..s + self.cols]
    }

    /// True when rows are packed back to back.
    pub fn is_packed(&self) -> bool {
        self.rs == self.cols || self.rows <= 1
    }

    /// The rows as one packed slice (copying when they are not packed).
    pub fn packed(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.is_packed() {
            std::borrow::Cow::Borrowed(&self.data()[self.off..self.off + self.rows * self.cols])
        } else {
            let mut v = Vec::with_capacity(self.rows * self.cols);
            for i in 0..self.rows {
                v.extend_from_slice(self.row(i));
            }
            std::borrow::Cow::Owned(v)
        }
    }
}

/// All f32?
pub(crate) fn all_f32(ts: &[&FlexTensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
}

#[cfg(test)]
pub(crate) mod tests_util {
    use burn::backend::autodiff::grads::Gradients;
    use burn::tensor::{DType, Tensor, TensorData};
    use rand::{Rng, SeedableRng};

    pub use super::AD;

    /// Deterministic values in [-1, 1).
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// An untracked tensor.
    pub fn plain<const D: usize>(
        v: &[f32],
        shape: [usize; D],
        dev: &<AD as burn::tensor::backend::BackendTypes>::Device,
    ) -> Tensor<AD, D> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), (dev, DType::F32))
    }

    /// A leaf that requires a gradient.
    pub fn ad_param<const D: usize>(
        v: &[f32],
        shape: [usize; D],
        dev: &<AD as burn::tensor::backend::BackendTypes>::Device,
    ) -> Tensor<AD, D> {
        plain(v, shape, dev).require_grad()
    }

    /// Backward of Σ y ∘ dy (so dy is the upstream gradient).
    pub fn backward_with<const D: usize>(
        y: Tensor<AD, D>,
        dy: &[f32],
        shape: [usize; D],
    ) -> Gradients {
        let dev = y.device();
        (y * plain(dy, shape, &dev)).sum().backward()
    }

    pub fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data")
    }

    /// Max |a − b| ≤ tol · max(1, max |b|).
    pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= tol * scale && a.iter().all(|v| v.is_finite()),
            "{what}: max |Δ| = {worst} (scale {scale})"
        );
    }
}
