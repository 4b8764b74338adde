//! The harness the CUDA tests share (tests/backend_ops/, tests/cuda_unet/, tests/cuda_models.rs): one
//! device per test binary, printed and replayable seeds, the comparison, and the every-dtype
//! runner.
#![allow(dead_code)] // each test crate uses its own part

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use hdb::backend::cuda::ops::BlasElem;
use hdb::backend::cuda::{Cuda, CudaDevice, DeviceElem};
use hdb::rng::SplitMix64;

/// One device for the whole binary (kernels compile once), used by one test at a time.
pub fn device() -> Option<(MutexGuard<'static, ()>, Arc<CudaDevice>)> {
    static DEV: OnceLock<std::result::Result<Arc<CudaDevice>, String>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    match DEV.get_or_init(|| CudaDevice::open(0).map(Arc::new).map_err(|e| e.to_string())) {
        Ok(d) => Some((LOCK.lock().unwrap_or_else(|p| p.into_inner()), d.clone())),
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            None
        }
    }
}

pub fn seed(test: &str) -> SplitMix64 {
    let s = match std::env::var("HDB_TEST_SEED").ok().and_then(|v| {
        let v = v.trim_start_matches("0x");
        u64::from_str_radix(v, 16).ok()
    }) {
        Some(s) => s,
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ hdb::rng::fnv1a64(test)
        }
    };
    println!("{test}: seed {s:#x} (HDB_TEST_SEED={s:x} replays it)");
    SplitMix64(s)
}

/// ||got - want|| / ||want|| <= tol, every element finite; prints the figures and, on a
/// failure, the worst element (an unwritten or overflowed one is a NaN or infinity there).
pub fn check(case: &str, got: &[f32], want: &[f32], tol: f64) {
    let tol = super::Tol::RelL2(tol);
    let d = super::compare(got, want);
    println!("cuda-backend {case:<52} {}", d.figures(tol));
    assert!(d.within(tol), "{}", d.failure(case, tol));
}

pub fn sfx<T: BlasElem>(_: &Cuda<T>) -> &'static str {
    T::SUFFIX
}

/// Runs `$case::<T>(&dev, &mut rng)` for f32, f16 and bf16.
#[macro_export]
macro_rules! every_dtype {
    ($test:literal, $case:ident) => {{
        let Some((_lock, dev)) = $crate::common::cuda::device() else {
            return;
        };
        let mut rng = $crate::common::cuda::seed($test);
        $case(&hdb::backend::cuda::Cuda::<f32>::new(dev.clone()), &mut rng);
        $case(
            &hdb::backend::cuda::Cuda::<half::f16>::new(dev.clone()),
            &mut rng,
        );
        $case(&hdb::backend::cuda::Cuda::<half::bf16>::new(dev), &mut rng);
    }};
}

/// Normal values times `scale`, rounded to T (what the device holds).
pub fn randn<T: DeviceElem>(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    hdb::rng::normals(rng, n)
        .into_iter()
        .map(|v| T::from_f32(v as f32 * scale).to_f32())
        .collect()
}

/// Tolerance on rel_l2 for an op that rounds its output once to T.
pub fn tol<T: DeviceElem>(f32_tol: f64) -> f64 {
    match T::SUFFIX {
        "f32" => f32_tol,
        "f16" => 1e-3,
        _ => 8e-3,
    }
}

/// The emulated GPU's fault controls (tests/emu/gpu.cpp, `hdb_emu_gpu_control`), or None on a
/// real driver (or before the CUDA backend has loaded libcuda).
pub fn emulated_gpu_control() -> Option<EmuControl> {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        fn dlopen(name: *const c_char, flags: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_NOLOAD: c_int = 4;
    // SAFETY: RTLD_NOLOAD only looks up a library already loaded (by cudarc); the symbol, when
    // present, has the signature gpu.cpp exports.
    unsafe {
        let lib = dlopen(c"libcuda.so".as_ptr(), RTLD_NOW | RTLD_NOLOAD);
        if lib.is_null() {
            return None;
        }
        let f = dlsym(lib, c"hdb_emu_gpu_control".as_ptr());
        let stat = dlsym(lib, c"hdb_emu_gpu_stat".as_ptr());
        (!f.is_null() && !stat.is_null()).then(|| EmuControl {
            control: std::mem::transmute::<*mut c_void, EmuFn>(f),
            stat: std::mem::transmute::<*mut c_void, EmuStatFn>(stat),
        })
    }
}

type EmuFn = unsafe extern "C" fn(*const std::ffi::c_char, i64) -> i32;
type EmuStatFn = unsafe extern "C" fn(*const std::ffi::c_char) -> i64;

/// See [`emulated_gpu_control`].
#[derive(Clone, Copy)]
pub struct EmuControl {
    control: EmuFn,
    stat: EmuStatFn,
}

impl EmuControl {
    /// Allocations may add at most `bytes` to what is allocated now (None: no limit).
    pub fn memory_headroom(&self, bytes: Option<u64>) {
        let v = bytes.map_or(-1, |b| b as i64);
        // SAFETY: a NUL-terminated name and a value, as the function takes.
        assert_eq!(unsafe { (self.control)(c"memory_headroom".as_ptr(), v) }, 0);
    }

    /// The `n`-th kernel launch from now fails (0: none).
    pub fn fail_launch(&self, n: u64) {
        // SAFETY: as above.
        assert_eq!(
            unsafe { (self.control)(c"fail_launch".as_ptr(), n as i64) },
            0
        );
    }

    /// Kernel launches so far.
    pub fn launches(&self) -> u64 {
        // SAFETY: a NUL-terminated name, as the function takes.
        unsafe { (self.stat)(c"launches".as_ptr()) }.max(0) as u64
    }

    /// The most bytes live at once among allocations made under a memory headroom since the
    /// last control call.
    pub fn peak_bytes(&self) -> u64 {
        // SAFETY: as above.
        unsafe { (self.stat)(c"peak_bytes".as_ptr()) }.max(0) as u64
    }
}

/// Whether the CUDA device is the emulated GPU (scripts/emulated-gpu.sh); call it after opening
/// the device.
pub fn on_emulated_gpu() -> bool {
    emulated_gpu_control().is_some()
}

/// The most multiply-adds one case may take on the emulated GPU, which runs kernels at roughly
/// 10^7 to 10^8 a second; larger cases are left to a real GPU (scripts/gpu-check.sh).
pub const EMULATED_GPU_MAX_WORK: f64 = 4e8;

/// True, after saying so, when `case` (`work` multiply-adds) is too large for the emulated GPU:
/// the caller skips it. Always false on a real GPU.
pub fn too_big_for_the_emulated_gpu(case: &str, work: f64) -> bool {
    let skip = work > EMULATED_GPU_MAX_WORK && on_emulated_gpu();
    if skip {
        println!(
            "{case}: skipped on the emulated GPU ({work:.1e} multiply-adds, above \
             {EMULATED_GPU_MAX_WORK:.0e}); scripts/gpu-check.sh runs it on a GPU"
        );
    }
    skip
}
