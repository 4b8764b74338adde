//! Group and layer normalisation (torch semantics: biased variance, eps inside the sqrt).
//! Statistics are two-pass (mean, then centred squares) accumulated in f64.

use super::{simd, PAR_CHUNK, PAR_MIN};
use rayon::prelude::*;

/// (mean, 1/sqrt(var + eps)) of `x`, biased variance, accumulated in f64.
fn stats(x: &[f32], eps: f32) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 1.0 / (eps as f64).sqrt());
    }
    let n = x.len() as f64;
    let mean = simd::sum_f64(x) / n;
    let var = simd::sq_dev_f64(x, mean) / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// GroupNorm over x [batch, channels, hw]: channels split into `groups` consecutive groups,
/// normalised over (channels/groups) x hw, then `y = x̂ * gamma[c] + beta[c]`, then SiLU if
/// `silu` (the resnet's norm + nonlinearity fused).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    y: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    batch: usize,
    channels: usize,
    hw: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) {
    assert_eq!(x.len(), batch * channels * hw, "group_norm: x");
    assert_eq!(y.len(), x.len(), "group_norm: y");
    assert_eq!(gamma.len(), channels, "group_norm: gamma");
    assert_eq!(beta.len(), channels, "group_norm: beta");
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "group_norm: {channels} channels in {groups} groups"
    );
    let cg = channels / groups;
    let len = cg * hw;
    if len == 0 {
        return;
    }
    // One task per (batch, group): its slice of x and y is contiguous.
    let run = |gi: usize, y: &mut [f32], x: &[f32]| {
        let (mean, rstd) = stats(x, eps);
        let c0 = (gi % groups) * cg;
        for (j, (yc, xc)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
            let a = gamma[c0 + j] as f64 * rstd;
            let b = beta[c0 + j] as f64 - mean * a;
            simd::affine(yc, xc, a as f32, b as f32, silu);
        }
    };
    if x.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        for (gi, (y, x)) in y.chunks_exact_mut(len).zip(x.chunks_exact(len)).enumerate() {
            run(gi, y, x);
        }
    } else {
        y.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(gi, (y, x))| run(gi, y, x));
    }
}

/// LayerNorm over the last dim of x [rows, dim] with per-element gamma, beta.
pub fn layer_norm(
    y: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    dim: usize,
    eps: f32,
) {
    assert_eq!(x.len(), rows * dim, "layer_norm: x");
    assert_eq!(y.len(), x.len(), "layer_norm: y");
    assert_eq!(gamma.len(), dim, "layer_norm: gamma");
    assert_eq!(beta.len(), dim, "layer_norm: beta");
    if dim == 0 {
        return;
    }
    let run = |y: &mut [f32], x: &[f32]| {
        for (yr, xr) in y.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let (mean, rstd) = stats(xr, eps);
            simd::norm_affine(yr, xr, mean as f32, rstd as f32, gamma, beta);
        }
    };
    if x.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        run(y, x);
    } else {
        let r = (PAR_CHUNK / dim).max(1) * dim;
        y.par_chunks_mut(r)
            .zip(x.par_chunks(r))
            .for_each(|(y, x)| run(y, x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, fixture, fixtures, rand_vec, TORCH_TOL};

    #[allow(clippy::too_many_arguments)]
    fn group_norm_ref(
        x: &[f32],
        g: &[f32],
        b: &[f32],
        n: usize,
        c: usize,
        hw: usize,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Vec<f32> {
        let cg = c / groups;
        let mut y = vec![0f32; x.len()];
        for bi in 0..n {
            for gi in 0..groups {
                let s = (bi * c + gi * cg) * hw;
                let xs = &x[s..s + cg * hw];
                let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / xs.len() as f64;
                let var =
                    xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
                for j in 0..cg * hw {
                    let ch = gi * cg + j / hw;
                    let mut v =
                        (xs[j] as f64 - mean) / (var + eps).sqrt() * g[ch] as f64 + b[ch] as f64;
                    if silu {
                        v /= 1.0 + (-v).exp();
                    }
                    y[s + j] = v as f32;
                }
            }
        }
        y
    }

    /// Offset, scaled inputs (mean 3, so a one-pass f32 variance would lose digits), odd hw,
    /// with and without SiLU; tolerance 1e-6 x max|ref|.
    #[test]
    fn group_norm_matches_reference() {
        for &(n, c, hw, groups) in &[
            (1, 4, 1, 2),
            (2, 6, 7, 3),
            (2, 32, 33, 8),
            (1, 64, 1031, 32),
        ] {
            let x: Vec<f32> = rand_vec(n * c * hw, 10)
                .iter()
                .map(|v| 3.0 + 2.0 * v)
                .collect();
            let g = rand_vec(c, 11);
            let b = rand_vec(c, 12);
            for silu in [false, true] {
                let mut y = vec![f32::NAN; x.len()];
                group_norm(&mut y, &x, &g, &b, n, c, hw, groups, 1e-5, silu);
                let want = group_norm_ref(&x, &g, &b, n, c, hw, groups, 1e-5, silu);
                assert_close(
                    &format!("group_norm {n}x{c}x{hw}/{groups} silu={silu}"),
                    &y,
                    &want,
                    1e-6,
                );
            }
        }
    }

    /// Odd dims, rows around the parallel threshold; tolerance 1e-6 x max|ref|.
    #[test]
    fn layer_norm_matches_reference() {
        for &(rows, dim) in &[(1, 1), (3, 17), (300, 320), (2, 769)] {
            let x: Vec<f32> = rand_vec(rows * dim, 13)
                .iter()
                .map(|v| 1.0 + 5.0 * v)
                .collect();
            let g = rand_vec(dim, 14);
            let b = rand_vec(dim, 15);
            let mut y = vec![f32::NAN; x.len()];
            layer_norm(&mut y, &x, &g, &b, rows, dim, 1e-5);
            let mut want = vec![0f32; x.len()];
            for r in 0..rows {
                let xs = &x[r * dim..(r + 1) * dim];
                let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
                let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
                for j in 0..dim {
                    want[r * dim + j] = ((xs[j] as f64 - mean) / (var + 1e-5).sqrt() * g[j] as f64
                        + b[j] as f64) as f32;
                }
            }
            assert_close(&format!("layer_norm {rows}x{dim}"), &y, &want, 1e-6);
        }
    }

    /// Against PyTorch; tolerance 1e-5 x max|ref|.
    #[test]
    fn norms_match_torch() {
        let f = fixtures();
        let x = fixture(&f, "group_norm.x");
        let (g, b) = (fixture(&f, "group_norm.w"), fixture(&f, "group_norm.b"));
        let mut y = vec![0f32; x.len()];
        group_norm(&mut y, &x, &g, &b, 2, 8, 15, 4, 1e-5, false);
        assert_close(
            "torch group_norm",
            &y,
            &fixture(&f, "group_norm.y"),
            TORCH_TOL,
        );
        group_norm(&mut y, &x, &g, &b, 2, 8, 15, 4, 1e-5, true);
        assert_close(
            "torch group_norm_silu",
            &y,
            &fixture(&f, "group_norm_silu.y"),
            TORCH_TOL,
        );
        let x = fixture(&f, "layer_norm.x");
        let (g, b) = (fixture(&f, "layer_norm.w"), fixture(&f, "layer_norm.b"));
        let mut y = vec![0f32; x.len()];
        layer_norm(&mut y, &x, &g, &b, 15, 16, 1e-5);
        assert_close(
            "torch layer_norm",
            &y,
            &fixture(&f, "layer_norm.y"),
            TORCH_TOL,
        );
    }
}
