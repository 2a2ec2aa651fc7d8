//! Element-wise building blocks written so that LLVM vectorises them, compiled three times (AVX-512, AVX2+FMA,
//! baseline) and picked at run time. Reductions keep 16 independent lanes (float addition is not reassociated
//! by the compiler), so results do not depend on which variant runs.

/// Define `fn name(args) -> ret` whose body is compiled for AVX-512 / AVX2+FMA / baseline x86-64 and chosen at
/// run time (other architectures: the plain body).
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

const LANES: usize = 16;

/// exp(x) for f32 (Cephes' polynomial, ≤ 2 ulp on the normal range); exactly 0 below -87.3 and for -inf.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23
    let xc = x.clamp(-87.336_55, 88.376_26);
    // Round to nearest with the 1.5·2^23 trick: t's low mantissa bits hold n (no float→int conversion, which
    // Rust saturates and LLVM would not vectorise).
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // 5.0000001e-1 rounds to 0.5 in f32
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    if x < -87.336_55 {
        0.0
    } else {
        y * scale
    }
}

/// Logistic sigmoid.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn fold(acc: [f32; LANES]) -> f32 {
    let mut a = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

/// Σ x.
#[cfg(test)]
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        acc[i] += v;
    }
    fold(acc)
}

/// Fused multiply-add (one instruction in the AVX2/AVX-512 variants).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// 16 lanes starting at `i` (the slice must hold them).
#[inline(always)]
pub fn ld(s: &[f32], i: usize) -> [f32; LANES] {
    <[f32; LANES]>::try_from(&s[i..i + LANES]).unwrap_or_default()
}

/// Store 16 lanes at `i`.
#[inline(always)]
pub fn st(s: &mut [f32], i: usize, v: [f32; LANES]) {
    s[i..i + LANES].copy_from_slice(&v);
}

/// Σ x·y (four independent 16-lane accumulators).
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [[0f32; LANES]; 4];
    let mut i = 0;
    while i + 4 * LANES <= n {
        for (q, a) in acc.iter_mut().enumerate() {
            let (xv, yv) = (ld(x, i + q * LANES), ld(y, i + q * LANES));
            for l in 0..LANES {
                a[l] = fma(xv[l], yv[l], a[l]);
            }
        }
        i += 4 * LANES;
    }
    while i + LANES <= n {
        let (xv, yv) = (ld(x, i), ld(y, i));
        for l in 0..LANES {
            acc[0][l] = fma(xv[l], yv[l], acc[0][l]);
        }
        i += LANES;
    }
    let mut tot = [0f32; LANES];
    for a in &acc {
        for l in 0..LANES {
            tot[l] += a[l];
        }
    }
    let mut s = fold(tot);
    while i < n {
        s = fma(x[i], y[i], s);
        i += 1;
    }
    s
}

/// max x (-inf for an empty slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// x ← exp(x - shift), returning Σ of the new values.
#[inline(always)]
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact_mut(LANES);
    for c in &mut it {
        for i in 0..LANES {
            let e = exp(c[i] - shift);
            c[i] = e;
            acc[i] += e;
        }
    }
    for (i, v) in it.into_remainder().iter_mut().enumerate() {
        let e = exp(*v - shift);
        *v = e;
        acc[i] += e;
    }
    fold(acc)
}

/// Σ exp(x - shift) without writing.
#[inline(always)]
pub fn exp_shift_sum_ro(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += exp(c[i] - shift);
        }
    }
    for (i, &v) in it.remainder().iter().enumerate() {
        acc[i] += exp(v - shift);
    }
    fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.013;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn reductions_match_sequential_sums() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let s: f32 = v.iter().sum();
        assert!((sum(&v) - s).abs() < 1e-5);
        let d: f32 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((dot(&v, &w) - d).abs() < 1e-5);
        assert_eq!(max(&v), v.iter().cloned().fold(f32::MIN, f32::max));
        let mut e = v.clone();
        let tot = exp_shift_sum(&mut e, 0.5);
        let want: f32 = v.iter().map(|x| (x - 0.5).exp()).sum();
        assert!((tot - want).abs() < 1e-4);
        assert!((exp_shift_sum_ro(&v, 0.5) - want).abs() < 1e-4);
    }
}
