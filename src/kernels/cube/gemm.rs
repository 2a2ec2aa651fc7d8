//! The GEMM table (`loratune bench --gemm`): each of cubek's matmul strategies timed on this device for the
//! products a training step runs (frozen `x·Wᵀ`, its backward `dy·W`, the rank-r LoRA factors, an `lm_head`
//! chunk). It is how the strategy the step uses is chosen on a real GPU: burn's autotune would try ~20 strategies
//! per new shape at run time, compiling each with NVRTC, before the first step.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubek::matmul::components::tile::TileMatmulKind;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::Strategy;
use cubek::matmul::routines::double_buffering::DoubleBufferingArgs;
use cubek::matmul::routines::ordered_double_buffering::OrderedSelectionArgs;
use cubek::matmul::routines::simple::SimpleArgs;
use cubek::matmul::routines::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::routines::{BlueprintStrategy, TileSizeSelection};
use cubek::std::InputBinding;

use super::float;
use crate::kernels::{GemmRow, GemmShape};

/// The strategies timed: cubek's default (`Auto`, what burn runs without `autotune`) and the tensor-core ones
/// burn's autotune tries first for large products.
fn strategies() -> Vec<Strategy> {
    use TileMatmulKind::{Cmma, Mma};
    fn simple<A: cubek::matmul::routines::Routine<(), Strategy = SimpleArgs>>(
        multi_rows: bool,
        tile_matmul: TileMatmulKind,
    ) -> BlueprintStrategy<(), A> {
        BlueprintStrategy::Inferred(SimpleArgs {
            multi_rows,
            tile_matmul,
        })
    }
    let double = |specialized, tile_matmul| {
        BlueprintStrategy::Inferred(DoubleBufferingArgs {
            specialized,
            tile_matmul,
        })
    };
    let ordered = |tile_matmul| {
        BlueprintStrategy::Inferred(OrderedSelectionArgs {
            partition_k: Some(2),
            row_count: Some(4),
            rows_per_plane: Some(2),
            tile_matmul,
        })
    };
    vec![
        Strategy::Auto,
        Strategy::SimpleCyclicMma(simple(false, Mma)),
        Strategy::SimpleCyclicCmma(simple(true, Cmma)),
        Strategy::DoubleCyclicCmma(double(false, Cmma)),
        Strategy::DoubleCyclicMma(double(true, Mma)),
        Strategy::OrderedDoubleCmma(ordered(Cmma)),
        Strategy::OrderedDoubleMma(ordered(Mma)),
        Strategy::SpecializedCyclicMma(BlueprintStrategy::Inferred(().into())),
        Strategy::SimpleTmaMma(simple(false, Mma)),
        Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into())),
        Strategy::SpecializedTmaCmma(BlueprintStrategy::Inferred(().into())),
        // Without tensor cores (what runs on lavapipe in tests).
        Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs {
            tile_size: TileSizeSelection::MaxTileSize,
        })),
    ]
}

/// The strategy `LORATUNE_GEMM` names (`specialized_tma_mma` or `matmul_specialized_tma_mma`, any name of
/// [`strategies`]) for the frozen products `x·Wᵀ` and their backward; `None` (unset) leaves them to burn's matmul.
/// An unknown name is reported once on stderr with the names that exist, and ignored.
pub fn chosen() -> Option<usize> {
    #[cfg(test)]
    if let Some(o) = OVERRIDE.with(|o| o.get()) {
        return o;
    }
    static CHOSEN: OnceLock<Option<usize>> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let name = std::env::var("LORATUNE_GEMM").ok().filter(|n| !n.is_empty())?;
        let found = index(&name);
        if found.is_none() {
            let names = names();
            eprintln!(
                "warning: LORATUNE_GEMM={name} is not a GEMM strategy; using the default. Known: {}",
                names.join(", ")
            );
        }
        found
    })
}

/// The strategies' names, in [`strategies`]' order.
pub fn names() -> Vec<String> {
    strategies().iter().map(|s| s.to_string()).collect()
}

/// The index in [`strategies`] of a strategy name, with or without its `matmul_` prefix.
pub fn index(name: &str) -> Option<usize> {
    strategies().iter().position(|s| {
        let n = s.to_string();
        n == name || n.strip_prefix("matmul_") == Some(name)
    })
}

#[cfg(test)]
thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Option<usize>>> = const { std::cell::Cell::new(None) };
}

/// Run `f` with the frozen products' strategy set to `name` (`None`: burn's matmul) on this thread.
#[cfg(test)]
pub fn with_gemm<T>(name: Option<&str>, f: impl FnOnce() -> T) -> T {
    let choice = name.map(|n| index(n).unwrap_or_else(|| panic!("no GEMM strategy {n}")));
    let prev = OVERRIDE.with(|o| o.replace(Some(choice)));
    let r = f();
    OVERRIDE.with(|o| o.set(prev));
    r
}

/// `lhs · rhs` (2-D, one float dtype) with the strategy at `index` in [`strategies`]; burn's matmul where that
/// strategy cannot run this product.
pub fn matmul<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    index: usize,
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
) -> CubeTensor<R> {
    let (m, n) = (lhs.meta.shape()[0], rhs.meta.shape()[1]);
    let out = empty_device_contiguous_dtype::<R>(
        lhs.client.clone(),
        lhs.device.clone(),
        [m, n].into(),
        lhs.dtype,
    );
    match strategies().get(index).map(|s| launch(s, &lhs, &rhs, &out)) {
        Some(Ok(())) => out,
        _ => {
            let t = |p| {
                Tensor::<CubeBackend<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(p))
            };
            float(t(lhs).matmul(t(rhs)))
        }
    }
}

/// `out = lhs · rhs` with one strategy (plain, unquantized tensors of one float dtype).
fn launch<R: CubeRuntime>(
    strategy: &Strategy,
    lhs: &CubeTensor<R>,
    rhs: &CubeTensor<R>,
    out: &CubeTensor<R>,
) -> Result<(), String> {
    let dtype = lhs.dtype;
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: dtype.into(),
        out: out.dtype.into(),
    });
    let run = || {
        cubek::matmul::launch::launch_ref(
            strategy,
            &out.client,
            InputBinding::new(lhs.clone().binding(), dtype.into()),
            InputBinding::new(rhs.clone().binding(), dtype.into()),
            out.clone().binding(),
            &mut dtypes,
        )
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("panicked".into()),
    }
}

/// Time every strategy on every shape: the first call (kernel compilation included) and the median of `reps`
/// synced calls. Rows are also printed as they are measured (`print`), so a run cut short keeps what it measured.
pub fn table<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    device: &R::Device,
    dtype: DType,
    shapes: &[GemmShape],
    reps: usize,
    print: &mut dyn FnMut(&GemmRow),
) -> Vec<GemmRow> {
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let sync = || {
        let _ = <B<R, F, I, BT> as Backend>::sync(device);
    };
    let mut rows = Vec::new();
    for shape in shapes {
        let normal = Distribution::Normal(0.0, 1.0);
        let lhs = float(
            Tensor::<B<R, F, I, BT>, 2>::random([shape.m, shape.k], normal, device).cast(dtype),
        );
        let rhs = if shape.rhs_transposed {
            Tensor::<B<R, F, I, BT>, 2>::random([shape.n, shape.k], normal, device)
                .cast(dtype)
                .transpose()
        } else {
            Tensor::<B<R, F, I, BT>, 2>::random([shape.k, shape.n], normal, device).cast(dtype)
        };
        let rhs = float(rhs);
        let out = empty_device_contiguous_dtype::<R>(
            lhs.client.clone(),
            device.clone(),
            [shape.m, shape.n].into(),
            dtype,
        );
        // The values every strategy is held to: the product in f32 through burn's own matmul.
        let tensor = |t: &CubeTensor<R>| {
            Tensor::<B<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(t.clone()))
                .cast(DType::F32)
        };
        let reference = tensor(&lhs).matmul(tensor(&rhs));
        let scale = reference
            .clone()
            .abs()
            .max()
            .into_scalar()
            .elem::<f64>()
            .max(1e-30);
        sync();
        let flops = 2.0 * (shape.m * shape.k * shape.n) as f64;
        for strategy in strategies() {
            let t0 = Instant::now();
            let first = launch(&strategy, &lhs, &rhs, &out);
            sync();
            let first_ms = ms(t0.elapsed());
            let mut row = GemmRow {
                shape: shape.label(),
                strategy: strategy.to_string(),
                first_ms,
                median_ms: f64::NAN,
                tflops: f64::NAN,
                max_rel: f64::NAN,
                error: first.err(),
            };
            if row.error.is_none() {
                let mut times: Vec<f64> = (0..reps.max(1))
                    .map(|_| {
                        let t = Instant::now();
                        let _ = launch(&strategy, &lhs, &rhs, &out);
                        sync();
                        ms(t.elapsed())
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                row.median_ms = times[times.len() / 2];
                row.tflops = flops / (row.median_ms * 1e-3) / 1e12;
                let diff = tensor(&out)
                    .sub(reference.clone())
                    .abs()
                    .max()
                    .into_scalar();
                row.max_rel = diff.elem::<f64>() / scale;
            }
            print(&row);
            rows.push(row);
        }
    }
    rows
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
