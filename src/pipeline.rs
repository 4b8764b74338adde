//! Text to image on a session: tokenize, encode the prompt and the negative prompt, denoise
//! with classifier-free guidance, decode with the VAE, with the session's adapters (one set,
//! or one identity per image). Equal to diffusers' StableDiffusionPipeline given the same
//! latents; seeded noise comes from hdb's own stream ([`crate::rng::normals`] on a
//! splitmix64 started at the seed).

use crate::error::{Error, Result};
use crate::model::scheduler::{self, SamplerKind, SchedulerConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UnetInput;
use crate::placed::Place;
use crate::progress::{Cancel, Progress, Stage, StageProgress};
use crate::rng::{normals, SplitMix64};
use crate::session::{on_sets, On, Session, Sets};

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

impl Session {
    /// Runs a generation with the session's adapters (and per-sample indices: one identity
    /// per image). Errors name the parameter at fault; cancelling through `progress`, or from
    /// another thread through [`Session::canceller`], returns `Error::Cancelled` at the next
    /// check: after each step, and between the phases (component build, text encoding,
    /// denoising, VAE decode).
    pub fn generate(
        &self,
        p: &GenerateParams,
        progress: Option<Progress<'_>>,
    ) -> Result<Generated> {
        match progress {
            Some(cb) => {
                let mut steps = |stage: Stage, done: usize, total: usize| {
                    stage != Stage::Denoise || done == 0 || cb(done, total)
                };
                self.generate_stages(p, Some(&mut steps))
            }
            None => self.generate_stages(p, None),
        }
    }

    /// [`Session::generate`] with progress for every phase ([`Stage`]): the component build
    /// on a first call, the text encoding, each denoising step and the VAE decode, each
    /// reported when it starts (0 done) and after each of its units; `false` cancels.
    pub fn generate_stages(
        &self,
        p: &GenerateParams,
        progress: Option<StageProgress<'_>>,
    ) -> Result<Generated> {
        let cancel = self.cancel_flag();
        let _running = cancel.begin();
        let engine = self.engine();
        let tokenizer = engine.tokenizer()?;
        let scheduler = engine.scheduler()?;
        let per_image = self.per_sample();
        if let Some(idx) = per_image {
            if idx.len() != p.batch {
                return Err(Error::invalid_arg(
                    "adapter_index",
                    format!("{} entries for a batch of {}", idx.len(), p.batch),
                ));
            }
        }
        self.check_batch(per_image, p.batch)?;
        let run = Run {
            tokenizer: &tokenizer,
            scheduler: &scheduler,
            p,
            per_image,
            cancel,
        };
        let rt = engine.runtime();
        on_sets!(&self.on, s => rt.install(|| run.generate(s, progress)))
    }
}

/// One generation's inputs besides the model.
struct Run<'a> {
    tokenizer: &'a ClipTokenizer,
    scheduler: &'a SchedulerConfig,
    p: &'a GenerateParams,
    per_image: Option<&'a [i32]>,
    /// The session's flag, checked between phases and steps.
    cancel: &'a Cancel,
}

impl Run<'_> {
    /// Prompt embeddings for `texts` (each padded to the tokenizer's length) -> [n, L, D],
    /// with the session's text-encoder set.
    fn encode_prompts<B: Place>(
        &self,
        s: &Sets<B>,
        texts: &[&str],
        per_sample: Option<&[i32]>,
    ) -> Result<(Vec<f32>, usize)> {
        let ids: Vec<u32> = texts
            .iter()
            .flat_map(|t| self.tokenizer.encode_padded(t))
            .collect();
        let hidden = s.encode_text(&ids, texts.len(), per_sample)?;
        Ok((hidden, self.tokenizer.max_len()))
    }

    fn generate<B: Place>(
        &self,
        s: &Sets<B>,
        mut progress: Option<StageProgress<'_>>,
    ) -> Result<Generated> {
        let p = self.p;
        // Reports (stage, done, total) to the host; its `false` cancels.
        let mut report = |stage: Stage, done: usize, total: usize| -> Result<()> {
            if progress.as_mut().is_none_or(|cb| cb(stage, done, total)) {
                Ok(())
            } else {
                Err(Error::Cancelled)
            }
        };
        // Building the components on a model's first call is a phase of its own.
        report(Stage::Build, 0, 3)?;
        let vae_config = s.placed.vae()?.config.clone();
        self.cancel.check()?;
        report(Stage::Build, 1, 3)?;
        let lc = s.placed.unet()?.config.in_channels;
        self.cancel.check()?;
        report(Stage::Build, 2, 3)?;
        s.placed.text_encoder()?;
        self.cancel.check()?;
        report(Stage::Build, 3, 3)?;
        let f = vae_config.downscale();
        crate::limits::check_range("batch", p.batch, crate::limits::MAX_BATCH)?;
        crate::limits::check_image_size(p.width, p.height, f)?;
        vae_config.check_decode_memory(p.batch, p.height, p.width)?;
        if !p.guidance.is_finite() {
            return Err(Error::invalid_arg(
                "guidance",
                format!("{} is not a finite number", p.guidance),
            ));
        }
        let (h, w, b) = (p.height / f, p.width / f, p.batch);
        let n = b * lc * h * w;
        let cfg = p.guidance > 1.0;
        let mut sched = scheduler::make(p.sampler, self.scheduler, p.steps)?;
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
        let doubled: Option<Vec<i32>> = self.per_image.map(|i| {
            if cfg {
                i.iter().chain(i).copied().collect()
            } else {
                i.to_vec()
            }
        });
        let mut texts: Vec<&str> = Vec::new();
        if cfg {
            texts.extend(std::iter::repeat_n(p.negative_prompt.as_str(), b));
        }
        texts.extend(std::iter::repeat_n(p.prompt.as_str(), b));
        report(Stage::Text, 0, 1)?;
        let (context, l) = self.encode_prompts(s, &texts, doubled.as_deref())?;
        self.cancel.check()?;
        report(Stage::Text, 1, 1)?;

        let total = sched.timesteps().len();
        report(Stage::Denoise, 0, total)?;
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
            let eps = s.unet(&input, doubled.as_deref())?;
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
            // After the last step this is the check before the VAE decode.
            self.cancel.check()?;
            report(Stage::Denoise, i + 1, total)?;
        }
        report(Stage::Decode, 0, 1)?;
        let scaled: Vec<f32> = latents
            .iter()
            .map(|x| x / vae_config.scaling_factor)
            .collect();
        let img = s.decode(&scaled, b, h, w)?;
        report(Stage::Decode, 1, 1)?;
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
