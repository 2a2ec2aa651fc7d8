//! RMSNorm on CubeCL runtimes, one cube per row (a shared-memory tree reduction over its units), with its own
//! backward for the input (the norm's weight is frozen): `y = x·r·(w + offset)`, `r = 1/√(mean(x²) + eps)` in f32.
//! The forward saves the input and r (one float per row); the backward is
//! `dx = r·(g − x̂·mean(g ∘ x̂))` with `g = dy ∘ (w + offset)` and `x̂ = x·r`.

use cubecl::prelude::*;

use super::reduce::cube_sum;

/// Units per cube (a power of two).
pub const BLOCK: u32 = 128;

#[cube(launch)]
pub fn rms_fwd<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    y: &mut Tensor<F>,
    r_out: &mut Tensor<f32>,
    eps: f32,
    offset: f32,
) {
    let row = CUBE_POS;
    if row >= r_out.len() {
        terminate!();
    }
    let h = w.len();
    let base = row * h;
    let mut sh = SharedMemory::<f32>::new(BLOCK as usize);
    let mut acc = 0.0f32;
    let mut c = UNIT_POS as usize;
    while c < h {
        let v = f32::cast_from(x[base + c]);
        acc += v * v;
        c += CUBE_DIM as usize;
    }
    let total = cube_sum(acc, &mut sh);
    let r = f32::new(1.0) / f32::sqrt(total / f32::cast_from(h) + eps);
    let mut c = UNIT_POS as usize;
    while c < h {
        let v = f32::cast_from(x[base + c]);
        y[base + c] = F::cast_from(v * r * (f32::cast_from(w[c]) + offset));
        c += CUBE_DIM as usize;
    }
    if UNIT_POS == 0 {
        r_out[row] = r;
    }
}

#[cube(launch)]
pub fn rms_bwd<F: Float>(
    dy: &Tensor<F>,
    x: &Tensor<F>,
    w: &Tensor<F>,
    r_in: &Tensor<f32>,
    dx: &mut Tensor<F>,
    offset: f32,
) {
    let row = CUBE_POS;
    if row >= r_in.len() {
        terminate!();
    }
    let h = w.len();
    let base = row * h;
    let r = r_in[row];
    let mut sh = SharedMemory::<f32>::new(BLOCK as usize);
    let mut acc = 0.0f32;
    let mut c = UNIT_POS as usize;
    while c < h {
        let g = f32::cast_from(dy[base + c]) * (f32::cast_from(w[c]) + offset);
        acc += g * f32::cast_from(x[base + c]) * r;
        c += CUBE_DIM as usize;
    }
    let mean = cube_sum(acc, &mut sh) / f32::cast_from(h);
    let mut c = UNIT_POS as usize;
    while c < h {
        let g = f32::cast_from(dy[base + c]) * (f32::cast_from(w[c]) + offset);
        let xh = f32::cast_from(x[base + c]) * r;
        dx[base + c] = F::cast_from(r * (g - xh * mean));
        c += CUBE_DIM as usize;
    }
}
