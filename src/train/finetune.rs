//! Finetuning an identity from one face photo with the diffusion loss, as SD finetuning
//! computes it (docs/training.md gives every step and the random stream):
//!
//! 1. the face (any size) is center-cropped and resized as the hypernetwork's preprocessing
//!    does, to `resolution`, scaled to [-1, 1], and encoded once by the VAE encoder;
//! 2. each step draws a timestep uniform in [0, T), a latent from the encoder's posterior
//!    (times the VAE's `scaling_factor`) and noise; the noisy latent is DDPM's
//!    `sqrt(a_t) z + sqrt(1 - a_t) noise` (the model's scheduler config), the target the
//!    noise; the loss is the mean squared error of the UNet's prediction (conditioned on the
//!    prompt, `"a [V] face"` by default, through the text encoder with its adapted layers);
//! 3. AdamW (torch's) on the adapter's tensors, gradients clipped by global norm.
//!
//! Two starts: LiDB optimization from zero (`D_train` random, `U_train` zero, so the update
//! starts at exactly zero) and rank-relaxed finetuning from an adapter (the hypernetwork's
//! prediction): its effective factors become the first components of a rank-`r` LoRA whose
//! other down rows are orthonormal to them and whose other up columns are zero, so the first
//! step starts from exactly the prediction and every direction of the weight is trainable.

use super::adamw::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use super::grad::{loss_and_gradients, Condition, GradInput};
use super::params::{Layout, TrainLayer, Trainable};
use crate::adapter::lidb::{BasisCache, LidbMeta};
use crate::adapter::lora::LoraFormat;
use crate::adapter::Adapter;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::hypernet::preprocess::preprocess;
use crate::model::adaptable::LayerTable;
use crate::model::scheduler::{SchedulerConfig, TrainSchedule};
use crate::model::text_encoder::TextEncoder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::Unet;
use crate::model::vae::Vae;
use crate::rng::{fnv1a64, normals, SplitMix64};

/// Called after each step with (steps done, steps total, the step's loss); `false` cancels.
pub type StepProgress<'a> = &'a mut (dyn FnMut(usize, usize, f32) -> bool + Send);

/// Where a run starts.
#[derive(Clone, Debug)]
pub enum Start {
    /// LiDB optimization from zero on every adaptable layer: rank `rank`, bases of sizes
    /// `a` x `b` (clamped to the smallest layer) from `basis_seed`; `D_train` drawn from the
    /// run's stream, `U_train` zero.
    LidbFromZero {
        rank: usize,
        a: usize,
        b: usize,
        basis_seed: u64,
        alpha: f32,
    },
    /// Rank-relaxed finetuning of `from` (any adapter: the hypernetwork's prediction, a LiDB,
    /// a LoRA) as a LoRA of rank `rank` (at least the adapter's own).
    Relaxed { from: Adapter, rank: usize },
    /// The adapter's own tensors in their file's layout.
    Tensors(Trainable),
}

/// A run's settings. `Default` is the rank-relaxed recipe of the paper: 40 steps, AdamW at
/// 1e-4 (torch's other defaults), constant rate, clipping at norm 1, "a sks face".
#[derive(Clone, Debug)]
pub struct FinetuneParams {
    pub steps: usize,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    pub warmup_steps: usize,
    /// Clip the gradients' global norm to this (infinite: no clipping).
    pub max_grad_norm: f32,
    /// The prompt; every `[V]` in it is replaced by `token`.
    pub prompt: String,
    pub token: String,
    pub seed: u64,
    /// Recompute each UNet block in the backward (less memory).
    pub checkpoint: bool,
    /// The image side fed to the VAE (512 for SD 1.5).
    pub resolution: usize,
}

impl Default for FinetuneParams {
    fn default() -> Self {
        FinetuneParams {
            steps: 40,
            optimizer: AdamWConfig {
                lr: 1e-4,
                ..AdamWConfig::default()
            },
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            prompt: "a [V] face".into(),
            token: "sks".into(),
            seed: 0,
            checkpoint: true,
            resolution: 512,
        }
    }
}

/// Bounds on what a run may ask for (a real run is ~40-2000 steps).
pub const MAX_STEPS: usize = 1_000_000;

impl FinetuneParams {
    /// The prompt with `[V]` replaced by the token.
    pub fn prompt_text(&self) -> String {
        self.prompt.replace("[V]", &self.token)
    }

    pub fn check(&self) -> Result<()> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::invalid_arg(
                "steps",
                format!("{} is not in 1..={MAX_STEPS}", self.steps),
            ));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return Err(Error::invalid_arg(
                "max_grad_norm",
                "must be positive (inf: no clipping)",
            ));
        }
        if self.resolution < crate::hypernet::preprocess::MIN_SIDE || self.resolution > 4096 {
            return Err(Error::invalid_arg(
                "resolution",
                format!("{} is not in 16..=4096", self.resolution),
            ));
        }
        self.optimizer.check()
    }
}

/// The models a run uses, on backend `B`.
pub struct Models<'a, B: Backend> {
    pub unet: &'a Unet<B>,
    pub text_encoder: &'a TextEncoder<B>,
    pub vae: &'a Vae<B>,
    pub tokenizer: &'a ClipTokenizer,
    pub scheduler: &'a SchedulerConfig,
    /// The model's identity layers (what training adapts) and its LiDB basis cache.
    pub layers: &'a LayerTable,
    pub bases: &'a BasisCache,
}

/// A face image: RGB8 rows `stride` bytes apart.
#[derive(Clone, Copy, Debug)]
pub struct Face<'a> {
    pub rgb: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub stride: usize,
}

/// What a run gives back.
#[derive(Clone, Debug)]
pub struct Finetuned {
    /// The adapter's tensors after the last good step.
    pub trainable: Trainable,
    /// The loss of every step that ran.
    pub losses: Vec<f32>,
    /// The step (0-based) whose loss was NaN or infinite, when the run stopped there;
    /// `trainable` is then the adapter before that step.
    pub diverged_at: Option<usize>,
}

/// Standard normals from `rng` as f32.
fn draw(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    normals(rng, n).into_iter().map(|x| x as f32).collect()
}

/// The tensors a run with these params starts from (the first draws of its stream), for
/// comparing before and after.
pub fn initial<B: Backend>(
    m: &Models<'_, B>,
    start: Start,
    params: &FinetuneParams,
) -> Result<Trainable> {
    start_tensors(m, start, &mut SplitMix64(params.seed))
}

/// The adapter a run starts from.
fn start_tensors<B: Backend>(
    m: &Models<'_, B>,
    start: Start,
    rng: &mut SplitMix64,
) -> Result<Trainable> {
    match start {
        Start::Tensors(t) => Ok(t),
        Start::LidbFromZero {
            rank,
            a,
            b,
            basis_seed,
            alpha,
        } => {
            if rank == 0 || a == 0 || b == 0 || !alpha.is_finite() {
                return Err(Error::invalid_arg(
                    "rank",
                    "rank, a and b must be positive and alpha finite",
                ));
            }
            let a = m.layers.values().map(|l| l.din).min().unwrap_or(1).min(a);
            let b = m.layers.values().map(|l| l.dout).min().unwrap_or(1).min(b);
            let meta = LidbMeta {
                rank,
                a,
                b,
                basis_seed,
                alpha,
                base: None,
            };
            let layers = m
                .layers
                .iter()
                .map(|(key, s)| {
                    let scale = 1.0 / (a as f32).sqrt();
                    Ok(TrainLayer {
                        key: key.clone(),
                        din: s.din,
                        dout: s.dout,
                        rank,
                        down: draw(rng, rank * a).iter().map(|x| x * scale).collect(),
                        up: vec![0.0; b * rank],
                        names: None,
                        scale: alpha,
                        basis: Some(m.bases.get(key, basis_seed, a, b, s.din, s.dout)?),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Trainable {
                layout: Layout::Lidb {
                    meta,
                    version: 2,
                    file_metadata: Default::default(),
                },
                layers,
            })
        }
        Start::Relaxed { from, rank } => relax(&from, rank, m.layers),
    }
}

/// `from` as a rank-`rank` PEFT LoRA: its effective factors first, then down rows orthonormal
/// to theirs (norm 1/sqrt 3, PEFT's default init's expected row norm) with zero up columns.
pub fn relax(from: &Adapter, rank: usize, table: &LayerTable) -> Result<Trainable> {
    let mut layers = Vec::with_capacity(from.layers.len());
    if let Some(key) = from
        .layers
        .keys()
        .find(|k| !crate::model::adaptable::is_identity_layer(k))
    {
        return Err(super::params::untrainable("the adapter to finetune", key));
    }
    for (key, l) in &from.layers {
        let s = table.get(key).ok_or_else(|| {
            Error::AdapterMismatch(format!(
                "layer '{key}' is not an adaptable layer of this model"
            ))
        })?;
        let (r0, din, dout) = (l.rank, s.din, s.dout);
        let r = rank.max(r0).min(din);
        let mut down = l.down.clone();
        let mut rng = SplitMix64(0x5245_4c41_5845 ^ fnv1a64(key));
        let rows: Vec<Vec<f64>> = down
            .chunks(din)
            .map(|r| r.iter().map(|&x| x as f64).collect())
            .collect();
        let mut basis: Vec<Vec<f64>> = Vec::new();
        for row in rows {
            if let Some(u) = orthonormalize(row, &basis) {
                basis.push(u);
            }
        }
        while down.len() < r * din {
            let v = normals(&mut rng, din);
            let Some(u) = orthonormalize(v, &basis) else {
                continue;
            };
            let norm = 1.0 / 3f64.sqrt();
            down.extend(u.iter().map(|x| (x * norm) as f32));
            basis.push(u);
        }
        let mut up = vec![0f32; dout * r];
        for o in 0..dout {
            up[o * r..o * r + r0].copy_from_slice(&l.up[o * r0..(o + 1) * r0]);
        }
        layers.push(TrainLayer {
            key: key.clone(),
            din,
            dout,
            rank: r,
            down,
            up,
            names: Some((
                (format!("{key}.lora_A.weight"), vec![r, din]),
                (format!("{key}.lora_B.weight"), vec![dout, r]),
            )),
            scale: 1.0,
            basis: None,
        });
    }
    Ok(Trainable {
        layout: Layout::Lora {
            format: LoraFormat::Peft,
        },
        layers,
    })
}

/// `v` minus its projections on the orthonormal `basis` (twice, for accuracy), normalized;
/// `None` when nothing is left of it.
fn orthonormalize(mut v: Vec<f64>, basis: &[Vec<f64>]) -> Option<Vec<f64>> {
    let n0 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _ in 0..2 {
        for q in basis {
            let d: f64 = v.iter().zip(q).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(q).for_each(|(a, b)| *a -= d * b);
        }
    }
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (n > 1e-6 * n0.max(1e-30)).then(|| v.iter().map(|x| x / n).collect())
}

/// The face encoded once and what each step draws from.
struct Data {
    mean: Vec<f32>,
    logvar: Vec<f32>,
    scaling: f32,
    alphas_cumprod: Vec<f32>,
    condition: Condition,
    h: usize,
    w: usize,
}

impl Data {
    fn new<B: Backend>(
        m: &Models<'_, B>,
        face: Face<'_>,
        t: &Trainable,
        params: &FinetuneParams,
    ) -> Result<Data> {
        let res = params.resolution;
        let f = m.vae.config.downscale();
        if !res.is_multiple_of(f) {
            return Err(Error::invalid_arg(
                "resolution",
                format!("{res} is not a multiple of the VAE's factor {f}"),
            ));
        }
        let image = preprocess(
            face.rgb,
            face.width,
            face.height,
            face.stride,
            res,
            [0.5; 3],
            [0.5; 3],
        )?;
        let (mean, logvar) = m.vae.encode(&image, 1, res, res)?;
        let schedule = TrainSchedule::new(m.scheduler)?;
        // The condition: token ids when the text encoder trains, else its output, once.
        let ids = m.tokenizer.encode_padded(&params.prompt_text());
        let len = ids.len();
        let te_trains = t.layers.iter().any(|l| {
            l.key
                .starts_with(crate::model::adaptable::TEXT_ENCODER_PREFIX)
        });
        let condition = if te_trains {
            Condition::Ids { ids, len }
        } else {
            Condition::Hidden {
                values: m.text_encoder.forward_hooked(&ids, 1, None)?,
                len,
            }
        };
        Ok(Data {
            mean,
            logvar,
            scaling: m.vae.config.scaling_factor,
            alphas_cumprod: schedule.alphas_cumprod,
            condition,
            h: res / f,
            w: res / f,
        })
    }

    /// One step's input, drawn from `rng` in this order (docs/training.md): the timestep
    /// `floor(u T)` with `u = (next >> 11) 2^-53`, the posterior's normals, the noise's.
    fn draw(&self, rng: &mut SplitMix64) -> Result<GradInput> {
        let n = self.mean.len();
        let steps_t = self.alphas_cumprod.len();
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let ts = ((u * steps_t as f64) as usize).min(steps_t - 1);
        let post = draw(rng, n);
        let noise = draw(rng, n);
        let z = Vae::<crate::backend::Cpu>::sample(&self.mean, &self.logvar, &post)?;
        let a = self.alphas_cumprod[ts];
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let sample = z
            .iter()
            .zip(&noise)
            .map(|(z, e)| sa * (z * self.scaling) + sb * e)
            .collect();
        Ok(GradInput {
            sample,
            timesteps: vec![ts as f32],
            target: noise,
            condition: self.condition.clone(),
            batch: 1,
            height: self.h,
            width: self.w,
        })
    }
}

/// Runs the finetuning: `params.steps` AdamW steps of the diffusion loss on the face. Stops at
/// the first NaN or infinite loss or gradient (`diverged_at`, the tensors of the step before);
/// `progress` may cancel after any step (`Error::Cancelled`).
pub fn finetune<B: Backend>(
    m: &Models<'_, B>,
    face: Face<'_>,
    start: Start,
    params: &FinetuneParams,
    mut progress: Option<StepProgress<'_>>,
) -> Result<Finetuned> {
    params.check()?;
    let mut rng = SplitMix64(params.seed);
    let mut t = start_tensors(m, start, &mut rng)?;
    if t.layers.is_empty() {
        return Err(Error::AdapterMismatch(
            "the adapter has no layers to train".into(),
        ));
    }
    let data = Data::new(m, face, &t, params)?;
    let lens: Vec<usize> = t
        .layers
        .iter()
        .flat_map(|l| [l.down.len(), l.up.len()])
        .collect();
    let mut opt = AdamW::new(params.optimizer, &lens)?;
    let mut losses = Vec::with_capacity(params.steps);
    for step in 0..params.steps {
        let input = data.draw(&mut rng)?;
        let (loss, grads) =
            loss_and_gradients(m.unet, Some(m.text_encoder), &t, &input, params.checkpoint)?;
        let finite = loss.is_finite()
            && grads
                .iter()
                .all(|g| g.down.iter().chain(&g.up).all(|x| x.is_finite()));
        if !finite {
            log::warn!(
                "finetuning: the loss or a gradient is not finite at step {step} (loss {loss}); \
                 stopping with the adapter of the step before"
            );
            return Ok(Finetuned {
                trainable: t,
                losses,
                diverged_at: Some(step),
            });
        }
        let mut flat: Vec<Vec<f32>> = grads.into_iter().flat_map(|g| [g.down, g.up]).collect();
        {
            let mut refs: Vec<&mut Vec<f32>> = flat.iter_mut().collect();
            clip_grad_norm(&mut refs, params.max_grad_norm);
        }
        let lr = params
            .schedule
            .lr(params.optimizer.lr, step, params.steps, params.warmup_steps);
        let mut ps: Vec<&mut Vec<f32>> = t
            .layers
            .iter_mut()
            .flat_map(|l| [&mut l.down, &mut l.up])
            .collect();
        let gs: Vec<&[f32]> = flat.iter().map(|g| g.as_slice()).collect();
        opt.step(&mut ps, &gs, lr)?;
        losses.push(loss as f32);
        log::debug!(
            "finetuning step {}/{}: loss {loss:.6}, lr {lr:e}",
            step + 1,
            params.steps
        );
        if let Some(cb) = progress.as_mut() {
            if !cb(step + 1, params.steps, loss as f32) {
                return Err(Error::Cancelled);
            }
        }
    }
    Ok(Finetuned {
        trainable: t,
        losses,
        diverged_at: None,
    })
}

/// The mean diffusion loss of `t` on the face over `draws` fixed draws from a stream seeded
/// with `seed` (held out from training's): a yardstick that does not move with the draws.
pub fn evaluate<B: Backend>(
    m: &Models<'_, B>,
    face: Face<'_>,
    t: &Trainable,
    params: &FinetuneParams,
    draws: usize,
    seed: u64,
) -> Result<f64> {
    let data = Data::new(m, face, t, params)?;
    let mut rng = SplitMix64(seed);
    let mut sum = 0.0;
    for _ in 0..draws {
        let input = data.draw(&mut rng)?;
        let (loss, _) = loss_and_gradients(m.unet, Some(m.text_encoder), t, &input, true)?;
        sum += loss;
    }
    Ok(sum / draws.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterSource, LoraLayer};

    #[test]
    fn relaxing_keeps_the_update_and_adds_orthonormal_directions() {
        let (din, dout) = (6, 5);
        let down: Vec<f32> = (0..din).map(|i| i as f32 * 0.1 - 0.2).collect();
        let up: Vec<f32> = (0..dout).map(|i| 0.3 - i as f32 * 0.05).collect();
        let key = "unet.x.attn1.to_q".to_string();
        let a = Adapter {
            layers: [(
                key.clone(),
                LoraLayer {
                    rank: 1,
                    down: down.clone(),
                    up: up.clone(),
                    conv_kernel: None,
                },
            )]
            .into(),
            source: AdapterSource::Lora,
        };
        let table: LayerTable = [(key.clone(), crate::model::LayerShape::linear(din, dout))].into();
        let t = relax(&a, 4, &table).expect("relax");
        let l = &t.layers[0];
        assert_eq!((l.rank, l.down.len(), l.up.len()), (4, 4 * din, dout * 4));
        // dW = up . down is exactly the original rank-1 update.
        for (o, u) in up.iter().enumerate() {
            for (i, d) in down.iter().enumerate() {
                let dw: f32 = (0..4).map(|q| l.up[o * 4 + q] * l.down[q * din + i]).sum();
                assert_eq!(dw, u * d, "({o}, {i})");
            }
        }
        // The new rows are orthogonal to the original direction and to each other.
        let row = |q: usize| &l.down[q * din..(q + 1) * din];
        for p in 0..4 {
            for q in (p + 1)..4 {
                let d: f32 = row(p).iter().zip(row(q)).map(|(a, b)| a * b).sum();
                assert!(d.abs() < 1e-6, "rows {p} and {q}: {d}");
            }
        }
    }
}
