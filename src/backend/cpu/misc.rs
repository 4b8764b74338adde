//! Data movement and small ops: upsampling, concatenation, layout transposes, additions and
//! the timestep embedding.

use super::{extent, par_zip, simd, SendPtr, PAR_CHUNK, PAR_MIN};
use rayon::prelude::*;

/// x [planes, h, w] -> y [planes, 2h, 2w], nearest neighbour (each pixel becomes 2x2).
pub fn upsample_nearest2x(y: &mut [f32], x: &[f32], planes: usize, h: usize, w: usize) {
    assert_eq!(
        x.len(),
        extent("upsample_nearest2x", &[planes, h, w]),
        "upsample_nearest2x: x"
    );
    assert_eq!(
        y.len(),
        extent("upsample_nearest2x", &[4, x.len()]),
        "upsample_nearest2x: y"
    );
    if x.is_empty() {
        return;
    }
    let run = |y: &mut [f32], x: &[f32]| {
        // One input row -> two identical output rows of 2w.
        for (yr, xr) in y.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
            let (top, bottom) = yr.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(xr) {
                pair[0] = v;
                pair[1] = v;
            }
            bottom.copy_from_slice(top);
        }
    };
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        run(y, x);
    } else {
        let rows = (PAR_CHUNK / (4 * w)).max(1);
        y.par_chunks_mut(rows * 4 * w)
            .zip(x.par_chunks(rows * w))
            .for_each(|(y, x)| run(y, x));
    }
}

/// y [batch, ca + cb, hw] = cat(a [batch, ca, hw], b [batch, cb, hw]) along dim 1.
pub fn concat_channels(
    y: &mut [f32],
    a: &[f32],
    b: &[f32],
    batch: usize,
    ca: usize,
    cb: usize,
    hw: usize,
) {
    assert_eq!(
        a.len(),
        extent("concat_channels", &[batch, ca, hw]),
        "concat_channels: a"
    );
    assert_eq!(
        b.len(),
        extent("concat_channels", &[batch, cb, hw]),
        "concat_channels: b"
    );
    assert_eq!(y.len(), a.len() + b.len(), "concat_channels: y");
    let (la, lb) = (ca * hw, cb * hw);
    if la + lb == 0 {
        return;
    }
    // Copy in pieces of at most PAR_CHUNK so both threads share even a single image.
    let mut jobs: Vec<(usize, &[f32])> = Vec::new();
    for bi in 0..batch {
        let base = bi * (la + lb);
        for (off, src) in [
            (0, &a[bi * la..(bi + 1) * la]),
            (la, &b[bi * lb..(bi + 1) * lb]),
        ] {
            for (i, piece) in src.chunks(PAR_CHUNK).enumerate() {
                jobs.push((base + off + i * PAR_CHUNK, piece));
            }
        }
    }
    let dst = SendPtr(y.as_mut_ptr());
    let copy = |&(at, src): &(usize, &[f32])| {
        // SAFETY: the jobs tile y exactly once (each image's a-part then b-part, split into
        // consecutive pieces), so the ranges are disjoint and in bounds.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.get().add(at), src.len()) };
    };
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        jobs.iter().for_each(copy);
    } else {
        jobs.par_iter().for_each(copy);
    }
}

/// Side of the square tile moved through a local buffer (16 f32 = one cache line per row).
const T: usize = 16;
/// Side of the square block one task transposes (bounds the pages a task touches).
const BLOCK: usize = 64;

/// Transposes the block rows r0..r1, cols c0..c1 of x [rows, cols] into y [cols, rows] (y
/// given as a pointer to the image's output), through T x T tiles: T contiguous loads,
/// then T contiguous stores of T.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn transpose_block(
    y: SendPtr,
    x: &[f32],
    rows: usize,
    cols: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
) {
    let mut tile = [[0f32; T]; T];
    let mut rt = r0;
    while rt < r1 {
        let nr = T.min(r1 - rt);
        let mut ct = c0;
        while ct < c1 {
            let nc = T.min(c1 - ct);
            for i in 0..nr {
                let src = &x[(rt + i) * cols + ct..(rt + i) * cols + ct + nc];
                tile[i][..nc].copy_from_slice(src);
            }
            for j in 0..nc {
                let line: [f32; T] = std::array::from_fn(|i| tile[i][j]);
                // SAFETY: row ct + j < cols of y, columns rt..rt+nr <= rows: in bounds of
                // this image's rows * cols outputs; tasks own disjoint blocks.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        line.as_ptr(),
                        y.get().add((ct + j) * rows + rt),
                        nr,
                    )
                };
            }
            ct += nc;
        }
        rt += nr;
    }
}

/// Transposes each of `batch` matrices [rows, cols] into [cols, rows], in parallel over
/// (batch, BLOCK x BLOCK block).
fn transpose_batched(y: &mut [f32], x: &[f32], batch: usize, rows: usize, cols: usize) {
    assert_eq!(x.len(), extent("transpose", &[batch, rows, cols]));
    assert_eq!(y.len(), x.len());
    let plane = rows * cols;
    if plane == 0 {
        return;
    }
    let (br, bc) = (rows.div_ceil(BLOCK), cols.div_ceil(BLOCK));
    let task = |t: usize, y: SendPtr| {
        let (bi, blk) = (t / (br * bc), t % (br * bc));
        let (r0, c0) = ((blk / bc) * BLOCK, (blk % bc) * BLOCK);
        // SAFETY: image bi's output is y[bi*plane..(bi+1)*plane]; the block stays in it.
        let yb = SendPtr(unsafe { y.get().add(bi * plane) });
        let xb = &x[bi * plane..(bi + 1) * plane];
        transpose_block(
            yb,
            xb,
            rows,
            cols,
            r0,
            (r0 + BLOCK).min(rows),
            c0,
            (c0 + BLOCK).min(cols),
        );
    };
    let dst = SendPtr(y.as_mut_ptr());
    let tasks = batch * br * bc;
    if x.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        (0..tasks).for_each(|t| task(t, dst));
    } else {
        (0..tasks).into_par_iter().for_each(|t| task(t, dst));
    }
}

/// x [batch, c, hw] -> y [batch, hw, c].
pub fn nchw_to_nhwc(y: &mut [f32], x: &[f32], batch: usize, c: usize, hw: usize) {
    assert_eq!(
        x.len(),
        extent("nchw_to_nhwc", &[batch, c, hw]),
        "nchw_to_nhwc: x"
    );
    assert_eq!(y.len(), x.len(), "nchw_to_nhwc: y");
    transpose_batched(y, x, batch, c, hw);
}

/// x [batch, hw, c] -> y [batch, c, hw].
pub fn nhwc_to_nchw(y: &mut [f32], x: &[f32], batch: usize, c: usize, hw: usize) {
    assert_eq!(
        x.len(),
        extent("nhwc_to_nchw", &[batch, c, hw]),
        "nhwc_to_nchw: x"
    );
    assert_eq!(y.len(), x.len(), "nhwc_to_nchw: y");
    transpose_batched(y, x, batch, hw, c);
}

/// y += x.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len(), "add_inplace");
    par_zip(y, x, PAR_CHUNK, simd::add_slice);
}

/// y [batch, channels, hw] += v [batch, channels] broadcast over hw.
pub fn add_channel_bias(y: &mut [f32], v: &[f32], batch: usize, channels: usize, hw: usize) {
    assert_eq!(y.len(), batch * channels * hw, "add_channel_bias: y");
    assert_eq!(v.len(), batch * channels, "add_channel_bias: v");
    if hw == 0 {
        return;
    }
    let planes = (PAR_CHUNK / hw).max(1);
    let run = |i0: usize, y: &mut [f32]| {
        for (j, p) in y.chunks_exact_mut(hw).enumerate() {
            simd::add_scalar(p, v[i0 + j]);
        }
    };
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        run(0, y);
    } else {
        y.par_chunks_mut(planes * hw)
            .enumerate()
            .for_each(|(i, y)| run(i * planes, y));
    }
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, scale=1,
/// max_period)`: y `[n, dim]` for t `[n]`.
///
/// The f32 steps are torch's: exponent = f32(-ln max_period) * i / (half - shift), args =
/// t * f32(exp(exponent)). exp, sin and cos are correctly rounded (computed in f64, rounded
/// once), so results do not depend on the platform's libm; torch's own (MKL) exp is 1 ulp off
/// for a few frequencies, which at t = 999 moves the argument by one f32 ulp (6e-5).
pub fn timestep_embedding(
    y: &mut [f32],
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    max_period: f32,
) {
    assert_eq!(y.len(), t.len() * dim, "timestep_embedding: y");
    let half = dim / 2;
    let neg_log = -(max_period as f64).ln() as f32;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (((neg_log * i as f32) / denom) as f64).exp() as f32)
        .collect();
    for (row, &tv) in y.chunks_exact_mut(dim.max(1)).zip(t) {
        let (first, rest) = row.split_at_mut(half);
        let (second, pad) = rest.split_at_mut(half);
        for i in 0..half {
            let arg = (tv * freqs[i]) as f64;
            let (s, c) = (arg.sin() as f32, arg.cos() as f32);
            if flip_sin_to_cos {
                first[i] = c;
                second[i] = s;
            } else {
                first[i] = s;
                second[i] = c;
            }
        }
        pad.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, fixture, fixtures, rand_vec, TORCH_TOL};

    #[test]
    fn upsample_matches_reference() {
        for &(p, h, w) in &[(1, 1, 1), (3, 5, 7), (8, 33, 65)] {
            let x = rand_vec(p * h * w, 20);
            let mut y = vec![f32::NAN; 4 * x.len()];
            upsample_nearest2x(&mut y, &x, p, h, w);
            let mut want = vec![0f32; y.len()];
            for pi in 0..p {
                for i in 0..2 * h {
                    for j in 0..2 * w {
                        want[(pi * 2 * h + i) * 2 * w + j] = x[(pi * h + i / 2) * w + j / 2];
                    }
                }
            }
            assert_close("upsample", &y, &want, 0.0);
        }
    }

    #[test]
    fn concat_matches_reference() {
        for &(n, ca, cb, hw) in &[(1, 1, 1, 1), (2, 3, 5, 7), (2, 40, 24, 1025)] {
            let a = rand_vec(n * ca * hw, 21);
            let b = rand_vec(n * cb * hw, 22);
            let mut y = vec![f32::NAN; a.len() + b.len()];
            concat_channels(&mut y, &a, &b, n, ca, cb, hw);
            let mut want = Vec::new();
            for bi in 0..n {
                want.extend_from_slice(&a[bi * ca * hw..(bi + 1) * ca * hw]);
                want.extend_from_slice(&b[bi * cb * hw..(bi + 1) * cb * hw]);
            }
            assert_close("concat", &y, &want, 0.0);
        }
    }

    #[test]
    fn transposes_round_trip() {
        for &(n, c, hw) in &[(1, 1, 1), (2, 3, 5), (2, 17, 33), (2, 320, 257)] {
            let x = rand_vec(n * c * hw, 23);
            let mut t = vec![f32::NAN; x.len()];
            nchw_to_nhwc(&mut t, &x, n, c, hw);
            for bi in 0..n {
                for ci in 0..c {
                    for p in 0..hw {
                        assert_eq!(
                            t[(bi * hw + p) * c + ci],
                            x[(bi * c + ci) * hw + p],
                            "nhwc at {bi},{ci},{p}"
                        );
                    }
                }
            }
            let mut back = vec![f32::NAN; x.len()];
            nhwc_to_nchw(&mut back, &t, n, c, hw);
            assert_close("nhwc_to_nchw", &back, &x, 0.0);
        }
    }

    #[test]
    fn additions_match_reference() {
        let n = PAR_MIN + 5;
        let x = rand_vec(n, 24);
        let mut y = rand_vec(n, 25);
        let want: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a + b).collect();
        add_inplace(&mut y, &x);
        assert_close("add_inplace", &y, &want, 0.0);
        for &(b, c, hw) in &[(1, 1, 1), (2, 3, 7), (2, 64, 1025)] {
            let v = rand_vec(b * c, 26);
            let y0 = rand_vec(b * c * hw, 27);
            let mut y = y0.clone();
            add_channel_bias(&mut y, &v, b, c, hw);
            let want: Vec<f32> = (0..y0.len()).map(|i| y0[i] + v[i / hw]).collect();
            assert_close("add_channel_bias", &y, &want, 0.0);
        }
    }

    /// Against an f64 evaluation of the same formula (odd dim pads a zero); tolerance 1e-6 at
    /// t <= 1.5 and 2e-4 at t = 999, where f32 rounding of t * freq (~6e-5 absolute) dominates.
    #[test]
    fn timestep_matches_f64_formula() {
        let t = [0.0f32, 1.5, 999.0];
        for &(dim, flip, shift) in &[(320, true, 0.0f32), (7, true, 0.0), (8, false, 1.0)] {
            let mut y = vec![f32::NAN; 3 * dim];
            timestep_embedding(&mut y, &t, dim, flip, shift, 10000.0);
            let half = dim / 2;
            for (r, &tv) in t.iter().enumerate() {
                let mut want = vec![0f32; dim];
                for i in 0..half {
                    let f = (-(10000f64.ln()) * i as f64 / (half as f64 - shift as f64)).exp();
                    let a = tv as f64 * f;
                    let (s, c) = (a.sin() as f32, a.cos() as f32);
                    want[i] = if flip { c } else { s };
                    want[half + i] = if flip { s } else { c };
                }
                let tol = if tv > 2.0 { 2e-4 } else { 1e-6 };
                assert_close(
                    &format!("timestep dim {dim} t {tv}"),
                    &y[r * dim..(r + 1) * dim],
                    &want,
                    tol,
                );
            }
        }
    }

    /// Against PyTorch; tolerance 1e-5 x max|ref|, except the t = 999 rows of the timestep
    /// embedding: there one f32 ulp of the argument t * freq (~890) is 6.1e-5, and torch's
    /// MKL exp is 1 ulp off correct rounding for some frequencies (indices 2, 15, 42 of 160
    /// with torch 2.15), so those rows get 2 ulps of the argument, 1.25e-4.
    #[test]
    fn small_ops_match_torch() {
        let f = fixtures();
        let x = fixture(&f, "upsample.x");
        let mut y = vec![0f32; 4 * x.len()];
        upsample_nearest2x(&mut y, &x, 6, 4, 5);
        assert_close("torch upsample", &y, &fixture(&f, "upsample.y"), TORCH_TOL);
        let t = fixture(&f, "timestep.t");
        for (dim, key) in [(320, "timestep.y320"), (7, "timestep.y7")] {
            let mut y = vec![0f32; t.len() * dim];
            timestep_embedding(&mut y, &t, dim, true, 0.0, 10000.0);
            let want = fixture(&f, key);
            assert_eq!(want.len(), y.len(), "{key} shape");
            for (r, &tv) in t.iter().enumerate() {
                let tol = if tv > 100.0 { 1.25e-4 } else { TORCH_TOL };
                let row = r * dim..(r + 1) * dim;
                assert_close(
                    &format!("torch {key} t={tv}"),
                    &y[row.clone()],
                    &want[row],
                    tol,
                );
            }
        }
    }
}
