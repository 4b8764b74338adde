//! `hdb finetune` (an identity from a face photo: LiDB from zero, or rank-relaxed from an
//! adapter), `hdb personalize` (the hypernetwork's prediction, then finetuning) and
//! `hdb finetune grad` (one loss and an adapter's gradients: the contract the gradient tests
//! and users' tools rely on).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hdb::io::safetensors::SafetensorsFile;
use hdb::placed::PlacedHypernet;
use hdb::train::adamw::LrSchedule;
use hdb::train::finetune::{Face, FinetuneParams, Finetuned, Start};
use hdb::train::GradInput;
use hdb::Engine;

use hdb::io::png::read_png;

/// The training settings `hdb finetune` and `hdb personalize` share.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A diffusers folder (with tokenizer/) or an LDM single file.
    #[arg(long, required = true)]
    pub model: Option<PathBuf>,
    /// The face photo (PNG, any size >= 16x16; center-cropped to a square and resized).
    #[arg(long, required = true)]
    pub face: Option<PathBuf>,
    /// Where the adapter goes: a LiDB v2 file (--init zero) or a PEFT LoRA (rank-relaxed).
    #[arg(short, long, required = true)]
    pub output: Option<PathBuf>,
    /// Optimizer steps (default: 40 rank-relaxed, 200 from zero).
    #[arg(long)]
    pub steps: Option<usize>,
    /// The rank of the relaxed LoRA (rank-relaxed), or of the LiDB factors (from zero).
    #[arg(long)]
    pub rank: Option<usize>,
    /// AdamW learning rate (default: 1e-4 rank-relaxed, 1e-2 from zero).
    #[arg(long)]
    pub lr: Option<f32>,
    /// AdamW weight decay (torch's default).
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f32,
    /// constant, constant_with_warmup or cosine.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    /// Warm-up steps of the schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the gradients' global norm to this ("inf": no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// The training prompt; [V] stands for --token.
    #[arg(long, default_value = "a [V] face")]
    pub prompt: String,
    /// The identity's token in the prompt.
    #[arg(long, default_value = "sks")]
    pub token: String,
    /// Seed of hdb's random stream (timesteps, posterior draws, noise; docs/training.md).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The image side the face is encoded at (512 for SD 1.5).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Keep every UNet activation instead of recomputing each block in the backward (faster,
    /// more memory).
    #[arg(long)]
    pub no_checkpointing: bool,
    /// CPU threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where training runs: cpu, cuda (= cuda:0), cuda:N or auto (the model's components and
    /// the backward passes run there; the adapter's f32 tensors and AdamW's state stay on
    /// the host).
    #[arg(long, default_value = "cpu", value_parser = super::parse_device)]
    pub device: hdb::runtime::DeviceRequest,
}

/// `hdb finetune`'s own arguments.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Rank-relaxed finetuning of this adapter (LiDB or LoRA; e.g. `hdb predict`'s output).
    #[arg(long, conflicts_with = "init")]
    pub from: Option<PathBuf>,
    /// `zero`: LiDB optimization from zero on every adaptable layer (no hypernetwork needed).
    #[arg(long)]
    pub init: Option<String>,
}

/// `hdb personalize`'s arguments.
#[derive(clap::Args, Debug)]
pub struct PersonalizeArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// The hypernetwork (v1 file).
    #[arg(long)]
    pub hypernet: PathBuf,
    /// The hypernetwork's refinement iterations (default: the file's).
    #[arg(long)]
    pub iterations: Option<usize>,
}

struct Setup {
    engine: Engine,
    rgb: Vec<u8>,
    width: usize,
    height: usize,
    output: PathBuf,
}

impl Setup {
    fn face(&self) -> Face<'_> {
        Face {
            rgb: &self.rgb,
            width: self.width,
            height: self.height,
            stride: self.width * 3,
        }
    }
}

fn required<'a>(v: &'a Option<PathBuf>, flag: &'static str) -> hdb::Result<&'a Path> {
    v.as_deref()
        .ok_or_else(|| hdb::Error::invalid_arg(flag, "is required"))
}

fn setup(a: &TrainArgs) -> hdb::Result<Setup> {
    let rt = super::runtime(a.device, a.threads)?;
    let engine = Engine::new(
        Arc::new(rt),
        super::load_model(required(&a.model, "--model")?)?,
    );
    let (rgb, width, height) = read_png(required(&a.face, "--face")?)?;
    Ok(Setup {
        engine,
        rgb,
        width,
        height,
        output: required(&a.output, "--output")?.to_path_buf(),
    })
}

/// The run's parameters, with `steps`/`lr` defaults for the mode.
fn params(a: &TrainArgs, steps: usize, lr: f32) -> hdb::Result<FinetuneParams> {
    let mut p = FinetuneParams {
        steps: a.steps.unwrap_or(steps),
        schedule: a.lr_schedule.parse::<LrSchedule>()?,
        warmup_steps: a.warmup_steps,
        max_grad_norm: a.max_grad_norm,
        prompt: a.prompt.clone(),
        token: a.token.clone(),
        seed: a.seed,
        checkpoint: !a.no_checkpointing,
        resolution: a.resolution,
        ..FinetuneParams::default()
    };
    p.optimizer.lr = a.lr.unwrap_or(lr);
    p.optimizer.weight_decay = a.weight_decay;
    p.check()?;
    Ok(p)
}

/// A progress bar over the steps, with the loss and the time left.
pub fn step_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "finetuning [{bar:30}] {pos}/{len} steps, {msg}, {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Saves the run's adapter; a diverged run saves the adapter of its last good step and fails
/// naming the step.
fn finish(s: &Setup, run: Finetuned, started: Instant) -> hdb::Result<()> {
    let adapter = run.trainable.to_adapter();
    adapter.save(&s.output)?;
    let first = run.losses.first().copied().unwrap_or(f32::NAN);
    let last10 = &run.losses[run.losses.len().saturating_sub(10)..];
    let tail = last10.iter().sum::<f32>() / last10.len().max(1) as f32;
    println!(
        "wrote {} ({} layers) after {} steps in {:.1} s; loss {first:.4} at the first step, \
         {tail:.4} over the last {}",
        s.output.display(),
        adapter.layers.len(),
        run.losses.len(),
        started.elapsed().as_secs_f64(),
        last10.len()
    );
    match run.diverged_at {
        None => Ok(()),
        Some(step) => Err(hdb::Error::Diverged(format!(
            "the loss or a gradient was NaN or infinite at step {step}; {} holds the adapter \
             after step {} (lower --lr?)",
            s.output.display(),
            step.saturating_sub(1)
        ))),
    }
}

pub fn run(a: &RunArgs) -> hdb::Result<()> {
    let s = setup(&a.train)?;
    let (start, p) = match (&a.from, a.init.as_deref()) {
        (Some(from), None) => {
            let adapter = s.engine.load_adapter(&SafetensorsFile::open(from)?)?;
            let start = Start::Relaxed {
                from: adapter,
                rank: a.train.rank.unwrap_or(4),
            };
            (start, params(&a.train, 40, 1e-4)?)
        }
        (None, Some("zero")) => {
            let start = Start::LidbFromZero {
                rank: a.train.rank.unwrap_or(1),
                a: 100,
                b: 50,
                basis_seed: hdb::hypernet::HypernetConfig::default().basis_seed,
                alpha: 1.0,
            };
            (start, params(&a.train, 200, 1e-2)?)
        }
        (None, Some(other)) => {
            return Err(hdb::Error::invalid_arg(
                "--init",
                format!("'{other}' is not 'zero'"),
            ))
        }
        (None, None) | (Some(_), Some(_)) => {
            return Err(hdb::Error::invalid_arg(
                "--from",
                "give --from ADAPTER (rank-relaxed finetuning) or --init zero (LiDB from zero)",
            ))
        }
    };
    let bar = step_bar(p.steps);
    let mut progress = |done: usize, _total: usize, loss: f32| {
        bar.set_message(format!("loss {loss:.4}"));
        bar.set_position(done as u64);
        true
    };
    let t = Instant::now();
    let run = s
        .engine
        .finetune(s.face(), start, &p, Some(&mut progress))?;
    bar.finish_and_clear();
    finish(&s, run, t)
}

pub fn personalize(a: &PersonalizeArgs) -> hdb::Result<()> {
    let s = setup(&a.train)?;
    let net = PlacedHypernet::load(s.engine.runtime(), &a.hypernet)?;
    let p = params(&a.train, 40, 1e-4)?;
    let bar = step_bar(p.steps);
    let mut progress = |done: usize, _total: usize, loss: f32| {
        bar.set_message(format!("loss {loss:.4}"));
        bar.set_position(done as u64);
        true
    };
    let t = Instant::now();
    let run = s.engine.personalize(
        &net,
        s.face(),
        a.iterations,
        a.train.rank.unwrap_or(4),
        &p,
        None,
        Some(&mut progress),
    )?;
    bar.finish_and_clear();
    finish(&s, run, t)
}

/// Reads the adapter and the input, runs one forward and backward pass, writes `loss` and
/// the gradients under the adapter's own tensor names and layout.
pub fn grad(
    model: &Path,
    adapter: &Path,
    input: &Path,
    output: &Path,
    (threads, checkpoint): (usize, bool),
) -> hdb::Result<()> {
    let rt = super::runtime(hdb::runtime::DeviceRequest::Cpu, threads)?;
    let engine = Engine::new(Arc::new(rt), super::load_model(model)?);
    let input = GradInput::from_safetensors(&SafetensorsFile::open(input)?)?;
    let adapter_file = SafetensorsFile::open(adapter)?;
    let t = Instant::now();
    let (loss, trainable, grads) = engine.adapter_gradients(&adapter_file, &input, checkpoint)?;
    trainable.write_gradients(output, loss as f32, &grads)?;
    println!(
        "loss {loss:.8}; wrote {} ({} gradient tensors of {} layers) in {:.2} s",
        output.display(),
        2 * grads.len(),
        grads.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
