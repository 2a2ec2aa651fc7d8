//! A bounds-checked front end to the `gemm` crate (the same GEMM burn-flex uses) for f32 matrices given as
//! slice + offset + row/column strides.

/// A read-only strided matrix: element (r, c) is `data[off + r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> MatRef<'a> {
    /// Row-major `[rows, cols]` with row stride `rs` starting at `off`.
    pub fn rows(data: &'a [f32], off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        MatRef {
            data,
            off,
            rows,
            cols,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// Packed row-major `[rows, cols]`.
    pub fn packed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::rows(data, 0, rows, cols, cols)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `r0..r1`.
    pub fn row_range(self, r0: usize, r1: usize) -> Self {
        assert!(r0 <= r1 && r1 <= self.rows);
        MatRef {
            off: (self.off as isize + r0 as isize * self.rs) as usize,
            rows: r1 - r0,
            ..self
        }
    }

    fn check(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = self.off as isize
            + (self.rows as isize - 1) * self.rs
            + (self.cols as isize - 1) * self.cs;
        let first = self.off as isize
            + (self.rows as isize - 1) * self.rs.min(0)
            + (self.cols as isize - 1) * self.cs.min(0);
        assert!(
            first >= 0 && (last as usize) < self.data.len() && (self.off) < self.data.len(),
            "gemm operand out of bounds"
        );
    }
}

/// A mutable row-major destination `[rows, cols]` with row stride `rs` starting at `off`.
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a> MatMut<'a> {
    pub fn rows(data: &'a mut [f32], off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        MatMut {
            data,
            off,
            rows,
            cols,
            rs,
        }
    }

    pub fn packed(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::rows(data, 0, rows, cols, cols)
    }
}

/// dst ← beta·a·b (`acc = false`) or dst ← dst + beta·a·b (`acc = true`). `parallel` lets the GEMM use the
/// rayon pool (do not set it from inside a rayon task).
pub fn gemm(dst: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, beta: f32, acc: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions");
    assert!(dst.rows == m && dst.cols == n, "gemm: destination shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst.data[dst.off + r * dst.rs..dst.off + r * dst.rs + n].fill(0.0);
            }
        }
        return;
    }
    a.check();
    b.check();
    assert!(
        dst.cols <= dst.rs || dst.rows == 1,
        "gemm: destination rows overlap"
    );
    assert!(
        dst.off + (m - 1) * dst.rs + n <= dst.data.len(),
        "gemm: destination out of bounds"
    );
    let par = if parallel && m * n * k >= 96 * 96 * 96 {
        gemm_crate::Parallelism::Rayon(0)
    } else {
        gemm_crate::Parallelism::None
    };
    // SAFETY: every index the GEMM touches was bounds-checked above (first/last element of each operand and
    // of the destination, whose rows do not overlap); `dst` is borrowed mutably, the operands immutably, so
    // they cannot alias.
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr().add(dst.off),
            1,
            dst.rs as isize,
            acc,
            a.data.as_ptr().add(a.off),
            a.cs,
            a.rs,
            b.data.as_ptr().add(b.off),
            b.cs,
            b.rs,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// One product of a [`gemm_cols_new`] / [`gemm_sum_new`] call.
#[derive(Clone, Copy)]
pub struct Term<'a> {
    pub a: MatRef<'a>,
    pub b: MatRef<'a>,
    pub beta: f32,
}

fn parallelism(m: usize, n: usize, k: usize, parallel: bool) -> gemm_crate::Parallelism {
    if parallel && m * n * k >= 96 * 96 * 96 {
        gemm_crate::Parallelism::Rayon(0)
    } else {
        gemm_crate::Parallelism::None
    }
}

/// Write `beta·a·b` (`acc` false) or add it (`acc` true) into rows of width `cols` of the buffer behind `dst`,
/// columns `col0..col0 + b.cols`.
///
/// # Safety
/// `dst` must be valid for writes (and, with `acc`, reads of initialised values) of `a.rows · cols` f32.
unsafe fn gemm_raw(
    dst: *mut f32,
    cols: usize,
    col0: usize,
    t: Term<'_>,
    acc: bool,
    parallel: bool,
) {
    let (m, k, n) = (t.a.rows, t.a.cols, t.b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                // SAFETY: row r, columns col0..col0+n lie inside the m × cols buffer (caller's contract).
                unsafe { std::ptr::write_bytes(dst.add(r * cols + col0), 0, n) };
            }
        }
        return;
    }
    // SAFETY: operands were bounds-checked by the callers (`check`), the destination by the caller's contract.
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            dst.add(col0),
            1,
            cols as isize,
            acc,
            t.a.data.as_ptr().add(t.a.off),
            t.a.cs,
            t.a.rs,
            t.b.data.as_ptr().add(t.b.off),
            t.b.cs,
            t.b.rs,
            1.0,
            t.beta,
            false,
            false,
            false,
            parallelism(m, n, k, parallel),
        );
    }
}

/// A new row-major `[m, Σ n_j]` buffer whose column blocks are `beta_j·a_j·b_j`, side by side in order (no
/// zero fill: every element is written once by a GEMM).
pub fn gemm_cols_new(m: usize, terms: &[Term<'_>], parallel: bool) -> Vec<f32> {
    let cols: usize = terms.iter().map(|t| t.b.cols).sum();
    for t in terms {
        assert!(
            t.a.rows == m && t.b.rows == t.a.cols,
            "gemm_cols_new: shapes"
        );
        t.a.check();
        t.b.check();
    }
    let len = m * cols;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let mut col0 = 0;
    for t in terms {
        // SAFETY: the capacity holds m × cols values; each term writes its own column block of every row.
        unsafe { gemm_raw(v.as_mut_ptr(), cols, col0, *t, false, parallel) };
        col0 += t.b.cols;
    }
    // SAFETY: the column blocks cover 0..cols of all m rows, so all `len` values were written above.
    unsafe { v.set_len(len) };
    v
}

/// A new row-major `[m, n]` buffer holding `Σ_j beta_j·a_j·b_j` (no zero fill).
pub fn gemm_sum_new(m: usize, n: usize, terms: &[Term<'_>], parallel: bool) -> Vec<f32> {
    for t in terms {
        assert!(
            t.a.rows == m && t.b.cols == n && t.b.rows == t.a.cols,
            "gemm_sum_new: shapes"
        );
        t.a.check();
        t.b.check();
    }
    let Some(first) = terms.first() else {
        return vec![0f32; m * n];
    };
    let len = m * n;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the first term writes all m × n values; the others then read and update initialised values.
    unsafe {
        gemm_raw(v.as_mut_ptr(), n, 0, *first, false, parallel);
        for t in &terms[1..] {
            gemm_raw(v.as_mut_ptr(), n, 0, *t, true, parallel);
        }
        v.set_len(len);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f32;
                for p in 0..a.cols {
                    let x =
                        a.data[(a.off as isize + i as isize * a.rs + p as isize * a.cs) as usize];
                    let y =
                        b.data[(b.off as isize + p as isize * b.rs + j as isize * b.cs) as usize];
                    s += x * y;
                }
                out[i * b.cols + j] = s;
            }
        }
        out
    }

    #[test]
    fn strided_and_transposed_operands_accumulate() {
        let a: Vec<f32> = (0..7 * 5).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..4 * 5).map(|i| (i as f32 * 0.7).cos()).collect();
        // a: rows 1..4 of a [7, 5] matrix, columns 0..5; b: [4, 5] used transposed → [5, 4].
        let am = MatRef::rows(&a, 5, 3, 5, 5);
        let bm = MatRef::packed(&b, 4, 5).t();
        let want = naive(am, bm);
        let mut out = vec![1f32; 3 * 6];
        gemm(MatMut::rows(&mut out, 1, 3, 4, 6), am, bm, 2.0, true, false);
        for i in 0..3 {
            for j in 0..4 {
                let got = out[1 + i * 6 + j];
                assert!((got - (1.0 + 2.0 * want[i * 4 + j])).abs() < 1e-5);
            }
        }
        assert_eq!(out[0], 1.0);
        gemm(MatMut::rows(&mut out, 1, 3, 4, 6), am, bm, 1.0, false, true);
        assert!((out[1] - want[0]).abs() < 1e-5);

        // Column blocks side by side, and a sum of products, into fresh buffers.
        let t = Term {
            a: am,
            b: bm,
            beta: 1.0,
        };
        let t2 = Term {
            a: am,
            b: bm,
            beta: -0.5,
        };
        let cols = gemm_cols_new(3, &[t, t2], true);
        let sum = gemm_sum_new(3, 4, &[t, t2, t], false);
        for i in 0..3 {
            for j in 0..4 {
                let w = want[i * 4 + j];
                assert!((cols[i * 8 + j] - w).abs() < 1e-5);
                assert!((cols[i * 8 + 4 + j] + 0.5 * w).abs() < 1e-5);
                assert!((sum[i * 4 + j] - 1.5 * w).abs() < 1e-5);
            }
        }
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// 12 independent 8-lane FMA chains (AVX2+FMA; Zen 4 runs 512-bit FMAs as two 256-bit halves, so this is
    /// its peak too), `iters` times: 192·iters FLOPs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_loop(iters: usize, seed: f32) -> f32 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_set1_ps(seed); 12];
        let m = _mm256_set1_ps(1.000_000_1);
        let c = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut out = [0f32; 8];
        let mut t = _mm256_setzero_ps();
        for a in acc {
            t = _mm256_add_ps(t, a);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), t);
        out.iter().sum()
    }

    /// The FMA peak of this machine (run with `--ignored --nocapture`): one and two threads.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn fma_peak() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let iters = 200_000_000;
        // SAFETY: AVX2 and FMA are present (checked above).
        let run = |seed| unsafe { fma_loop(iters, seed) };
        for threads in [1usize, 2] {
            let t0 = std::time::Instant::now();
            let s = if threads == 1 {
                run(1.0)
            } else {
                let (a, b) = rayon::join(|| run(1.0), || run(2.0));
                a + b
            };
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "{threads} thread(s): {:.0} GFLOP/s (checksum {s})",
                192.0 * iters as f64 * threads as f64 / dt / 1e9
            );
        }
    }

    /// GEMM throughput at the SmolLM2 LoRA step's shapes (run with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn gemm_shapes() {
        let shapes: &[(&str, usize, usize, usize, bool)] = &[
            // (name, m, k, n, rhs transposed = x·Wᵀ with W [n, k])
            ("q/o fwd x·Wᵀ", 1024, 576, 576, true),
            ("k/v fwd", 1024, 576, 192, true),
            ("gate/up fwd", 1024, 576, 1536, true),
            ("down fwd", 1024, 1536, 576, true),
            ("q/o bwd dy·W", 1024, 576, 576, false),
            ("k/v bwd", 1024, 192, 576, false),
            ("gate/up bwd", 1024, 1536, 576, false),
            ("down bwd", 1024, 576, 1536, false),
            ("qkv fused fwd", 1024, 576, 960, true),
            ("gate|up fused fwd", 1024, 576, 3072, true),
            ("qkv fused bwd", 1024, 960, 576, false),
            ("gate|up fused bwd", 1024, 3072, 576, false),
            ("lm_head chunk", 128, 576, 49152, true),
            ("lm_head dh", 128, 49152, 576, false),
            ("lm_head 1024", 1024, 576, 49152, true),
        ];
        for &(name, m, k, n, trans) in shapes {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
            let mut c = vec![0f32; m * n];
            let bref = if trans {
                MatRef::packed(&b, n, k).t()
            } else {
                MatRef::packed(&b, k, n)
            };
            for mode in 0..3 {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t0 = std::time::Instant::now();
                    if mode == 2 {
                        // rows split across the pool, one single-threaded GEMM per half
                        let half = m / 2;
                        let (c0, c1) = c.split_at_mut(half * n);
                        let am = MatRef::packed(&a, m, k);
                        rayon::join(
                            || {
                                gemm(
                                    MatMut::packed(c0, half, n),
                                    am.row_range(0, half),
                                    bref,
                                    1.0,
                                    false,
                                    false,
                                )
                            },
                            || {
                                gemm(
                                    MatMut::packed(c1, m - half, n),
                                    am.row_range(half, m),
                                    bref,
                                    1.0,
                                    false,
                                    false,
                                )
                            },
                        );
                    } else {
                        gemm(
                            MatMut::packed(&mut c, m, n),
                            MatRef::packed(&a, m, k),
                            bref,
                            1.0,
                            false,
                            mode == 1,
                        );
                    }
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                println!(
                    "{name:<16} {m:>5}x{k:>5}x{n:>6} {} {:>7.2} ms {:>6.0} GFLOP/s",
                    ["1T", "2T", "split"][mode],
                    best * 1e3,
                    2.0 * (m * k * n) as f64 / best / 1e9
                );
            }
        }
    }
}
