//! One CUDA device: its context and stream, the kernel modules compiled for it (NVRTC, once
//! per file, on first use), a cuBLAS handle, and memory transfers.
//!
//! Everything runs on one stream, so cudarc's multi-stream event tracking is turned off. Every
//! driver, NVRTC and cuBLAS failure becomes an [`Error`]: a missing driver or device is
//! [`Error::NoDevice`], a failed allocation [`Error::OutOfMemory`], anything else
//! [`Error::Device`] naming the operation. cudarc panics where a library lacks a symbol; the
//! entry points catch that too, so nothing aborts the host.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError, ValidAsZeroBits,
};

use super::kernels::{compile_ptx, nvrtc_available, KernelFile};
use crate::error::{Error, Result};

/// A storage type of device tensors: f32, f16 or bf16, named as the kernels' suffix.
pub trait DeviceElem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// The kernel name suffix (`"f32"`, `"f16"`, `"bf16"`).
    const SUFFIX: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl DeviceElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl DeviceElem for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl DeviceElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Maps a driver error: allocation failures to [`Error::OutOfMemory`], the rest to
/// [`Error::Device`], both naming `what`.
pub fn driver_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| {
        use cudarc::driver::sys::CUresult;
        let msg = format!("{what}: {e:?}");
        match e.0 {
            CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
            CUresult::CUDA_ERROR_NO_DEVICE
            | CUresult::CUDA_ERROR_INVALID_DEVICE
            | CUresult::CUDA_ERROR_NOT_INITIALIZED => Error::NoDevice(msg),
            _ => Error::Device(msg),
        }
    }
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from a dynamically loaded
/// library) into [`Error::Device`].
pub(crate) fn guard<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let detail = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        Err(Error::Device(format!(
            "{what}: the CUDA libraries failed: {detail}"
        )))
    })
}

/// Whether the CUDA driver library can be loaded at all.
pub fn driver_available() -> bool {
    // SAFETY: the probe only tries to dlopen the library and drops it.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's `--gpu-architecture` for a compute capability: the real architecture where NVRTC
/// knows it, else the nearest virtual one (PTX JIT-compiled by the driver).
fn arch_for(cc: (i32, i32)) -> Result<&'static str> {
    Ok(match cc {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (major, _) if major >= 10 => "compute_90",
        (8, _) => "compute_80",
        (major, minor) => {
            return Err(Error::NoDevice(format!(
                "compute capability {major}.{minor} is below 8.0; hdb's kernels need sm_80 \
                 (Ampere) or newer"
            )))
        }
    })
}

/// A CUDA device with its stream, kernels and cuBLAS handle.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    ordinal: usize,
    name: String,
    cc: (i32, i32),
    /// Multiprocessors, read once at open (the split heuristics ask on every launch).
    sms: usize,
    arch: &'static str,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Where compiled kernels persist between processes ([`super::ptx_cache`]).
    kernel_cache: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("cc", &self.cc)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`: a missing driver, no such device, a device older than sm_80
    /// or a missing libnvrtc is [`Error::NoDevice`].
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        if !driver_available() {
            return Err(Error::NoDevice(
                "no CUDA driver found (libcuda.so could not be loaded)".into(),
            ));
        }
        if !nvrtc_available() {
            return Err(Error::NoDevice(
                "libnvrtc could not be loaded; hdb compiles its kernels at run time with NVRTC \
                 (install the CUDA runtime compiler, e.g. pip's nvidia-cuda-nvrtc-cu12, and put \
                 its lib/ on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        guard("opening the CUDA device", || {
            let count = CudaContext::device_count().map_err(driver_err("cuDeviceGetCount"))?;
            if ordinal as i64 >= count as i64 {
                return Err(Error::NoDevice(format!(
                    "cuda:{ordinal} requested but {count} CUDA device(s) are present"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(driver_err("creating a CUDA context"))?;
            // One stream does all the work: cudarc's per-buffer events are not needed.
            // SAFETY: no other stream of this context touches hdb's buffers.
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name().map_err(driver_err("cuDeviceGetName"))?;
            let cc = ctx
                .compute_capability()
                .map_err(driver_err("reading the compute capability"))?;
            let arch = arch_for(cc)?;
            let sms = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(driver_err("reading the multiprocessor count"))?
                .max(1) as usize;
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone())
                .map_err(|e| Error::Device(format!("creating a cuBLAS handle: {e:?}")))?;
            log::info!(
                "CUDA device {ordinal}: {name} (sm_{}{}), kernels compiled for {arch}",
                cc.0,
                cc.1
            );
            Ok(CudaDevice {
                ctx,
                stream,
                blas,
                ordinal,
                name,
                cc,
                sms,
                arch,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                kernel_cache: super::ptx_cache::cache_dir(),
            })
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// The device's multiprocessor count (split heuristics: enough blocks to fill the GPU).
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The kernel `name` of `kernels/<file>`, compiling and loading the file on first use.
    pub fn function(&self, file: &'static str, name: &str) -> Result<CudaFunction> {
        let key = format!("{file}/{name}");
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let module = self.module(file)?;
        let f = guard("loading a kernel", || {
            module
                .load_function(name)
                .map_err(driver_err(&format!("kernels/{file} has no kernel {name}")))
        })?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    /// Like [`CudaDevice::function`], for a kernel launched with `bytes` of dynamic shared
    /// memory: above the default 48 KB the function's limit is raised once.
    pub fn function_dyn_smem(
        &self,
        file: &'static str,
        name: &str,
        bytes: u32,
    ) -> Result<CudaFunction> {
        if bytes <= 48 * 1024 {
            return self.function(file, name);
        }
        let key = format!("{file}/{name}#{bytes}");
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let f = self.function(file, name)?;
        guard("raising a kernel's shared memory limit", || {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(driver_err(&format!(
                "{name} with {bytes} bytes of shared memory"
            )))
        })?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        if let Some(m) = lock(&self.modules).get(file) {
            return Ok(m.clone());
        }
        let kf = KernelFile::get(file)
            .ok_or_else(|| Error::Internal(format!("no kernel file {file}")))?;
        use super::ptx_cache::{self, Origin};
        let t = std::time::Instant::now();
        let load = |ptx: String| {
            guard("loading a kernel module", || {
                self.ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(driver_err(&format!("loading kernels/{file}")))
            })
        };
        let (ptx, origin) = ptx_cache::ptx(kf, self.arch, &[], self.kernel_cache.as_deref())?;
        let module = match (load(ptx), origin) {
            (Ok(m), _) => m,
            // A cached entry the driver refuses: compile it afresh (and do not trust it).
            (Err(e), Origin::Cache) => {
                log::warn!("kernel cache: the driver refused kernels/{file} ({e}); recompiling");
                match self.kernel_cache.as_deref() {
                    Some(dir) => load(ptx_cache::store(kf, self.arch, &[], dir)?)?,
                    None => load(compile_ptx(kf, self.arch, &[])?)?,
                }
            }
            (Err(e), Origin::Compiled) => return Err(e),
        };
        log::debug!(
            "kernels/{file} for {}: {} in {:.0} ms",
            self.arch,
            match origin {
                Origin::Cache => "read from the kernel cache",
                Origin::Compiled => "compiled",
            },
            t.elapsed().as_secs_f64() * 1e3
        );
        lock(&self.modules).insert(file, module.clone());
        Ok(module)
    }

    /// A zeroed device buffer of `n` elements.
    pub fn zeros<T: DeviceElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        guard("allocating device memory", || {
            self.stream
                .alloc_zeros::<T>(n.max(1))
                .map_err(driver_err(&format!(
                    "allocating {} bytes of device memory",
                    n * std::mem::size_of::<T>()
                )))
        })
    }

    /// An uninitialised device buffer of `n` elements, for outputs an op writes in full.
    pub fn alloc<T: DeviceElem>(&self, n: usize) -> Result<CudaSlice<T>> {
        guard("allocating device memory", || {
            // SAFETY: T is plain data (DeviceElem), and the caller's op writes every element
            // before anything reads it.
            unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(driver_err(&format!(
                "allocating {} bytes of device memory",
                n * std::mem::size_of::<T>()
            )))
        })
    }

    /// A device copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        guard("copying to the device", || {
            if host.is_empty() {
                // cudarc refuses zero-length allocations; one element stands in.
                return Err(Error::Internal("upload of an empty slice".into()));
            }
            self.stream.clone_htod(host).map_err(driver_err(&format!(
                "copying {} bytes to the device",
                std::mem::size_of_val(host)
            )))
        })
    }

    /// `host` converted from f32 to `T` and copied to the device.
    pub fn upload_f32<T: DeviceElem>(&self, host: &[f32]) -> Result<CudaSlice<T>> {
        let v: Vec<T> = host.iter().map(|&x| T::from_f32(x)).collect();
        self.upload(&v)
    }

    /// The first `n` elements of `dev`, copied to the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        guard("copying from the device", || {
            if n > dev.len() {
                return Err(Error::Internal(format!(
                    "download of {n} elements from a buffer of {}",
                    dev.len()
                )));
            }
            let mut out = vec![T::default(); n];
            self.stream
                .memcpy_dtoh(&dev.slice(..n), &mut out)
                .map_err(driver_err("copying from the device"))?;
            self.synchronize()?;
            Ok(out)
        })
    }

    /// The first `n` elements of `dev` as f32.
    pub fn download_f32<T: DeviceElem>(&self, dev: &CudaSlice<T>, n: usize) -> Result<Vec<f32>> {
        Ok(self.download(dev, n)?.into_iter().map(T::to_f32).collect())
    }

    /// Makes this device's context current on the calling thread. cudarc's memory and launch
    /// calls do it themselves, cuBLAS does not: entry points that may run on any thread (a
    /// session's calls, the runtime's worker threads) call this first.
    pub fn bind_to_thread(&self) -> Result<()> {
        guard("binding the CUDA context", || {
            self.ctx
                .bind_to_thread()
                .map_err(driver_err("making the CUDA context current on this thread"))
        })
    }

    /// Waits for all queued work; a kernel fault surfaces here.
    pub fn synchronize(&self) -> Result<()> {
        guard("synchronising the stream", || {
            self.stream
                .synchronize()
                .map_err(driver_err("a queued CUDA operation failed"))
        })
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(driver_err("cuMemGetInfo"))
    }

    /// The raw device address of `s` (for the pointer tables some kernels read).
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_table() {
        assert_eq!(arch_for((9, 0)).unwrap(), "sm_90");
        assert_eq!(arch_for((8, 0)).unwrap(), "sm_80");
        assert_eq!(arch_for((12, 0)).unwrap(), "compute_90");
        assert!(matches!(arch_for((7, 5)), Err(Error::NoDevice(_))));
    }
}
