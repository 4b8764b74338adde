//! 2-D convolution (NCHW, PyTorch weight layout) as im2col + GEMM.
//!
//! `y[b]` (c_out x HWo) = W (c_out x c_in*k*k) · col (c_in*k*k x HWo), with `col` built for a
//! bounded number of output columns at a time, so the extra memory stays a few MB per thread
//! whatever the image size. Strategy by shape:
//! - 3x3, stride 1, padding 1 with planes of 32x32 and more: Winograd F(2x2, 3x3)
//!   (`super::winograd`), 2.25x fewer FLOPs than im2col's GEMM.
//! - 1x1, stride 1, no padding: `col` is the input itself (no copy); one GEMM per image,
//!   split across the pool's threads.
//! - Small outputs (HWo below `GROUP_BELOW`, batch > 1): several images share one GEMM
//!   (columns of image after image) into a scratch output, so a large weight
//!   (1280x1280x3x3 = 59 MB at 8x8 and 16x16) is streamed once per group, not per image.
//! - Large outputs with 2+ threads: each rayon task builds the im2col of 128-512 columns of
//!   one image in its own thread's workspace and runs a single-threaded GEMM into y
//!   (`per_worker`).
//! - Otherwise (one thread, or too few chunks to share): per image, chunks of up to
//!   `COL_BUDGET` floats, each one GEMM split across threads.
//!
//! Workspaces are per-thread and kept between calls (see `WORKSPACE`).
//!
//! Tried and dropped: 3x3/stride 1 as nine shifted GEMMs over three zero-bordered copies of
//! the input (3x the input instead of 9x; same speed as im2col within noise, more code).

use super::linear::{gemm_raw, par_for, Mat};
use super::{extent, SendPtr};
use crate::backend::api::Conv2d;
use gemm::Parallelism;
use rayon::prelude::*;

/// Most f32 elements of an im2col buffer (8 MB; 320 ch at 64x64 takes 3 chunks per image).
/// Measured at SD shapes on 2 Zen cores (2 MB L2 each, 32 MB shared L3): 1-2 MB chunks are
/// 10-30% slower (the weight is re-packed per chunk), 8-64 MB are equal within the noise of
/// a shared machine, so the smallest of those.
const COL_BUDGET: usize = 1 << 21;

/// Per-worker im2col chunk (`per_worker`): at most this many f32 per worker (4 MB)...
const WORKER_BUDGET: usize = 1 << 20;
/// ...and this many over all workers (32 MB), so many-thread pools take smaller chunks.
const WORKERS_BUDGET: usize = 1 << 23;
/// Chunk width bounds: below 128 columns re-packing the weight per chunk dominates; above
/// 512 the chunk leaves L2 for no gain (measured: 128-384 equal, 512 x 11520 rows 2x slower).
const WORKER_MIN_COLS: usize = 128;
const WORKER_MAX_COLS: usize = 512;

/// Output planes smaller than this share GEMMs across images.
const GROUP_BELOW: usize = 1024;

/// The ways [`conv2d`] computes a convolution (the module doc's strategies).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// Small output planes, batch > 1: images share one im2col GEMM.
    Grouped,
    /// 3x3, stride 1, padding 1 from 32x32 up (`super::winograd`).
    Winograd,
    /// 1x1, stride 1, no padding: the input is the GEMM operand.
    Direct,
    /// im2col chunks, per worker or shared.
    Im2col,
}

/// The path [`conv2d`] takes for `p`: the one place that decides it.
fn path(p: &Conv2d) -> Path {
    let (ho, wo) = p.out_hw();
    if ho.saturating_mul(wo) < GROUP_BELOW && p.batch > 1 {
        Path::Grouped
    } else if super::winograd::applies(p) {
        Path::Winograd
    } else if p.kernel == 1 && p.stride == 1 && p.padding == 0 {
        Path::Direct
    } else {
        Path::Im2col
    }
}

/// The algorithm [`conv2d`] runs for `p` ("grouped im2col", "winograd F(2x2,3x3)", "1x1 GEMM"
/// or "im2col"), for benchmark reports.
pub fn algorithm(p: &Conv2d) -> &'static str {
    match path(p) {
        Path::Grouped => "grouped im2col",
        Path::Winograd => "winograd F(2x2,3x3)",
        Path::Direct => "1x1 GEMM",
        Path::Im2col => "im2col",
    }
}

/// y = conv2d(x, weight) + bias; see [`Conv2d`] for the layouts.
pub fn conv2d(y: &mut [f32], x: &[f32], weight: &[f32], bias: Option<&[f32]>, p: &Conv2d) {
    assert!(
        p.kernel > 0 && p.stride > 0,
        "conv2d: kernel and stride must be positive: {p:?}"
    );
    let (ho, wo) = p.out_hw();
    let n_out = extent("conv2d", &[ho, wo]);
    let n_in = extent("conv2d", &[p.h, p.w]);
    let kdim = extent("conv2d", &[p.c_in, p.kernel, p.kernel]);
    assert_eq!(
        x.len(),
        extent("conv2d", &[p.batch, p.c_in, n_in]),
        "conv2d: x for {p:?}"
    );
    assert_eq!(
        weight.len(),
        extent("conv2d", &[p.c_out, kdim]),
        "conv2d: weight for {p:?}"
    );
    assert_eq!(
        y.len(),
        extent("conv2d", &[p.batch, p.c_out, n_out]),
        "conv2d: y for {p:?}"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), p.c_out, "conv2d: bias for {p:?}");
    }
    if y.is_empty() {
        return;
    }
    let path = path(p);
    let w = Mat::new(weight, kdim, 1);
    match path {
        Path::Grouped => return grouped(y, x, w, bias, p, kdim, n_out, n_in),
        Path::Winograd => return super::winograd::conv3x3(y, x, weight, bias, p),
        Path::Direct | Path::Im2col => {}
    }
    if let Some(b) = bias {
        fill_bias(y, b, n_out);
    }
    let acc = bias.is_some();
    if path == Path::Direct {
        for (yb, xb) in y
            .chunks_exact_mut(p.c_out * n_out)
            .zip(x.chunks_exact(p.c_in * n_in))
        {
            let xm = Mat::new(xb, n_in, 1);
            // SAFETY: yb is c_out x n_out, xb c_in x n_in (= n_out), w c_out x c_in.
            unsafe {
                gemm_raw(
                    yb.as_mut_ptr(),
                    n_out,
                    w,
                    xm,
                    p.c_out,
                    kdim,
                    n_out,
                    acc,
                    1.0,
                    par_for(p.c_out * kdim * n_out),
                )
            };
        }
        return;
    }
    let threads = rayon::current_num_threads();
    if let Some(nc) = worker_chunk(kdim, p.batch, n_out, threads) {
        per_worker(y, x, weight, acc, p, kdim, n_out, nc);
        return;
    }
    let nc = chunk_cols(kdim, n_out);
    with_workspace(kdim * nc, |col| {
        for (yb, xb) in y
            .chunks_exact_mut(p.c_out * n_out)
            .zip(x.chunks_exact(p.c_in * n_in))
        {
            let mut c0 = 0;
            while c0 < n_out {
                let ncols = nc.min(n_out - c0);
                let col = &mut col[..kdim * ncols];
                im2col(col, xb, p, wo, c0, ncols);
                let cm = Mat::new(col, ncols, 1);
                // SAFETY: columns c0..c0+ncols of the c_out x n_out block yb (row stride n_out);
                // col is kdim x ncols; w is c_out x kdim.
                unsafe {
                    gemm_raw(
                        yb.as_mut_ptr().add(c0),
                        n_out,
                        w,
                        cm,
                        p.c_out,
                        kdim,
                        ncols,
                        acc,
                        1.0,
                        par_for(p.c_out * kdim * ncols),
                    )
                };
                c0 += ncols;
            }
        }
    });
}

thread_local! {
    /// im2col (and grouped-output) workspace of a thread, kept between calls: a fresh
    /// multi-MB allocation per convolution costs page faults on every call. On the calling
    /// thread it grows to max(COL_BUDGET, kdim x HWo) plus one grouped output block (at SD
    /// 1.5 shapes at most 13 MB: 1280 channels, 3x3, 16x16); on other pool threads
    /// (`per_worker`) to at most max(WORKER_BUDGET, 128 kdim) floats (4 MB; 5.9 MB for
    /// 1280 input channels); Winograd tasks take up to 16 MB on any thread.
    static WORKSPACE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with a workspace of at least `len` floats (contents unspecified).
pub(super) fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => {
            if ws.len() < len {
                ws.resize(len, 0.0);
            }
            f(&mut ws[..len])
        }
        // Re-entered on this thread (a conv inside a conv's rayon task): use a fresh buffer.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Columns of one worker's im2col chunk, or None when the shared-GEMM path should run
/// (one thread, or too few chunks to keep the threads busy).
fn worker_chunk(kdim: usize, batch: usize, n_out: usize, threads: usize) -> Option<usize> {
    if threads < 2 {
        return None;
    }
    let budget = WORKER_BUDGET.min(WORKERS_BUDGET / threads);
    let nc = (budget / kdim.max(1)).clamp(WORKER_MIN_COLS, WORKER_MAX_COLS);
    // At least two chunks per thread, so uneven chunk times still balance.
    let per_image = n_out.div_ceil(nc);
    if batch * per_image < 2 * threads {
        return None;
    }
    Some(n_out.div_ceil(per_image).div_ceil(16) * 16)
}

/// Each rayon task takes one image's `nc` output columns: im2col into its thread's
/// workspace (a few MB: stays in L2/L3), then a single-threaded GEMM into y. Measured on 2
/// threads this is 10-25% faster than building a big shared chunk and splitting one GEMM
/// across threads (less L3 traffic and no GEMM-internal synchronisation), even though each
/// task re-packs the weight.
#[allow(clippy::too_many_arguments)]
fn per_worker(
    y: &mut [f32],
    x: &[f32],
    weight: &[f32],
    acc: bool,
    p: &Conv2d,
    kdim: usize,
    n_out: usize,
    nc: usize,
) {
    let wo = p.out_hw().1;
    let n_in = p.h * p.w;
    let chunks = n_out.div_ceil(nc);
    let yp = SendPtr(y.as_mut_ptr());
    (0..p.batch * chunks).into_par_iter().for_each(|t| {
        let (b, c0) = (t / chunks, (t % chunks) * nc);
        let ncols = nc.min(n_out - c0);
        let xb = &x[b * p.c_in * n_in..(b + 1) * p.c_in * n_in];
        with_workspace(kdim * ncols, |col| {
            for (r, row) in col.chunks_exact_mut(ncols).enumerate() {
                im2col_row(row, xb, p, wo, r, c0);
            }
            let w = Mat::new(weight, kdim, 1);
            let cm = Mat::new(col, ncols, 1);
            // SAFETY: y has batch * c_out * n_out elements; this task writes rows co of
            // image b, columns c0..c0+ncols only, and tasks cover disjoint (b, column)
            // ranges. col is kdim x ncols, weight c_out x kdim.
            unsafe {
                let dst = yp.get().add(b * p.c_out * n_out + c0);
                gemm_raw(
                    dst,
                    n_out,
                    w,
                    cm,
                    p.c_out,
                    kdim,
                    ncols,
                    acc,
                    1.0,
                    Parallelism::None,
                )
            };
        });
    });
}

/// Columns per im2col chunk: as many as the budget allows, split evenly, multiple of 16.
fn chunk_cols(kdim: usize, total: usize) -> usize {
    let max = (COL_BUDGET / kdim.max(1)).max(16) / 16 * 16;
    let chunks = total.div_ceil(max);
    total.div_ceil(chunks).div_ceil(16) * 16
}

/// y[b, c, :] = bias[c].
fn fill_bias(y: &mut [f32], bias: &[f32], n_out: usize) {
    let c_out = bias.len();
    let run = |i0: usize, ys: &mut [f32]| {
        for (j, plane) in ys.chunks_exact_mut(n_out).enumerate() {
            plane.fill(bias[(i0 + j) % c_out]);
        }
    };
    let planes = (super::PAR_CHUNK / n_out).max(1);
    if y.len() < super::PAR_MIN || rayon::current_num_threads() == 1 {
        run(0, y);
    } else {
        y.par_chunks_mut(planes * n_out)
            .enumerate()
            .for_each(|(i, ys)| run(i * planes, ys));
    }
}

/// Small output planes: groups of `g` images share one GEMM into a scratch
/// [c_out, g * n_out], scattered (with bias) into y.
#[allow(clippy::too_many_arguments)]
fn grouped(
    y: &mut [f32],
    x: &[f32],
    w: Mat,
    bias: Option<&[f32]>,
    p: &Conv2d,
    kdim: usize,
    n_out: usize,
    n_in: usize,
) {
    let g = (COL_BUDGET / (kdim * n_out).max(1)).clamp(1, p.batch);
    with_workspace((kdim + p.c_out) * g * n_out, |ws| {
        let (col, tmp) = ws.split_at_mut(kdim * g * n_out);
        grouped_in(y, x, w, bias, p, kdim, n_out, n_in, g, col, tmp)
    })
}

#[allow(clippy::too_many_arguments)]
fn grouped_in(
    y: &mut [f32],
    x: &[f32],
    w: Mat,
    bias: Option<&[f32]>,
    p: &Conv2d,
    kdim: usize,
    n_out: usize,
    n_in: usize,
    g: usize,
    col: &mut [f32],
    tmp: &mut [f32],
) {
    let wo = p.out_hw().1;
    let mut b0 = 0;
    while b0 < p.batch {
        let gb = g.min(p.batch - b0);
        let ncols = gb * n_out;
        let col = &mut col[..kdim * ncols];
        let xg = &x[b0 * p.c_in * n_in..(b0 + gb) * p.c_in * n_in];
        // col row r holds image after image: [r, bi * n_out + q].
        let row_task = |r: usize, row: &mut [f32]| {
            for (bi, seg) in row.chunks_exact_mut(n_out).enumerate() {
                im2col_row(
                    seg,
                    &xg[bi * p.c_in * n_in..(bi + 1) * p.c_in * n_in],
                    p,
                    wo,
                    r,
                    0,
                );
            }
        };
        par_rows(col, ncols, row_task);
        let tmp = &mut tmp[..p.c_out * ncols];
        let cm = Mat::new(col, ncols, 1);
        // SAFETY: tmp is c_out x ncols, col kdim x ncols, w c_out x kdim.
        unsafe {
            gemm_raw(
                tmp.as_mut_ptr(),
                ncols,
                w,
                cm,
                p.c_out,
                kdim,
                ncols,
                false,
                1.0,
                par_for(p.c_out * kdim * ncols),
            )
        };
        // Scatter: y[b0 + bi, co, :] = tmp[co, bi * n_out ..] + bias[co].
        let yg = &mut y[b0 * p.c_out * n_out..(b0 + gb) * p.c_out * n_out];
        let tmp = &*tmp;
        let scatter = |i: usize, plane: &mut [f32]| {
            let (bi, co) = (i / p.c_out, i % p.c_out);
            let src = &tmp[co * ncols + bi * n_out..co * ncols + (bi + 1) * n_out];
            match bias {
                Some(b) => {
                    let bv = b[co];
                    for (d, &s) in plane.iter_mut().zip(src) {
                        *d = s + bv;
                    }
                }
                None => plane.copy_from_slice(src),
            }
        };
        if yg.len() < super::PAR_MIN || rayon::current_num_threads() == 1 {
            yg.chunks_exact_mut(n_out)
                .enumerate()
                .for_each(|(i, pl)| scatter(i, pl));
        } else {
            yg.par_chunks_mut(n_out)
                .enumerate()
                .with_min_len(16)
                .for_each(|(i, pl)| scatter(i, pl));
        }
        b0 += gb;
    }
}

/// Runs `f(r, row)` over the `ncols`-long rows of `col`, in parallel when large.
fn par_rows(col: &mut [f32], ncols: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if col.len() < super::PAR_MIN || rayon::current_num_threads() == 1 {
        col.chunks_exact_mut(ncols)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        let min = (super::PAR_CHUNK / ncols).max(1);
        col.par_chunks_mut(ncols)
            .enumerate()
            .with_min_len(min)
            .for_each(|(r, row)| f(r, row));
    }
}

/// col [kdim, ncols] = the im2col rows for output positions c0..c0+ncols of one image xb.
fn im2col(col: &mut [f32], xb: &[f32], p: &Conv2d, wo: usize, c0: usize, ncols: usize) {
    par_rows(col, ncols, |r, row| im2col_row(row, xb, p, wo, r, c0));
}

/// One im2col row r = (ci, ky, kx): row[q] = x[ci, oy*s + ky - pad, ox*s + kx - pad] (0
/// outside the image) for output position c0 + q = oy * wo + ox.
fn im2col_row(row: &mut [f32], xb: &[f32], p: &Conv2d, wo: usize, r: usize, c0: usize) {
    let kk = p.kernel * p.kernel;
    let (ci, ky, kx) = (r / kk, (r % kk) / p.kernel, r % p.kernel);
    let plane = &xb[ci * p.h * p.w..(ci + 1) * p.h * p.w];
    let (s, pad) = (p.stride, p.padding);
    // Output columns ox with 0 <= ox*s + kx - pad < w: ox in [ox_lo, ox_hi).
    let ox_lo = if pad > kx { (pad - kx).div_ceil(s) } else { 0 }.min(wo);
    let ox_hi = if p.w + pad > kx {
        (p.w + pad - kx).div_ceil(s)
    } else {
        0
    }
    .clamp(ox_lo, wo);
    let mut q = 0;
    let mut pos = c0;
    while q < row.len() {
        let (oy, ox0) = (pos / wo, pos % wo);
        let n = (wo - ox0).min(row.len() - q);
        let seg = &mut row[q..q + n];
        let iy = (oy * s + ky) as isize - pad as isize;
        if iy < 0 || iy >= p.h as isize {
            seg.fill(0.0);
        } else {
            let src = &plane[iy as usize * p.w..(iy as usize + 1) * p.w];
            // Segment covers ox0..ox0+n; valid part [a, b) clipped to it.
            let a = ox_lo.clamp(ox0, ox0 + n);
            let b = ox_hi.clamp(a, ox0 + n);
            seg[..a - ox0].fill(0.0);
            seg[b - ox0..].fill(0.0);
            if b > a {
                let ix0 = a * s + kx - pad;
                let dst = &mut seg[a - ox0..b - ox0];
                let len = b - a;
                // Source elements ix0, ix0 + s, ..., ix0 + (len - 1) s; `chunks(s)` of that
                // span yields exactly len pieces, each starting with one of them.
                let span = &src[ix0..ix0 + (len - 1) * s + 1];
                match s {
                    1 => dst.copy_from_slice(span),
                    2 => gather(dst, span, 2),
                    _ => gather(dst, span, s),
                }
            }
        }
        q += n;
        pos += n;
    }
}

/// dst[j] = span[j * s], where span.len() = (dst.len() - 1) * s + 1. All but the last
/// element come from `chunks_exact(s)`, which LLVM vectorises (strided loads become
/// shuffles) once `s` is a constant.
#[inline(always)]
fn gather(dst: &mut [f32], span: &[f32], s: usize) {
    if let Some((last, head)) = dst.split_last_mut() {
        for (d, c) in head.iter_mut().zip(span.chunks_exact(s)) {
            *d = c[0];
        }
        *last = span[span.len() - 1];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, fixture, fixtures, rand_vec, TORCH_TOL};

    fn conv_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, p: &Conv2d) -> Vec<f32> {
        let (ho, wo) = p.out_hw();
        let k = p.kernel;
        let mut y = vec![0f32; p.batch * p.c_out * ho * wo];
        for bi in 0..p.batch {
            for co in 0..p.c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = b.map_or(0.0, |b| b[co] as f64);
                        for ci in 0..p.c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                                    let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                                    if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < p.h
                                        && (ix as usize) < p.w
                                    {
                                        let xv = x[((bi * p.c_in + ci) * p.h + iy as usize) * p.w
                                            + ix as usize];
                                        s += xv as f64
                                            * w[((co * p.c_in + ci) * k + ky) * k + kx] as f64;
                                    }
                                }
                            }
                        }
                        y[((bi * p.c_out + co) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        y
    }

    fn check(p: Conv2d, with_bias: bool) {
        let (ho, wo) = p.out_hw();
        let x = rand_vec(p.batch * p.c_in * p.h * p.w, 30);
        let w = rand_vec(p.c_out * p.c_in * p.kernel * p.kernel, 31);
        let b = rand_vec(p.c_out, 32);
        let bias = with_bias.then_some(&b[..]);
        let want = conv_ref(&x, &w, bias, &p);
        // 1 thread: shared-GEMM chunks; 3 threads: per-worker chunks where there are enough.
        for threads in [1, 3] {
            let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                Ok(pool) => pool,
                Err(e) => panic!("thread pool: {e}"),
            };
            let mut y = vec![f32::NAN; p.batch * p.c_out * ho * wo];
            pool.install(|| conv2d(&mut y, &x, &w, bias, &p));
            let name = format!("conv2d {p:?} bias={with_bias} threads={threads}");
            assert_close(&name, &y, &want, 1e-5);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shape(
        batch: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Conv2d {
        Conv2d {
            batch,
            c_in,
            h,
            w,
            c_out,
            kernel,
            stride,
            padding,
        }
    }

    /// Naive f64 reference over odd shapes, each path (direct 1x1, grouped small planes,
    /// shared-GEMM chunks with 1 thread, per-worker chunks with 3, several chunks per image),
    /// stride 1 and 2; tolerance 1e-5 x max|ref|.
    #[test]
    fn conv2d_matches_naive() {
        for with_bias in [true, false] {
            check(shape(2, 5, 7, 6, 4, 3, 1, 1), with_bias);
            check(shape(2, 5, 7, 6, 3, 1, 1, 0), with_bias);
            check(shape(2, 5, 7, 6, 4, 3, 2, 1), with_bias);
            check(shape(1, 3, 9, 11, 5, 3, 2, 1), with_bias);
            check(shape(3, 4, 5, 5, 2, 5, 1, 2), with_bias);
            check(shape(1, 2, 3, 3, 2, 3, 1, 0), with_bias);
        }
        // Large planes: per-image path, direct and im2col.
        check(shape(2, 3, 33, 35, 7, 3, 1, 1), true);
        check(shape(2, 6, 33, 35, 5, 1, 1, 0), true);
        check(shape(1, 4, 65, 63, 3, 3, 2, 1), true);
        // Several column chunks per image: shared (kdim * n_out > COL_BUDGET) and per worker.
        check(shape(1, 520, 45, 47, 3, 3, 1, 1), true);
        check(shape(2, 40, 41, 39, 6, 3, 2, 1), false);
        // Winograd F(2x2, 3x3) (3x3, stride 1, padding 1, planes of 32x32 and more): odd and
        // even heights and widths (partial tiles), one and several tile rows per task.
        for (h, w) in [(32, 32), (33, 35), (35, 33), (31, 40), (64, 17)] {
            check(shape(2, 9, h, w, 10, 3, 1, 1), true);
        }
        check(shape(1, 130, 45, 47, 8, 3, 1, 1), false);
        check(shape(3, 8, 1, 1500, 12, 3, 1, 1), true);
        check(shape(1, 8, 1500, 1, 12, 3, 1, 1), true);
    }

    /// Against PyTorch `F.conv2d` (im2col, 1x1 and Winograd paths); tolerance 1e-5 x max|ref|.
    #[test]
    fn conv2d_matches_torch() {
        let f = fixtures();
        for (key, kernel, stride, padding, c_out) in [
            ("conv3x3", 3, 1, 1, 4),
            ("conv1x1", 1, 1, 0, 3),
            ("conv3x3s2", 3, 2, 1, 4),
        ] {
            let x = fixture(&f, &format!("{key}.x"));
            let w = fixture(&f, &format!("{key}.w"));
            let b = fixture(&f, &format!("{key}.b"));
            let want = fixture(&f, &format!("{key}.y"));
            assert_eq!(w.len(), c_out * 5 * kernel * kernel, "{key}.w shape");
            let p = shape(2, 5, 7, 6, c_out, kernel, stride, padding);
            let mut y = vec![0f32; want.len()];
            conv2d(&mut y, &x, &w, Some(&b), &p);
            assert_close(&format!("torch {key}"), &y, &want, TORCH_TOL);
        }
        // The Winograd path (a 33x34 plane), one thread and three.
        let key = "conv3x3_wino";
        let [x, w, b, want] = ["x", "w", "b", "y"].map(|s| fixture(&f, &format!("{key}.{s}")));
        let p = shape(2, 16, 33, 34, 12, 3, 1, 1);
        assert_eq!(path(&p), Path::Winograd, "{p:?}");
        assert_eq!(
            (x.len(), w.len()),
            (2 * 16 * 33 * 34, 12 * 16 * 9),
            "{key} shapes"
        );
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            let pool = pool.unwrap_or_else(|e| panic!("thread pool: {e}"));
            let mut y = vec![f32::NAN; want.len()];
            pool.install(|| conv2d(&mut y, &x, &w, Some(&b), &p));
            assert_close(
                &format!("torch {key}, {threads} threads"),
                &y,
                &want,
                TORCH_TOL,
            );
        }
    }
}
