//! `hdb_generate`: text to RGB8 images on a session, with its adapters.

use std::ffi::{c_char, c_void, CString};

use super::boundary::{arg_ref, arg_str, ffi_boundary, ffi_infallible};
use super::params::{read_params, Versioned};
use super::session::hdb_session;
use super::status::hdb_status;
use super::{hdb_progress_fn, HostProgress};
use crate::error::Error;
use crate::model::scheduler::SamplerKind;
use crate::pipeline::GenerateParams;
use crate::progress::Stage;

/// Samplers (diffusers' schedulers with SD 1.5's config).
pub type hdb_sampler = u32;
pub const HDB_SAMPLER_DDIM: hdb_sampler = 0;
pub const HDB_SAMPLER_EULER: hdb_sampler = 1;
pub const HDB_SAMPLER_EULER_A: hdb_sampler = 2;
pub const HDB_SAMPLER_DPMPP_2M: hdb_sampler = 3;
pub const HDB_SAMPLER_DPMPP_2M_KARRAS: hdb_sampler = 4;

/// Pixel formats of `hdb_image`.
pub type hdb_pixel_format = u32;
/// 3 bytes a pixel, R G B.
pub const HDB_PIXEL_RGB8: hdb_pixel_format = 0;

/// An 8-bit image in caller memory: `height` rows, `stride` bytes apart, at `data`
/// (`data_len` bytes in all).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_image {
    pub data: *mut u8,
    pub data_len: usize,
    pub width: u32,
    pub height: u32,
    /// Bytes from one row to the next (>= width * 3 for RGB8).
    pub stride: u32,
    /// `HDB_PIXEL_*`.
    pub format: hdb_pixel_format,
}

impl hdb_image {
    /// An input image's pixels, width, height and row stride (`stride` 0 = packed), or an
    /// error naming the field at fault (`names`: the format and data fields' names, e.g.
    /// `("face.format", "face.data")`). The pixels' extent is checked by the code that reads
    /// them (`hypernet::preprocess::check`).
    ///
    /// # Safety
    /// `data` NULL or valid for `data_len` bytes.
    pub(crate) unsafe fn rgb(
        &self,
        (format, data): (&'static str, &'static str),
    ) -> crate::Result<(&[u8], usize, usize, usize)> {
        if self.format != HDB_PIXEL_RGB8 {
            return Err(Error::invalid_arg(
                format,
                format!("{} is not HDB_PIXEL_RGB8", self.format),
            ));
        }
        if self.data.is_null() {
            return Err(Error::NullArgument(data));
        }
        // SAFETY: data valid for data_len bytes per the caller's contract.
        let rgb = unsafe { std::slice::from_raw_parts(self.data as *const u8, self.data_len) };
        let (w, h) = (self.width as usize, self.height as usize);
        let stride = if self.stride == 0 {
            w * 3
        } else {
            self.stride as usize
        };
        Ok((rgb, w, h, stride))
    }
}

/// Options for `hdb_generate`. Get the defaults from `hdb_generate_params_default()`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hdb_generate_params {
    pub struct_size: u32,
    /// Denoising steps (default 25).
    pub steps: u32,
    /// Classifier-free guidance scale (default 7.5; <= 1 disables guidance).
    pub guidance: f32,
    /// `HDB_SAMPLER_*` (default Euler ancestral).
    pub sampler: hdb_sampler,
    /// Seed of hdb's noise generator (splitmix64 + Box-Muller; see the README).
    pub seed: u64,
    /// Image size in pixels, multiples of the VAE's factor (8 for SD); default 512 x 512.
    pub width: u32,
    pub height: u32,
    /// Images per call (default 1). With per-sample adapters set on the session, each image
    /// gets its own identity.
    pub batch: u32,
    /// Reserved; must be 0.
    pub reserved: u32,
    /// UTF-8 prompt; NULL means "".
    pub prompt: *const c_char,
    /// UTF-8 negative prompt; NULL means "".
    pub negative_prompt: *const c_char,
    /// Optional starting latents [batch, 4, height/8, width/8] (unscaled noise, as diffusers'
    /// `latents=`); NULL for seeded noise.
    pub latents: *const f32,
    pub latents_len: usize,
    /// Called after each step (stage "denoise"), possibly from an hdb worker thread while the
    /// caller waits; returning false cancels within one step (HDB_STATUS_CANCELLED).
    pub progress: hdb_progress_fn,
    pub progress_user_data: *mut c_void,
    /// 0 (default): `progress` hears the denoising steps only, as above. Nonzero: every
    /// phase, each when it starts (done 0) and after each of its units: "build" (the UNet,
    /// text encoder and VAE made ready on the device: slow on a model's first call, instant
    /// after; total 3), "text" (prompt encoding, total 1), "denoise" (total = steps),
    /// "decode" (the VAE decode, total 1). Returning false cancels at any of them.
    /// A struct from a header without this field ends before it: it then reads as 0.
    pub progress_stages: u32,
}

impl Versioned for hdb_generate_params {
    const SIZES: &'static [usize] = &[
        // The first version ended after `progress_user_data`.
        std::mem::offset_of!(hdb_generate_params, progress_stages)
            .next_multiple_of(std::mem::align_of::<hdb_generate_params>()),
        std::mem::size_of::<hdb_generate_params>(),
    ];
}

fn default_generate_params() -> hdb_generate_params {
    hdb_generate_params {
        struct_size: std::mem::size_of::<hdb_generate_params>() as u32,
        steps: 25,
        guidance: 7.5,
        sampler: HDB_SAMPLER_EULER_A,
        seed: 0,
        width: 512,
        height: 512,
        batch: 1,
        reserved: 0,
        prompt: std::ptr::null(),
        negative_prompt: std::ptr::null(),
        latents: std::ptr::null(),
        latents_len: 0,
        progress: None,
        progress_user_data: std::ptr::null_mut(),
        progress_stages: 0,
    }
}

/// The default generate params.
#[no_mangle]
pub extern "C" fn hdb_generate_params_default() -> hdb_generate_params {
    ffi_infallible(default_generate_params(), default_generate_params)
}

/// Writes the default generate params into `*params`, `struct_size` included: the values of
/// `hdb_generate_params_default()`, for hosts that cannot take a struct returned by value.
///
/// `size` is `sizeof` the caller's struct: only that much is written (a struct from an older
/// header is shorter), and `struct_size` is set to the size written; a size no version has
/// is refused (`HDB_STATUS_INVALID_ARGUMENT`).
///
/// # Safety
/// `params` NULL (`HDB_STATUS_NULL_ARGUMENT`) or `size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_generate_params_init(
    params: *mut hdb_generate_params,
    size: usize,
) -> hdb_status {
    ffi_boundary("hdb_generate_params_init", || {
        // SAFETY: caller contract.
        unsafe { super::params::init_params(params, size, default_generate_params(), "params") }
    })
}

/// Renders `params.batch` images into `out[0..n_out]`: caller-allocated `data` of
/// `data_len` bytes each, rows `stride` bytes apart (0 = packed, `width * 3`); on success
/// width, height, stride and format are set. Uses the session's adapters (one set, or one identity per image after
/// `hdb_session_set_sample_adapters` with n = batch). A cancelled or failed call leaves the
/// session usable and `out` images unspecified.
///
/// # Safety
/// `session` a live session used by this thread only; `params` valid; `out` valid for
/// `n_out` images whose `data` is valid for `data_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn hdb_generate(
    session: *mut hdb_session,
    params: *const hdb_generate_params,
    out: *mut hdb_image,
    n_out: usize,
) -> hdb_status {
    ffi_boundary("hdb_generate", || {
        // SAFETY: caller contract for each pointer.
        let s = unsafe { arg_ref(session, "session") }?;
        if params.is_null() {
            return Err(Error::NullArgument("params"));
        }
        let p = unsafe { read_params(params, default_generate_params(), "params") }?;
        if out.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let text = |ptr: *const c_char, name: &'static str| -> crate::Result<String> {
            // SAFETY: the field is NULL or a NUL-terminated string.
            Ok(if ptr.is_null() {
                String::new()
            } else {
                unsafe { arg_str(ptr, name) }?.to_string()
            })
        };
        let sampler = match p.sampler {
            HDB_SAMPLER_DDIM => SamplerKind::Ddim,
            HDB_SAMPLER_EULER => SamplerKind::Euler,
            HDB_SAMPLER_EULER_A => SamplerKind::EulerAncestral,
            HDB_SAMPLER_DPMPP_2M => SamplerKind::DpmPp2M,
            HDB_SAMPLER_DPMPP_2M_KARRAS => SamplerKind::DpmPp2MKarras,
            v => {
                return Err(Error::invalid_arg(
                    "params.sampler",
                    format!("{v} is not an HDB_SAMPLER_* value"),
                ))
            }
        };
        if p.reserved != 0 {
            return Err(Error::invalid_arg("params.reserved", "must be 0"));
        }
        // Sizes first, before any buffer arithmetic or copy uses them.
        crate::limits::check_range("params.batch", p.batch as usize, crate::limits::MAX_BATCH)?;
        crate::limits::check_range(
            "params.width",
            p.width as usize,
            crate::limits::MAX_IMAGE_SIDE,
        )?;
        crate::limits::check_range(
            "params.height",
            p.height as usize,
            crate::limits::MAX_IMAGE_SIDE,
        )?;
        // Held from here: a second thread on this session gets HDB_STATUS_BUSY.
        let s = s.lock()?;
        let latents = if p.latents.is_null() {
            None
        } else {
            let (lc, f) = (
                s.engine().unet_config()?.in_channels,
                s.engine().vae_config()?.downscale(),
            );
            let dims = [
                p.batch as usize,
                lc,
                p.height as usize / f,
                p.width as usize / f,
            ];
            if crate::limits::product(&dims) != Some(p.latents_len) {
                return Err(Error::invalid_arg(
                    "params.latents_len",
                    format!("is {}, expected {dims:?}", p.latents_len),
                ));
            }
            // SAFETY: valid for latents_len floats per the field's contract.
            let l = unsafe { std::slice::from_raw_parts(p.latents, p.latents_len) };
            let mut v = crate::limits::try_with_capacity(l.len(), "params.latents")?;
            v.extend_from_slice(l);
            Some(v)
        };
        let gp = GenerateParams {
            prompt: text(p.prompt, "params.prompt")?,
            negative_prompt: text(p.negative_prompt, "params.negative_prompt")?,
            steps: p.steps as usize,
            guidance: p.guidance,
            sampler,
            seed: p.seed,
            width: p.width as usize,
            height: p.height as usize,
            batch: p.batch as usize,
            latents,
        };
        if n_out < gp.batch {
            return Err(Error::invalid_arg(
                "n_out",
                format!("{n_out} images for a batch of {}", gp.batch),
            ));
        }
        // SAFETY: out valid for n_out images.
        let outs = unsafe { std::slice::from_raw_parts_mut(out, n_out) };
        let row = gp.width * 3;
        for (i, img) in outs.iter().take(gp.batch).enumerate() {
            let stride = if img.stride == 0 {
                row
            } else {
                img.stride as usize
            };
            let need = (gp.height.saturating_sub(1))
                .checked_mul(stride)
                .and_then(|n| n.checked_add(row))
                .ok_or_else(|| {
                    Error::invalid_arg("out", format!("out[{i}].stride {stride} is too large"))
                })?;
            if stride < row {
                return Err(Error::invalid_arg(
                    "out",
                    format!("out[{i}].stride {stride} < width * 3 = {row}"),
                ));
            }
            if img.data.is_null() {
                const NAMES: [&str; 8] = [
                    "out[0].data",
                    "out[1].data",
                    "out[2].data",
                    "out[3].data",
                    "out[4].data",
                    "out[5].data",
                    "out[6].data",
                    "out[7].data",
                ];
                return Err(Error::NullArgument(
                    NAMES.get(i).copied().unwrap_or("out[i].data"),
                ));
            }
            if img.data_len < need {
                return Err(Error::invalid_arg(
                    "out",
                    format!(
                        "out[{i}] needs {need} bytes of data ({}x{} RGB8)",
                        gp.width, gp.height
                    ),
                ));
            }
        }
        let host = HostProgress {
            cb: p.progress,
            user_data: p.progress_user_data,
        };
        let res = if p.progress_stages == 0 {
            let stage = CString::new("denoise").unwrap_or_default();
            let mut report = |done: usize, total: usize| host.call(done, total, &stage);
            s.generate(&gp, Some(&mut report))?
        } else {
            let names = [Stage::Build, Stage::Text, Stage::Denoise, Stage::Decode]
                .map(|st| (st, CString::new(st.name()).unwrap_or_default()));
            let mut report = |stage: Stage, done: usize, total: usize| {
                names
                    .iter()
                    .find(|(st, _)| *st == stage)
                    .is_none_or(|(_, name)| host.call(done, total, name))
            };
            s.generate_stages(&gp, Some(&mut report))?
        };
        for (img, rgb) in outs.iter_mut().zip(&res.images) {
            let stride = if img.stride == 0 {
                row
            } else {
                img.stride as usize
            };
            for y in 0..res.height {
                // SAFETY: data holds at least (height - 1) * stride + row bytes, checked above.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        rgb[y * row..].as_ptr(),
                        img.data.add(y * stride),
                        row,
                    )
                };
            }
            img.width = res.width as u32;
            img.height = res.height as u32;
            img.stride = stride as u32;
            img.format = HDB_PIXEL_RGB8;
        }
        Ok(())
    })
}
