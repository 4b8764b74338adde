//! Text to image: tokenize, encode the prompt and the negative prompt, denoise with
//! classifier-free guidance, decode with the VAE. Equal to diffusers' StableDiffusionPipeline
//! given the same latents; seeded noise comes from hdb's own RNG
//! ([`crate::model::random::normals`] on a splitmix64 stream seeded with the seed).

use std::path::Path;

use crate::adapter::apply::{AdapterCtx, Applied};
use crate::backend::device_unet::{DeviceAdapters, DeviceTextVae, DeviceUnet};
use crate::error::{Error, Result};
use crate::io::diffusers::read_json;
use crate::model::random::{normals, SplitMix64};
use crate::model::scheduler::{self, SamplerKind, SchedulerConfig};
use crate::model::text_encoder::TextEncoder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Unet, UnetInput};
use crate::model::vae::Vae;
use crate::model::Model;
use crate::runtime::Runtime;

/// Everything a generation needs, built once and shared. The tokenizer runs on the CPU; the
/// UNet, text encoder and VAE run on the runtime's device when the pipeline has them
/// (`device_unet`, `device_text_vae`), else on the CPU.
pub struct Pipeline {
    pub tokenizer: ClipTokenizer,
    /// The text encoder on the CPU; `None` when `device_text_vae` runs it (no host copy of
    /// its weights is kept then: its adapter sets are built on the device,
    /// [`DeviceTextVae::text_adapters`]).
    pub text_encoder: Option<TextEncoder>,
    /// The UNet on the CPU; `None` when `device_unet` runs the denoising (no host copy of its
    /// weights is kept then: its adapter sets are built on the device,
    /// [`DeviceUnet::adapters`]).
    pub unet: Option<std::sync::Arc<Unet>>,
    /// The VAE on the CPU; `None` when `device_text_vae` runs it.
    pub vae: Option<Vae>,
    pub scheduler: SchedulerConfig,
    /// The UNet on the runtime's device (see [`Pipeline::from_model_on`]): denoising runs
    /// there, with adapter sets built for it ([`GenerateAdapters::device_unet`]).
    pub device_unet: Option<DeviceUnet>,
    /// The text encoder and VAE on the runtime's device.
    pub device_text_vae: Option<DeviceTextVae>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// One generation's settings (diffusers' StableDiffusionPipeline arguments).
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 disables guidance (one UNet pass per step).
    pub guidance: f32,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    /// Start from these latents [batch, C, H/f, W/f] (unscaled noise, as diffusers'
    /// `latents=`) instead of seeded noise.
    pub latents: Option<Vec<f32>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.5,
            sampler: SamplerKind::EulerAncestral,
            seed: 0,
            width: 512,
            height: 512,
            batch: 1,
            latents: None,
        }
    }
}

/// A session's adapters for one generation: one set for the text encoder and the UNet, and
/// optionally an index per image (runtime mode). The UNet set is `unet` for a pipeline that
/// runs its UNet on the CPU, `device_unet` (from [`DeviceUnet::adapters`]) for one with a
/// device UNet; giving the other kind is an error. The text encoder's set is
/// `text_encoder` (resolved against [`Pipeline::text_encoder`]) on the CPU,
/// `device_text_encoder` (from [`DeviceTextVae::text_adapters`]) on a device; a device text
/// encoder still takes a host set, uploading it for the call.
#[derive(Clone, Copy, Default)]
pub struct GenerateAdapters<'a> {
    pub unet: Option<&'a Applied>,
    pub text_encoder: Option<&'a Applied>,
    pub per_image: Option<&'a [i32]>,
    pub device_unet: Option<&'a DeviceAdapters>,
    pub device_text_encoder: Option<&'a DeviceAdapters>,
}

/// The result: RGB8 images (row-major, 3 bytes a pixel) and the final latents.
#[derive(Debug)]
pub struct Generated {
    pub images: Vec<Vec<u8>>,
    pub width: usize,
    pub height: usize,
    /// [batch, C, H/f, W/f]: what diffusers returns with `output_type="latent"`.
    pub latents: Vec<f32>,
    /// Images as floats in [0, 1], [batch, H, W, 3] (diffusers' `output_type="np"`).
    pub pixels: Vec<f32>,
}

/// Called after each denoising step with (step done, steps total); `false` cancels.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

impl Pipeline {
    /// Builds every component of a diffusers folder or LDM file (the tokenizer needs the
    /// folder's `tokenizer/`).
    pub fn from_model(model: &Model) -> Result<Pipeline> {
        Pipeline::build(model, None, None)
    }

    /// `model`'s pipeline with `device_unet` for its UNet and `device_text_vae` for its text
    /// encoder and VAE (no CPU copies of what runs on a device are built), else the CPU's.
    fn build(
        model: &Model,
        device_unet: Option<DeviceUnet>,
        device_text_vae: Option<DeviceTextVae>,
    ) -> Result<Pipeline> {
        let tok = model.tokenizer.as_ref().ok_or_else(|| {
            Error::invalid_model(&model.path, "the model has no tokenizer/ folder")
        })?;
        let scheduler = match scheduler_config_path(&model.path) {
            Some(p) => SchedulerConfig::from_json(&read_json(&p)?, &p)?,
            None => SchedulerConfig::default(),
        };
        let on_host = device_text_vae.is_none();
        Ok(Pipeline {
            tokenizer: ClipTokenizer::from_folder(tok)?,
            text_encoder: on_host
                .then(|| TextEncoder::from_model(model))
                .transpose()?,
            unet: match device_unet {
                Some(_) => None,
                None => Some(model.unet()?),
            },
            vae: on_host.then(|| Vae::from_model(model)).transpose()?,
            scheduler,
            device_unet,
            device_text_vae,
        })
    }

    /// As [`Pipeline::from_model`], built in `rt`'s threads, with the UNet, text encoder and
    /// VAE on `rt`'s device when it has one (uploaded on first use, cached by the model).
    pub fn from_model_on(model: &Model, rt: &Runtime) -> Result<Pipeline> {
        let device_text_vae = DeviceTextVae::for_runtime(rt, model)?;
        if let Some(d) = &device_text_vae {
            log::info!(
                "the pipeline's text encoder and VAE run on {}",
                d.describe()
            );
        }
        let device_unet = DeviceUnet::for_runtime(rt, model)?;
        if let Some(d) = &device_unet {
            log::info!("the pipeline's UNet runs on {}", d.describe());
        }
        rt.install(|| Pipeline::build(model, device_unet, device_text_vae))
    }

    /// The UNet's config, from whichever copy the pipeline has.
    pub fn unet_config(&self) -> Result<&crate::model::config::UnetConfig> {
        match (&self.unet, &self.device_unet) {
            (Some(u), _) => Ok(&u.config),
            (None, Some(d)) => Ok(d.config()),
            (None, None) => Err(no_unet()),
        }
    }

    /// Every adaptable projection (UNet and text encoder) by adapter key, wherever they run.
    pub fn adaptable_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        let mut t = match (&self.unet, &self.device_unet) {
            (Some(u), _) => u.adaptable_layers(),
            (None, Some(d)) => d.adaptable_layers(),
            (None, None) => Default::default(),
        };
        t.extend(self.text_encoder_layers());
        t
    }

    /// A session's set on the pipeline's UNet, wherever it runs: `(host, device)`, the other
    /// `None`.
    pub fn unet_adapters(
        &self,
        set: &[(&crate::adapter::Adapter, f32)],
        mode: crate::adapter::apply::ApplyMode,
    ) -> Result<(Option<Applied>, Option<DeviceAdapters>)> {
        match (&self.device_unet, &self.unet) {
            (Some(d), _) => Ok((None, Some(d.adapters(set, mode)?))),
            (None, Some(u)) => Ok((Some(Applied::new(set, mode, &**u)?), None)),
            (None, None) => Err(no_unet()),
        }
    }

    /// The VAE's config, from whichever copy the pipeline has.
    pub fn vae_config(&self) -> Result<&crate::model::vae::VaeConfig> {
        match (&self.vae, &self.device_text_vae) {
            (Some(v), _) => Ok(&v.config),
            (None, Some(d)) => Ok(d.vae_config()),
            (None, None) => Err(Error::Internal(
                "the pipeline has no VAE (neither `vae` nor `device_text_vae`)".into(),
            )),
        }
    }

    /// The text encoder's adaptable projections by adapter key, wherever it runs.
    pub fn text_encoder_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        match (&self.text_encoder, &self.device_text_vae) {
            (Some(t), _) => t.adaptable_layers(),
            (None, Some(d)) => d.text_encoder_layers(),
            (None, None) => Default::default(),
        }
    }

    /// A session's set on the pipeline's text encoder, wherever it runs: `(host, device)`,
    /// one of them `None` (both when the set changes no text-encoder layer).
    pub fn text_adapters(
        &self,
        set: &[(&crate::adapter::Adapter, f32)],
        mode: crate::adapter::apply::ApplyMode,
    ) -> Result<(Option<Applied>, Option<DeviceAdapters>)> {
        if !crate::adapter::touches_text_encoder(set) {
            return Ok((None, None));
        }
        match (&self.text_encoder, &self.device_text_vae) {
            (Some(t), _) => Ok((Some(Applied::new(set, mode, t)?), None)),
            (None, Some(d)) => Ok((None, d.text_adapters(set, mode)?)),
            (None, None) => Err(Error::Internal(
                "the pipeline has no text encoder (neither `text_encoder` nor `device_text_vae`)"
                    .into(),
            )),
        }
    }

    /// Prompt embeddings for `texts` (each padded to the tokenizer's length) -> [n, L, D],
    /// with the text encoder's set: `host` on the CPU text encoder (a device one uploads it
    /// for the call), or `device` (built by [`DeviceTextVae::text_adapters`]; `per_sample`
    /// as for the UNet) on the device one.
    pub fn encode_prompts(
        &self,
        texts: &[&str],
        host: Option<&AdapterCtx<'_>>,
        device: Option<&DeviceAdapters>,
        per_sample: Option<&[i32]>,
    ) -> Result<(Vec<f32>, usize)> {
        let ids: Vec<u32> = texts
            .iter()
            .flat_map(|t| self.tokenizer.encode_padded(t))
            .collect();
        let len = self.tokenizer.max_len();
        let hidden = match (&self.device_text_vae, &self.text_encoder) {
            (Some(d), _) => d.encode_text(&ids, texts.len(), device, per_sample, host)?,
            (None, Some(_)) if device.is_some() => {
                return Err(Error::invalid_arg(
                    "adapters",
                    "a device text-encoder set was given but this pipeline runs its text \
                     encoder on the CPU",
                ))
            }
            (None, Some(t)) => t.forward(&ids, texts.len(), host)?,
            (None, None) => {
                return Err(Error::Internal(
                    "the pipeline has no text encoder (neither `text_encoder` nor \
                     `device_text_vae`)"
                        .into(),
                ))
            }
        };
        Ok((hidden, len))
    }

    /// Runs a generation. Errors name the parameter at fault; cancelling through `progress`
    /// returns `Error::Cancelled` within one step.
    pub fn generate(
        &self,
        p: &GenerateParams,
        ad: GenerateAdapters<'_>,
        mut progress: Option<Progress<'_>>,
    ) -> Result<Generated> {
        let vae_config = self.vae_config()?;
        let f = vae_config.downscale();
        let lc = self.unet_config()?.in_channels;
        crate::limits::check_range("batch", p.batch, crate::limits::MAX_BATCH)?;
        crate::limits::check_image_size(p.width, p.height, f)?;
        if self.vae.is_some() {
            vae_config.check_decode_memory(p.batch, p.height, p.width)?;
        }
        if !p.guidance.is_finite() {
            return Err(Error::invalid_arg(
                "guidance",
                format!("{} is not a finite number", p.guidance),
            ));
        }
        let (h, w, b) = (p.height / f, p.width / f, p.batch);
        let n = b * lc * h * w;
        if let Some(idx) = ad.per_image {
            if idx.len() != b {
                return Err(Error::invalid_arg(
                    "adapter_index",
                    format!("{} entries for a batch of {b}", idx.len()),
                ));
            }
        }
        match (&self.device_unet, ad.unet, ad.device_unet) {
            (Some(d), Some(_), _) => {
                return Err(Error::invalid_arg(
                    "adapters",
                    format!(
                        "this pipeline runs its UNet on {}: its adapter set must be built for \
                         it (DeviceUnet::adapters), not for the CPU UNet",
                        d.describe()
                    ),
                ))
            }
            (None, _, Some(_)) => {
                return Err(Error::invalid_arg(
                    "adapters",
                    "a device adapter set was given but this pipeline runs its UNet on the CPU",
                ))
            }
            _ => {}
        }
        let cfg = p.guidance > 1.0;
        let mut sched = scheduler::make(p.sampler, &self.scheduler, p.steps)?;
        let mut rng = SplitMix64(p.seed);
        if let Some((i, v)) = p
            .latents
            .iter()
            .flatten()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            // They would run through every step and decode to a black image without a word.
            return Err(Error::invalid_arg(
                "latents",
                format!("value {i} is {v}; starting latents must be finite"),
            ));
        }
        let mut latents: Vec<f32> = match &p.latents {
            Some(l) if l.len() == n => l.clone(),
            Some(l) => {
                return Err(Error::invalid_arg(
                    "latents",
                    format!(
                        "has {} values, expected [{b}, {lc}, {h}, {w}] = {n}",
                        l.len()
                    ),
                ))
            }
            None => normals(&mut rng, n).into_iter().map(|x| x as f32).collect(),
        };
        let sigma0 = sched.init_noise_sigma();
        latents.iter_mut().for_each(|x| *x *= sigma0);

        // Text: [negative x b ; prompt x b] with guidance (diffusers' order), else [prompt x b].
        let doubled: Option<Vec<i32>> = ad.per_image.map(|i| {
            if cfg {
                i.iter().chain(i).copied().collect()
            } else {
                i.to_vec()
            }
        });
        let te_ad = ad.text_encoder.map(|applied| AdapterCtx {
            applied,
            per_sample: doubled.as_deref(),
        });
        let unet_ad = ad.unet.map(|applied| AdapterCtx {
            applied,
            per_sample: doubled.as_deref(),
        });
        let mut texts: Vec<&str> = Vec::new();
        if cfg {
            texts.extend(std::iter::repeat_n(p.negative_prompt.as_str(), b));
        }
        texts.extend(std::iter::repeat_n(p.prompt.as_str(), b));
        let (context, l) = self.encode_prompts(
            &texts,
            te_ad.as_ref(),
            ad.device_text_encoder,
            doubled.as_deref(),
        )?;

        let total = sched.timesteps().len();
        for i in 0..total {
            let t = sched.timesteps()[i];
            let x = sched.scale_model_input(&latents, i);
            let model_in: Vec<f32> = if cfg {
                x.iter().chain(&x).copied().collect()
            } else {
                x
            };
            let nb = if cfg { 2 * b } else { b };
            let ts = vec![t; nb];
            let input = UnetInput {
                sample: &model_in,
                timesteps: &ts,
                context: &context,
                batch: nb,
                height: h,
                width: w,
                context_len: l,
            };
            let eps = match (&self.device_unet, &self.unet) {
                (Some(d), _) => d.forward(&input, ad.device_unet, doubled.as_deref())?,
                (None, Some(u)) => u.forward_with(&input, unet_ad.as_ref())?,
                (None, None) => return Err(no_unet()),
            };
            let eps: Vec<f32> = if cfg {
                let (u, c) = eps.split_at(n);
                u.iter()
                    .zip(c)
                    .map(|(u, c)| u + p.guidance * (c - u))
                    .collect()
            } else {
                eps
            };
            let mut noise = |k: usize| {
                normals(&mut rng, k)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect::<Vec<f32>>()
            };
            latents = sched.step(&eps, i, &latents, &mut noise)?;
            if let Some(cb) = progress.as_mut() {
                if !cb(i + 1, total) {
                    return Err(Error::Cancelled);
                }
            }
        }
        let scaled: Vec<f32> = latents
            .iter()
            .map(|x| x / vae_config.scaling_factor)
            .collect();
        let img = match (&self.device_text_vae, &self.vae) {
            (Some(d), _) => d.decode(&scaled, b, h, w)?,
            (None, Some(v)) => v.decode(&scaled, b, h, w)?,
            (None, None) => return Err(Error::Internal("the pipeline has no VAE".into())),
        };
        let (hh, ww) = (h * f, w * f);
        let oc = vae_config.out_channels;
        let mut pixels = vec![0f32; b * hh * ww * 3];
        let mut images = Vec::with_capacity(b);
        for s in 0..b {
            let mut rgb = vec![0u8; hh * ww * 3];
            for y in 0..hh {
                for x in 0..ww {
                    for c in 0..3 {
                        let v = img[((s * oc + c.min(oc - 1)) * hh + y) * ww + x];
                        let v = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                        let at = (y * ww + x) * 3 + c;
                        pixels[s * hh * ww * 3 + at] = v;
                        rgb[at] = (v * 255.0).round() as u8;
                    }
                }
            }
            images.push(rgb);
        }
        Ok(Generated {
            images,
            width: ww,
            height: hh,
            latents,
            pixels,
        })
    }
}

fn no_unet() -> Error {
    Error::Internal("the pipeline has no UNet (neither `unet` nor `device_unet`)".into())
}

fn scheduler_config_path(model: &Path) -> Option<std::path::PathBuf> {
    let p = model.join("scheduler/scheduler_config.json");
    p.is_file().then_some(p)
}
