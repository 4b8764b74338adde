//! Dense matrix products through the `gemm` crate.

use gemm::Parallelism;

use super::extent;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// Parallelism for a product of `macs` multiply-adds issued from outside any parallel loop:
/// the current rayon pool's threads when it is worth it.
/// Linear layers of fewer rows than this (the text encoder's 154, the ViT's 257, the UNet's
/// low resolutions) run as column slices of [`SPLIT_COLS`] in parallel: the gemm crate's own
/// split leaves most of a second core idle at these shapes (`hdb bench gemm`, 2 threads on a
/// Zen 5: the text encoder's fc2 6.4 ms -> 3.6 ms, its q/k/v 0.95 -> 0.5 ms); at the UNet's
/// 8192 rows its own split is as fast or faster.
const SPLIT_COLS_MAX_ROWS: usize = 4096;
/// The width of one column slice.
const SPLIT_COLS: usize = 128;

/// Whether `x[m, k] · w[n, k]^T` runs on hdb's own AVX-512 kernel (`xwt.rs`) rather than the
/// gemm crate: on AVX-512 CPUs, below [`SPLIT_COLS_MAX_ROWS`] rows (at the UNet's 8192 the
/// crate's own kernel is as fast: `hdb bench gemm`), at least one full register tile wide and
/// 16 deep (narrower products, LoRA's rank-4 factors say, would waste most of its lanes).
fn xwt_fits(m: usize, k: usize, n: usize) -> bool {
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    {
        m < SPLIT_COLS_MAX_ROWS && n >= 32 && k >= 16 && super::xwt::available()
    }
    #[cfg(not(all(target_arch = "x86_64", feature = "avx512")))]
    {
        let _ = (m, k, n);
        false
    }
}

pub(crate) fn par_for(macs: usize) -> Parallelism {
    let t = rayon::current_num_threads();
    if t > 1 && macs >= PAR_MIN_MACS {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// A strided f32 matrix operand: `ptr[i * rs + j * cs]` is element (i, j).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// The operand starting at `data[0]` with row stride `rs` and column stride `cs`.
    pub fn new(data: &[f32], rs: usize, cs: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            rs: rs as isize,
            cs: cs as isize,
        }
    }

    /// The same matrix read transposed.
    pub fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst[m, n] (row stride `dst_rs`, unit column stride) = (`acc` ? dst : 0) + `scale` * a · b.
///
/// # Safety
/// `dst` must be valid for writes of the m x n strided region, `a` for reads of m x k and `b`
/// of k x n, and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            acc,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y[m, n] = x[m, k] · w[n, k]^T + bias[n]` (PyTorch `Linear`).
pub fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(y.len(), extent("linear", &[m, n]), "linear: y");
    assert_eq!(x.len(), extent("linear", &[m, k]), "linear: x");
    assert_eq!(w.len(), extent("linear", &[n, k]), "linear: w");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias");
    }
    if xwt_fits(m, k, n) {
        // The kernel adds the bias as it stores its first k block: no separate pass over y.
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        return super::xwt::xwt(y, x, w, bias, m, k, n, false);
    }
    if let Some(b) = bias {
        if n > 0 {
            super::par_each(y, n * (super::PAR_CHUNK / n.max(1)).max(1), |rows| {
                for r in rows.chunks_exact_mut(n) {
                    r.copy_from_slice(b);
                }
            });
        }
    }
    let a = Mat::new(x, k, 1);
    let bt = Mat::new(w, 1, k);
    let macs = extent("linear", &[m, k, n]);
    if m < SPLIT_COLS_MAX_ROWS && n > SPLIT_COLS && macs >= PAR_MIN_MACS {
        // Column slices of SPLIT_COLS, in parallel, each one single-threaded GEMM. The slices
        // do not depend on the thread count, so neither do the results.
        use rayon::prelude::*;
        let y_addr = y.as_mut_ptr() as usize;
        (0..n.div_ceil(SPLIT_COLS)).into_par_iter().for_each(|c| {
            let j0 = c * SPLIT_COLS;
            let cols = SPLIT_COLS.min(n - j0);
            // SAFETY: the lengths were checked above; each task writes its own columns
            // j0..j0 + cols of y (row stride n) and reads rows j0.. of w.
            unsafe {
                gemm_raw(
                    (y_addr as *mut f32).add(j0),
                    n,
                    Mat::new(x, k, 1),
                    Mat::new(&w[j0 * k..], 1, k),
                    m,
                    k,
                    cols,
                    bias.is_some(),
                    1.0,
                    Parallelism::None,
                )
            }
        });
        return;
    }
    // SAFETY: the lengths were checked above; y is a distinct &mut.
    unsafe {
        gemm_raw(
            y.as_mut_ptr(),
            n,
            a,
            bt,
            m,
            k,
            n,
            bias.is_some(),
            1.0,
            par_for(macs),
        )
    }
}

/// c[m, n] (+)= a[m, k] · b, where b is [k, n], or [n, k] read transposed when
/// `b_transposed`. `accumulate` adds to c instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
    accumulate: bool,
) {
    assert_eq!(c.len(), extent("matmul", &[m, n]), "matmul: c");
    assert_eq!(a.len(), extent("matmul", &[m, k]), "matmul: a");
    assert_eq!(b.len(), extent("matmul", &[k, n]), "matmul: b");
    let am = Mat::new(a, k, 1);
    let bm = if b_transposed {
        Mat::new(b, 1, k)
    } else {
        Mat::new(b, n, 1)
    };
    // SAFETY: the lengths were checked above; c is a distinct &mut.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            n,
            am,
            bm,
            m,
            k,
            n,
            accumulate,
            1.0,
            par_for(extent("matmul", &[m, k, n])),
        )
    }
}

/// c[m, n] (+)= a^T · b, where a is [k, m] and b is [k, n] (a gradient's outer products summed
/// over k rows). `accumulate` adds to c instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_at(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "matmul_at: c");
    assert_eq!(a.len(), k * m, "matmul_at: a");
    assert_eq!(b.len(), k * n, "matmul_at: b");
    // SAFETY: the lengths were checked above; c is a distinct &mut.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            n,
            Mat::new(a, m, 1).t(),
            Mat::new(b, n, 1),
            m,
            k,
            n,
            accumulate,
            1.0,
            par_for(m * k * n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, rand_vec};

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, bt: bool) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let bv = if bt { b[j * k + p] } else { b[p * n + j] };
                    s += a[i * k + p] as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// Odd sizes, with and without bias; tolerance 1e-5 x max|ref|.
    #[test]
    fn linear_matches_naive() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 5),
            (33, 70, 19),
            (129, 65, 257),
            (300, 320, 31),
            (3, 0, 4),
        ] {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let b = rand_vec(n, 3);
            let r = naive(&x, &w, m, k, n, true);
            let mut y = vec![f32::NAN; m * n];
            linear(&mut y, &x, &w, Some(&b), m, k, n);
            let want: Vec<f32> = (0..m * n)
                .map(|i| (r[i] + b[i % n] as f64) as f32)
                .collect();
            assert_close(&format!("linear {m}x{k}x{n} bias"), &y, &want, 1e-5);
            linear(&mut y, &x, &w, None, m, k, n);
            let want: Vec<f32> = r.iter().map(|&v| v as f32).collect();
            assert_close(&format!("linear {m}x{k}x{n}"), &y, &want, 1e-5);
        }
    }

    /// a read transposed, overwrite and accumulate; tolerance 1e-5 x max|ref|.
    #[test]
    fn matmul_at_matches_naive() {
        for &(m, k, n) in &[(1, 9, 1), (17, 31, 23), (4, 300, 40)] {
            let a = rand_vec(k * m, 7);
            let b = rand_vec(k * n, 8);
            let at: Vec<f32> = (0..m * k).map(|i| a[(i % k) * m + i / k]).collect();
            let r = naive(&at, &b, m, k, n, false);
            let c0 = rand_vec(m * n, 9);
            for acc in [false, true] {
                let mut c = c0.clone();
                matmul_at(&mut c, &a, &b, m, k, n, acc);
                let want: Vec<f32> = r
                    .iter()
                    .zip(&c0)
                    .map(|(&v, &c)| (v + if acc { c as f64 } else { 0.0 }) as f32)
                    .collect();
                assert_close(&format!("matmul_at {m}x{k}x{n} acc={acc}"), &c, &want, 1e-5);
            }
        }
    }

    /// Both b layouts, overwrite and accumulate; tolerance 1e-5 x max|ref|.
    #[test]
    fn matmul_matches_naive() {
        for &(m, k, n) in &[(1, 9, 1), (17, 31, 23), (64, 77, 40), (200, 129, 150)] {
            let a = rand_vec(m * k, 4);
            let b = rand_vec(k * n, 5);
            let c0 = rand_vec(m * n, 6);
            for bt in [false, true] {
                let r = naive(&a, &b, m, k, n, bt);
                let mut c = c0.clone();
                matmul(&mut c, &a, &b, m, k, n, bt, false);
                let want: Vec<f32> = r.iter().map(|&v| v as f32).collect();
                assert_close(&format!("matmul {m}x{k}x{n} bt={bt}"), &c, &want, 1e-5);
                let mut c = c0.clone();
                matmul(&mut c, &a, &b, m, k, n, bt, true);
                let want: Vec<f32> = r
                    .iter()
                    .zip(&c0)
                    .map(|(&v, &c)| (v + c as f64) as f32)
                    .collect();
                assert_close(&format!("matmul {m}x{k}x{n} bt={bt} acc"), &c, &want, 1e-5);
            }
        }
    }
}
