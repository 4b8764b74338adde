//! `hdb_session`: one thread's state on a shared model ([`crate::Session`]): its adapters,
//! UNet evaluations on caller buffers (for hosts that drive their own sampler) and
//! generations (`ffi::generate`). This file only converts and checks arguments.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use super::adapter::hdb_adapter;
use super::boundary::{arg_ref, ffi_boundary, ffi_infallible, out_ptr};
use super::model::hdb_model;
use super::params::read_params;
use super::params::Versioned;
use super::status::hdb_status;
use crate::adapter::apply::ApplyMode;
use crate::error::Error;
use crate::model::unet::UnetInput;
use crate::progress::Cancel;
use crate::session::Session;

/// Opaque session: a [`crate::Session`] on a model's engine. Belongs to one thread at a
/// time; a call made while another thread is inside a call on the same session returns
/// `HDB_STATUS_BUSY` instead of touching it. Keeps its model alive.
pub struct hdb_session {
    inner: Mutex<Session>,
    /// The session's cancel flag, reachable without the lock (`hdb_session_cancel`).
    cancel: Arc<Cancel>,
}

impl hdb_session {
    /// The session for the length of one call, or `Error::Busy` while another thread is inside
    /// a call on it (the header forbids that; detecting it costs one uncontended lock).
    pub(crate) fn lock(&self) -> crate::Result<MutexGuard<'_, Session>> {
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::Busy(
                "another thread is inside a call on this session (a session belongs to one \
                 thread at a time)"
                    .into(),
            )),
            // A panic inside an earlier call was caught at the boundary; every session call
            // changes its state only once it has succeeded, so the state is still whole.
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
        }
    }
}

/// How a session applies its adapters.
pub type hdb_apply_mode = u32;
/// `W = W_base + sum scale_i * dW_i`, recomputed from the pristine base on every change
/// (exact; costs a pass over the adapted weights; one identity set for the whole batch).
pub const HDB_APPLY_MERGE: hdb_apply_mode = 0;
/// `y = x W^T + sum scale_i * up_i(down_i(x))`: swapping costs only the adapters, and each
/// batch sample may carry its own adapter (`hdb_session_set_sample_adapters`).
pub const HDB_APPLY_RUNTIME: hdb_apply_mode = 1;

/// Options for `hdb_session_new`. Get the defaults from `hdb_session_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_session_params {
    pub struct_size: u32,
    /// Reserved for future options; set to 0.
    pub reserved: u32,
}

impl Versioned for hdb_session_params {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_session_params>()];
}

fn default_session_params() -> hdb_session_params {
    hdb_session_params {
        struct_size: std::mem::size_of::<hdb_session_params>() as u32,
        reserved: 0,
    }
}

/// The default session params.
#[no_mangle]
pub extern "C" fn hdb_session_params_default() -> hdb_session_params {
    ffi_infallible(default_session_params(), default_session_params)
}

/// Writes the default session params into `*params`, `struct_size` included: the values of
/// `hdb_session_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_params_init(
    params: *mut hdb_session_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_session_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_session_params(), "params") }
    })
}

/// Creates a session on `model`. On success `*out` owns it (free with `hdb_session_free`).
///
/// # Safety
/// `model` a live model; `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_new(
    model: *const hdb_model,
    params: *const hdb_session_params,
    out: *mut *mut hdb_session,
) -> hdb_status {
    ffi_boundary("hdb_session_new", || {
        // SAFETY: caller contract for each pointer.
        let m = unsafe { arg_ref(model, "model") }?;
        let out = out_ptr(out, "out")?;
        let p = unsafe { read_params(params, default_session_params(), "params") }?;
        if p.reserved != 0 {
            return Err(Error::invalid_arg("params.reserved", "must be 0"));
        }
        let session = Session::new(m.inner.clone());
        let boxed = Box::new(hdb_session {
            cancel: session.canceller(),
            inner: Mutex::new(session),
        });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// Borrows a caller buffer of `len` floats, or fails naming it.
///
/// # Safety
/// `p` NULL or valid for `len` floats.
unsafe fn floats<'a>(p: *const f32, len: usize, name: &'static str) -> crate::Result<&'a [f32]> {
    if p.is_null() {
        return Err(Error::NullArgument(name));
    }
    // SAFETY: non-null and valid for len floats per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Runs one UNet evaluation, exactly diffusers' `UNet2DConditionModel(sample, timestep,
/// encoder_hidden_states).sample`:
/// `sample` [batch, in_channels, height, width], `timesteps` (one per sample),
/// `context` [batch, context_tokens, cross_attention_dim] -> `out` [batch, out_channels,
/// height, width], all f32, row-major. Each `*_len` is the buffer's length in floats and must
/// equal the shape's size (the error names the argument and the expected shape). The UNet is
/// built on the model's first call (seconds for SD 1.5) and shared afterwards; on a runtime
/// with a CUDA device it runs there in fp16 (inputs and output stay f32 on the host).
///
/// # Safety
/// `session` a live session used by this thread only; each buffer valid for its length.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_unet(
    session: *mut hdb_session,
    sample: *const f32,
    sample_len: usize,
    timesteps: *const f32,
    timesteps_len: usize,
    context: *const f32,
    context_len: usize,
    batch: u32,
    height: u32,
    width: u32,
    context_tokens: u32,
    out: *mut f32,
    out_len: usize,
) -> hdb_status {
    ffi_boundary("hdb_session_unet", || {
        // SAFETY: caller contract for each pointer and length.
        let s = unsafe { arg_ref(session, "session") }?;
        let sample = unsafe { floats(sample, sample_len, "sample") }?;
        let timesteps = unsafe { floats(timesteps, timesteps_len, "timesteps") }?;
        let context = unsafe { floats(context, context_len, "context") }?;
        let out = out_ptr(out, "out")?;
        let (b, h, w, l) = (
            batch as usize,
            height as usize,
            width as usize,
            context_tokens as usize,
        );
        let s = s.lock()?;
        let out_channels = s.engine().unet_config()?.out_channels;
        let want = crate::limits::checked_len("out_len", &[b, out_channels, h, w])?;
        if out_len != want {
            return Err(Error::invalid_arg(
                "out_len",
                format!("is {out_len}, expected [{b}, {out_channels}, {h}, {w}] = {want}"),
            ));
        }
        let input = UnetInput {
            sample,
            timesteps,
            context,
            batch: b,
            height: h,
            width: w,
            context_len: l,
        };
        let y = s.unet(&input)?;
        // SAFETY: out is valid for out_len == y.len() floats.
        unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), out, y.len()) };
        Ok(())
    })
}

/// Makes `adapters[0..n]` (with `scales[0..n]`, or 1.0 each when `scales` is NULL) the
/// session's active set, applied in `mode` (`HDB_APPLY_MERGE` or `HDB_APPLY_RUNTIME`).
/// `n = 0` removes all adapters (the pristine base weights run again). The session keeps what
/// it needs, so the caller may free the adapters. On failure the previous set stays active.
/// Changing the set clears per-sample indices. On a runtime with a CUDA device the UNet's and
/// the text encoder's sets are built there: merge mode writes the session's own merged copies
/// of the adapted weights (the model's are never changed), runtime mode uploads the factors;
/// ranks above the device kernels' limits (a layer's total rank 256 in merge mode, an
/// adapter's rank 128 in runtime mode) fail with `HDB_STATUS_UNSUPPORTED` naming the layer.
///
/// # Safety
/// `session` a live session used by this thread only; `adapters` valid for `n` pointers to
/// live adapters; `scales` NULL or valid for `n` floats.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_set_adapters(
    session: *mut hdb_session,
    adapters: *const *const hdb_adapter,
    scales: *const f32,
    n: usize,
    mode: hdb_apply_mode,
) -> hdb_status {
    ffi_boundary("hdb_session_set_adapters", || {
        // SAFETY: caller contract for each pointer.
        let s = unsafe { arg_ref(session, "session") }?;
        let mode = match mode {
            HDB_APPLY_MERGE => ApplyMode::Merge,
            HDB_APPLY_RUNTIME => ApplyMode::Runtime,
            m => {
                return Err(Error::invalid_arg(
                    "mode",
                    format!("{m} is not an HDB_APPLY_* value"),
                ))
            }
        };
        if n > 0 && adapters.is_null() {
            return Err(Error::NullArgument("adapters"));
        }
        if n > crate::limits::MAX_ADAPTERS {
            return Err(Error::invalid_arg(
                "n",
                format!(
                    "{n} adapters; at most {} in one set (hdb's documented limit)",
                    crate::limits::MAX_ADAPTERS
                ),
            ));
        }
        let mut set = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: adapters valid for n pointers.
            let a = unsafe { (*adapters.add(i)).as_ref() }.ok_or(Error::NullEntry {
                name: "adapters",
                index: i,
            })?;
            // SAFETY: scales NULL or valid for n floats.
            let scale = if scales.is_null() {
                1.0
            } else {
                unsafe { *scales.add(i) }
            };
            set.push((&*a.inner, scale));
        }
        s.lock()?.set_adapters(&set, mode)?;
        Ok(())
    })
}

/// Runtime mode: gives each sample of the next UNet calls its own adapter, as an index into
/// the active set (-1 = none); `n` must equal those calls' batch. NULL or `n = 0` returns to
/// applying the whole set to every sample.
///
/// # Safety
/// `session` a live session used by this thread only; `indices` NULL or valid for `n` values.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_set_sample_adapters(
    session: *mut hdb_session,
    indices: *const i32,
    n: usize,
) -> hdb_status {
    ffi_boundary("hdb_session_set_sample_adapters", || {
        // SAFETY: caller contract.
        let s = unsafe { arg_ref(session, "session") }?;
        let mut s = s.lock()?;
        if indices.is_null() || n == 0 {
            return s.set_sample_adapters(None);
        }
        // n must equal the batch of the next calls, so it is bounded like a batch.
        crate::limits::check_range("n", n, crate::limits::MAX_BATCH)?;
        // SAFETY: valid for n values.
        let idx = unsafe { std::slice::from_raw_parts(indices, n) }.to_vec();
        s.set_sample_adapters(Some(idx))
    })
}

/// Cancels the call running on `session` on another thread (`hdb_generate`,
/// `hdb_session_unet`): it returns `HDB_STATUS_CANCELLED` at its next check (after each
/// denoising step, and between the phases: component build on a model's first call, text
/// encoding, denoising, VAE decode; a UNet evaluation after it). The only session call that
/// may be made from any thread at any time, also from a progress callback. With no call
/// running it does nothing: a request never carries over to the next call. Returns
/// `HDB_STATUS_OK` either way.
///
/// # Safety
/// `session` NULL (`HDB_STATUS_NULL_ARGUMENT`) or a live session (not yet freed).
#[no_mangle]
pub unsafe extern "C" fn hdb_session_cancel(session: *const hdb_session) -> hdb_status {
    ffi_boundary("hdb_session_cancel", || {
        // SAFETY: caller contract.
        let s = unsafe { arg_ref(session, "session") }?;
        s.cancel.cancel();
        Ok(())
    })
}

/// Frees a session; NULL is a no-op. May be called from any thread (a finalizer's), once no
/// call on the session runs. Freeing it while another thread is inside a call on it is
/// detected when that call already holds the session: the session is then not freed (it is
/// leaked, so the running call is not broken) and an error is logged. A second free, or any
/// use after the free, is undefined behaviour.
///
/// # Safety
/// `session` NULL or a session from `hdb_session_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_free(session: *mut hdb_session) {
    ffi_infallible((), || {
        if session.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in hdb_session_new, freed once.
        let boxed = unsafe { Box::from_raw(session) };
        let busy = matches!(boxed.inner.try_lock(), Err(TryLockError::WouldBlock));
        if busy {
            log::error!(
                "hdb_session_free: another thread is inside a call on this session; it is \
                 leaked instead of freed (free a session only once its calls have returned)"
            );
            std::mem::forget(boxed);
        }
    })
}
