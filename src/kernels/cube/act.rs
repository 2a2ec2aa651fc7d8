//! The gated MLP activation `act(gate)·up` on CubeCL runtimes — SiLU (Llama, Mistral, Qwen, Phi-3) and both GELU
//! forms (Gemma: tanh approximation; exact erf) — from the packed `gate|up` rows `[n, 2i]` a grouped projection
//! writes, with its own backward: the forward saves only its input (the reference keeps the activation's
//! intermediates), the backward writes `d(gate|up)` in the same packed layout. f32 math whatever the storage type.
//!
//! The activation is a compile-time argument ([`SILU`], [`GELU_TANH`], [`GELU_ERF`]): one kernel per activation.

use cubecl::prelude::*;

pub const SILU: u32 = 0;
pub const GELU_TANH: u32 = 1;
pub const GELU_ERF: u32 = 2;

/// √(2/π), the tanh form's scale.
const K_TANH: f32 = 0.797_884_6;
/// 1/√2 and 1/√(2π), the erf form's constants.
const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// (act(g), act'(g)).
#[cube]
fn act_and_slope(g: f32, #[comptime] act: u32) -> (f32, f32) {
    if comptime!(act == SILU) {
        let s = f32::new(1.0) / (f32::new(1.0) + f32::exp(-g));
        (g * s, s * (f32::new(1.0) + g * (f32::new(1.0) - s)))
    } else if comptime!(act == GELU_TANH) {
        let inner = f32::new(K_TANH) * (g + f32::new(0.044715) * g * g * g);
        let t = f32::tanh(inner);
        let d_inner = f32::new(K_TANH) * (f32::new(1.0) + f32::new(3.0 * 0.044715) * g * g);
        (
            f32::new(0.5) * g * (f32::new(1.0) + t),
            f32::new(0.5) * (f32::new(1.0) + t)
                + f32::new(0.5) * g * (f32::new(1.0) - t * t) * d_inner,
        )
    } else {
        let cdf = f32::new(0.5) * (f32::new(1.0) + Erf::erf(g * f32::new(INV_SQRT2)));
        let pdf = f32::new(INV_SQRT_2PI) * f32::exp(f32::new(-0.5) * g * g);
        (g * cdf, cdf + g * pdf)
    }
}

/// y[r, c] = act(g)·u with g = x[r, c], u = x[r, i + c].
#[cube(launch)]
pub fn glu_fwd<F: Float>(x: &Tensor<F>, y: &mut Tensor<F>, inter: u32, #[comptime] act: u32) {
    let p = ABSOLUTE_POS;
    if p >= y.len() {
        terminate!();
    }
    let i = inter as usize;
    let (r, c) = (p / i, p % i);
    let g = f32::cast_from(x[r * 2 * i + c]);
    let u = f32::cast_from(x[r * 2 * i + i + c]);
    let (a, _) = act_and_slope(g, act);
    y[p] = F::cast_from(a * u);
}

/// dx[r, c] = dy·u·act'(g) (gate half), dx[r, i + c] = dy·act(g) (up half).
#[cube(launch)]
pub fn glu_bwd<F: Float>(
    dy: &Tensor<F>,
    x: &Tensor<F>,
    dx: &mut Tensor<F>,
    inter: u32,
    #[comptime] act: u32,
) {
    let p = ABSOLUTE_POS;
    if p >= dy.len() {
        terminate!();
    }
    let i = inter as usize;
    let (r, c) = (p / i, p % i);
    let g = f32::cast_from(x[r * 2 * i + c]);
    let u = f32::cast_from(x[r * 2 * i + i + c]);
    let d = f32::cast_from(dy[p]);
    let (a, slope) = act_and_slope(g, act);
    dx[r * 2 * i + c] = F::cast_from(d * u * slope);
    dx[r * 2 * i + i + c] = F::cast_from(d * a);
}
