//! `hdb_model`: a frozen SD model, loaded once and shared (read-only) by any number of threads.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::Arc;

use super::boundary::{arg_path, arg_ref, ffi_boundary, ffi_infallible, out_ptr, write_string};
use super::hdb_progress_fn;
use super::params::Versioned;
use super::params::{read_params, write_out_struct};
use super::runtime::hdb_runtime;
use super::status::hdb_status;
use crate::error::Error;
use crate::io::diffusers::Variant;
use crate::io::keymap::Component;
use crate::model::{Architecture, LoadOptions, Model, SourceFormat};
use crate::session::Engine;
use crate::tensor::DType;

/// Opaque, immutable model: a [`crate::Engine`], the model's weights on a runtime.
/// Thread-safe: any number of threads may use one model at once.
pub struct hdb_model {
    pub(crate) inner: Arc<Engine>,
}

impl hdb_model {
    /// The model's weights (an `hdb_model` always has them: it was loaded from a file).
    pub(crate) fn model(&self) -> crate::Result<&Model> {
        self.inner
            .model()
            .ok_or_else(|| Error::Internal("an hdb_model without weights".into()))
    }
}

/// Which weight files of a diffusers folder to read.
pub type hdb_weights_variant = u32;
/// The plain files if present, else the `fp16` variant (default).
pub const HDB_WEIGHTS_AUTO: hdb_weights_variant = 0;
/// Only `*.safetensors` (no variant).
pub const HDB_WEIGHTS_FULL: hdb_weights_variant = 1;
/// Only `*.fp16.safetensors`.
pub const HDB_WEIGHTS_FP16: hdb_weights_variant = 2;

/// How a loaded model holds its weight files.
pub type hdb_weights_storage = u32;
/// Memory-mapped (default): no copy. The files must not change while the model lives:
/// truncating one kills the process with SIGBUS at the next use (the OS's rule for every
/// mapping), and rewriting one in place changes the model's outputs.
pub const HDB_STORAGE_MMAP: hdb_weights_storage = 0;
/// Read into memory at load: the model is immune to later changes of its files, at the cost
/// of a private copy of their bytes (about 4 GB for SD 1.5 in f32, 2 GB in f16).
pub const HDB_STORAGE_COPY: hdb_weights_storage = 1;

/// Options for `hdb_model_load`. Get the defaults from `hdb_model_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_model_params {
    pub struct_size: u32,
    /// One of `HDB_WEIGHTS_*`.
    pub weights_variant: hdb_weights_variant,
    /// Called after each weight file is read (stage "load"); may be NULL.
    pub progress: hdb_progress_fn,
    /// Passed to `progress` unchanged.
    pub progress_user_data: *mut c_void,
    /// `HDB_STORAGE_MMAP` (default) or `HDB_STORAGE_COPY`: choose COPY when the weight files
    /// may be replaced, truncated or rewritten while the model is loaded.
    pub storage: hdb_weights_storage,
    /// Reserved; must be 0.
    pub reserved: u32,
    /// A tokenizer folder (`tokenizer.json` or `vocab.json` + `merges.txt`, or a diffusers
    /// folder with `tokenizer/`) to use instead of the model's own; NULL (default): the
    /// model's `tokenizer/`, else for SD 1.x models (LDM single files carry no tokenizer) the
    /// built-in CLIP ViT-L/14 tokenizer. Copied during the call.
    pub tokenizer: *const c_char,
}

impl Versioned for hdb_model_params {
    /// Version 1 ended after `progress_user_data`; version 2 added `storage` and `reserved`;
    /// version 3 `tokenizer`.
    const SIZES: &'static [usize] = &[
        std::mem::offset_of!(hdb_model_params, storage),
        std::mem::offset_of!(hdb_model_params, tokenizer),
        std::mem::size_of::<hdb_model_params>(),
    ];
}

fn default_model_params() -> hdb_model_params {
    hdb_model_params {
        struct_size: std::mem::size_of::<hdb_model_params>() as u32,
        weights_variant: HDB_WEIGHTS_AUTO,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        storage: HDB_STORAGE_MMAP,
        reserved: 0,
        tokenizer: std::ptr::null(),
    }
}

/// The default model params.
#[no_mangle]
pub extern "C" fn hdb_model_params_default() -> hdb_model_params {
    ffi_infallible(default_model_params(), default_model_params)
}

/// Writes the default model params into `*params`, `struct_size` included: the values of
/// `hdb_model_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_params_init(
    params: *mut hdb_model_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_model_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_model_params(), "params") }
    })
}

/// Architectures reported in `hdb_model_info.architecture`.
pub type hdb_architecture = u32;
pub const HDB_ARCH_UNKNOWN: hdb_architecture = 0;
pub const HDB_ARCH_SD1: hdb_architecture = 1;
pub const HDB_ARCH_SD2: hdb_architecture = 2;
pub const HDB_ARCH_SDXL: hdb_architecture = 3;

/// Storage formats reported in `hdb_model_info.source_format`.
pub type hdb_source_format = u32;
pub const HDB_FORMAT_DIFFUSERS: hdb_source_format = 1;
pub const HDB_FORMAT_LDM_SINGLE_FILE: hdb_source_format = 2;

/// Element types.
pub type hdb_dtype = u32;
pub const HDB_DTYPE_NONE: hdb_dtype = 0;
pub const HDB_DTYPE_F32: hdb_dtype = 1;
pub const HDB_DTYPE_F16: hdb_dtype = 2;
pub const HDB_DTYPE_BF16: hdb_dtype = 3;

/// One component of a model.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct hdb_component_info {
    /// 1 when the model has this component.
    pub present: u32,
    /// The dtype holding most of its parameters (`HDB_DTYPE_*`).
    pub dtype: hdb_dtype,
    pub tensor_count: u64,
    pub parameter_count: u64,
}

/// What a model holds. Set `struct_size = sizeof(hdb_model_info)` before the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_model_info {
    pub struct_size: u32,
    /// `HDB_ARCH_*`.
    pub architecture: hdb_architecture,
    /// `HDB_FORMAT_*`.
    pub source_format: hdb_source_format,
    /// The UNet's cross-attention width (768 for SD 1.x); 0 when unknown.
    pub cross_attention_dim: u32,
    /// 1 when the model has a tokenizer folder (its `tokenizer/`, or `params.tokenizer`);
    /// 0: SD 1.x models use the built-in CLIP ViT-L/14 tokenizer.
    pub has_tokenizer: u32,
    /// Always 0 (explicit, so no uninitialised padding bytes are copied out).
    pub reserved0: u32,
    pub unet: hdb_component_info,
    pub text_encoder: hdb_component_info,
    pub vae: hdb_component_info,
}

impl Versioned for hdb_model_info {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_model_info>()];
}

/// Loads a model: a diffusers folder (`model_index.json`, `unet/`, `text_encoder/`, `vae/`,
/// `tokenizer/`; `*.fp16.safetensors` and sharded files too), a folder holding one diffusers
/// component, or an LDM single-file `.safetensors` checkpoint. Weights are kept in their dtype,
/// memory-mapped by default: then the files must not be truncated or rewritten while the model
/// lives (a truncated file kills the process with SIGBUS at the next use; one rewritten in
/// place changes the outputs). `params.storage = HDB_STORAGE_COPY` reads them into memory
/// instead. Only regular files are read (a FIFO is refused, never opened for blocking). On
/// success `*out` owns the model (free with `hdb_model_free`).
///
/// # Safety
/// `rt` a live runtime; `path` a NUL-terminated path (any bytes on Unix); `params` NULL or
/// valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_load(
    rt: *mut hdb_runtime,
    path: *const c_char,
    params: *const hdb_model_params,
    out: *mut *mut hdb_model,
) -> hdb_status {
    ffi_boundary("hdb_model_load", || {
        // SAFETY: caller contract for each pointer.
        let rt = unsafe { arg_ref(rt, "rt") }?;
        let path = unsafe { arg_path(path, "path") }?;
        let out = out_ptr(out, "out")?;
        let p = unsafe { read_params(params, default_model_params(), "params") }?;
        let variant = match p.weights_variant {
            HDB_WEIGHTS_AUTO => Variant::Auto,
            HDB_WEIGHTS_FULL => Variant::Full,
            HDB_WEIGHTS_FP16 => Variant::Fp16,
            v => {
                return Err(Error::invalid_arg(
                    "params.weights_variant",
                    format!("{v} is not an HDB_WEIGHTS_* value"),
                ))
            }
        };
        let storage = match p.storage {
            HDB_STORAGE_MMAP => crate::io::safetensors::Storage::Mapped,
            HDB_STORAGE_COPY => crate::io::safetensors::Storage::Copied,
            v => {
                return Err(Error::invalid_arg(
                    "params.storage",
                    format!("{v} is not an HDB_STORAGE_* value"),
                ))
            }
        };
        if p.reserved != 0 {
            return Err(Error::invalid_arg("params.reserved", "must be 0"));
        }
        let tokenizer = if p.tokenizer.is_null() {
            None
        } else {
            // SAFETY: caller contract: NULL or a NUL-terminated path.
            Some(unsafe { arg_path(p.tokenizer, "params.tokenizer") }?)
        };
        let stage = CString::new("load").unwrap_or_default();
        let mut report = |done: usize, total: usize, _f: &Path| match p.progress {
            // SAFETY: the host's callback with its own user data.
            Some(cb) => unsafe {
                cb(
                    p.progress_user_data,
                    done as u64,
                    total as u64,
                    stage.as_ptr(),
                )
            },
            None => true,
        };
        let model = Model::load(
            &path,
            LoadOptions {
                variant,
                storage,
                progress: Some(&mut report),
                tokenizer,
            },
        )?;
        let boxed = Box::new(hdb_model {
            inner: Arc::new(Engine::new(rt.inner.clone(), model)),
        });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

/// As `hdb_model_load`, for an LDM single-file `.safetensors` checkpoint held in memory (for
/// hosts whose model ships inside a package, such as an Android APK's assets): `len` bytes at
/// `bytes` are copied, so the caller may free its buffer when this returns (the copy costs the
/// file's size in memory). `name` (UTF-8, NULL for `"<memory>"`) stands for the file's path in
/// messages and in the base an adapter records. From `params`, `progress` (stage "load",
/// once) and `tokenizer` apply; `weights_variant` and `storage` are ignored (the bytes are
/// always the model's own copy) and `reserved` must be 0. Without `tokenizer`, an SD 1.x
/// model from memory uses the built-in CLIP tokenizer, as a single file on disk does.
///
/// # Safety
/// `rt` a live runtime; `bytes` valid for `len` bytes; `name` NULL or NUL-terminated;
/// `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_load_from_memory(
    rt: *mut hdb_runtime,
    bytes: *const u8,
    len: usize,
    name: *const c_char,
    params: *const hdb_model_params,
    out: *mut *mut hdb_model,
) -> hdb_status {
    ffi_boundary("hdb_model_load_from_memory", || {
        // SAFETY: caller contract for each pointer.
        let rt = unsafe { arg_ref(rt, "rt") }?;
        if bytes.is_null() {
            return Err(Error::NullArgument("bytes"));
        }
        let name = if name.is_null() {
            std::path::PathBuf::from("<memory>")
        } else {
            // SAFETY: non-null and NUL-terminated per the caller's contract.
            unsafe { arg_path(name, "name") }?
        };
        let out = out_ptr(out, "out")?;
        let p = unsafe { read_params(params, default_model_params(), "params") }?;
        if p.reserved != 0 {
            return Err(Error::invalid_arg("params.reserved", "must be 0"));
        }
        // SAFETY: non-null, valid for len bytes per the caller's contract.
        let host = unsafe { std::slice::from_raw_parts(bytes, len) };
        // Reserved fallibly: OUT_OF_MEMORY, not an abort, when it cannot be held twice.
        let mut data = crate::limits::try_with_capacity(len, "bytes")?;
        data.extend_from_slice(host);
        let stage = CString::new("load").unwrap_or_default();
        let mut report = |done: usize, total: usize, _f: &Path| match p.progress {
            // SAFETY: the host's callback with its own user data.
            Some(cb) => unsafe {
                cb(
                    p.progress_user_data,
                    done as u64,
                    total as u64,
                    stage.as_ptr(),
                )
            },
            None => true,
        };
        let tokenizer = if p.tokenizer.is_null() {
            None
        } else {
            // SAFETY: caller contract: NULL or a NUL-terminated path.
            Some(unsafe { arg_path(p.tokenizer, "params.tokenizer") }?)
        };
        let model = Model::load_single_file_bytes(
            &name,
            data,
            LoadOptions {
                progress: Some(&mut report),
                tokenizer,
                ..LoadOptions::default()
            },
        )?;
        let boxed = Box::new(hdb_model {
            inner: Arc::new(Engine::new(rt.inner.clone(), model)),
        });
        // SAFETY: out checked non-null.
        unsafe { *out = Box::into_raw(boxed) };
        Ok(())
    })
}

fn dtype_code(d: Option<DType>) -> hdb_dtype {
    match d {
        None => HDB_DTYPE_NONE,
        Some(DType::F32) => HDB_DTYPE_F32,
        Some(DType::F16) => HDB_DTYPE_F16,
        Some(DType::BF16) => HDB_DTYPE_BF16,
    }
}

fn component_info(m: &Model, c: Component) -> hdb_component_info {
    m.component(c).map_or_else(Default::default, |cw| {
        let s = cw.summary();
        hdb_component_info {
            present: 1,
            dtype: dtype_code(cw.main_dtype()),
            tensor_count: s.tensors as u64,
            parameter_count: s.parameters,
        }
    })
}

/// Reports what a model holds.
///
/// # Safety
/// `model` a live model; `out` a struct whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_get_info(
    model: *const hdb_model,
    out: *mut hdb_model_info,
) -> hdb_status {
    ffi_boundary("hdb_model_get_info", || {
        // SAFETY: caller contract.
        let m = unsafe { arg_ref(model, "model") }?.model()?;
        let out = out_ptr(out, "out")?;
        let info = hdb_model_info {
            struct_size: std::mem::size_of::<hdb_model_info>() as u32,
            architecture: match m.architecture {
                Architecture::Unknown => HDB_ARCH_UNKNOWN,
                Architecture::Sd1 => HDB_ARCH_SD1,
                Architecture::Sd2 => HDB_ARCH_SD2,
                Architecture::Sdxl => HDB_ARCH_SDXL,
            },
            source_format: match m.format {
                SourceFormat::Diffusers => HDB_FORMAT_DIFFUSERS,
                SourceFormat::LdmSingleFile => HDB_FORMAT_LDM_SINGLE_FILE,
            },
            cross_attention_dim: m.cross_attention_dim().unwrap_or(0) as u32,
            has_tokenizer: m.tokenizer.is_some() as u32,
            reserved0: 0,
            unet: component_info(m, Component::Unet),
            text_encoder: component_info(m, Component::TextEncoder),
            vae: component_info(m, Component::Vae),
        };
        // SAFETY: out non-null, sized by the caller.
        unsafe { write_out_struct(out, &info, "out") }
    })
}

/// Writes a JSON description of the model (path, format, architecture, per-component tensor
/// and parameter counts by dtype) into `buf`, NUL-terminated. `*needed` (if non-NULL) gets
/// the size required, NUL included; with `buf` NULL or too small the call returns
/// `HDB_STATUS_BUFFER_TOO_SMALL` after setting it.
///
/// # Safety
/// `model` a live model; `buf` NULL or valid for `buf_len` bytes; `needed` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_describe(
    model: *const hdb_model,
    buf: *mut c_char,
    buf_len: usize,
    needed: *mut usize,
) -> hdb_status {
    ffi_boundary("hdb_model_describe", || {
        // SAFETY: caller contract.
        let m = unsafe { arg_ref(model, "model") }?.model()?;
        let text = m.describe().to_string();
        // SAFETY: caller contract on buf/needed.
        unsafe { write_string(&text, buf, buf_len, needed) }
    })
}

/// Frees a model; NULL is a no-op. Sessions and adapters made from it keep what they need, so
/// it may be freed before them, but not while another thread is inside a call that takes this
/// model. May be called from any thread (a finalizer's).
/// A second free, or any use after the free, is undefined behaviour (not detected: the
/// handle's memory is gone).
///
/// # Safety
/// `model` NULL or a model from `hdb_model_load` not yet freed and no longer in use.
#[no_mangle]
pub unsafe extern "C" fn hdb_model_free(model: *mut hdb_model) {
    ffi_infallible((), || {
        if !model.is_null() {
            // SAFETY: created by Box::into_raw in hdb_model_load, freed once.
            drop(unsafe { Box::from_raw(model) });
        }
    })
}
