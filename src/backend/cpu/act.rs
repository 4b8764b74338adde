//! Activations and softmax.

use super::{par_each, simd, PAR_CHUNK, PAR_MIN};
use rayon::prelude::*;

/// x = x * sigmoid(x).
pub fn silu_inplace(x: &mut [f32]) {
    par_each(x, PAR_CHUNK, simd::silu_slice);
}

/// x = x/2 * (1 + erf(x / sqrt 2)): exact GELU (torch's default `approximate="none"`).
pub fn gelu_inplace(x: &mut [f32]) {
    par_each(x, PAR_CHUNK, simd::gelu_slice);
}

/// Rows per rayon task so that a task holds about `PAR_CHUNK` elements of `row_len`.
fn rows_per_task(row_len: usize) -> usize {
    (PAR_CHUNK / row_len.max(1)).max(1)
}

/// x [rows, 2d] -> y [rows, d] = x[:, :d] * gelu(x[:, d:]) (diffusers' GEGLU after its
/// projection: `hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate)`).
pub fn geglu(y: &mut [f32], x: &[f32], rows: usize, d: usize) {
    assert_eq!(y.len(), rows * d, "geglu: y");
    assert_eq!(x.len(), rows * 2 * d, "geglu: x");
    if d == 0 {
        return;
    }
    let run = |y: &mut [f32], x: &[f32]| {
        for (yr, xr) in y.chunks_exact_mut(d).zip(x.chunks_exact(2 * d)) {
            let (a, g) = xr.split_at(d);
            simd::geglu_row(yr, a, g);
        }
    };
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        run(y, x);
    } else {
        let r = rows_per_task(d);
        y.par_chunks_mut(r * d)
            .zip(x.par_chunks(r * 2 * d))
            .for_each(|(y, x)| run(y, x));
    }
}

/// Softmax over the last dim of x [rows, n], in place (max-subtracted, as torch).
pub fn softmax_rows(x: &mut [f32], rows: usize, n: usize) {
    assert_eq!(x.len(), rows * n, "softmax_rows: x");
    if n == 0 {
        return;
    }
    let run = |x: &mut [f32]| simd::softmax_block(x, n);
    if x.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        run(x);
    } else {
        x.par_chunks_mut(rows_per_task(n) * n).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, fixture, fixtures, rand_vec, TORCH_TOL};

    fn gelu_ref(x: f32) -> f32 {
        let x = x as f64;
        (0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)) as f32
    }

    fn silu_ref(x: f32) -> f32 {
        let x = x as f64;
        (x / (1.0 + (-x).exp())) as f32
    }

    /// Values spread over [-12, 12] (both tails), sizes around the parallel threshold;
    /// tolerance 1e-6 x max|ref| (the kernels are ~1e-7 relative).
    #[test]
    fn activations_match_reference() {
        for n in [1, 17, PAR_MIN + 3] {
            let x: Vec<f32> = rand_vec(n, 7).iter().map(|v| v * 12.0).collect();
            let mut y = x.clone();
            silu_inplace(&mut y);
            let want: Vec<f32> = x.iter().map(|&v| silu_ref(v)).collect();
            assert_close("silu", &y, &want, 1e-6);
            let mut y = x.clone();
            gelu_inplace(&mut y);
            let want: Vec<f32> = x.iter().map(|&v| gelu_ref(v)).collect();
            assert_close("gelu", &y, &want, 1e-6);
        }
    }

    /// Odd d, rows around the parallel threshold; tolerance 1e-6 x max|ref|.
    #[test]
    fn geglu_matches_reference() {
        for &(rows, d) in &[(1, 1), (3, 7), (1000, 45)] {
            let x: Vec<f32> = rand_vec(rows * 2 * d, 8).iter().map(|v| v * 4.0).collect();
            let mut y = vec![f32::NAN; rows * d];
            geglu(&mut y, &x, rows, d);
            let mut want = vec![0f32; rows * d];
            for r in 0..rows {
                for j in 0..d {
                    let a = x[r * 2 * d + j] as f64;
                    want[r * d + j] = (a * gelu_ref(x[r * 2 * d + d + j]) as f64) as f32;
                }
            }
            assert_close(&format!("geglu {rows}x{d}"), &y, &want, 1e-6);
        }
    }

    /// Rows with a large spread (and -inf-like values); tolerance 1e-6 x max|ref|.
    #[test]
    fn softmax_matches_reference() {
        for &(rows, n) in &[(1, 1), (5, 3), (7, 77), (400, 129)] {
            let x: Vec<f32> = rand_vec(rows * n, 9).iter().map(|v| v * 30.0).collect();
            let mut y = x.clone();
            softmax_rows(&mut y, rows, n);
            let mut want = vec![0f32; rows * n];
            for r in 0..rows {
                let row = &x[r * n..(r + 1) * n];
                let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
                for j in 0..n {
                    want[r * n + j] = ((row[j] as f64 - m).exp() / s) as f32;
                }
            }
            assert_close(&format!("softmax {rows}x{n}"), &y, &want, 1e-6);
        }
    }

    /// Against PyTorch; tolerance 1e-5 x max|ref|.
    #[test]
    fn activations_match_torch() {
        let f = fixtures();
        let mut x = fixture(&f, "silu.x");
        silu_inplace(&mut x);
        assert_close("torch silu", &x, &fixture(&f, "silu.y"), TORCH_TOL);
        let mut x = fixture(&f, "gelu.x");
        gelu_inplace(&mut x);
        assert_close("torch gelu", &x, &fixture(&f, "gelu.y"), TORCH_TOL);
        let x = fixture(&f, "geglu.x");
        let mut y = vec![0f32; x.len() / 2];
        geglu(&mut y, &x, 6, 8);
        assert_close("torch geglu", &y, &fixture(&f, "geglu.y"), TORCH_TOL);
        let mut x = fixture(&f, "softmax.x");
        softmax_rows(&mut x, 3, 7);
        assert_close("torch softmax", &x, &fixture(&f, "softmax.y"), TORCH_TOL);
    }
}
