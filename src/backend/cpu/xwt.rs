//! `y[m, n] (+)= x[m, k] · w[n, k]^T` on AVX-512, for the linear layers of up to a few thousand
//! rows (the text encoder's 154, the ViT-H/14's 257, the hypernetwork decoder's 176, the UNet at
//! 32x32 and below), where the gemm crate reached only 63-90% of MKL's speed on an Intel Xeon
//! (`hdb bench gemm`, docs/perf.md 2026-12-08, session 6).
//!
//! BLIS-style, with the roles chosen for `x · w^T`:
//! - w is packed one 32-row panel at a time into `[kc][32]` (a 16 x 16 register transpose), so
//!   each k step loads two vectors of 16 outputs' weights (packing is 10-12% of the time at
//!   the hypernetwork's shapes; software prefetch of the next panel changed nothing measurable);
//! - x is packed per k block into 14-row panels `[kc][14]`, read back as broadcasts;
//! - the register tile is 14 rows x 32 columns: 28 accumulators, two weight vectors and one
//!   broadcast of the 32 registers. It runs at 98% of the FMA peak on data in L1.
//!
//! Blocks: k in chunks of [`KC`] (a panel of w is 32 KB), columns in chunks of [`NC`] so the
//! rows of y being accumulated stay in L2. Up to [`SPLIT_N_MAX_M`] rows, x is packed once and
//! tasks take 128-column chunks (each streams only its part of w); above it, tasks take blocks
//! of [`MC`] rows. Tasks are smaller than a thread's share and taken dynamically, so one core
//! slowed by other work does not hold up the product. Every output is summed in the same order
//! (k blocks of [`KC`], each block's FMAs in k order) whatever the thread count or split, so
//! results do not depend on the number of threads.

use std::arch::x86_64::*;
use std::cell::RefCell;

use super::SendPtr;

/// Columns of the register tile (two AVX-512 vectors).
const NR: usize = 32;
/// Rows of the register tile.
const MR: usize = 14;
/// k block: one packed panel of w is KC x 32 floats (32 KB).
const KC: usize = 256;
/// Column block: the rows of y accumulated across k blocks (m x NC floats) stay in L2.
const NC: usize = 1024;
/// Row block when rows are split across threads.
const MC: usize = 476;
/// Up to this many rows, tasks take column chunks; above, row blocks.
const SPLIT_N_MAX_M: usize = 1024;
/// Panels of w per column task (128 columns).
const CHUNK_PANELS: usize = 4;

/// Per-thread packing buffers, kept between calls (a fresh allocation per call would fault its
/// pages in every time).
struct Bufs {
    w: Vec<f32>,
    x: Vec<f32>,
}

std::thread_local! {
    /// All of x packed, on the thread that called [`xwt`], read by its tasks.
    static XPACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static BUFS: RefCell<Bufs> = const { RefCell::new(Bufs { w: Vec::new(), x: Vec::new() }) };
}

/// Transposes the 16 x 16 block held in `r` (row i in r[i]) in registers.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    // 32-bit interleave of row pairs, then 64-bit interleave of pair pairs: r[4i + c] holds,
    // in each 128-bit lane L, column 4L + c of rows 4i..4i+3.
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a0, a1) = (_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 1]));
        let (b0, b1) = (
            _mm512_castps_pd(t[4 * i + 2]),
            _mm512_castps_pd(t[4 * i + 3]),
        );
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
    }
    // Gather lane L of the four row groups into output row 4L + c.
    for c in 0..4 {
        let (g0, g1, g2, g3) = (r[c], r[4 + c], r[8 + c], r[12 + c]);
        let s0 = _mm512_shuffle_f32x4::<0b10_00_10_00>(g0, g1);
        let s1 = _mm512_shuffle_f32x4::<0b11_01_11_01>(g0, g1);
        let s2 = _mm512_shuffle_f32x4::<0b10_00_10_00>(g2, g3);
        let s3 = _mm512_shuffle_f32x4::<0b11_01_11_01>(g2, g3);
        t[c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(s0, s2);
        t[8 + c] = _mm512_shuffle_f32x4::<0b11_01_11_01>(s0, s2);
        t[4 + c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(s1, s3);
        t[12 + c] = _mm512_shuffle_f32x4::<0b11_01_11_01>(s1, s3);
    }
    *r = t;
}

/// Packs rows 0..nr (nr <= 32) of `w` (row stride `ldw`), columns 0..kc, into
/// `dst[p * 32 + j]`, zero padded to 32 columns.
///
/// # Safety
/// `w` must be readable for nr rows of kc, `dst` writable for kc * 32 floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_w(dst: *mut f32, w: *const f32, ldw: usize, nr: usize, kc: usize) {
    if nr < NR {
        for p in 0..kc {
            for j in 0..NR {
                *dst.add(p * NR + j) = if j < nr { *w.add(j * ldw + p) } else { 0.0 };
            }
        }
        return;
    }
    let mut p = 0;
    while p + 16 <= kc {
        for half in 0..2 {
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, rj) in r.iter_mut().enumerate() {
                let row = half * 16 + j;
                *rj = _mm512_loadu_ps(w.add(row * ldw + p));
            }
            transpose16(&mut r);
            for (q, rq) in r.iter().enumerate() {
                _mm512_storeu_ps(dst.add((p + q) * NR + half * 16), *rq);
            }
        }
        p += 16;
    }
    for p in p..kc {
        for j in 0..NR {
            *dst.add(p * NR + j) = *w.add(j * ldw + p);
        }
    }
}

/// Packs rows 0..mr (mr <= 14) of `x` (row stride `ldx`), columns 0..kc, into `dst[p * mr + i]`.
///
/// # Safety
/// `x` must be readable for mr rows of kc, `dst` writable for kc * mr floats.
#[target_feature(enable = "avx512f")]
unsafe fn pack_x(dst: *mut f32, x: *const f32, ldx: usize, mr: usize, kc: usize) {
    let mask = ((1u32 << mr) - 1) as __mmask16;
    let mut p = 0;
    while p + 16 <= kc {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, ri) in r.iter_mut().enumerate().take(mr) {
            *ri = _mm512_loadu_ps(x.add(i * ldx + p));
        }
        transpose16(&mut r);
        for (q, rq) in r.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add((p + q) * mr), mask, *rq);
        }
        p += 16;
    }
    for p in p..kc {
        for i in 0..mr {
            *dst.add(p * mr + i) = *x.add(i * ldx + p);
        }
    }
}

/// The register tile: y[0..M, 0..nr] (+)= xp · wp over kc steps, from packed x (`xp[p * M + i]`)
/// and packed w (`wp[p * 32 + j]`); y's rows are `ldy` apart. `load`: add to y's contents;
/// otherwise, unless `bias` is null, add `bias[0..nr]` to every row.
///
/// # Safety
/// `xp` readable for kc * M floats, `wp` for kc * 32, y read/writable for M rows of nr, `bias`
/// null or readable for nr floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const M: usize>(
    kc: usize,
    xp: *const f32,
    wp: *const f32,
    y: *mut f32,
    ldy: usize,
    nr: usize,
    load: bool,
    bias: *const f32,
) {
    let mut acc0 = [_mm512_setzero_ps(); M];
    let mut acc1 = [_mm512_setzero_ps(); M];
    if load {
        // y's tile is needed only at the end: start fetching it now.
        for i in 0..M {
            _mm_prefetch::<_MM_HINT_T0>(y.add(i * ldy) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(y.add(i * ldy + 16) as *const i8);
        }
    }
    let (mut xp, mut wp) = (xp, wp);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(wp);
        let b1 = _mm512_loadu_ps(wp.add(16));
        for i in 0..M {
            let a = _mm512_set1_ps(*xp.add(i));
            acc0[i] = _mm512_fmadd_ps(a, b0, acc0[i]);
            acc1[i] = _mm512_fmadd_ps(a, b1, acc1[i]);
        }
        xp = xp.add(M);
        wp = wp.add(NR);
    }
    let m0 = if nr >= 16 {
        0xffff
    } else {
        ((1u32 << nr) - 1) as __mmask16
    };
    let m1 = if nr >= NR {
        0xffff
    } else if nr <= 16 {
        0
    } else {
        ((1u32 << (nr - 16)) - 1) as __mmask16
    };
    let with_bias = !load && !bias.is_null();
    let (b0, b1) = if with_bias {
        (
            _mm512_maskz_loadu_ps(m0, bias),
            _mm512_maskz_loadu_ps(m1, bias.add(16)),
        )
    } else {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    };
    for i in 0..M {
        let yr = y.add(i * ldy);
        if load {
            acc0[i] = _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, yr));
            acc1[i] = _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, yr.add(16)));
        } else if with_bias {
            acc0[i] = _mm512_add_ps(acc0[i], b0);
            acc1[i] = _mm512_add_ps(acc1[i], b1);
        }
        _mm512_mask_storeu_ps(yr, m0, acc0[i]);
        _mm512_mask_storeu_ps(yr.add(16), m1, acc1[i]);
    }
}

/// [`tile`] for `mr` rows (1..=14).
///
/// # Safety
/// As [`tile`] with M = mr.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile_rows(
    mr: usize,
    kc: usize,
    xp: *const f32,
    wp: *const f32,
    y: *mut f32,
    ldy: usize,
    nr: usize,
    load: bool,
    bias: *const f32,
) {
    match mr {
        14 => tile::<14>(kc, xp, wp, y, ldy, nr, load, bias),
        13 => tile::<13>(kc, xp, wp, y, ldy, nr, load, bias),
        12 => tile::<12>(kc, xp, wp, y, ldy, nr, load, bias),
        11 => tile::<11>(kc, xp, wp, y, ldy, nr, load, bias),
        10 => tile::<10>(kc, xp, wp, y, ldy, nr, load, bias),
        9 => tile::<9>(kc, xp, wp, y, ldy, nr, load, bias),
        8 => tile::<8>(kc, xp, wp, y, ldy, nr, load, bias),
        7 => tile::<7>(kc, xp, wp, y, ldy, nr, load, bias),
        6 => tile::<6>(kc, xp, wp, y, ldy, nr, load, bias),
        5 => tile::<5>(kc, xp, wp, y, ldy, nr, load, bias),
        4 => tile::<4>(kc, xp, wp, y, ldy, nr, load, bias),
        3 => tile::<3>(kc, xp, wp, y, ldy, nr, load, bias),
        2 => tile::<2>(kc, xp, wp, y, ldy, nr, load, bias),
        1 => tile::<1>(kc, xp, wp, y, ldy, nr, load, bias),
        _ => unreachable!("xwt: tile of {mr} rows"),
    }
}

/// The operands of one call, shared by its threads.
#[derive(Clone, Copy)]
struct Args {
    y: *mut f32,
    x: *const f32,
    w: *const f32,
    /// Null, or n floats added to every row (unless `acc`).
    bias: *const f32,
    k: usize,
    n: usize,
    acc: bool,
}

// SAFETY: the pointers are only dereferenced by `block`, whose callers give each thread a
// disjoint part of y and read-only x and w that outlive the parallel loop.
unsafe impl Send for Args {}
unsafe impl Sync for Args {}

/// Rows i_lo..i_hi and columns j_lo..j_hi of y, on this thread, rows in blocks of `mcb`.
/// `xpre`: null, or all of x already packed by [`pack_all_x`] (then i_lo = 0 and mcb = m).
///
/// # Safety
/// The ranges must lie inside y ([m, n]), x ([m, k]) and w ([n, k]); no other thread may touch
/// this part of y; a non-null `xpre` holds m * k packed floats.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn block(
    a: Args,
    i_lo: usize,
    i_hi: usize,
    j_lo: usize,
    j_hi: usize,
    mcb: usize,
    xpre: *const f32,
    b: &mut Bufs,
) {
    let (k, n) = (a.k, a.n);
    let kcb = KC.min(k);
    b.w.resize(kcb * NR, 0.0);
    if xpre.is_null() {
        b.x.resize(kcb * mcb.div_ceil(MR) * MR, 0.0);
    }
    let wb = b.w.as_mut_ptr();
    let mut jc = j_lo;
    while jc < j_hi {
        let nc = NC.min(j_hi - jc);
        let mut p0 = 0;
        while p0 < k {
            let kc = kcb.min(k - p0);
            let load = a.acc || p0 > 0;
            let mut ic = i_lo;
            while ic < i_hi {
                let mc = mcb.min(i_hi - ic);
                let xb: *const f32 = if xpre.is_null() {
                    let xb = b.x.as_mut_ptr();
                    let mut i = 0;
                    while i < mc {
                        let mr = MR.min(mc - i);
                        pack_x(xb.add(i * kc), a.x.add((ic + i) * k + p0), k, mr, kc);
                        i += mr;
                    }
                    xb
                } else {
                    xpre.add(p0 * mc)
                };
                let mut j = 0;
                while j < nc {
                    let nr = NR.min(nc - j);
                    pack_w(wb, a.w.add((jc + j) * k + p0), k, nr, kc);
                    let mut i = 0;
                    while i < mc {
                        let mr = MR.min(mc - i);
                        let y = a.y.add((ic + i) * n + jc + j);
                        let bias = if a.bias.is_null() {
                            a.bias
                        } else {
                            a.bias.add(jc + j)
                        };
                        tile_rows(mr, kc, xb.add(i * kc), wb, y, n, nr, load, bias);
                        i += mr;
                    }
                    j += NR;
                }
                ic += mc;
            }
            p0 += kc;
        }
        jc += nc;
    }
}

/// Packs all of x ([m, k]) for [`block`]: k block p0 (of [`KC`] columns, fewer in the last)
/// at `dst + p0 * m`, its 14-row panels `[kc][14]` one after another. One task per k block.
///
/// # Safety
/// AVX-512 must be available; `x` readable for m * k floats; `dst` writable for m * k.
unsafe fn pack_all_x(dst: *mut f32, x: *const f32, m: usize, k: usize) {
    use rayon::prelude::*;
    let (dst, x) = (SendPtr(dst), SendPtr(x as *mut f32));
    (0..k.div_ceil(KC)).into_par_iter().for_each(|kb| {
        let p0 = kb * KC;
        let kc = KC.min(k - p0);
        let mut i = 0;
        while i < m {
            let mr = MR.min(m - i);
            // SAFETY: rows i..i+mr, columns p0..p0+kc of x; their packed place in dst lies
            // inside block kb's m * kc floats, which no other task writes.
            unsafe {
                pack_x(
                    dst.get().add(p0 * m + i * kc),
                    x.get().add(i * k + p0),
                    k,
                    mr,
                    kc,
                )
            };
            i += mr;
        }
    });
}

/// Whether [`xwt`] runs on this CPU.
pub(crate) fn available() -> bool {
    super::simd::level() == super::simd::Level::Avx512
}

/// `y[m, n] = (acc ? y : bias) + x[m, k] · w[n, k]^T` (bias[n] broadcast over the rows, 0 when
/// None), on the current rayon pool's threads.
///
/// Panics unless [`available`] and the lengths match.
#[allow(clippy::too_many_arguments)]
pub(crate) fn xwt(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    assert!(available(), "xwt: needs AVX-512");
    assert_eq!(y.len(), super::extent("xwt", &[m, n]), "xwt: y");
    assert_eq!(x.len(), super::extent("xwt", &[m, k]), "xwt: x");
    assert_eq!(w.len(), super::extent("xwt", &[n, k]), "xwt: w");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "xwt: bias");
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            match bias {
                Some(b) => y.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b)),
                None => y.fill(0.0),
            }
        }
        return;
    }
    let a = Args {
        y: y.as_mut_ptr(),
        x: x.as_ptr(),
        w: w.as_ptr(),
        bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
        k,
        n,
        acc,
    };
    use rayon::prelude::*;
    let run = |i_lo: usize, i_hi: usize, j_lo: usize, j_hi: usize, mcb: usize, xpre: SendPtr| {
        BUFS.with(|b| {
            let mut b = b.borrow_mut();
            // SAFETY: AVX-512 was checked above; the ranges lie inside the checked lengths, the
            // tasks below own disjoint parts of y, and xpre is null or all of x packed.
            unsafe { block(a, i_lo, i_hi, j_lo, j_hi, mcb, xpre.get(), &mut b) }
        })
    };
    // Tasks smaller than a thread's share, taken dynamically, so a thread slowed by other work
    // on its core (a busy machine or VM) does not hold up the whole product.
    if m > SPLIT_N_MAX_M {
        // Row blocks, each packing its own rows of x.
        let null = SendPtr(std::ptr::null_mut());
        (0..m.div_ceil(MC)).into_par_iter().for_each(|c| {
            run(c * MC, (c * MC + MC).min(m), 0, n, MC, null);
        });
        return;
    }
    // Column chunks over all rows, x packed once for all of them.
    XPACK.with(|cell| {
        // A nested call on this thread (work stolen while this one waits) packs into its own.
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let buf: &mut Vec<f32> = match borrowed {
            Ok(ref mut v) => v,
            Err(_) => &mut own,
        };
        buf.resize(m * k, 0.0);
        // SAFETY: AVX-512 was checked above; x holds m * k floats, buf as many.
        unsafe { pack_all_x(buf.as_mut_ptr(), x.as_ptr(), m, k) };
        let xpre = SendPtr(buf.as_mut_ptr());
        let chunk = CHUNK_PANELS * NR;
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
            run(0, m, c * chunk, (c * chunk + chunk).min(n), m, xpre);
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::rand_vec;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        w: &[f32],
        y0: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        acc: bool,
    ) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                y[i * n + j] = s + match (acc, bias) {
                    (true, _) => y0[i * n + j] as f64,
                    (false, Some(b)) => b[j] as f64,
                    (false, None) => 0.0,
                };
            }
        }
        y
    }

    /// Every tail: rows 1..=14 and beyond a block, columns around 16 and 32, k around 16 and
    /// KC (and 0), plain, with a bias and accumulating, against an f64 reference; and the same
    /// bits on one thread as on four.
    #[test]
    fn xwt_matches_naive_at_odd_shapes() {
        if !available() {
            eprintln!("xwt_matches_naive_at_odd_shapes: this CPU has no AVX-512; the kernel is not used here");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (4, 0, 33),
            (3, 17, 5),
            (14, 16, 32),
            (15, 15, 33),
            (29, 257, 48),
            (13, 300, 70),
            (176, 513, 100),
            (40, 16, 31),
            (1030, 40, 40),
            (7, 600, 1100),
        ];
        for (idx, &(m, k, n)) in shapes.iter().enumerate() {
            for (acc, with_bias) in [(false, false), (false, true), (true, false)] {
                let x = rand_vec(m * k, 10 + idx as u64);
                let w = rand_vec(n * k, 20 + idx as u64);
                let y0 = rand_vec(m * n, 30 + idx as u64);
                let b = rand_vec(n, 40 + idx as u64);
                let bias = with_bias.then_some(&b[..]);
                let want = naive(&x, &w, &y0, bias, m, k, n, acc);
                let mut outs = Vec::new();
                for threads in [1, 4] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut y = y0.clone();
                    pool.install(|| xwt(&mut y, &x, &w, bias, m, k, n, acc));
                    outs.push(y);
                }
                // Tolerance: f32 accumulation over k terms of |x w| <= 0.25 each.
                let tol = 1e-6 * (k as f64 + 1.0);
                let (mut worst, mut at) = (0f64, 0);
                for (i, (&got, &exp)) in outs[0].iter().zip(&want).enumerate() {
                    let e = (got as f64 - exp).abs();
                    if e.is_nan() || e > worst {
                        (worst, at) = (e, i);
                    }
                }
                assert!(
                    worst <= tol,
                    "xwt {m}x{k}x{n} acc={acc} bias={with_bias}: worst |error| {worst:e} at {at} (got {}, want {}), tolerance {tol:e}",
                    outs[0][at],
                    want[at]
                );
                assert!(
                    outs[0]
                        .iter()
                        .zip(&outs[1])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "xwt {m}x{k}x{n} acc={acc} bias={with_bias}: 1 and 4 threads differ"
                );
            }
        }
    }
}
