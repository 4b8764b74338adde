//! Element-wise and reduction kernels written as plain loops over fixed-width lane arrays,
//! compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run time, so they
//! auto-vectorise to the widest instructions the CPU has without `-C target-cpu=native`.
//!
//! Reductions keep [`LANES`] independent accumulators (lane-wise adds need no reassociation,
//! so LLVM vectorises them); the lanes are summed at the end.
//!
//! `exp` is Cephes' `expf` (range reduction by ln 2, degree-5 polynomial; about 1 ulp with
//! FMA); `exp_nonpos` drops its clamps for softmax inputs (x <= 0). GELU goes through
//! erfc(|x|/sqrt 2) in the Numerical Recipes `erfcc` form (relative error < 1.2e-7 for all
//! x >= 0) with -x^2/2 split exactly into hi + lo, so it keeps ~3e-7 relative accuracy in
//! both tails (tested against f64 erfc over [-14, 14]).
//!
//! Flash attention's per-tile online-softmax step also lives here, so it is vectorised the
//! same way.

/// Independent accumulators per reduction; 16 f32 = one AVX-512 register.
pub(crate) const LANES: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    Scalar = 0,
    Avx2 = 1,
    Avx512 = 2,
}

#[cfg(test)]
std::thread_local! {
    /// A variant forced on this thread ([`with_level`]); None: the widest the CPU runs. Per
    /// thread, not process-wide, so forcing one (a test comparing the variants) cannot change
    /// what ops on other threads run.
    static FORCED: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the kernels of this thread forced to `level` (which the CPU must run), then
/// restores the previous choice. Ops that `f` hands to other threads (rayon) do not see it:
/// run `f` inside a one-thread pool to cover them.
#[cfg(test)]
pub(crate) fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Level>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(level))));
    f()
}

fn level_from(code: u8) -> Option<Level> {
    match code {
        1 => Some(Level::Scalar),
        2 => Some(Level::Avx2),
        3 => Some(Level::Avx512),
        _ => None,
    }
}

/// The variant this thread runs: the widest instruction set this CPU runs (detected once), or
/// in tests the one forced by `with_level`.
pub(crate) fn level() -> Level {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    #[cfg(test)]
    if let Some(l) = FORCED.with(|c| c.get()) {
        return l;
    }
    if let Some(l) = level_from(LEVEL.load(Ordering::Relaxed)) {
        return l;
    }
    let l = detect();
    LEVEL.store(l as u8 + 1, Ordering::Relaxed);
    l
}

/// The instruction set the CPU kernels run on this machine ("AVX-512", "AVX2+FMA", "scalar", or
/// on aarch64 "NEON": its baseline, which the plain loops vectorise to and gemm has kernels for),
/// for benchmark reports. The gemm crate's matmul kernels are chosen by the same rule (its
/// AVX-512 ones need only AVX-512F, which every CPU with the four checked here has).
pub fn instruction_set() -> &'static str {
    match level() {
        Level::Avx512 => "AVX-512",
        Level::Avx2 => "AVX2+FMA",
        Level::Scalar if cfg!(target_arch = "aarch64") => "NEON",
        Level::Scalar => "scalar",
    }
}

/// The widest variant this CPU runs. Without the `avx512` feature the AVX-512 variant is never
/// chosen (nor the gemm crate's AVX-512 kernels, which the feature also gates): such a build runs
/// what an AVX2 machine runs.
#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if cfg!(feature = "avx512")
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("bmi2")
    {
        Level::Avx512
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("bmi2")
    {
        Level::Avx2
    } else {
        Level::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Scalar
}

/// Defines `pub(crate) fn $name(args) -> ret` that dispatches to `$body` compiled with
/// `FMA = true` under AVX-512 or AVX2 target features, or with `FMA = false` (plain mul+add,
/// since a software `fma` call would be slow) on other CPUs.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(non_snake_case)]
            fn inner<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma,bmi2")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner::<true>($($arg),*) }
                match level() {
                    // SAFETY: `level()` checked that the CPU has these features.
                    Level::Avx512 => return unsafe { v4($($arg),*) },
                    Level::Avx2 => return unsafe { v3($($arg),*) },
                    Level::Scalar => {}
                }
            }
            inner::<false>($($arg),*)
        }
    };
}

/// a * b + c, fused where the target has FMA.
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn max_f(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// e^x for f32 (Cephes expf). Inputs below ln(2^-126) give 0; above 127.5 ln 2 are clamped.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    exp_hl::<FMA>(x, 0.0)
}

/// e^x for x <= 0 (softmax after max subtraction): no upper clamp and no flush to zero, so
/// two fewer instructions; inputs below -126 ln 2 (and -inf) give 2^-126 (1.2e-38), not 0,
/// which is far below anything that matters next to a softmax sum >= 1.
#[inline(always)]
pub(crate) fn exp_nonpos<const FMA: bool>(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < LO { LO } else { x };
    let t = fmadd::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fmadd::<FMA>(n, -LN2_HI, x);
    let r = fmadd::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = fmadd::<FMA>(p, r, 1.398_199_9e-3);
    p = fmadd::<FMA>(p, r, 8.333_452e-3);
    p = fmadd::<FMA>(p, r, 4.166_579_6e-2);
    p = fmadd::<FMA>(p, r, 1.666_666_5e-1);
    p = fmadd::<FMA>(p, r, 0.5);
    let y = fmadd::<FMA>(p, r * r, r) + 1.0;
    y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// Row max, seeded with `init`: full `LANES` blocks in independent lanes, the tail through
/// a -inf-padded block, so all of it vectorises.
#[inline(always)]
fn row_max(row: &[f32], init: f32) -> f32 {
    let mut acc = [init; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = max_f(acc[j], c[j]);
        }
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut tail = [f32::NEG_INFINITY; LANES];
        tail[..rem.len()].copy_from_slice(rem);
        for j in 0..LANES {
            acc[j] = max_f(acc[j], tail[j]);
        }
    }
    // Halving tree: shuffles instead of a serial chain.
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] = max_f(acc[j], acc[j + w]);
        }
        w /= 2;
    }
    acc[0]
}

/// Sum of the lanes by a halving tree.
#[inline(always)]
fn hsum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for j in 0..w {
            acc[j] += acc[j + w];
        }
        w /= 2;
    }
    acc[0]
}

/// row = exp(row - shift) (row - shift <= 0), returning the sum; the tail runs as one
/// padded block.
#[inline(always)]
fn row_exp_sum<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let e = exp_nonpos::<FMA>(c[j] - shift);
            c[j] = e;
            sums[j] += e;
        }
    }
    let rem = chunks.into_remainder();
    let n = rem.len();
    if n > 0 {
        let mut tail = [shift; LANES];
        tail[..n].copy_from_slice(rem);
        for j in 0..LANES {
            let e = exp_nonpos::<FMA>(tail[j] - shift);
            tail[j] = e;
            sums[j] += if j < n { e } else { 0.0 };
        }
        rem.copy_from_slice(&tail[..n]);
    }
    hsum(sums)
}

/// e^(hi + lo) where `lo` is a small correction below the precision of `hi` (it joins the
/// reduced argument, so it is not lost to the rounding of hi + lo).
#[inline(always)]
fn exp_hl<const FMA: bool>(hi: f32, lo: f32) -> f32 {
    const HI: f32 = 88.376_26; // 127.5 ln 2: keeps 2^n finite
    const LO: f32 = -87.336_55; // -126 ln 2: keeps 2^n normal
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = hi + lo;
    let (h, l) = if x > HI { (HI, 0.0) } else { (hi, lo) };
    let (h, l) = if x < LO { (LO, 0.0) } else { (h, l) };
    let t = fmadd::<FMA>(h + l, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fmadd::<FMA>(n, -LN2_HI, h);
    let r = fmadd::<FMA>(n, -LN2_LO, r) + l;
    let mut p = 1.987_569_1e-4f32;
    p = fmadd::<FMA>(p, r, 1.398_199_9e-3);
    p = fmadd::<FMA>(p, r, 8.333_452e-3);
    p = fmadd::<FMA>(p, r, 4.166_579_6e-2);
    p = fmadd::<FMA>(p, r, 1.666_666_5e-1);
    p = fmadd::<FMA>(p, r, 0.5);
    let y = fmadd::<FMA>(p, r * r, r) + 1.0;
    // 2^n from the integer in t's low mantissa bits: ((n + 127) << 23).
    let bits = t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23;
    let v = y * f32::from_bits(bits);
    if x < LO {
        0.0
    } else {
        v
    }
}

/// x * sigmoid(x).
#[inline(always)]
pub(crate) fn silu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-x))
}

/// Exact GELU, x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), through erfc(|x| / sqrt 2) so both
/// tails keep their relative accuracy.
#[inline(always)]
pub(crate) fn gelu<const FMA: bool>(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / fmadd::<FMA>(0.5, z, 1.0);
    let mut p = 0.170_872_77f32;
    p = fmadd::<FMA>(p, t, -0.822_152_23);
    p = fmadd::<FMA>(p, t, 1.488_515_9);
    p = fmadd::<FMA>(p, t, -1.135_204);
    p = fmadd::<FMA>(p, t, 0.278_868_07);
    p = fmadd::<FMA>(p, t, -0.186_288_06);
    p = fmadd::<FMA>(p, t, 0.096_784_18);
    p = fmadd::<FMA>(p, t, 0.374_091_96);
    p = fmadd::<FMA>(p, t, 1.000_023_7);
    p = fmadd::<FMA>(p, t, -1.265_512_2);
    // exp(-z^2 + p) with z^2 = x^2 / 2 split exactly: xh has 12 mantissa bits, so xh^2 is
    // exact and x^2 - xh^2 = xl (x + xh) is small. Rounding z = x/sqrt 2, or -z^2, in f32
    // would cost ~2 z^2 ulp of relative accuracy in the tail (1e-5 at x = -12).
    // (|x| capped at 20, where erfc is already 0 in f32, so x = +-inf gives no inf - inf.)
    let ax = x.abs();
    let ax = if ax > 20.0 { 20.0 } else { ax };
    let xh = f32::from_bits(ax.to_bits() & 0xFFFF_F000);
    let xl = ax - xh;
    let erfc = t * exp_hl::<FMA>(-0.5 * (xh * xh), fmadd::<FMA>(-0.5 * xl, ax + xh, p));
    let phi2 = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * phi2
}

multiversion! {
    /// x = silu(x).
    fn silu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = silu::<FMA>(*v);
        }
    }
}

multiversion! {
    /// x = gelu(x).
    fn gelu_slice(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu::<FMA>(*v);
        }
    }
}

multiversion! {
    /// y = a * gelu(g), element-wise (GEGLU).
    fn geglu_row(y: &mut [f32], a: &[f32], g: &[f32]) {
        let n = y.len();
        let (a, g) = (&a[..n], &g[..n]);
        for i in 0..n {
            y[i] = a[i] * gelu::<FMA>(g[i]);
        }
    }
}

multiversion! {
    /// Softmax of each `n`-long row of `x`, in place.
    fn softmax_block(x: &mut [f32], n: usize) {
        for r in x.chunks_exact_mut(n) {
            let m = row_max(r, f32::NEG_INFINITY);
            let inv = 1.0 / row_exp_sum::<FMA>(r, m);
            for v in r.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// y += x.
    fn add_slice(y: &mut [f32], x: &[f32]) {
        let n = y.len();
        let x = &x[..n];
        for i in 0..n {
            y[i] += x[i];
        }
    }
}

multiversion! {
    /// y += s.
    fn add_scalar(y: &mut [f32], s: f32) {
        for v in y.iter_mut() {
            *v += s;
        }
    }
}

multiversion! {
    /// Sum in f64.
    fn sum_f64(x: &[f32]) -> f64 {
        let mut acc = [0f64; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += c[i] as f64;
            }
        }
        let mut s = 0f64;
        for &v in chunks.remainder() {
            s += v as f64;
        }
        s + acc.iter().sum::<f64>()
    }
}

multiversion! {
    /// Sum of (x - mean)^2 in f64.
    fn sq_dev_f64(x: &[f32], mean: f64) -> f64 {
        let mut acc = [0f64; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let d = c[i] as f64 - mean;
                acc[i] += d * d;
            }
        }
        let mut s = 0f64;
        for &v in chunks.remainder() {
            let d = v as f64 - mean;
            s += d * d;
        }
        s + acc.iter().sum::<f64>()
    }
}

multiversion! {
    /// y = x * a + b, then SiLU if `silu`.
    fn affine(y: &mut [f32], x: &[f32], a: f32, b: f32, act: bool) {
        let n = y.len();
        let x = &x[..n];
        if act {
            for i in 0..n {
                y[i] = silu::<FMA>(fmadd::<FMA>(x[i], a, b));
            }
        } else {
            for i in 0..n {
                y[i] = fmadd::<FMA>(x[i], a, b);
            }
        }
    }
}

multiversion! {
    /// y = (x - mean) * rstd * gamma + beta (layer norm's per-element affine).
    fn norm_affine(y: &mut [f32], x: &[f32], mean: f32, rstd: f32, gamma: &[f32], beta: &[f32]) {
        let n = y.len();
        let (x, gamma, beta) = (&x[..n], &gamma[..n], &beta[..n]);
        for i in 0..n {
            y[i] = fmadd::<FMA>((x[i] - mean) * rstd, gamma[i], beta[i]);
        }
    }
}

multiversion! {
    /// The online-softmax step of flash attention for one tile of scores.
    ///
    /// `s` [rows, nk] holds scaled scores q·k; `m`, `l` [rows] the running max and sum of
    /// exponentials; `o` [rows, d] the unnormalised output accumulator. Replaces `s` by
    /// exp(s - m_new), updates `m` and `l`, and rescales `o` rows by exp(m_old - m_new)
    /// (unless `first`, when `o` is about to be overwritten).
    fn online_softmax_tile(s: &mut [f32], nk: usize, m: &mut [f32], l: &mut [f32], o: &mut [f32], d: usize, first: bool) {
        for (i, row) in s.chunks_exact_mut(nk).enumerate() {
            let rm = row_max(row, m[i]);
            let sum = row_exp_sum::<FMA>(row, rm);
            if first {
                l[i] = sum;
            } else {
                let alpha = exp::<FMA>(m[i] - rm);
                l[i] = fmadd::<FMA>(l[i], alpha, sum);
                if alpha != 1.0 {
                    for v in o[i * d..(i + 1) * d].iter_mut() {
                        *v *= alpha;
                    }
                }
            }
            m[i] = rm;
        }
    }
}

multiversion! {
    /// o[i, :] /= l[i] for the rows of `o` [rows, d] (flash attention's final normalisation).
    fn divide_rows(o: &mut [f32], l: &[f32], d: usize) {
        for (row, &li) in o.chunks_exact_mut(d).zip(l) {
            let r = 1.0 / li;
            for v in row.iter_mut() {
                *v *= r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::assert_close;

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
            .collect()
    }

    /// Relative error of exp over [-87, 88] against f64, both with and without FMA.
    #[test]
    fn exp_is_accurate() {
        let xs = grid(-87.0, 88.0, 100_003);
        for fma in [false, true] {
            let mut worst = 0f64;
            for &x in &xs {
                let got = if fma { exp::<true>(x) } else { exp::<false>(x) } as f64;
                let want = (x as f64).exp();
                worst = worst.max(((got - want) / want).abs());
            }
            assert!(worst < 3e-7, "fma={fma}: worst relative error {worst}");
        }
        assert_eq!(exp::<true>(-100.0), 0.0);
        assert_eq!(exp::<true>(f32::NEG_INFINITY), 0.0);
        assert!(exp::<true>(f32::NAN).is_nan());
    }

    /// GELU against x/2 (1 + erf(x / sqrt 2)) in f64 (libm); relative error < 1e-6 where
    /// |gelu| > 1e-30, absolute < 1e-12 elsewhere.
    #[test]
    fn gelu_is_accurate() {
        let xs = grid(-14.0, 14.0, 200_001);
        let mut worst = (0f64, 0f32);
        for &x in &xs {
            let got = gelu::<true>(x) as f64;
            let xd = x as f64;
            let want = 0.5 * xd * libm::erfc(-xd / std::f64::consts::SQRT_2);
            let err = if want.abs() > 1e-30 {
                ((got - want) / want).abs()
            } else {
                (got - want).abs()
            };
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 < 1e-6,
            "worst relative error {} at x = {}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn reductions_match_scalar() {
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
            .collect();
        assert_eq!(row_max(&x, f32::NEG_INFINITY), 5.0);
        assert_eq!(
            row_max(&x[..7], f32::NEG_INFINITY),
            x[..7].iter().cloned().fold(f32::NEG_INFINITY, f32::max)
        );
        assert_eq!(row_max(&[], f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(row_max(&x, 9.0), 9.0);
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum_f64(&x) - s).abs() < 1e-9);
        for n in [0, 5, 16, 77, 1001] {
            let mut e = x[..n].to_vec();
            let total = row_exp_sum::<true>(&mut e, 5.0);
            let want: Vec<f32> = x[..n]
                .iter()
                .map(|&v| ((v - 5.0) as f64).exp() as f32)
                .collect();
            assert_close("row_exp_sum", &e, &want, 1e-6);
            let ws: f64 = want.iter().map(|&v| v as f64).sum();
            assert!(
                ((total as f64) - ws).abs() <= 1e-5 * ws,
                "sum {total} vs {ws} (n = {n})"
            );
        }
    }

    /// exp_nonpos over [-87, 0] within 3e-7 relative; -inf and far-negative inputs give the
    /// documented floor 2^-126.
    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0f64;
        for &x in &grid(-87.0, 0.0, 100_003) {
            let got = exp_nonpos::<true>(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_nonpos::<true>(f32::NEG_INFINITY) <= 1.2e-38);
        assert!(exp_nonpos::<false>(-1000.0) <= 1.2e-38);
    }

    /// Every kernel variant this CPU can run (baseline without FMA, AVX2, AVX-512) gives the
    /// same results within 1e-6 x max|value| on the ops built from these kernels. Each variant
    /// runs in a one-thread pool whose thread has it forced, so the ops' parallel parts see it
    /// too and tests running meanwhile do not.
    #[test]
    fn kernel_variants_agree() {
        use crate::backend::cpu::testutil::rand_vec;
        use crate::backend::cpu::{
            attention, geglu, gelu_inplace, group_norm, layer_norm, silu_inplace, softmax_rows,
        };
        let run = || {
            let x: Vec<f32> = rand_vec(4099, 60).iter().map(|v| v * 9.0).collect();
            let mut s = x.clone();
            silu_inplace(&mut s);
            let mut g = x.clone();
            gelu_inplace(&mut g);
            let rows = 4099 / 14;
            let mut gg = vec![0f32; rows * 7];
            geglu(&mut gg, &x[..rows * 14], rows, 7);
            let mut sm = x[..4095].to_vec();
            softmax_rows(&mut sm, 45, 91);
            let (gam, bet) = (rand_vec(13, 61), rand_vec(13, 62));
            let mut gn = vec![0f32; 13 * 315];
            group_norm(
                &mut gn,
                &x[..13 * 315],
                &gam,
                &bet,
                1,
                13,
                315,
                13,
                1e-5,
                true,
            );
            let mut ln = vec![0f32; 13 * 315];
            layer_norm(&mut ln, &x[..13 * 315], &gam, &bet, 315, 13, 1e-5);
            let q = rand_vec(2 * 37 * 2 * 24, 63);
            let k = rand_vec(2 * 90 * 2 * 24, 64);
            let v = rand_vec(2 * 90 * 2 * 24, 65);
            let mut at = vec![0f32; q.len()];
            attention(&mut at, &q, &k, &v, 2, 37, 90, 2, 24);
            [s, g, gg, sm, gn, ln, at]
        };
        let native = detect();
        let want = run();
        for l in [Level::Scalar, Level::Avx2, Level::Avx512] {
            if l as u8 > native as u8 {
                continue;
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("a one-thread pool");
            let got = pool.install(|| with_level(l, run));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{l:?} output {i}"), g, w, 1e-6);
            }
        }
    }
}
