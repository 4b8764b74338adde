//! The CPU backend: f32 ops as plain functions `op(out, inputs..., dims)` over row-major
//! slices, each with a shape comment and a unit test. Ops parallelise with rayon, so they use
//! the thread pool of the runtime whose `install` they run in.
//!
//! Layouts are PyTorch's (NCHW activations, `[out, in]` linear weights, `[c_out, c_in, k, k]`
//! conv weights). Matrix products go through the `gemm` crate; element-wise kernels live in
//! `simd` and are compiled for AVX-512, AVX2 and baseline x86-64, chosen at run time.

pub mod act;
pub mod attention;
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
mod attn512;
mod backend;
pub mod backward;
pub mod conv;
pub mod linear;
pub mod misc;
pub mod norm;
pub(crate) mod simd;
mod winograd;
#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
mod xwt;

pub use act::{geglu, gelu_inplace, silu_inplace, softmax_rows};
pub use attention::attention;
pub use backend::Cpu;
pub use conv::conv2d;
pub use linear::{linear, matmul, matmul_at};
pub use misc::{
    add_channel_bias, add_inplace, concat_channels, nchw_to_nhwc, nhwc_to_nchw, timestep_embedding,
    upsample_nearest2x,
};
pub use norm::{group_norm, layer_norm};
pub use simd::instruction_set;

/// Below this many elements an element-wise op runs on the calling thread: rayon's fork/join
/// costs more than the work.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Elements per rayon task for element-wise ops (64 KiB of f32: L2-sized, far above the
/// scheduling overhead).
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// Activations at least this large are advised onto transparent huge pages ([`zeroed`]).
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `n` floats for an op's output or scratch.
///
/// A large allocation is a fresh mapping from the allocator (glibc maps every block above 32
/// MB, and smaller ones once trimmed), so its pages fault in one 4 KB page at a time as the
/// op first writes them: about 420,000 faults per SD 1.5 UNet forward, 14% of the process's
/// CPU time in the kernel (measured on a 2-core Zen 3 VM, 2026-12-07). On Linux such a buffer
/// is advised onto transparent huge pages (`madvise(MADV_HUGEPAGE)` on its 2 MB-aligned
/// interior, before anything touches it), so it faults in 2 MB at a time. The advice is only
/// that: where huge pages are off, or already always on, nothing changes.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    let v = vec![0f32; n];
    #[cfg(target_os = "linux")]
    if n.saturating_mul(4) >= HUGE_PAGE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + n * 4) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside v's allocation; MADV_HUGEPAGE changes no contents
            // (zero pages stay zero) and its failure (e.g. huge pages compiled out) is harmless.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// The product of a kernel's dims, for the length checks every kernel makes before it touches
/// memory through raw pointers or unchecked GEMMs. Overflow panics (caught at the C boundary as
/// `HDB_STATUS_PANIC`) instead of wrapping to a small length that a short buffer would match;
/// callers bound sizes from outside first (`crate::limits`), so this never fires on valid input.
#[inline]
pub(crate) fn extent(op: &str, dims: &[usize]) -> usize {
    crate::limits::product(dims)
        .unwrap_or_else(|| panic!("{op}: the extent {dims:?} overflows usize"))
}

/// A raw pointer that may cross threads. Users write disjoint ranges through it; each use
/// states why the ranges are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to write disjoint ranges of one live `&mut [f32]` from rayon tasks that
// all finish before that borrow ends.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f` over `chunk`-element pieces of `y` (paired with the same pieces of `x`), in
/// parallel when the slice is large.
pub(crate) fn par_zip(
    y: &mut [f32],
    x: &[f32],
    chunk: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    use rayon::prelude::*;
    debug_assert_eq!(y.len(), x.len());
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        f(y, x);
    } else {
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(y, x)| f(y, x));
    }
}

/// Runs `f` over `chunk`-element pieces of `y`, in parallel when the slice is large.
pub(crate) fn par_each(y: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    use rayon::prelude::*;
    if y.len() < PAR_MIN || rayon::current_num_threads() == 1 {
        f(y);
    } else {
        y.par_chunks_mut(chunk).for_each(f);
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the op tests: a seeded generator, a closeness check that names the
    //! worst element, and the PyTorch fixture reader.

    /// Deterministic uniform values in [-1, 1) (xorshift64*).
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Panics unless every |got - want| <= `tol` x max|want| (`tol` itself if `want` is all
    /// zeros). The message names the worst element, its index and both values.
    pub fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(
            got.len(),
            want.len(),
            "{name}: length {} != {}",
            got.len(),
            want.len()
        );
        let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        let bound = tol * if scale > 0.0 { scale } else { 1.0 };
        let mut worst = (0f64, 0usize);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let e = (g as f64 - w as f64).abs();
            if e > worst.0 || e.is_nan() {
                worst = (if e.is_nan() { f64::INFINITY } else { e }, i);
            }
        }
        let (e, i) = worst;
        assert!(
            e <= bound,
            "{name}: worst |err| {e:.3e} at index {i} (got {}, want {}); bound {bound:.3e} = {tol:.1e} x max|want| {scale:.4e}",
            got.get(i).copied().unwrap_or(f32::NAN),
            want.get(i).copied().unwrap_or(f32::NAN),
        );
    }

    /// Tolerance for the PyTorch fixtures: 1e-5 x max|ref|.
    pub const TORCH_TOL: f64 = 1e-5;

    /// The PyTorch fixture file; a missing file or key is a test failure, never a skip.
    pub fn fixtures() -> crate::io::safetensors::SafetensorsFile {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ops.safetensors");
        match crate::io::safetensors::SafetensorsFile::open(&path) {
            Ok(f) => f,
            Err(e) => panic!("PyTorch fixtures unavailable ({}): {e}", path.display()),
        }
    }

    /// One fixture tensor as f32.
    pub fn fixture(f: &crate::io::safetensors::SafetensorsFile, name: &str) -> Vec<f32> {
        match f.to_f32(name) {
            Ok(v) => v,
            Err(e) => panic!("fixture tensor {name}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{assert_close, rand_vec};
    use super::*;
    use crate::backend::api::Conv2d;

    fn pool(threads: usize) -> rayon::ThreadPool {
        match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
            Ok(p) => p,
            Err(e) => panic!("thread pool: {e}"),
        }
    }

    /// Op buffers are zero and of the asked length on both sides of the huge-page threshold,
    /// and a large one holds what is written to it across its huge-page boundaries.
    #[test]
    fn zeroed_buffers_are_zero_and_usable_at_every_size() {
        let big = HUGE_PAGE_MIN_BYTES / 4;
        for n in [0, 1, 1000, big - 1, big, big + 3, 3 * big + 12345] {
            let mut v = zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0), "a non-zero element at n = {n}");
            for (i, x) in v.iter_mut().enumerate() {
                *x = i as f32;
            }
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32), "n = {n}");
        }
    }

    /// conv2d, linear and attention at sizes that take the parallel paths give the same
    /// results in a 1-thread and a 2-thread pool (within 1e-6 x max|value|).
    #[test]
    fn results_do_not_depend_on_thread_count() {
        let run = || {
            let p = Conv2d {
                batch: 2,
                c_in: 24,
                h: 33,
                w: 35,
                c_out: 20,
                kernel: 3,
                stride: 1,
                padding: 1,
            };
            let (ho, wo) = p.out_hw();
            let x = rand_vec(2 * 24 * 33 * 35, 50);
            let w = rand_vec(20 * 24 * 9, 51);
            let b = rand_vec(20, 52);
            let mut conv = vec![0f32; 2 * 20 * ho * wo];
            conv2d(&mut conv, &x, &w, Some(&b), &p);
            let (m, k, n) = (300, 200, 150);
            let xl = rand_vec(m * k, 53);
            let wl = rand_vec(n * k, 54);
            let mut lin = vec![0f32; m * n];
            let bl = rand_vec(n, 55);
            linear(&mut lin, &xl, &wl, Some(&bl), m, k, n);
            let (bt, lq, lk, h, d) = (2, 300, 280, 3, 40);
            let q = rand_vec(bt * lq * h * d, 56);
            let kk = rand_vec(bt * lk * h * d, 57);
            let v = rand_vec(bt * lk * h * d, 58);
            let mut att = vec![0f32; q.len()];
            attention(&mut att, &q, &kk, &v, bt, lq, lk, h, d);
            (conv, lin, att)
        };
        let one = pool(1).install(run);
        let two = pool(2).install(run);
        assert_close("conv2d 1 vs 2 threads", &two.0, &one.0, 1e-6);
        assert_close("linear 1 vs 2 threads", &two.1, &one.1, 1e-6);
        assert_close("attention 1 vs 2 threads", &two.2, &one.2, 1e-6);
    }
}
