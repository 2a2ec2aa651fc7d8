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
            a.data.as_ptr().offset(a.off as isize),
            a.cs,
            a.rs,
            b.data.as_ptr().offset(b.off as isize),
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
    }
}
