//! `hdb_session`: one thread's generation state on a shared model. Today it runs single UNet
//! evaluations on caller buffers, for hosts that drive their own sampler.

use std::sync::Arc;

use super::boundary::{arg_ref, ffi_boundary, ffi_infallible, out_ptr};
use super::model::{hdb_model, ModelShared};
use super::params::read_params;
use super::params::Versioned;
use super::status::hdb_status;
use crate::error::Error;
use crate::model::unet::UnetInput;

/// Opaque session. Belongs to one thread at a time; keeps its model alive.
pub struct hdb_session {
    shared: Arc<ModelShared>,
}

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
        let _p = unsafe { read_params(params, default_session_params(), "params") }?;
        let boxed = Box::new(hdb_session {
            shared: m.inner.clone(),
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
/// `sample` [batch, in_channels, height, width], `timesteps` [batch],
/// `context` [batch, context_tokens, cross_attention_dim] -> `out` [batch, out_channels,
/// height, width], all f32, row-major. Each `*_len` is the buffer's length in floats and must
/// equal the shape's size (the error names the argument and the expected shape). The UNet is
/// built on the model's first call (seconds for SD 1.5) and shared afterwards.
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
        let shared = &s.shared;
        let unet = shared.model.unet()?;
        let want = b * unet.config.out_channels * h * w;
        if out_len != want {
            return Err(Error::invalid_arg(
                "out_len",
                format!(
                    "is {out_len}, expected [{b}, {}, {h}, {w}] = {want}",
                    unet.config.out_channels
                ),
            ));
        }
        let y = shared.runtime.install(|| {
            unet.forward(&UnetInput {
                sample,
                timesteps,
                context,
                batch: b,
                height: h,
                width: w,
                context_len: l,
            })
        })?;
        // SAFETY: out is valid for out_len == y.len() floats.
        unsafe { std::ptr::copy_nonoverlapping(y.as_ptr(), out, y.len()) };
        Ok(())
    })
}

/// Frees a session; NULL is a no-op.
///
/// # Safety
/// `session` NULL or a session from `hdb_session_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn hdb_session_free(session: *mut hdb_session) {
    ffi_infallible((), || {
        if !session.is_null() {
            // SAFETY: created by Box::into_raw in hdb_session_new, freed once.
            drop(unsafe { Box::from_raw(session) });
        }
    })
}
