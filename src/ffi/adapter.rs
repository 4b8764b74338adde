//! `hdb_adapter`: one identity (LiDB or LoRA), validated against a model; immutable.

use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

use super::boundary::{arg_path, arg_ref, ffi_boundary, ffi_infallible, out_ptr};
use super::model::hdb_model;
use super::status::hdb_status;
use crate::adapter::Adapter;
use crate::error::Error;
use crate::io::safetensors::SafetensorsFile;

/// Opaque, immutable adapter. Thread-safe; may be shared by any number of sessions.
pub struct hdb_adapter {
    pub(crate) inner: Arc<Adapter>,
}

fn publish(adapter: Adapter, out: *mut *mut hdb_adapter) {
    let boxed = Box::new(hdb_adapter {
        inner: Arc::new(adapter),
    });
    // SAFETY: callers checked `out` non-null.
    unsafe { *out = Box::into_raw(boxed) };
}

/// Loads an adapter file for `model`: a LiDB v1/v2 adapter (composed with its basis), a kohya
/// or PEFT/diffusers LoRA or LoCon of any rank, or a LyCORIS LoHa/LoKr (merge mode only). Layers or shapes that do not fit the model, keys
/// that match no adaptable layer, and NaN/Inf values are `HDB_STATUS_ADAPTER_MISMATCH`,
/// naming the layer. On success `*out` owns the adapter (free with `hdb_adapter_free`).
///
/// # Safety
/// `model` a live model; `path` a NUL-terminated path; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_load(
    model: *const hdb_model,
    path: *const c_char,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_adapter_load", || {
        // SAFETY: caller contract for each pointer.
        let m = unsafe { arg_ref(model, "model") }?;
        let path = unsafe { arg_path(path, "path") }?;
        let out = out_ptr(out, "out")?;
        let f = SafetensorsFile::open(&path)?;
        let a = m.inner.load_adapter(&f)?;
        publish(a, out);
        Ok(())
    })
}

/// Options for `hdb_adapter_load_ex`. Get the defaults from `hdb_adapter_load_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_adapter_load_params {
    pub struct_size: u32,
    /// 1: skip the keys of a LoRA file that match no adaptable layer of the model (logged at
    /// warning level) instead of refusing the file; 0 (default): refuse, listing them.
    pub allow_unmatched: u32,
}

impl super::params::Versioned for hdb_adapter_load_params {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_adapter_load_params>()];
}

fn default_load_params() -> hdb_adapter_load_params {
    hdb_adapter_load_params {
        struct_size: std::mem::size_of::<hdb_adapter_load_params>() as u32,
        allow_unmatched: 0,
    }
}

/// The default adapter-load params.
#[no_mangle]
pub extern "C" fn hdb_adapter_load_params_default() -> hdb_adapter_load_params {
    ffi_infallible(default_load_params(), default_load_params)
}

/// Writes the default adapter-load params into `*params`, `struct_size` included: the values
/// of `hdb_adapter_load_params_default()`, for hosts that cannot take a struct returned by
/// value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_load_params_init(
    params: *mut hdb_adapter_load_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_adapter_load_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_load_params(), "params") }
    })
}

/// As `hdb_adapter_load`, with options (`params` NULL: the defaults, as `hdb_adapter_load`).
///
/// # Safety
/// `model` a live model; `path` a NUL-terminated path; `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_load_ex(
    model: *const hdb_model,
    path: *const c_char,
    params: *const hdb_adapter_load_params,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_adapter_load_ex", || {
        // SAFETY: caller contract for each pointer.
        let m = unsafe { arg_ref(model, "model") }?;
        let path = unsafe { arg_path(path, "path") }?;
        let out = out_ptr(out, "out")?;
        // SAFETY: NULL or a valid params struct per the caller's contract.
        let p = unsafe { super::params::read_params(params, default_load_params(), "params") }?;
        let allow_unmatched = match p.allow_unmatched {
            0 => false,
            1 => true,
            v => {
                return Err(Error::invalid_arg(
                    "params.allow_unmatched",
                    format!("{v}; must be 0 or 1"),
                ))
            }
        };
        let f = SafetensorsFile::open(&path)?;
        let opts = crate::adapter::LoadOptions { allow_unmatched };
        let a = m.inner.load_adapter_with(&f, opts)?;
        publish(a, out);
        Ok(())
    })
}

/// As `hdb_adapter_load`, from `len` bytes of a file held in memory (copied; the caller keeps
/// its buffer).
///
/// # Safety
/// `model` a live model; `bytes` valid for `len` bytes; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_load_from_memory(
    model: *const hdb_model,
    bytes: *const u8,
    len: usize,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_adapter_load_from_memory", || {
        // SAFETY: caller contract for each pointer.
        let m = unsafe { arg_ref(model, "model") }?;
        if bytes.is_null() {
            return Err(Error::NullArgument("bytes"));
        }
        let out = out_ptr(out, "out")?;
        // SAFETY: non-null, valid for len bytes per the caller's contract.
        let host = unsafe { std::slice::from_raw_parts(bytes, len) };
        // The copy is as large as the host's buffer: reserved fallibly (OUT_OF_MEMORY, not an
        // abort, when it cannot be held twice).
        let mut data = crate::limits::try_with_capacity(len, "bytes")?;
        data.extend_from_slice(host);
        let f = SafetensorsFile::from_vec(Path::new("<memory>"), data)?;
        let a = m.inner.load_adapter(&f)?;
        publish(a, out);
        Ok(())
    })
}

/// Saves an adapter in the form it was loaded in: a LiDB adapter as LiDB v2 (~106 KB for SD
/// 1.5), an imported LoRA as a PEFT file. The file is written atomically.
///
/// # Safety
/// `adapter` a live adapter; `path` a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_save(
    adapter: *const hdb_adapter,
    path: *const c_char,
) -> hdb_status {
    ffi_boundary("hdb_adapter_save", || {
        // SAFETY: caller contract for each pointer.
        let a = unsafe { arg_ref(adapter, "adapter") }?;
        let path = unsafe { arg_path(path, "path") }?;
        a.inner.save(&path)
    })
}

/// Frees an adapter; NULL is a no-op. Sessions using it keep their own reference, so it may
/// be freed once `hdb_session_set_adapters` has returned. May be called from any thread (a finalizer's).
/// A second free, or any use after the free, is undefined behaviour (not detected: the
/// handle's memory is gone).
///
/// # Safety
/// `adapter` NULL or an adapter from `hdb_adapter_load*` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn hdb_adapter_free(adapter: *mut hdb_adapter) {
    ffi_infallible((), || {
        if !adapter.is_null() {
            // SAFETY: created by Box::into_raw in publish, freed once.
            drop(unsafe { Box::from_raw(adapter) });
        }
    })
}
