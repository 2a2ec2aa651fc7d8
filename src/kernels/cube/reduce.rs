//! Reductions over the units of one cube through shared memory (a tree; `CUBE_DIM` a power of two), the result
//! returned to every unit. `sh` holds at least `CUBE_DIM` floats.

use cubecl::prelude::*;

/// Σ (or, with `max`, the maximum) over the cube of each unit's `v`.
#[cube]
fn cube_reduce(v: f32, sh: &mut SharedMemory<f32>, #[comptime] max: bool) -> f32 {
    sh[UNIT_POS as usize] = v;
    sync_cube();
    let mut stride = CUBE_DIM / 2;
    loop {
        if stride == 0 {
            break;
        }
        if UNIT_POS < stride {
            let a = sh[(UNIT_POS + stride) as usize];
            let b = sh[UNIT_POS as usize];
            if comptime!(max) {
                sh[UNIT_POS as usize] = f32::max(a, b);
            } else {
                sh[UNIT_POS as usize] = a + b;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = sh[0];
    sync_cube();
    total
}

/// Σ over the cube of each unit's `v`.
#[cube]
pub fn cube_sum(v: f32, sh: &mut SharedMemory<f32>) -> f32 {
    cube_reduce(v, sh, false)
}

/// The maximum over the cube of each unit's `v`.
#[cube]
pub fn cube_max(v: f32, sh: &mut SharedMemory<f32>) -> f32 {
    cube_reduce(v, sh, true)
}
