//! `hdb demo`: the whole path on a small built-in model (random weights, made in-process) or a
//! real SD 1.5 folder: two identities predicted by the hypernetwork from face images, swaps, a batch with one identity per image, PNGs and a
//! timing table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hdb::adapter::apply::ApplyMode;
use hdb::adapter::Adapter;
use hdb::hypernet::{EncoderConfig, HypernetConfig};
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::adaptable::identity_layers;
use hdb::model::config::{BlockKind, UnetConfig};
use hdb::model::random::RandomWeights;
use hdb::model::scheduler::{SamplerKind, SchedulerConfig};
use hdb::model::text_encoder::TextEncoderConfig;
use hdb::model::tokenizer::ClipTokenizer;
use hdb::model::vae::VaeConfig;
use hdb::pipeline::GenerateParams;
use hdb::placed::PlacedHypernet;
use hdb::session::BuiltModel;
use hdb::{Engine, Session};

use super::generate::{step_bar, write_png};

pub struct DemoArgs {
    pub model: Option<PathBuf>,
    pub hypernet: Option<PathBuf>,
    pub out: PathBuf,
    pub steps: usize,
    pub size: Option<usize>,
    pub threads: usize,
    pub device: hdb::runtime::DeviceRequest,
    /// Rank-relaxed finetuning steps on identity 0 (0: skip).
    pub finetune_steps: usize,
}

/// A small SD-shaped model with deterministic random weights (no download) on `rt`'s device:
/// a byte-level tokenizer, a 2-layer 64-wide text encoder, a 4-level UNet (32-64 channels)
/// and a 4-level VAE.
fn builtin(rt: Arc<hdb::Runtime>) -> hdb::Result<Engine> {
    let (text_encoder, unet, vae) = builtin_configs();
    Engine::from_parts(
        rt,
        BuiltModel {
            unet,
            text_encoder,
            vae,
            weights: &RandomWeights { seed: 2023 },
            tokenizer: ClipTokenizer::byte_level(77)?,
            scheduler: SchedulerConfig::default(),
        },
    )
}

/// The built-in model's text encoder, UNet and VAE configs.
fn builtin_configs() -> (TextEncoderConfig, UnetConfig, VaeConfig) {
    let te = TextEncoderConfig {
        vocab_size: 514,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        ..TextEncoderConfig::default()
    };
    use BlockKind::*;
    let unet = UnetConfig {
        block_out_channels: vec![32, 64, 64, 64],
        layers_per_block: 1,
        down_blocks: vec![CrossAttn, CrossAttn, CrossAttn, Plain],
        up_blocks: vec![Plain, CrossAttn, CrossAttn, CrossAttn],
        heads: vec![2; 4],
        transformer_layers: vec![1; 4],
        cross_attention_dim: 64,
        norm_num_groups: 8,
        ..UnetConfig::default()
    };
    let vae = VaeConfig {
        block_out_channels: vec![16, 32, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::default()
    };
    (te, unet, vae)
}

/// The hypernetwork that makes the demo's identities: `--hypernet FILE`, or one with random
/// weights (no trained weights are published) shaped for the pipeline's adaptable layers: the
/// paper's default for a real model, a small one for the built-in model.
fn hypernet(
    rt: &hdb::Runtime,
    engine: &Engine,
    file: Option<&Path>,
    builtin: bool,
) -> hdb::Result<PlacedHypernet> {
    if let Some(f) = file {
        return PlacedHypernet::load(rt, f);
    }
    let table = identity_layers(&engine.adaptable_layers());
    let a = table.values().map(|l| l.din).min().unwrap_or(1).min(100);
    let b = table.values().map(|l| l.dout).min().unwrap_or(1).min(50);
    let mut cfg = HypernetConfig {
        a,
        b,
        layer_keys: table.keys().cloned().collect(),
        ..HypernetConfig::default()
    };
    if builtin {
        cfg.encoder = EncoderConfig {
            img_size: 64,
            patch_size: 16,
            width: 64,
            depth: 2,
            heads: 2,
            ..EncoderConfig::default()
        };
        (cfg.d_model, cfg.heads, cfg.layers) = (64, 2, 2);
    }
    PlacedHypernet::from_source(rt, cfg, &RandomWeights { seed: 77 })
}

/// A synthetic "face" photo: smooth color fields that differ per identity.
fn face(i: usize, w: usize, h: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let r = 0.5 + 0.5 * (6.0 * fx + i as f32 * 1.7).sin() * (4.0 * fy).cos();
            let g = 0.5 + 0.5 * (5.0 * fy - i as f32).sin();
            let b = 0.5
                + 0.5
                    * ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt().cos()
                    * (1.0 - i as f32 * 0.5);
            for (c, v) in [r, g, b].into_iter().enumerate() {
                rgb[(y * w + x) * 3 + c] = (v.clamp(0.0, 1.0) * 255.0) as u8;
            }
        }
    }
    rgb
}

pub fn run(a: DemoArgs) -> hdb::Result<()> {
    let total = Instant::now();
    let rt = Arc::new(super::runtime(a.device, a.threads)?);
    let mut rows: Vec<(String, String)> = Vec::new();
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    std::fs::create_dir_all(&a.out).map_err(|e| hdb::Error::io(&a.out, e))?;

    let t = Instant::now();
    let (engine, what) = match &a.model {
        None => (
            builtin(rt.clone())?,
            "built-in random model (no download)".to_string(),
        ),
        Some(path) => {
            let m = super::load_model(path)?;
            (Engine::new(rt.clone(), m), path.display().to_string())
        }
    };
    let engine = Arc::new(engine);
    rows.push(("load model".into(), ms(t.elapsed().as_secs_f64())));
    println!(
        "hdb demo on the {what}, {} threads, the UNet, text encoder and VAE on {}",
        rt.threads(),
        engine.describe()
    );

    let t = Instant::now();
    let net = hypernet(&rt, &engine, a.hypernet.as_deref(), a.model.is_none())?;
    let source = if a.hypernet.is_some() {
        "the given hypernetwork"
    } else {
        "a hypernetwork with random weights"
    };
    let net_on = net.describe();
    println!("identities: predicted by {source} on {net_on} from two synthetic face images");
    rows.push((
        format!(
            "load hypernetwork ({:.1} M parameters)",
            net.config().parameter_count() as f64 / 1e6
        ),
        ms(t.elapsed().as_secs_f64()),
    ));
    let mut adapters: Vec<Adapter> = Vec::new();
    for i in 0..2 {
        let (w, h) = (96, 80);
        let rgb = face(i, w, h);
        write_png(&a.out.join(format!("face-{i}.png")), &rgb, w, h)?;
        let t = Instant::now();
        let predicted = engine.predict(&net, (&rgb, w, h, w * 3), None, None)?;
        rows.push((
            format!(
                "predict identity {i} from a face ({} iterations)",
                net.config().iterations
            ),
            ms(t.elapsed().as_secs_f64()),
        ));
        let path = a.out.join(format!("identity-{i}.lidb.safetensors"));
        predicted.save(&path)?;
        let t = Instant::now();
        adapters.push(engine.load_adapter(&SafetensorsFile::open(&path)?)?);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        rows.push((
            format!(
                "load identity {i} ({size} bytes, {} layers)",
                predicted.layers.len()
            ),
            ms(t.elapsed().as_secs_f64()),
        ));
    }

    if a.finetune_steps > 0 {
        finetune_step(&engine, &adapters[0], &a, &mut rows)?;
    }

    let mut session = Session::new(engine.clone());
    let mut swap = |mode: ApplyMode, set: &[(&Adapter, f32)]| -> hdb::Result<f64> {
        let t = Instant::now();
        session.set_adapters(set, mode)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let t0 = swap(ApplyMode::Merge, &[(&adapters[0], 1.0)])?;
    let t1 = swap(ApplyMode::Merge, &[(&adapters[1], 1.0)])?;
    rows.push((
        "swap identity, merge mode (UNet + text encoder)".into(),
        ms(t0.min(t1)),
    ));
    let tr = swap(ApplyMode::Runtime, &[(&adapters[0], 1.0)])?;
    rows.push(("swap identity, runtime mode".into(), ms(tr)));

    let size = a.size.unwrap_or(if a.model.is_some() { 512 } else { 128 });
    let mut params = GenerateParams {
        prompt: "a portrait photo of sks person, studio light".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: a.steps,
        guidance: 7.5,
        sampler: SamplerKind::DpmPp2MKarras,
        seed: 7,
        width: size,
        height: size,
        batch: 1,
        latents: None,
    };
    let render = |session: &Session,
                  params: &GenerateParams,
                  label: &str|
     -> hdb::Result<(hdb::pipeline::Generated, f64, f64)> {
        let bar = step_bar(params.steps);
        let mut step_times = Vec::new();
        let mut last = Instant::now();
        let start = Instant::now();
        let mut progress = |done: usize, _total: usize| {
            step_times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
            bar.set_position(done as u64);
            true
        };
        bar.set_message(label.to_string());
        let out = session.generate(params, Some(&mut progress))?;
        bar.finish_and_clear();
        let per_step =
            step_times.iter().skip(1).sum::<f64>() / (step_times.len().max(2) - 1) as f64;
        Ok((out, per_step, start.elapsed().as_secs_f64()))
    };

    session.set_adapters(&[(&adapters[1], 1.0)], ApplyMode::Merge)?;
    let (out, step, whole) = render(&session, &params, "identity 1 (merged)")?;
    let p = a.out.join("identity-1.png");
    write_png(&p, &out.images[0], out.width, out.height)?;
    rows.push((
        format!(
            "render 1 image {size}x{size}, {} steps, merged identity",
            params.steps
        ),
        ms(whole),
    ));
    rows.push((
        "  per denoising step (CFG: 2 UNet samples)".into(),
        ms(step),
    ));

    let both: Vec<(&Adapter, f32)> = adapters.iter().map(|x| (x, 1.0)).collect();
    session.set_adapters(&both, ApplyMode::Runtime)?;
    session.set_sample_adapters(Some(vec![0, 1]))?;
    params.batch = 2;
    let (out, step, whole) = render(&session, &params, "batch, one identity per image")?;
    for (i, img) in out.images.iter().enumerate() {
        write_png(
            &a.out.join(format!("batch-{i}-identity-{i}.png")),
            img,
            out.width,
            out.height,
        )?;
    }
    rows.push((
        "render batch of 2, one identity per image (runtime)".into(),
        ms(whole),
    ));
    rows.push((
        "  per denoising step (CFG: 4 UNet samples)".into(),
        ms(step),
    ));
    rows.push(("total".into(), ms(total.elapsed().as_secs_f64())));

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!();
    for (k, v) in &rows {
        println!("{k:<width$}  {v:>12}");
    }
    println!(
        "\nwrote {} (the two input faces, the images and the two identity files)",
        display(&a.out)
    );
    if a.model.is_none() {
        println!(
            "the built-in model's weights are random, so its images are noise: the path and the \
             timings are what is real (--model PATH renders with a real SD 1.5 model)"
        );
    }
    Ok(())
}

/// Rank-relaxed finetuning of identity 0 on its face (the paper's third step), with the loss
/// over fixed held-out draws before and after; saved as a PEFT LoRA. Training runs on the CPU.
fn finetune_step(
    engine: &Engine,
    identity: &Adapter,
    a: &DemoArgs,
    rows: &mut Vec<(String, String)>,
) -> hdb::Result<()> {
    use hdb::train::finetune::{Face, FinetuneParams, Start};
    if engine.runtime().device() != hdb::Device::Cpu {
        println!(
            "finetuning: skipped (training runs on the CPU only so far: run the demo with \
             --device cpu)"
        );
        return Ok(());
    }
    let (w, h) = (96, 80);
    let rgb = face(0, w, h);
    let face = Face {
        rgb: &rgb,
        width: w,
        height: h,
        stride: w * 3,
    };
    let mut params = FinetuneParams {
        steps: a.finetune_steps,
        resolution: if a.model.is_some() { 512 } else { 64 },
        seed: 11,
        ..FinetuneParams::default()
    };
    if a.model.is_none() {
        // The built-in model is tiny and random: a larger step shows the loss move.
        params.optimizer.lr = 1e-2;
    }
    let start = Start::Relaxed {
        from: identity.clone(),
        rank: 4,
    };
    let before = engine.initial_tensors(start.clone(), &params)?;
    let l0 = engine.evaluate_loss(face, &before, &params, 8, 4242)?;
    let bar = super::finetune_cmd::step_bar(params.steps);
    let mut progress = |done: usize, _total: usize, loss: f32| {
        bar.set_message(format!("loss {loss:.4}"));
        bar.set_position(done as u64);
        true
    };
    let t = Instant::now();
    let run = engine.finetune(face, start, &params, Some(&mut progress))?;
    let spent = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let l1 = engine.evaluate_loss(face, &run.trainable, &params, 8, 4242)?;
    let path = a.out.join("identity-0-finetuned.safetensors");
    run.trainable.to_adapter().save(&path)?;
    println!(
        "finetuning identity 0 (rank-relaxed to 4, {} steps, lr {:e}): loss over 8 fixed draws \
         {l0:.4} -> {l1:.4}",
        params.steps, params.optimizer.lr
    );
    rows.push((
        format!("finetune identity 0, {} steps (CPU, rank 4)", params.steps),
        format!("{:.1} ms", spent * 1e3),
    ));
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
