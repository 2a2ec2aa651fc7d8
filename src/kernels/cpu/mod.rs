//! The fused CPU kernels: hand-written forward and backward passes on burn-flex's f32 storage, registered in
//! burn's autodiff graph (burn-autodiff's `Backward` trait) when the backend records one.
//!
//! - [`norm`] — RMSNorm (one pass forward, one pass backward, rows in parallel);
//! - [`act`] — SiLU(gate)·up;
//! - [`lora`] — frozen linears plus their LoRA adapters, `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, several sharing one input at
//!   once, with GEMMs accumulating in place;
//! - [`attention`] — RoPE + causal/padded/packed/windowed softmax attention with grouped KV heads, reading q/k/v
//!   in the projections' `[tokens, heads·dim]` layout and writing o_proj's input layout (no transposes), blocked
//!   to skip the causally masked half, in memory linear in the sequence (the backward recomputes the
//!   probabilities block by block);
//! - [`xent`] — `lm_head` + cross-entropy, chunked over rows, never keeping vocabulary-sized logits.
//!
//! Each kernel is generic over [`Cpu`], the two backends it runs on (`Flex` and `Autodiff<Flex>`), and returns
//! `None` when its inputs are outside what it covers (a dtype other than f32, a tracked frozen weight, a shape it
//! does not handle); [`crate::kernels`]'s implementations for those backends then run the reference. Every
//! kernel is tested against the reference (values and gradients).

pub mod act;
pub mod attention;
mod gemm;
pub mod lora;
pub mod norm;
mod qgemm;
mod simd;
pub mod xent;

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::ops::{Backward, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{backend::Backend, Bytes, DType, Shape, Tensor, TensorPrimitive};

/// The autodiff primitive of `Autodiff<Flex>` (a flex tensor plus its graph node).
pub(crate) type AdTensor =
    <Autodiff<Flex> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// The backends the fused CPU kernels run on: what a kernel needs of a tensor, and how its output re-enters the
/// backend (with the kernel's backward registered when the backend records a graph).
pub(crate) trait Cpu: Backend {
    /// A kernel input as the backend holds it (the flex primitive; with autodiff, also its graph node).
    type Input: Clone;
    /// The primitive of a float tensor.
    fn input<const D: usize>(t: &Tensor<Self, D>) -> Self::Input;
    /// Its flex storage.
    fn flex(i: &Self::Input) -> &FlexTensor;
    /// Whether autodiff tracks it (never on the plain backend).
    fn tracked(i: &Self::Input) -> bool;
    /// Whether the backend records a graph (so gradients may be asked for).
    const AUTODIFF: bool;
    /// Wrap a kernel's output `out`; with autodiff, `op` (holding `state`) becomes the backward of `parents`.
    fn output<O, const N: usize, const D: usize>(
        op: O,
        parents: [Self::Input; N],
        state: O::State,
        out: FlexTensor,
    ) -> Tensor<Self, D>
    where
        O: Backward<Flex, N>;
}

impl Cpu for Flex {
    type Input = FlexTensor;
    const AUTODIFF: bool = false;

    fn input<const D: usize>(t: &Tensor<Self, D>) -> FlexTensor {
        t.clone().into_primitive().tensor()
    }

    fn flex(i: &FlexTensor) -> &FlexTensor {
        i
    }

    fn tracked(_: &FlexTensor) -> bool {
        false
    }

    fn output<O, const N: usize, const D: usize>(
        _: O,
        _: [FlexTensor; N],
        _: O::State,
        out: FlexTensor,
    ) -> Tensor<Self, D>
    where
        O: Backward<Flex, N>,
    {
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

impl Cpu for Autodiff<Flex> {
    type Input = AdTensor;
    const AUTODIFF: bool = true;

    fn input<const D: usize>(t: &Tensor<Self, D>) -> AdTensor {
        t.clone().into_primitive().tensor()
    }

    fn flex(i: &AdTensor) -> &FlexTensor {
        &i.primitive
    }

    fn tracked(i: &AdTensor) -> bool {
        i.is_tracked()
    }

    fn output<O, const N: usize, const D: usize>(
        op: O,
        parents: [AdTensor; N],
        state: O::State,
        out: FlexTensor,
    ) -> Tensor<Self, D>
    where
        O: Backward<Flex, N>,
    {
        let t = match op
            .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(t))
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

    /// The training backend the kernels are registered for.
    pub type AD = burn::backend::Autodiff<burn::backend::Flex>;

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
