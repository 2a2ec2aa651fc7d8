//! Cross-entropy over rows of logits on CubeCL runtimes, one cube per row: the row's log-sum-exp and its target's
//! logit give the row's loss (f32), and — the loss being the graph's root — the gradient of the loss with respect to
//! the logits, `softmax − onehot(target)`, is written over the logits in place, so a row chunk of logits is the only
//! vocabulary-sized buffer the loss ever holds (see `lm_xent` in the parent module for the chunking and the two
//! GEMMs around this kernel). Gemma 2's final soft-cap `z = c·tanh(l / c)` is applied on the fly, its derivative
//! `1 − (z / c)²` folded into the gradient. f32 math whatever the storage type.

use cubecl::prelude::*;

use super::reduce::{cube_max, cube_sum};

/// Units per cube (a power of two).
pub const BLOCK: u32 = 256;

/// The (soft-capped) logit: `cap·tanh(l / cap)`, or `l` when `cap` is 0.
#[cube]
fn capped(l: f32, cap: f32) -> f32 {
    let mut z = l;
    if cap > f32::new(0.0) {
        z = cap * f32::tanh(l / cap);
    }
    z
}

/// Row r of `logits` `[rows, vocab]`: `loss[r] = lse(z) − z[t]`; with `grad`, `logits[r] ← (softmax(z) − onehot(t))
/// · dz/dl`.
#[cube(launch)]
pub fn xent_rows<F: Float>(
    logits: &mut Tensor<F>,
    targets: &Tensor<i32>,
    loss: &mut Tensor<f32>,
    vocab: u32,
    cap: f32,
    #[comptime] grad: bool,
) {
    let row = CUBE_POS;
    if row >= loss.len() {
        terminate!();
    }
    let v = vocab as usize;
    let base = row * v;
    let t = usize::cast_from(targets[row]);
    // Every unit reads the target's logit before the first barrier: no unit has overwritten it yet.
    let zt = capped(f32::cast_from(logits[base + t]), cap);
    let mut sh = SharedMemory::<f32>::new(BLOCK as usize);
    // "Minus infinity" as -3e38: WGSL has no infinity literals.
    let mut m = f32::new(-3.0e38);
    let mut c = UNIT_POS as usize;
    while c < v {
        m = f32::max(m, capped(f32::cast_from(logits[base + c]), cap));
        c += CUBE_DIM as usize;
    }
    let m = cube_max(m, &mut sh);
    let mut s = f32::new(0.0);
    let mut c = UNIT_POS as usize;
    while c < v {
        s += f32::exp(capped(f32::cast_from(logits[base + c]), cap) - m);
        c += CUBE_DIM as usize;
    }
    let lse = m + f32::ln(cube_sum(s, &mut sh));
    if UNIT_POS == 0 {
        loss[row] = lse - zt;
    }
    if comptime!(grad) {
        let mut c = UNIT_POS as usize;
        while c < v {
            let z = capped(f32::cast_from(logits[base + c]), cap);
            let mut d = f32::exp(z - lse);
            if c == t {
                d -= f32::new(1.0);
            }
            if cap > f32::new(0.0) {
                let u = z / cap;
                d *= f32::new(1.0) - u * u;
            }
            logits[base + c] = F::cast_from(d);
            c += CUBE_DIM as usize;
        }
    }
}
