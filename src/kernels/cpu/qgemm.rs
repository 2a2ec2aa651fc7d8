//! GEMMs against a quantized frozen matrix W `[out, in]` (torch layout): W is decoded a tile of rows at a time
//! into a small f32 buffer that the GEMM then reads, so no dense copy of W outlives the call. Both products a
//! frozen linear needs are here: the forward `x·Wᵀ` (a tile gives a block of output columns) and the backward
//! `dy·W` (a tile gives one term of the sum over output rows). Decoding is exact (the format's reference
//! arithmetic), so a step on a quantized base equals a step on the same weights dequantized, up to the GEMM's
//! summation order.

use super::gemm::{gemm, MatMut, MatRef};
use crate::quant::QMatrix;

/// Rows of W per decoded tile: about 1 Mi f32 (4 MB, cache-sized), a multiple of 16, at least 16.
pub(crate) fn tile_rows(cols: usize) -> usize {
    ((1usize << 20) / cols.max(1)).max(16) / 16 * 16
}

/// Every tile of W's rows, decoded: `f(j0, j1, tile)` with `tile` = rows `j0..j1` as packed f32 `[j1 − j0, in]`.
fn for_each_tile(w: &QMatrix, mut f: impl FnMut(usize, usize, &[f32])) {
    let (out, inp) = (w.rows(), w.cols());
    let t = tile_rows(inp).min(out.max(1));
    let mut buf = vec![0f32; t * inp];
    let mut j0 = 0;
    while j0 < out {
        let j1 = (j0 + t).min(out);
        let tile = &mut buf[..(j1 - j0) * inp];
        w.dequant_rows(j0, j1, tile);
        f(j0, j1, tile);
        j0 = j1;
    }
}

/// `dst[r, c0 + j] = Σ_k x[r, k]·W[j, k]` for every row r of `x` `[n, in]` and every row j of W, into a row-major
/// destination of row stride `rs` (W's output block sits at columns `c0..c0 + out`).
pub(crate) fn xwt_into(dst: &mut [f32], c0: usize, rs: usize, x: MatRef<'_>, w: &QMatrix) {
    assert_eq!(x.cols, w.cols(), "xwt_into: inner dimensions");
    for_each_tile(w, |j0, j1, tile| {
        gemm(
            MatMut::rows(dst, c0 + j0, x.rows, j1 - j0, rs),
            x,
            MatRef::packed(tile, j1 - j0, w.cols()).t(),
            1.0,
            false,
            true,
        )
    });
}

/// `dst += dy·W` for `dy` `[n, out]` (a column block of the upstream gradient) into a packed `[n, in]` buffer.
pub(crate) fn dyw_acc(dst: &mut [f32], dy: MatRef<'_>, w: &QMatrix) {
    assert_eq!(dy.cols, w.rows(), "dyw_acc: inner dimensions");
    for_each_tile(w, |j0, j1, tile| {
        let dyt = MatRef {
            off: (dy.off as isize + j0 as isize * dy.cs) as usize,
            cols: j1 - j0,
            ..dy
        };
        gemm(
            MatMut::packed(dst, dy.rows, w.cols()),
            dyt,
            MatRef::packed(tile, j1 - j0, w.cols()),
            1.0,
            true,
            true,
        )
    });
}

/// The matrix a kernel reads W from: a dense view, or a quantized matrix decoded per tile.
pub(crate) enum WeightRows<'a> {
    Dense(MatRef<'a>),
    Quant(&'a QMatrix),
}

impl WeightRows<'_> {
    pub fn rows(&self) -> usize {
        match self {
            WeightRows::Dense(m) => m.rows,
            WeightRows::Quant(q) => q.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            WeightRows::Dense(m) => m.cols,
            WeightRows::Quant(q) => q.cols(),
        }
    }

    /// Rows `r0..r1` as a matrix, decoding into `buf` when quantized.
    pub fn tile<'b>(&'b self, r0: usize, r1: usize, buf: &'b mut Vec<f32>) -> MatRef<'b> {
        match self {
            WeightRows::Dense(m) => m.row_range(r0, r1),
            WeightRows::Quant(q) => {
                let c = q.cols();
                buf.resize((r1 - r0) * c, 0.0);
                q.dequant_rows(r0, r1, buf);
                MatRef::packed(buf, r1 - r0, c)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgmlType;

    /// Both products against the same GEMMs on the dequantized matrix, with tiles smaller than W (rows 40 with
    /// a tile of 16 rows at in = 65 536 / … — forced here by a wide matrix) and an output block inside a wider
    /// destination.
    #[test]
    fn tiled_products_equal_the_dense_ones() {
        let (n, out, inp) = (5, 40, 1 << 16);
        assert!(tile_rows(inp) < out, "several tiles");
        let q = QMatrix::random_ggml(GgmlType::Q4_K, out, inp, 0.1, 3).expect("q");
        let w = q.to_f32();
        let x: Vec<f32> = (0..n * inp)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let (rs, c0) = (out + 3, 2);
        let mut got = vec![9f32; n * rs];
        xwt_into(&mut got, c0, rs, MatRef::packed(&x, n, inp), &q);
        let mut want = vec![9f32; n * rs];
        gemm(
            MatMut::rows(&mut want, c0, n, out, rs),
            MatRef::packed(&x, n, inp),
            MatRef::packed(&w, out, inp).t(),
            1.0,
            false,
            false,
        );
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert_eq!(got[0], 9.0, "columns outside the block untouched");
        // dy·W, dy a column block of a wider gradient.
        let dy: Vec<f32> = (0..n * rs)
            .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let dyr = MatRef::rows(&dy, c0, n, out, rs);
        let mut got = vec![1f32; n * inp];
        dyw_acc(&mut got, dyr, &q);
        let mut want = vec![1f32; n * inp];
        gemm(
            MatMut::packed(&mut want, n, inp),
            dyr,
            MatRef::packed(&w, out, inp),
            1.0,
            true,
            false,
        );
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
