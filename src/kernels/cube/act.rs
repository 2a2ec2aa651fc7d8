//! SiLU(gate)·up on CubeCL runtimes, from the packed `gate|up` rows `[n, 2i]` a grouped projection writes, with
//! its own backward: the forward saves only its input (the reference keeps the sigmoid and SiLU intermediates),
//! the backward writes `d(gate|up)` in the same packed layout. f32 math whatever the storage type.

use cubecl::prelude::*;

/// y[r, c] = silu(g)·u with g = x[r, c], u = x[r, i + c].
#[cube(launch)]
pub fn silu_mul_fwd<F: Float>(x: &Tensor<F>, y: &mut Tensor<F>, inter: u32) {
    let p = ABSOLUTE_POS;
    if p >= y.len() {
        terminate!();
    }
    let i = inter as usize;
    let (r, c) = (p / i, p % i);
    let g = f32::cast_from(x[r * 2 * i + c]);
    let u = f32::cast_from(x[r * 2 * i + i + c]);
    let s = f32::new(1.0) / (f32::new(1.0) + f32::exp(-g));
    y[p] = F::cast_from(g * s * u);
}

/// dx[r, c] = dy·u·s·(1 + g·(1 − s)) (gate half), dx[r, i + c] = dy·silu(g) (up half).
#[cube(launch)]
pub fn silu_mul_bwd<F: Float>(dy: &Tensor<F>, x: &Tensor<F>, dx: &mut Tensor<F>, inter: u32) {
    let p = ABSOLUTE_POS;
    if p >= dy.len() {
        terminate!();
    }
    let i = inter as usize;
    let (r, c) = (p / i, p % i);
    let g = f32::cast_from(x[r * 2 * i + c]);
    let u = f32::cast_from(x[r * 2 * i + i + c]);
    let d = f32::cast_from(dy[p]);
    let s = f32::new(1.0) / (f32::new(1.0) + f32::exp(-g));
    dx[r * 2 * i + c] = F::cast_from(d * u * s * (f32::new(1.0) + g * (f32::new(1.0) - s)));
    dx[r * 2 * i + i + c] = F::cast_from(d * g * s);
}
