//! PiSSA and OLoRA initialisation (PEFT's `init_lora_weights: pissa | olora`): the adapter starts as the principal
//! part of the frozen weight, and the base keeps the residual, so that W_res + s·B·A = W at step 0.
//!
//! - PiSSA: W = U·S·Vᵀ (SVD), A = diag(√(S_r/s))·V_rᵀ, B = U_r·diag(√(S_r/s)): s·B·A is W's best rank-r
//!   approximation.
//! - OLoRA: W = Q·R (Householder QR, as LAPACK's geqrf), A = R[:r], B = Q[:, :r]: s·B·A = s·Q_r·Q_rᵀ·W.
//!
//! The base becomes W_res = W − s·B·A. Both factorisations are unique only up to signs, but the products s·B·A
//! are not (given a gap between the r-th and (r+1)-th singular values for PiSSA), so the tests compare products.
//! Everything here runs on the host in f64; the factors are returned in f32 as the adapter stores them.
//!
//! The SVD is a truncated one ([`truncated_svd`]: block subspace iteration on the Gram matrix, run to convergence),
//! exact when the block covers the smaller dimension: a full SVD of every linear layer of a 7B model would cost
//! minutes per layer on a CPU, and only the top r triplets are used.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Residual ‖G·x_i − λ_i·x_i‖ / λ₁ (G the Gram matrix, λ = σ²) at which the top-r singular triplets count as
/// converged.
pub const SVD_TOL: f64 = 1e-11;
/// Subspace iterations before the truncated SVD settles for what it has (W_res + s·B·A = W holds whatever the
/// accuracy; only the split between the adapter and the residual is then less principal).
pub const SVD_MAX_ITERS: usize = 1000;
/// Subspace iterations between two Rayleigh–Ritz steps (each costs about two iterations).
const RR_EVERY: usize = 4;

/// A dense f64 matrix, column-major (element (i, j) at `data[i + j·rows]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// From torch's row-major `[rows, cols]` values.
    pub fn from_row_major(rows: usize, cols: usize, v: &[f32]) -> Self {
        let mut m = Mat::zeros(rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                m.data[i + j * rows] = v[i * cols + j] as f64;
            }
        }
        m
    }

    /// Torch's row-major layout, in f64.
    pub fn to_row_major(&self) -> Vec<f64> {
        let mut v = vec![0.0; self.rows * self.cols];
        for i in 0..self.rows {
            for j in 0..self.cols {
                v[i * self.cols + j] = self.data[i + j * self.rows];
            }
        }
        v
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i + j * self.rows]
    }

    fn col(&self, j: usize) -> &[f64] {
        &self.data[j * self.rows..(j + 1) * self.rows]
    }

    fn col_mut(&mut self, j: usize) -> &mut [f64] {
        &mut self.data[j * self.rows..(j + 1) * self.rows]
    }
}

/// op(a)·op(b), with op the transpose when the flag is set.
pub fn matmul(a: &Mat, ta: bool, b: &Mat, tb: bool) -> Mat {
    let (m, k) = if ta {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (k2, n) = if tb {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    assert_eq!(k, k2, "matmul inner dimensions");
    let mut c = Mat::zeros(m, n);
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    // Column-major a: element (i, j) at i + j·rows → row stride 1, column stride rows; transposed swaps them.
    let (a_rs, a_cs) = if ta {
        (a.rows as isize, 1)
    } else {
        (1, a.rows as isize)
    };
    let (b_rs, b_cs) = if tb {
        (b.rows as isize, 1)
    } else {
        (1, b.rows as isize)
    };
    // SAFETY: every pointer addresses an m×k, k×n or m×n matrix inside its Vec with the strides above.
    unsafe {
        gemm_crate::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            m as isize,
            1,
            false,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm_crate::Parallelism::Rayon(0),
        );
    }
    c
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    use rand::Rng;
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Orthonormalise the columns in place (classical Gram–Schmidt, twice); a column that vanishes (rank deficiency)
/// is replaced by a random one orthogonal to the others.
fn orthonormalize(q: &mut Mat, rng: &mut ChaCha8Rng) {
    let rows = q.rows;
    for j in 0..q.cols {
        for attempt in 0..4 {
            let before = dot(q.col(j), q.col(j)).sqrt();
            for _pass in 0..2 {
                let coef: Vec<f64> = (0..j).map(|i| dot(q.col(i), q.col(j))).collect();
                for (i, c) in coef.into_iter().enumerate() {
                    let (lo, hi) = q.data.split_at_mut(j * rows);
                    for (x, y) in hi[..rows].iter_mut().zip(&lo[i * rows..(i + 1) * rows]) {
                        *x -= c * y;
                    }
                }
            }
            let norm = dot(q.col(j), q.col(j)).sqrt();
            if norm > 1e-10 * before.max(f64::MIN_POSITIVE) && norm > 0.0 && attempt < 3 {
                q.col_mut(j).iter_mut().for_each(|x| *x /= norm);
                break;
            }
            // Linearly dependent on the earlier columns: start this one afresh.
            for x in q.col_mut(j) {
                *x = gaussian(rng);
            }
        }
    }
}

/// Eigen-decomposition of a symmetric matrix (cyclic Jacobi): eigenvalues in descending order and the matching
/// eigenvectors as columns.
pub fn sym_eig(c: &Mat) -> (Vec<f64>, Mat) {
    let n = c.rows;
    let mut a = c.clone();
    let mut v = Mat::zeros(n, n);
    for i in 0..n {
        v.data[i + i * n] = 1.0;
    }
    let scale = a.data.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|j| (0..n).filter(move |&i| i != j).map(move |i| (i, j)))
            .map(|(i, j)| a.at(i, j).powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale || scale == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a.at(p, q);
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (a.at(p, p), a.at(q, q));
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let cs = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * cs;
                // A ← Jᵀ·A·J on rows/columns p and q.
                for k in 0..n {
                    let (akp, akq) = (a.at(k, p), a.at(k, q));
                    a.data[k + p * n] = cs * akp - sn * akq;
                    a.data[k + q * n] = sn * akp + cs * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a.at(p, k), a.at(q, k));
                    a.data[p + k * n] = cs * apk - sn * aqk;
                    a.data[q + k * n] = sn * apk + cs * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.data[k + p * n] = cs * vkp - sn * vkq;
                    v.data[k + q * n] = sn * vkp + cs * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a.at(j, j).total_cmp(&a.at(i, i)));
    let vals = order.iter().map(|&i| a.at(i, i)).collect();
    let mut vecs = Mat::zeros(n, n);
    for (dst, &src) in order.iter().enumerate() {
        vecs.col_mut(dst).copy_from_slice(v.col(src));
    }
    (vals, vecs)
}

/// The top-r singular triplets of `w`: (U_r `[m, r]`, σ (r values, descending), V_r `[n, r]`), each pair of
/// singular vectors signed so that U's largest-magnitude entry is positive; and the iterations it took.
///
/// Block subspace iteration on the Gram matrix of the smaller side (G = Wᵀ·W or W·Wᵀ, k × k with k = min(m, n)):
/// its top-r eigenvectors are W's right (or left) singular vectors, λ = σ². Iterating on G costs k²·b per step
/// instead of the 2·m·n·b of alternating W and Wᵀ (5× less for an MLP projection), and forming it in f64 loses
/// nothing the top r need. Rayleigh–Ritz every [`RR_EVERY`] steps, until ‖G·x_i − λ_i·x_i‖ ≤ [`SVD_TOL`]·λ₁.
pub fn truncated_svd(w: &Mat, r: usize, seed: u64) -> (Mat, Vec<f64>, Mat, usize) {
    let (m, n) = (w.rows, w.cols);
    let k = m.min(n);
    assert!(r >= 1 && r <= k, "rank {r} for a {m}×{n} matrix");
    let right = n <= m;
    let g = if right {
        matmul(w, true, w, false)
    } else {
        matmul(w, false, w, true)
    };
    let block = (2 * r + 8).min(k);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut q = Mat::zeros(k, block);
    if block == k {
        // The block is the whole space: one Rayleigh–Ritz step is the exact eigen-decomposition.
        (0..k).for_each(|i| q.data[i + i * k] = 1.0);
    } else {
        q.data.iter_mut().for_each(|x| *x = gaussian(&mut rng));
        orthonormalize(&mut q, &mut rng);
    }
    let mut iters = 0;
    let x = loop {
        if block < k {
            for _ in 0..RR_EVERY {
                q = matmul(&g, false, &q, false);
                orthonormalize(&mut q, &mut rng);
                iters += 1;
            }
        }
        // Rayleigh–Ritz: H = Qᵀ·G·Q = S·Λ·Sᵀ; x = Q·S.
        let gq = matmul(&g, false, &q, false);
        let h = matmul(&q, true, &gq, false);
        let (lam, s) = sym_eig(&h);
        let mut s_r = Mat::zeros(block, r);
        for j in 0..r {
            s_r.col_mut(j).copy_from_slice(s.col(j));
        }
        let x = matmul(&q, false, &s_r, false);
        let gx = matmul(&gq, false, &s_r, false);
        let l1 = lam[0].max(f64::MIN_POSITIVE);
        let worst = (0..r)
            .map(|j| {
                gx.col(j)
                    .iter()
                    .zip(x.col(j))
                    .map(|(a, b)| (a - lam[j] * b).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / l1
            })
            .fold(0.0, f64::max);
        if worst <= SVD_TOL || block == k || iters >= SVD_MAX_ITERS || lam[0] <= 0.0 {
            break x;
        }
    };
    // σ = ‖W·x‖ (or ‖Wᵀ·x‖) and the other side's vectors y = W·x / σ.
    let mut y = if right {
        matmul(w, false, &x, false)
    } else {
        matmul(w, true, &x, false)
    };
    let mut sigma = Vec::with_capacity(r);
    for j in 0..r {
        let s = dot(y.col(j), y.col(j)).sqrt();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        y.col_mut(j).iter_mut().for_each(|v| *v *= inv);
        sigma.push(s);
    }
    let (mut u, mut v) = if right { (y, x) } else { (x, y) };
    for j in 0..r {
        let big = u
            .col(j)
            .iter()
            .copied()
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
            .unwrap_or(0.0);
        if big < 0.0 {
            u.col_mut(j).iter_mut().for_each(|x| *x = -*x);
            v.col_mut(j).iter_mut().for_each(|x| *x = -*x);
        }
    }
    (u, sigma, v, iters)
}

/// An initialisation's result: A `[r, in]`, B `[out, r]` (row-major f32, PEFT's layout) and W_res = W − s·B·A
/// (row-major f64).
pub struct Principal {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub residual: Vec<f64>,
    /// Subspace iterations the SVD took (PiSSA; 0 for OLoRA).
    pub iterations: usize,
}

/// W − s·B·A for the f32 factors as stored (so that W_res + s·B·A reproduces W to f64 rounding).
fn residual(w: &Mat, a: &[f32], b: &[f32], r: usize, scale: f64) -> Vec<f64> {
    let (m, n) = (w.rows, w.cols);
    let am = Mat::from_row_major(r, n, a);
    let bm = Mat::from_row_major(m, r, b);
    let ba = matmul(&bm, false, &am, false);
    let mut out = w.to_row_major();
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] -= scale * ba.at(i, j);
        }
    }
    out
}

/// PiSSA (PEFT `init_lora_weights="pissa"`): `w` is `[out, in]`, `scale` the adapter's s.
pub fn pissa(w: &Mat, r: usize, scale: f64, seed: u64) -> Principal {
    let (m, n) = (w.rows, w.cols);
    let (u, sigma, v, iterations) = truncated_svd(w, r, seed);
    let root: Vec<f64> = sigma.iter().map(|s| (s / scale).sqrt()).collect();
    let mut a = vec![0f32; r * n];
    let mut b = vec![0f32; m * r];
    for j in 0..r {
        for c in 0..n {
            a[j * n + c] = (root[j] * v.at(c, j)) as f32;
        }
        for i in 0..m {
            b[i * r + j] = (u.at(i, j) * root[j]) as f32;
        }
    }
    let residual = residual(w, &a, &b, r, scale);
    Principal {
        a,
        b,
        residual,
        iterations,
    }
}

/// OLoRA (PEFT `init_lora_weights="olora"`): A = R[:r], B = Q[:, :r] of W's Householder QR (only the first r
/// reflectors are needed).
pub fn olora(w: &Mat, r: usize, scale: f64) -> Principal {
    let (m, n) = (w.rows, w.cols);
    assert!(r >= 1 && r <= m.min(n), "rank {r} for a {m}×{n} matrix");
    let mut t = w.clone();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(r);
    for j in 0..r {
        let x = &t.col(j)[j..];
        let norm = dot(x, x).sqrt();
        if norm == 0.0 {
            reflectors.push(Vec::new());
            continue;
        }
        // LAPACK's choice: β = −sign(α)·‖x‖, v = x − β·e₁ (no cancellation).
        let beta = -norm.copysign(x[0]);
        let mut v = x.to_vec();
        v[0] -= beta;
        let vv = dot(&v, &v);
        for c in j..n {
            let col = &mut t.col_mut(c)[j..];
            let f = 2.0 * dot(&v, col) / vv;
            col.iter_mut().zip(&v).for_each(|(y, vi)| *y -= f * vi);
        }
        reflectors.push(v);
    }
    // Q_r = H_0 ⋯ H_{r−1} applied to the first r columns of the identity.
    let mut q = Mat::zeros(m, r);
    for j in 0..r {
        q.data[j + j * m] = 1.0;
    }
    for (j, v) in reflectors.iter().enumerate().rev() {
        if v.is_empty() {
            continue;
        }
        let vv = dot(v, v);
        for c in 0..r {
            let col = &mut q.col_mut(c)[j..];
            let f = 2.0 * dot(v, col) / vv;
            col.iter_mut().zip(v).for_each(|(y, vi)| *y -= f * vi);
        }
    }
    let mut a = vec![0f32; r * n];
    for i in 0..r {
        for c in i..n {
            a[i * n + c] = t.at(i, c) as f32;
        }
    }
    let mut b = vec![0f32; m * r];
    for i in 0..m {
        for j in 0..r {
            b[i * r + j] = q.at(i, j) as f32;
        }
    }
    let residual = residual(w, &a, &b, r, scale);
    Principal {
        a,
        b,
        residual,
        iterations: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix with prescribed singular values: U·diag(s)·Vᵀ from orthonormalised random factors.
    fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Mat {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = s.len();
        let mut u = Mat::zeros(m, k);
        let mut v = Mat::zeros(n, k);
        u.data.iter_mut().for_each(|x| *x = gaussian(&mut rng));
        v.data.iter_mut().for_each(|x| *x = gaussian(&mut rng));
        orthonormalize(&mut u, &mut rng);
        orthonormalize(&mut v, &mut rng);
        for (j, sj) in s.iter().enumerate() {
            u.col_mut(j).iter_mut().for_each(|x| *x *= sj);
        }
        matmul(&u, false, &v, true)
    }

    #[test]
    fn jacobi_diagonalises_a_symmetric_matrix() {
        // [[2, 1], [1, 2]]: eigenvalues 3 and 1, vectors (1, 1)/√2 and (1, −1)/√2.
        let c = Mat {
            rows: 2,
            cols: 2,
            data: vec![2.0, 1.0, 1.0, 2.0],
        };
        let (vals, vecs) = sym_eig(&c);
        assert!((vals[0] - 3.0).abs() < 1e-14 && (vals[1] - 1.0).abs() < 1e-14);
        assert!((vecs.at(0, 0).abs() - 0.5f64.sqrt()).abs() < 1e-14);
        assert!((vecs.at(0, 0) - vecs.at(1, 0)).abs() < 1e-14);
    }

    #[test]
    fn truncated_svd_finds_the_prescribed_spectrum_iteratively_and_exactly() {
        // 120 × 80 with a decaying spectrum; r = 4 → block 16 < 80, so the subspace iteration runs.
        let s: Vec<f64> = (0..80).map(|i| 10.0 * 0.9f64.powi(i)).collect();
        let w = with_spectrum(120, 80, &s, 3);
        let (u, sigma, v, iters) = truncated_svd(&w, 4, 7);
        assert!(iters > 1, "the iterative path ran ({iters} iterations)");
        for j in 0..4 {
            assert!(
                (sigma[j] - s[j]).abs() < 1e-9 * s[0],
                "σ{j} {} vs {}",
                sigma[j],
                s[j]
            );
        }
        // u_j ⟂ u_k, unit; Wᵀ·u_j = σ_j·v_j (u is derived from v, so this side is the test).
        let utu = matmul(&u, true, &u, false);
        let wtu = matmul(&w, true, &u, false);
        for (j, &sj) in sigma.iter().enumerate() {
            for k in 0..4 {
                let want = if j == k { 1.0 } else { 0.0 };
                assert!((utu.at(j, k) - want).abs() < 1e-12);
            }
            for i in 0..80 {
                assert!((wtu.at(i, j) - sj * v.at(i, j)).abs() < 1e-8);
            }
        }
        // The exact path (block covers the small side): 10 × 6, r = 2.
        let w = with_spectrum(10, 6, &[5.0, 3.0, 2.0, 1.0, 0.5, 0.25], 11);
        let (_, sigma, _, iters) = truncated_svd(&w, 2, 1);
        assert_eq!(iters, 0, "one Rayleigh–Ritz step on the whole space");
        assert!((sigma[0] - 5.0).abs() < 1e-12 && (sigma[1] - 3.0).abs() < 1e-12);
    }

    #[test]
    fn pissa_and_olora_split_the_weight_into_principal_part_and_residual() {
        let s: Vec<f64> = (0..6).map(|i| 8.0 / (1 << i) as f64).collect();
        let w = with_spectrum(9, 6, &s, 5);
        let scale = 2.0;
        // PiSSA: s·B·A = the rank-2 truncation, so the residual's spectrum is the rest (‖W_res‖²_F = Σ_{i≥2} σ_i²).
        let p = pissa(&w, 2, scale, 0);
        let res_sq: f64 = p.residual.iter().map(|x| x * x).sum();
        let tail: f64 = s[2..].iter().map(|x| x * x).sum();
        assert!((res_sq - tail).abs() < 1e-5 * tail, "{res_sq} vs {tail}");
        // OLoRA: B = Q_r has orthonormal columns, A = R_r is upper-trapezoidal, and s·B·A + W_res = W.
        let o = olora(&w, 2, scale);
        let b = Mat::from_row_major(9, 2, &o.b);
        let btb = matmul(&b, true, &b, false);
        assert!((btb.at(0, 0) - 1.0).abs() < 1e-6 && btb.at(0, 1).abs() < 1e-6);
        assert_eq!(o.a[6], 0.0, "R[1, 0] is zero");
        let a = Mat::from_row_major(2, 6, &o.a);
        let ba = matmul(&b, false, &a, false);
        let wr = w.to_row_major();
        for i in 0..9 {
            for j in 0..6 {
                let back = o.residual[i * 6 + j] + scale * ba.at(i, j);
                assert!((back - wr[i * 6 + j]).abs() < 1e-6);
            }
        }
        // B·A = Q_r·Q_rᵀ·W: its first two columns are W's own (they lie in span Q_r).
        for i in 0..9 {
            for j in 0..2 {
                assert!((ba.at(i, j) - wr[i * 6 + j]).abs() < 1e-5);
            }
        }
    }
}
