//! `hdb_runtime`: the device and CPU threads that models and sessions run on.

use std::ffi::c_char;
use std::sync::Arc;

use super::boundary::{arg_ref, arg_str, ffi_boundary, ffi_infallible, out_ptr};
use super::params::Versioned;
use super::params::{read_params, write_out_struct};
use super::status::hdb_status;
use crate::runtime::{Device, DeviceRequest, Runtime, RuntimeOptions};

/// Opaque runtime. Create with `hdb_runtime_new`, free with `hdb_runtime_free`. Thread-safe.
pub struct hdb_runtime {
    pub(crate) inner: Arc<Runtime>,
}

/// Options for `hdb_runtime_new`. Get the defaults from `hdb_runtime_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_runtime_params {
    /// `sizeof(hdb_runtime_params)`, set by `hdb_runtime_params_default()`.
    pub struct_size: u32,
    /// CPU threads for ops; 0 = one per available core (default).
    pub num_threads: u32,
    /// `"auto"` (default; CUDA when usable, else CPU), `"cpu"`, `"cuda"` or `"cuda:N"`.
    /// NULL means `"auto"`. Only read during `hdb_runtime_new`.
    pub device: *const c_char,
}

impl Versioned for hdb_runtime_params {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_runtime_params>()];
}

/// The default runtime params: auto device, all cores.
#[no_mangle]
pub extern "C" fn hdb_runtime_params_default() -> hdb_runtime_params {
    ffi_infallible(default_params(), default_params)
}

/// Writes the default runtime params into `*params`, `struct_size` included: the values of
/// `hdb_runtime_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_runtime_params_init(
    params: *mut hdb_runtime_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_runtime_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_params(), "params") }
    })
}

fn default_params() -> hdb_runtime_params {
    hdb_runtime_params {
        struct_size: std::mem::size_of::<hdb_runtime_params>() as u32,
        num_threads: 0,
        device: std::ptr::null(),
    }
}

/// Device kinds reported by `hdb_runtime_get_info`.
pub type hdb_device_kind = u32;
pub const HDB_DEVICE_CPU: hdb_device_kind = 0;
pub const HDB_DEVICE_CUDA: hdb_device_kind = 1;

/// What a runtime runs on. Set `struct_size = sizeof(hdb_runtime_info)` before the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_runtime_info {
    pub struct_size: u32,
    /// `HDB_DEVICE_CPU` or `HDB_DEVICE_CUDA`.
    pub device_kind: hdb_device_kind,
    /// CUDA device ordinal (0 for the CPU).
    pub device_index: u32,
    /// CPU worker threads.
    pub num_threads: u32,
}

impl Versioned for hdb_runtime_info {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_runtime_info>()];
}

/// Creates a runtime. `params` may be NULL for the defaults. Asking for `"cuda:N"` where no
/// usable CUDA device exists returns `HDB_STATUS_NO_DEVICE`; `"auto"` then uses the CPU.
/// On success `*out` owns a new runtime, freed with `hdb_runtime_free`. On a CUDA device the
/// kernels are compiled (NVRTC) on first use, seconds per kernel file, and kept as PTX in the
/// folder the environment variable `HDB_KERNEL_CACHE` names (`off` for none; by default
/// `$XDG_CACHE_HOME/hdb/kernels` or `~/.cache/hdb/kernels`), so later runs start at once.
///
/// # Safety
/// `params` NULL or a valid struct; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn hdb_runtime_new(
    params: *const hdb_runtime_params,
    out: *mut *mut hdb_runtime,
) -> hdb_status {
    ffi_boundary("hdb_runtime_new", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: params is NULL or a caller-owned struct of its declared size.
        let p = unsafe { read_params(params, default_params(), "params") }?;
        let device = if p.device.is_null() {
            DeviceRequest::Auto
        } else {
            // SAFETY: non-null C string per the field's contract.
            DeviceRequest::parse(unsafe { arg_str(p.device, "params.device") }?)?
        };
        let rt = Runtime::new(RuntimeOptions {
            device,
            threads: p.num_threads as usize,
        })?;
        let boxed = Box::new(hdb_runtime {
            inner: Arc::new(rt),
        });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// Reports the runtime's device and thread count.
///
/// # Safety
/// `rt` a live runtime; `out` a struct whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn hdb_runtime_get_info(
    rt: *const hdb_runtime,
    out: *mut hdb_runtime_info,
) -> hdb_status {
    ffi_boundary("hdb_runtime_get_info", || {
        // SAFETY: caller contract.
        let rt = unsafe { arg_ref(rt, "rt") }?;
        let out = out_ptr(out, "out")?;
        let (kind, index) = match rt.inner.device() {
            Device::Cpu => (HDB_DEVICE_CPU, 0),
            Device::Cuda(n) => (HDB_DEVICE_CUDA, n),
        };
        let info = hdb_runtime_info {
            struct_size: std::mem::size_of::<hdb_runtime_info>() as u32,
            device_kind: kind,
            device_index: index,
            num_threads: rt.inner.threads() as u32,
        };
        // SAFETY: out non-null, sized by the caller.
        unsafe { write_out_struct(out, &info, "out") }
    })
}

/// Frees a runtime (NULL is a no-op) once no other thread is inside a call that takes it.
/// Models loaded from it stay valid (they share it). May be called from any thread (a
/// finalizer's).
/// A second free, or any use after the free, is undefined behaviour (not detected: the
/// handle's memory is gone).
///
/// # Safety
/// `rt` NULL or a runtime from `hdb_runtime_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn hdb_runtime_free(rt: *mut hdb_runtime) {
    ffi_infallible((), || {
        if !rt.is_null() {
            // SAFETY: created by Box::into_raw in hdb_runtime_new, freed once.
            drop(unsafe { Box::from_raw(rt) });
        }
    })
}
