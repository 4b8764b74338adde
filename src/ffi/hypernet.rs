//! `hdb_hypernet`: one face image -> a LiDB identity adapter for a model.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

use super::adapter::hdb_adapter;
use super::boundary::{arg_path, arg_ref, ffi_boundary, ffi_infallible, out_ptr};
use super::generate::hdb_image;
use super::model::hdb_model;
use super::params::{read_params, Versioned};
use super::runtime::hdb_runtime;
use super::status::hdb_status;
use super::{hdb_progress_fn, HostProgress};
use crate::adapter::Adapter;
use crate::placed::PlacedHypernet;

/// Opaque, immutable hypernetwork. Thread-safe.
pub struct hdb_hypernet {
    /// The network on the runtime's device (the CPU or a GPU).
    net: PlacedHypernet,
}

impl hdb_hypernet {
    pub(crate) fn net(&self) -> &PlacedHypernet {
        &self.net
    }
}

/// Options for `hdb_hypernet_predict`. Get the defaults from `hdb_predict_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_predict_params {
    pub struct_size: u32,
    /// Refinement iterations; 0 = the file's default (4 for the paper's setup).
    pub iterations: u32,
    /// Called after each iteration (stage "predict"), possibly from an hdb worker thread;
    /// returning false cancels (HDB_STATUS_CANCELLED).
    pub progress: hdb_progress_fn,
    pub progress_user_data: *mut c_void,
}

impl Versioned for hdb_predict_params {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_predict_params>()];
}

pub(crate) fn default_predict_params() -> hdb_predict_params {
    hdb_predict_params {
        struct_size: std::mem::size_of::<hdb_predict_params>() as u32,
        iterations: 0,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
    }
}

/// The default predict params.
#[no_mangle]
pub extern "C" fn hdb_predict_params_default() -> hdb_predict_params {
    ffi_infallible(default_predict_params(), default_predict_params)
}

/// Writes the default predict params into `*params`, `struct_size` included: the values of
/// `hdb_predict_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_predict_params_init(
    params: *mut hdb_predict_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_predict_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_predict_params(), "params") }
    })
}

/// Loads a hypernetwork v1 file (DESIGN.md section 4). A config missing a field is
/// `HDB_STATUS_INVALID_FILE` naming it. On a CUDA runtime predictions run on its GPU in the
/// file's storage type: an f32 file in f32 (equal to the CPU's to rounding), an f16 or bf16
/// file in half precision with f32 accumulation (faster; theta equal to f32's within a
/// relative L2 error of 1e-2 for f16 and 4e-2 for bf16, the tolerances of hdb's GPU tests).
/// The CPU computes in f32 whatever the file holds.
/// On success `*out` owns it (`hdb_hypernet_free`).
///
/// # Safety
/// `rt` a live runtime; `path` a NUL-terminated path; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_hypernet_load(
    rt: *mut hdb_runtime,
    path: *const c_char,
    out: *mut *mut hdb_hypernet,
) -> hdb_status {
    ffi_boundary("hdb_hypernet_load", || {
        // SAFETY: caller contract for each pointer.
        let rt = unsafe { arg_ref(rt, "rt") }?;
        let path = unsafe { arg_path(path, "path") }?;
        let out = out_ptr(out, "out")?;
        let net = PlacedHypernet::load(&rt.inner, &path)?;
        log::info!(
            "the hypernetwork {} runs on {}",
            path.display(),
            net.describe()
        );
        let boxed = Box::new(hdb_hypernet { net });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// Predicts the identity adapter of the face in `face` (an RGB8 image of any size, at least
/// 16x16; the caller passes a face crop: it is center-cropped to a square and resized) for
/// `model`. A hypernetwork whose layer list does not fit the model is
/// `HDB_STATUS_ADAPTER_MISMATCH`. On success `*out` owns a new adapter, ready for
/// `hdb_session_set_adapters` or `hdb_adapter_save`.
///
/// # Safety
/// `hypernet` and `model` live; `face` valid with `data` valid for `data_len` bytes;
/// `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_hypernet_predict(
    hypernet: *const hdb_hypernet,
    model: *const hdb_model,
    face: *const hdb_image,
    params: *const hdb_predict_params,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_hypernet_predict", || {
        // SAFETY: caller contract for each pointer.
        let h = unsafe { arg_ref(hypernet, "hypernet") }?;
        let m = unsafe { arg_ref(model, "model") }?;
        let face = unsafe { arg_ref(face, "face") }?;
        let p = unsafe { read_params(params, default_predict_params(), "params") }?;
        let out = out_ptr(out, "out")?;
        // SAFETY: face.data valid for data_len bytes per the caller's contract.
        let (rgb, w, hh, stride) = unsafe { face.rgb(("face.format", "face.data")) }?;
        let iterations = (p.iterations > 0).then_some(p.iterations as usize);
        let host = HostProgress {
            cb: p.progress,
            user_data: p.progress_user_data,
        };
        let stage = CString::new("predict").unwrap_or_default();
        let mut report = |done: usize, total: usize| host.call(done, total, &stage);
        let adapter: Adapter =
            m.inner
                .predict(&h.net, (rgb, w, hh, stride), iterations, Some(&mut report))?;
        let boxed = Box::new(hdb_adapter {
            inner: Arc::new(adapter),
        });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// Frees a hypernetwork (NULL is a no-op) once no other thread is inside a call that takes
/// it. May be called from any thread (a finalizer's).
/// A second free, or any use after the free, is undefined behaviour (not detected: the
/// handle's memory is gone).
///
/// # Safety
/// `hypernet` NULL or from `hdb_hypernet_load`, not yet freed.
#[no_mangle]
pub unsafe extern "C" fn hdb_hypernet_free(hypernet: *mut hdb_hypernet) {
    ffi_infallible((), || {
        if !hypernet.is_null() {
            // SAFETY: created by Box::into_raw in hdb_hypernet_load, freed once.
            drop(unsafe { Box::from_raw(hypernet) });
        }
    })
}
