//! `hdb_finetune` and `hdb_personalize`: an identity adapter trained on one face photo, on
//! a model (its engine and runtime); and `hdb_finetune_params`.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

use super::adapter::hdb_adapter;
use super::boundary::{arg_ref, arg_str, ffi_boundary, ffi_infallible, out_ptr};
use super::generate::hdb_image;
use super::hypernet::{hdb_hypernet, hdb_predict_params};
use super::model::hdb_model;
use super::params::{read_params, Versioned};
use super::status::hdb_status;
use super::HostProgress;
use crate::error::{Error, Result};
use crate::train::adamw::LrSchedule;
use crate::train::finetune::{Face, FinetuneParams, Finetuned, Start};

/// How `hdb_finetune` starts.
pub type hdb_finetune_mode = u32;
/// Rank-relaxed finetuning when a start adapter is given, LiDB from zero otherwise.
pub const HDB_FINETUNE_AUTO: hdb_finetune_mode = 0;
/// Rank-relaxed finetuning of the start adapter (required): its update becomes the first
/// components of a rank-`rank` LoRA (default 4); the result is a PEFT LoRA.
pub const HDB_FINETUNE_RELAXED: hdb_finetune_mode = 1;
/// LiDB optimization from zero on every adaptable layer (rank `rank`, default 1); the result
/// is a LiDB adapter. No start adapter.
pub const HDB_FINETUNE_LIDB_FROM_ZERO: hdb_finetune_mode = 2;

/// Learning-rate schedules (diffusers' `get_scheduler` names).
pub type hdb_lr_schedule = u32;
pub const HDB_LR_CONSTANT: hdb_lr_schedule = 0;
pub const HDB_LR_CONSTANT_WITH_WARMUP: hdb_lr_schedule = 1;
pub const HDB_LR_COSINE: hdb_lr_schedule = 2;

/// Called after each training step with the step number (1-based), the total and the step's
/// loss; return false to cancel (the call then returns `HDB_STATUS_CANCELLED` and writes
/// nothing). `bool` is C's one-byte `_Bool` (C#: `[return: MarshalAs(UnmanagedType.I1)]`).
///
/// Thread: as `hdb_progress_fn`: on the calling thread or an hdb worker thread while the
/// caller waits, one call at a time; it must not unwind and must not call back into hdb
/// (except the functions `hdb_progress_fn` names).
pub type hdb_train_progress_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, step: u64, steps: u64, loss: f32) -> bool>;

/// Options for `hdb_finetune` and `hdb_personalize`. Get the defaults from
/// `hdb_finetune_params_default()`; a 0 in a numeric field means the mode's default.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_finetune_params {
    pub struct_size: u32,
    /// `HDB_FINETUNE_*` (default `HDB_FINETUNE_AUTO`).
    pub mode: hdb_finetune_mode,
    /// Optimizer steps; 0 = 40 (rank-relaxed) or 200 (from zero).
    pub steps: u32,
    /// LoRA rank (rank-relaxed, 0 = 4) or LiDB rank (from zero, 0 = 1).
    pub rank: u32,
    /// AdamW learning rate; 0 = 1e-4 (rank-relaxed) or 1e-2 (from zero).
    pub lr: f32,
    /// AdamW weight decay (default 0.01, torch's).
    pub weight_decay: f32,
    /// The gradients' global norm is clipped to this (default 1; INFINITY: no clipping).
    pub max_grad_norm: f32,
    /// `HDB_LR_*` (default constant).
    pub lr_schedule: hdb_lr_schedule,
    /// Warm-up steps of the schedule (default 0).
    pub warmup_steps: u32,
    /// The side in pixels the face is encoded at (0 = 512, SD 1.5's).
    pub resolution: u32,
    /// 1 (default): recompute each UNet block in the backward pass (less memory); 0: keep
    /// every activation.
    pub checkpointing: u32,
    /// Seed of hdb's random stream (timesteps, posterior draws, noise; the README).
    pub seed: u64,
    /// UTF-8 training prompt, `[V]` standing for `token`; NULL = `"a [V] face"`.
    pub prompt: *const c_char,
    /// UTF-8 identity token; NULL = "sks".
    pub token: *const c_char,
    pub progress: hdb_train_progress_fn,
    pub progress_user_data: *mut c_void,
}

impl Versioned for hdb_finetune_params {
    const SIZES: &'static [usize] = &[std::mem::size_of::<hdb_finetune_params>()];
}

fn default_finetune_params() -> hdb_finetune_params {
    hdb_finetune_params {
        struct_size: std::mem::size_of::<hdb_finetune_params>() as u32,
        mode: HDB_FINETUNE_AUTO,
        steps: 0,
        rank: 0,
        lr: 0.0,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        lr_schedule: HDB_LR_CONSTANT,
        warmup_steps: 0,
        resolution: 0,
        checkpointing: 1,
        seed: 0,
        prompt: std::ptr::null(),
        token: std::ptr::null(),
        progress: None,
        progress_user_data: std::ptr::null_mut(),
    }
}

/// The default finetune params.
#[no_mangle]
pub extern "C" fn hdb_finetune_params_default() -> hdb_finetune_params {
    ffi_infallible(default_finetune_params(), default_finetune_params)
}

/// Writes the default finetune params into `*params`, `struct_size` included: the values of
/// `hdb_finetune_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_finetune_params_init(
    params: *mut hdb_finetune_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_finetune_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_finetune_params(), "params") }
    })
}

/// The library's params from the C struct, for a run that is rank-relaxed or not.
///
/// # Safety
/// The string fields NULL or NUL-terminated.
unsafe fn convert(p: &hdb_finetune_params, relaxed: bool) -> Result<FinetuneParams> {
    let text = |ptr: *const c_char, name: &'static str, default: &str| -> Result<String> {
        Ok(if ptr.is_null() {
            default.to_string()
        } else {
            // SAFETY: the field is NULL or a NUL-terminated string.
            unsafe { arg_str(ptr, name) }?.to_string()
        })
    };
    let (steps, lr) = if relaxed { (40, 1e-4) } else { (200, 1e-2) };
    let schedule = match p.lr_schedule {
        HDB_LR_CONSTANT => LrSchedule::Constant,
        HDB_LR_CONSTANT_WITH_WARMUP => LrSchedule::ConstantWithWarmup,
        HDB_LR_COSINE => LrSchedule::Cosine,
        v => {
            return Err(Error::invalid_arg(
                "params.lr_schedule",
                format!("{v} is not an HDB_LR_* value"),
            ))
        }
    };
    if p.checkpointing > 1 {
        return Err(Error::invalid_arg("params.checkpointing", "must be 0 or 1"));
    }
    let mut f = FinetuneParams {
        steps: if p.steps == 0 {
            steps
        } else {
            p.steps as usize
        },
        schedule,
        warmup_steps: p.warmup_steps as usize,
        max_grad_norm: p.max_grad_norm,
        prompt: text(p.prompt, "params.prompt", "a [V] face")?,
        token: text(p.token, "params.token", "sks")?,
        seed: p.seed,
        checkpoint: p.checkpointing == 1,
        resolution: if p.resolution == 0 {
            512
        } else {
            p.resolution as usize
        },
        ..FinetuneParams::default()
    };
    f.optimizer.lr = if p.lr == 0.0 { lr } else { p.lr };
    f.optimizer.weight_decay = p.weight_decay;
    f.check()?;
    Ok(f)
}

/// The host's step callback and its user data.
struct HostSteps {
    cb: hdb_train_progress_fn,
    user_data: *mut c_void,
}

// SAFETY: the header documents that the callback may run on an hdb thread while the caller
// waits; user_data is only passed back to the callback.
unsafe impl Send for HostSteps {}
unsafe impl Sync for HostSteps {}

impl HostSteps {
    fn call(&self, step: usize, steps: usize, loss: f32) -> bool {
        match self.cb {
            // SAFETY: the host's callback with its own user data.
            Some(cb) => unsafe { cb(self.user_data, step as u64, steps as u64, loss) },
            None => true,
        }
    }
}

/// Publishes a finished run: the adapter, or `HDB_STATUS_DIVERGED` naming the step.
fn publish(run: Finetuned, out: *mut *mut hdb_adapter) -> Result<()> {
    if let Some(step) = run.diverged_at {
        return Err(Error::Diverged(format!(
            "the loss or a gradient was NaN or infinite at step {step} (lower params.lr?)"
        )));
    }
    let boxed = Box::new(hdb_adapter {
        inner: Arc::new(run.trainable.to_adapter()),
    });
    // SAFETY: callers checked `out` non-null.
    unsafe { *out = Box::into_raw(boxed) };
    Ok(())
}

/// Trains an identity adapter for `model` on the face in `face` (RGB8, any size >= 16x16;
/// center-cropped and resized to `params.resolution`) with the diffusion loss: rank-relaxed
/// finetuning of `start` (e.g. `hdb_hypernet_predict`'s adapter), or LiDB optimization from
/// zero (`start` NULL). `params` NULL means the defaults. On success `*out` owns the new
/// adapter (a PEFT LoRA, or a LiDB adapter; save it with `hdb_adapter_save`). A cancelled,
/// diverged (`HDB_STATUS_DIVERGED`, naming the step) or failed run writes nothing and changes
/// nothing; `model` and `start` are only read. Training runs on the CPU: a model on a CUDA
/// runtime returns `HDB_STATUS_UNSUPPORTED` (no GPU backward kernels yet).
///
/// # Safety
/// `model` a live model; `face` valid with `data` valid for `data_len` bytes; `start` NULL or
/// a live adapter; `params` NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_finetune(
    model: *const hdb_model,
    face: *const hdb_image,
    start: *const hdb_adapter,
    params: *const hdb_finetune_params,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_finetune", || {
        // SAFETY: caller contract for each pointer.
        let m = unsafe { arg_ref(model, "model") }?;
        let face = unsafe { arg_ref(face, "face") }?;
        let p = unsafe { read_params(params, default_finetune_params(), "params") }?;
        let out = out_ptr(out, "out")?;
        // SAFETY: start NULL or a live adapter.
        let start = unsafe { start.as_ref() };
        let relaxed = match (p.mode, start) {
            (HDB_FINETUNE_AUTO, s) => s.is_some(),
            (HDB_FINETUNE_RELAXED, Some(_)) => true,
            (HDB_FINETUNE_RELAXED, None) => return Err(Error::NullArgument("start")),
            (HDB_FINETUNE_LIDB_FROM_ZERO, None) => false,
            (HDB_FINETUNE_LIDB_FROM_ZERO, Some(_)) => {
                return Err(Error::invalid_arg(
                    "start",
                    "HDB_FINETUNE_LIDB_FROM_ZERO takes no start adapter (pass NULL)",
                ))
            }
            (v, _) => {
                return Err(Error::invalid_arg(
                    "params.mode",
                    format!("{v} is not an HDB_FINETUNE_* value"),
                ))
            }
        };
        // SAFETY: string fields per the struct's contract.
        let fp = unsafe { convert(&p, relaxed) }?;
        // SAFETY: face.data valid for data_len bytes.
        let (rgb, width, height, stride) = unsafe { face.rgb(("face.format", "face.data")) }?;
        let face = Face {
            rgb,
            width,
            height,
            stride,
        };
        let start = match start {
            Some(a) => Start::Relaxed {
                from: (*a.inner).clone(),
                rank: if p.rank == 0 { 4 } else { p.rank as usize },
            },
            None => Start::LidbFromZero {
                rank: if p.rank == 0 { 1 } else { p.rank as usize },
                a: 100,
                b: 50,
                basis_seed: crate::hypernet::HypernetConfig::default().basis_seed,
                alpha: 1.0,
            },
        };
        let host = HostSteps {
            cb: p.progress,
            user_data: p.progress_user_data,
        };
        let mut report = |s: usize, n: usize, loss: f32| host.call(s, n, loss);
        let run = m.inner.finetune(face, start, &fp, Some(&mut report))?;
        publish(run, out)
    })
}

/// Personalization in one call: `hypernet` predicts the identity of `face` for `model`
/// (`predict_params`: iterations and their progress, NULL for the defaults), then rank-relaxed
/// finetuning trains it (`params`, NULL for the defaults: 40 steps, rank 4). As
/// `hdb_finetune` for the result, failures and threads.
///
/// # Safety
/// `hypernet` and `model` live; `face` valid with `data` valid for `data_len` bytes; the
/// params NULL or valid; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn hdb_personalize(
    hypernet: *const hdb_hypernet,
    model: *const hdb_model,
    face: *const hdb_image,
    predict_params: *const hdb_predict_params,
    params: *const hdb_finetune_params,
    out: *mut *mut hdb_adapter,
) -> hdb_status {
    ffi_boundary("hdb_personalize", || {
        // SAFETY: caller contract for each pointer.
        let h = unsafe { arg_ref(hypernet, "hypernet") }?;
        let m = unsafe { arg_ref(model, "model") }?;
        let face = unsafe { arg_ref(face, "face") }?;
        let pp = unsafe {
            read_params(
                predict_params,
                super::hypernet::default_predict_params(),
                "predict_params",
            )
        }?;
        let p = unsafe { read_params(params, default_finetune_params(), "params") }?;
        let out = out_ptr(out, "out")?;
        if !matches!(p.mode, HDB_FINETUNE_AUTO | HDB_FINETUNE_RELAXED) {
            return Err(Error::invalid_arg(
                "params.mode",
                "personalization finetunes the prediction: HDB_FINETUNE_AUTO or HDB_FINETUNE_RELAXED",
            ));
        }
        // SAFETY: string fields per the struct's contract.
        let fp = unsafe { convert(&p, true) }?;
        // SAFETY: face.data valid for data_len bytes.
        let (rgb, width, height, stride) = unsafe { face.rgb(("face.format", "face.data")) }?;
        let face = Face {
            rgb,
            width,
            height,
            stride,
        };
        let iterations = (pp.iterations > 0).then_some(pp.iterations as usize);
        let predict_host = HostProgress {
            cb: pp.progress,
            user_data: pp.progress_user_data,
        };
        let stage = CString::new("predict").unwrap_or_default();
        let mut predict_report = |d: usize, t: usize| predict_host.call(d, t, &stage);
        let host = HostSteps {
            cb: p.progress,
            user_data: p.progress_user_data,
        };
        let mut report = |s: usize, n: usize, loss: f32| host.call(s, n, loss);
        let rank = if p.rank == 0 { 4 } else { p.rank as usize };
        let run = m.inner.personalize(
            h.net(),
            face,
            iterations,
            rank,
            &fp,
            Some(&mut predict_report),
            Some(&mut report),
        )?;
        publish(run, out)
    })
}
