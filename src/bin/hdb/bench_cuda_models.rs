//! `hdb bench cuda --unet`, the whole-model rows: the model code (`hdb::model` over `Cuda<f16>`,
//! what sessions and the pipeline run on a GPU) at SD 1.5 shapes with random weights: the UNet
//! step against diffusers' `UNet2DConditionModel` eager, identities on the UNet at batch 8, the
//! text encoder against transformers' `CLIPTextModel`, and the VAE decode at 512x512 against
//! diffusers' `AutoencoderKL`, all fp16 (tools/bench_torch_cuda.py); then a whole generation
//! (`Session::generate` on a CUDA runtime: 512x512, 25 steps, guidance) against diffusers'
//! `StableDiffusionPipeline`.
//!
//! These go through the models' public entry points, so each time includes copying the inputs
//! to the device and the output back (a few MB at most: ~0.1-0.3 ms on PCIe 5).

use std::sync::Arc;

use half::f16;
use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::cuda::CudaLayerAdapters;
use hdb::adapter::{Adapter, AdapterSource, LoraLayer};
use hdb::backend::cuda::ops::AttnKernel;
use hdb::backend::cuda::{Cuda, CudaDevice};
use hdb::backend::profile::Profiled;
use hdb::model::adaptable::identity_layers;
use hdb::model::text_encoder::{TextEncoder, TextEncoderConfig};
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::vae::{Vae, VaeConfig};
use hdb::model::Adaptable;
use hdb::Result;
use hdb::{model::random::RandomWeights, rng::SplitMix64};

use crate::bench_cuda::{device_profile, gpu_ms, Row, Rows, Scale};

/// 2 x multiply-adds of the VAE decoder at latents h x w: its convolutions (3x3 and 1x1
/// shortcuts) and the mid-block attention; norms and element-wise ops are noise.
fn vae_decode_flops(cfg: &VaeConfig, h: usize, w: usize) -> f64 {
    let conv =
        |cin: usize, cout: usize, k: usize, hw: usize| 2.0 * (cin * cout * k * k * hw) as f64;
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let mut hw = h * w;
    let c = rev[0];
    let mut f = conv(cfg.latent_channels, c, 3, hw);
    f += 2.0 * 2.0 * conv(c, c, 3, hw); // mid resnets
    f += 4.0 * conv(c, c, 1, hw) + 4.0 * (hw * hw * c) as f64; // mid attention
    let mut prev = c;
    for (i, &out) in rev.iter().enumerate() {
        for j in 0..=cfg.layers_per_block {
            let cin = if j == 0 { prev } else { out };
            f += conv(cin, out, 3, hw) + conv(out, out, 3, hw);
            if cin != out {
                f += conv(cin, out, 1, hw);
            }
        }
        if i + 1 < rev.len() {
            hw *= 4;
            f += conv(out, out, 3, hw);
        }
        prev = out;
    }
    f + conv(prev, cfg.out_channels, 3, hw)
}

/// 2 x multiply-adds of the CLIP text encoder over `rows` tokens of `len`-token sequences.
fn text_flops(c: &TextEncoderConfig, rows: usize, len: usize) -> f64 {
    let (d, ff) = (c.hidden_size as f64, c.intermediate_size as f64);
    let per_layer =
        2.0 * rows as f64 * (4.0 * d * d + 2.0 * d * ff) + 2.0 * (rows * len) as f64 * d;
    c.num_hidden_layers as f64 * per_layer
}

/// The rows; `peer` is the PyTorch JSON. Returns the summary lines to print after the table and
/// the UNet step's time (ms).
pub fn rows(
    dev: &Arc<CudaDevice>,
    scale: &Scale,
    runs: usize,
    peer: &serde_json::Value,
    out: &mut Rows,
) -> Result<(Vec<String>, f64)> {
    let runs = runs.clamp(3, 10);
    let mut notes = Vec::new();
    let be = Cuda::<f16>::new(dev.clone());
    // The profiling wrapper over it (each profiled op waits for the device), for the "where
    // the time goes" notes; collecting only in device_profile's one more call.
    let d = dev.clone();
    let profiled = Profiled::synced(be.clone(), move || {
        // A failed wait shows up as the op's own error.
        let _ = d.synchronize();
    });
    let mut rng = SplitMix64(99);
    let mut noise = |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };

    // The UNet step (batch 2: one guided step).
    let cfg = scale.unet.clone();
    let (lat, tokens) = (scale.latent, scale.tokens);
    let t = std::time::Instant::now();
    let unet = Unet::load_on(be.clone(), cfg.clone(), &RandomWeights { seed: 0x5D15 })?;
    println!(
        "built the UNet on {} in {:.1} s",
        hdb::backend::Backend::describe(&be),
        t.elapsed().as_secs_f64()
    );
    let (sample, ctx, ts) = (
        noise(2 * 4 * lat * lat),
        noise(2 * tokens * cfg.cross_attention_dim),
        [981.0f32, 981.0],
    );
    let x = UnetInput {
        sample: &sample,
        timesteps: &ts,
        context: &ctx,
        batch: 2,
        height: lat,
        width: lat,
        context_len: tokens,
    };
    let step_ms = gpu_ms(dev, 2, runs, || unet.forward_hooked(&x, None).map(|_| ()))?;
    // The same step with flash2 attention everywhere (the default takes flash3 at d 40).
    let prev = be.set_attention_kernel(AttnKernel::Flash2);
    let flash2_ms = gpu_ms(dev, 2, runs, || unet.forward_hooked(&x, None).map(|_| ()));
    be.set_attention_kernel(prev);
    let flash2_ms = flash2_ms?;
    let finite = unet.forward_hooked(&x, None)?.iter().all(|v| v.is_finite());
    let flops = cfg.flops(2, lat, lat, tokens);
    out.push(Row {
        what: format!("UNet fp16 step, batch 2, {lat}x{lat}, {tokens} tokens (finite: {finite})"),
        ours_ms: step_ms,
        rate: format!("{:.1} TFLOP/s", flops / step_ms / 1e9),
        peer_ms: peer["unet"]["ms"].as_f64(),
    });
    out.push(Row {
        what: "UNet fp16 step, flash2 attention everywhere".into(),
        ours_ms: flash2_ms,
        rate: format!("{:.1} TFLOP/s", flops / flash2_ms / 1e9),
        peer_ms: peer["unet"]["ms"].as_f64(),
    });
    let batch8 = Batch8::new(scale);
    let (identities, none_ms) = identity_rows(dev, scale, runs, &unet, &batch8.input(), out)?;
    let locons = locon_rows(dev, scale, runs, &unet, &batch8.input(), none_ms, out)?;
    drop(unet);
    // The same UNet again (same seed, same weights) on the profiling wrapper: the identity
    // rows need the plain one for their adapters, and both at once would double the memory.
    let unet = Unet::load_on(
        profiled.clone(),
        cfg.clone(),
        &RandomWeights { seed: 0x5D15 },
    )?;
    notes.push(device_profile(&profiled, dev, "the UNet step", || {
        unet.forward_hooked(&x, None).map(|_| ())
    })?);
    drop(unet);
    notes.push(identities);
    notes.push(locons);

    // The text encoder: two 77-token prompts (one guided generation).
    let tc = scale.text.clone();
    let te = TextEncoder::load_on(profiled.clone(), tc.clone(), &RandomWeights { seed: 0x7E })?;
    let ids: Vec<u32> = (0..2 * tokens)
        .map(|i| (i * 7919 % tc.vocab_size) as u32)
        .collect();
    let ms = gpu_ms(dev, 2, runs, || {
        te.forward_hooked(&ids, 2, None).map(|_| ())
    })?;
    out.push(Row {
        what: format!("CLIP text encoder fp16, 2 x {tokens} tokens (host in/out)"),
        ours_ms: ms,
        rate: format!(
            "{:.1} TFLOP/s",
            text_flops(&tc, 2 * tokens, tokens) / ms / 1e9
        ),
        // transformers' CLIPTextModel in fp16 on device-resident ids (hdb's time includes
        // the ids' upload and the output's download).
        peer_ms: peer["text_encoder"]["ms"].as_f64(),
    });
    notes.push(device_profile(&profiled, dev, "the text encoder", || {
        te.forward_hooked(&ids, 2, None).map(|_| ())
    })?);
    drop(te);

    // The VAE decode of one 64x64 latent (a 512x512 image).
    let vc = scale.vae.clone();
    let vae = Vae::load_on(profiled.clone(), vc.clone(), &RandomWeights { seed: 0xAE })?;
    let z = noise(vc.latent_channels * lat * lat);
    let ms = gpu_ms(dev, 1, runs, || vae.decode(&z, 1, lat, lat).map(|_| ()))?;
    let px = lat << (vc.block_out_channels.len() - 1);
    out.push(Row {
        what: format!("VAE decode fp16, 1 x {lat}x{lat} latents -> {px}x{px} (host in/out)"),
        ours_ms: ms,
        rate: format!("{:.1} TFLOP/s", vae_decode_flops(&vc, lat, lat) / ms / 1e9),
        peer_ms: peer["vae"]["ms"].as_f64(),
    });
    notes.push(device_profile(&profiled, dev, "the VAE decode", || {
        vae.decode(&z, 1, lat, lat).map(|_| ())
    })?);
    drop(vae);

    notes.push(generate_row(scale, runs, peer, out)?);
    Ok((notes, step_ms))
}

/// Denoising steps of the whole-generation row (2 in a smoke run).
pub(crate) fn generate_steps() -> usize {
    if crate::bench_cuda::SMOKE.load(std::sync::atomic::Ordering::Relaxed) {
        2
    } else {
        25
    }
}

/// Image side of the whole-generation row: the scale's latents through its VAE (512 at SD 1.5).
pub(crate) fn generate_size(scale: &Scale) -> usize {
    scale.latent << (scale.vae.block_out_channels.len() - 1)
}

/// The whole generation as `hdb generate` runs it on a GPU: one 512x512 image, 25 steps of the
/// default sampler (Euler ancestral) with classifier-free guidance 7.5, through the library's
/// `Session::generate` on a CUDA runtime (prompt tokenized and encoded, the denoising loop, the
/// VAE decode, pixels back on the host), random SD 1.5 weights; wall time of the call, median
/// of `runs` after one warm-up. The peer is diffusers' `StableDiffusionPipeline` in fp16 with
/// the same sampler, steps, guidance and size (tools/bench_torch_cuda.py --generate). Returns
/// the note with where the time went (each stage's start as the pipeline reports it).
fn generate_row(
    scale: &Scale,
    runs: usize,
    peer: &serde_json::Value,
    out: &mut Rows,
) -> Result<String> {
    use hdb::model::scheduler::SchedulerConfig;
    use hdb::model::tokenizer::ClipTokenizer;
    use hdb::pipeline::GenerateParams;
    use hdb::progress::Stage;
    use hdb::session::BuiltModel;
    use std::time::Instant;

    let rt = Arc::new(hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cuda(0),
        threads: 0,
    })?);
    let t = Instant::now();
    let engine = Arc::new(hdb::Engine::from_parts(
        rt,
        BuiltModel {
            unet: scale.unet.clone(),
            text_encoder: scale.text.clone(),
            vae: scale.vae.clone(),
            weights: &RandomWeights { seed: 0x6E4 },
            tokenizer: ClipTokenizer::byte_level(77)?,
            scheduler: SchedulerConfig::default(),
        },
    )?);
    println!(
        "built the pipeline's models on {} in {:.1} s",
        engine.describe(),
        t.elapsed().as_secs_f64()
    );
    let session = hdb::Session::new(engine);
    let (steps, px) = (generate_steps(), generate_size(scale));
    let params = GenerateParams {
        prompt: "a portrait photo of a person, studio light".into(),
        negative_prompt: String::new(),
        steps,
        width: px,
        height: px,
        seed: 1,
        ..GenerateParams::default()
    };
    // Host wall time of each call (it returns the pixels on the host, so the device is done),
    // and the time each stage started in the last call.
    let mut times = Vec::new();
    let mut marks: Vec<(Stage, f64)> = Vec::new();
    let mut finite = true;
    for i in 0..=runs {
        let t = Instant::now();
        let mut stages = Vec::new();
        let mut progress = |stage: Stage, done: usize, _total: usize| {
            if done == 0 {
                stages.push((stage, t.elapsed().as_secs_f64() * 1e3));
            }
            true
        };
        let g = session.generate_stages(&params, Some(&mut progress))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        finite &= g.pixels.iter().all(|v| v.is_finite());
        if i > 0 {
            times.push(ms);
        }
        stages.push((Stage::Decode, ms));
        marks = stages;
        if crate::bench_cuda::SMOKE.load(std::sync::atomic::Ordering::Relaxed) {
            times.push(ms);
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    out.push(Row {
        what: format!(
            "whole generate: {px}x{px}, {steps} steps, CFG 7.5, Euler a (host in/out; finite: {finite})"
        ),
        ours_ms: ms,
        rate: format!("{:.1} ms/step", ms / steps as f64),
        peer_ms: peer["generate"]["ms"].as_f64(),
    });
    // Stage starts -> durations (the last mark is the call's end).
    let mut note = format!(
        "where the whole generate's time goes (the last call, {:.1} ms):",
        marks.last().map_or(0.0, |m| m.1)
    );
    for w in marks.windows(2) {
        note += &format!(
            "\n  {:<24} {:>9.3} ms",
            format!("{:?}", w[0].0).to_lowercase(),
            w[1].1 - w[0].1
        );
    }
    Ok(note)
}

/// The UNet at batch 8 (64x64, 77 tokens) with 8 random rank-1 identities over every adapted
/// projection, applied by the fused kernels (`CudaLayerAdapters`, runtime mode): no identity,
/// one identity on every sample, and eight, one per sample (issue 7's target: eight within 10%
/// of one); then the host-side cost of switching identities (resolve, build on the device, and
/// for merge mode the lidb_merge launch), waited for. Returns the note and the time without
/// adapters.
fn identity_rows(
    dev: &Arc<CudaDevice>,
    scale: &Scale,
    runs: usize,
    unet: &Unet<Cuda<f16>>,
    x: &UnetInput<'_>,
    out: &mut Rows,
) -> Result<(String, f64)> {
    let mut rng = SplitMix64(31);
    let mut u = |n: usize, s: f32| uniform(&mut rng, n, s);
    let ids: Vec<Adapter> = (0..8)
        .map(|_| Adapter {
            layers: identity_layers(&unet.adaptable_layers())
                .into_iter()
                .map(|(k, l)| {
                    let rank = 1;
                    let (down, up) = (u(rank * l.din, 0.02), u(l.dout * rank, 0.02));
                    (
                        k,
                        LoraLayer {
                            rank,
                            down,
                            up,
                            conv_kernel: None,
                        },
                    )
                })
                .collect(),
            source: AdapterSource::Lora,
        })
        .collect();
    let set: Vec<(&Adapter, f32)> = ids.iter().map(|a| (a, 1.0)).collect();
    let fused = runtime_adapters(unet, &set)?;
    let b = x.batch;
    let one: Vec<i32> = vec![0; b];
    let eight: Vec<i32> = (0..b as i32).collect();
    let none_ms = gpu_ms(dev, 1, runs, || unet.forward_hooked(x, None).map(|_| ()))?;
    let hook1 = fused.with_samples(Some(&one))?;
    let one_ms = gpu_ms(dev, 1, runs, || {
        unet.forward_hooked(x, Some(&hook1)).map(|_| ())
    })?;
    let hook8 = fused.with_samples(Some(&eight))?;
    let eight_ms = gpu_ms(dev, 1, runs, || {
        unet.forward_hooked(x, Some(&hook8)).map(|_| ())
    })?;
    let flops = scale.unet.flops(b, x.height, x.width, x.context_len);
    for (what, ms) in [
        ("UNet fp16 batch 8, no identity", none_ms),
        (
            "UNet fp16 batch 8, 1 identity on every sample (runtime)",
            one_ms,
        ),
        (
            "UNet fp16 batch 8, 8 identities, one per sample (runtime)",
            eight_ms,
        ),
    ] {
        out.push(Row {
            what: what.into(),
            ours_ms: ms,
            rate: format!("{:.1} TFLOP/s", flops / ms / 1e9),
            peer_ms: None,
        });
    }
    // Switching identity: resolve + build on the device, waited for (host wall, median).
    for (mode, what) in [
        (
            ApplyMode::Merge,
            "identity swap, merge mode (resolve, upload, lidb_merge)",
        ),
        (
            ApplyMode::Runtime,
            "identity swap, runtime mode (resolve, upload tables)",
        ),
    ] {
        let mut v = Vec::new();
        for i in 0..runs.clamp(5, 20) {
            let t = std::time::Instant::now();
            let one = Applied::new(&set[i % 8..i % 8 + 1], ApplyMode::Runtime, unet)?;
            let a = CudaLayerAdapters::new(unet.backend(), unet, &one, mode)?;
            dev.synchronize()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
            drop(a);
        }
        v.sort_by(f64::total_cmp);
        out.push(Row {
            what: what.into(),
            ours_ms: v[v.len() / 2],
            rate: "host wall".into(),
            peer_ms: None,
        });
    }
    let note = format!(
        "UNet batch 8: 8 identities vs 1: {:+.1}% (target <= +10%); 1 identity vs none: {:+.1}%",
        100.0 * (eight_ms / one_ms - 1.0),
        100.0 * (one_ms / none_ms - 1.0)
    );
    Ok((note, none_ms))
}

/// The batch-8 UNet inputs of the adapter rows: random latents and context at the bench's
/// scale, time step 981.
struct Batch8 {
    sample: Vec<f32>,
    ctx: Vec<f32>,
    ts: Vec<f32>,
    lat: usize,
    tokens: usize,
}

impl Batch8 {
    fn new(scale: &Scale) -> Batch8 {
        let mut rng = SplitMix64(41);
        let mut noise =
            |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };
        let (lat, tokens) = (scale.latent, scale.tokens);
        Batch8 {
            sample: noise(8 * 4 * lat * lat),
            ctx: noise(8 * tokens * scale.unet.cross_attention_dim),
            ts: vec![981.0; 8],
            lat,
            tokens,
        }
    }

    fn input(&self) -> UnetInput<'_> {
        UnetInput {
            sample: &self.sample,
            timesteps: &self.ts,
            context: &self.ctx,
            batch: 8,
            height: self.lat,
            width: self.lat,
            context_len: self.tokens,
        }
    }
}

/// LoCon on the UNet at batch 8 in runtime mode (issue 20's convolution variant): 8 random
/// rank-4 LoCons over every adapted convolution (98 in SD 1.5), all on every sample and one per
/// sample (each adapter's samples gathered into one batch for its two convolutions). `--smoke`
/// takes 2 LoCons (samples alternate), to keep the emulated GPU's run short. `none_ms`: the
/// same inputs without adapters ([`identity_rows`]).
fn locon_rows(
    dev: &Arc<CudaDevice>,
    scale: &Scale,
    runs: usize,
    unet: &Unet<Cuda<f16>>,
    x: &UnetInput<'_>,
    none_ms: f64,
    out: &mut Rows,
) -> Result<String> {
    let mut rng = SplitMix64(37);
    let mut u = |n: usize, s: f32| uniform(&mut rng, n, s);
    let convs: Vec<(String, hdb::model::LayerShape)> = unet
        .adaptable_layers()
        .into_iter()
        .filter(|(_, l)| l.kind != hdb::model::LayerKind::Linear)
        .collect();
    let n = if crate::bench_cuda::SMOKE.load(std::sync::atomic::Ordering::Relaxed) {
        2
    } else {
        8
    };
    let locons: Vec<Adapter> = (0..n)
        .map(|_| Adapter {
            layers: convs
                .iter()
                .map(|(k, l)| {
                    let rank = 4;
                    let kernel = match l.kind {
                        hdb::model::LayerKind::Conv { kernel, .. } => kernel,
                        hdb::model::LayerKind::Linear => 1,
                    };
                    let layer = LoraLayer {
                        rank,
                        down: u(rank * l.din, 0.02),
                        up: u(l.dout * rank, 0.02),
                        conv_kernel: Some(kernel),
                    };
                    (k.clone(), layer)
                })
                .collect(),
            source: AdapterSource::Lora,
        })
        .collect();
    let set: Vec<(&Adapter, f32)> = locons.iter().map(|a| (a, 1.0)).collect();
    let fused = runtime_adapters(unet, &set)?;
    let b = x.batch;
    let all = fused.with_samples(None)?;
    let all_ms = gpu_ms(dev, 1, runs, || {
        unet.forward_hooked(x, Some(&all)).map(|_| ())
    })?;
    let eight: Vec<i32> = (0..b as i32).map(|i| i % n).collect();
    let hook8 = fused.with_samples(Some(&eight))?;
    let eight_ms = gpu_ms(dev, 1, runs, || {
        unet.forward_hooked(x, Some(&hook8)).map(|_| ())
    })?;
    let flops = scale.unet.flops(b, x.height, x.width, x.context_len);
    for (what, ms) in [
        (
            &format!("UNet fp16 batch 8, {n} rank-4 LoCons on every sample (runtime)"),
            all_ms,
        ),
        (
            &format!("UNet fp16 batch 8, {n} rank-4 LoCons, one per sample (runtime)"),
            eight_ms,
        ),
    ] {
        out.push(Row {
            what: what.to_string(),
            ours_ms: ms,
            rate: format!("{:.1} TFLOP/s", flops / ms / 1e9),
            peer_ms: None,
        });
    }
    Ok(format!(
        "UNet batch 8, LoCon on {} convolutions: {n} one per sample vs none {:+.1}%; all {n} on \
         every sample vs none {:+.1}%",
        convs.len(),
        100.0 * (eight_ms / none_ms - 1.0),
        100.0 * (all_ms / none_ms - 1.0)
    ))
}

/// n values uniform in [-s, s).
fn uniform(rng: &mut SplitMix64, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| (2.0 * rng.next_f32() - 1.0) * s).collect()
}

/// `set` resolved for runtime mode and built on the UNet's device, applied in runtime mode.
fn runtime_adapters(
    unet: &Unet<Cuda<f16>>,
    set: &[(&Adapter, f32)],
) -> Result<CudaLayerAdapters<f16>> {
    let resolved = Applied::new(set, ApplyMode::Runtime, unet)?;
    CudaLayerAdapters::new(unet.backend(), unet, &resolved, ApplyMode::Runtime)
}
