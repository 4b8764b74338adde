//! `hdb demo`: the whole path on a small built-in model (random weights, made in-process) or a
//! real SD 1.5 folder: two identities, swaps, a batch with one identity per image, PNGs and a
//! timing table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::lidb::{Lidb, LidbMeta};
use hdb::adapter::Adapter;
use hdb::model::config::{BlockKind, UnetConfig};
use hdb::model::random::{RandomWeights, SplitMix64};
use hdb::model::scheduler::{SamplerKind, SchedulerConfig};
use hdb::model::text_encoder::{TextEncoder, TextEncoderConfig};
use hdb::model::tokenizer::ClipTokenizer;
use hdb::model::unet::Unet;
use hdb::model::vae::{Vae, VaeConfig};
use hdb::pipeline::{GenerateAdapters, GenerateParams, Pipeline};

use super::generate::{step_bar, write_png};

pub struct DemoArgs {
    pub model: Option<PathBuf>,
    pub out: PathBuf,
    pub steps: usize,
    pub size: Option<usize>,
    pub threads: usize,
}

/// A small SD-shaped model with deterministic random weights (no download): a byte-level
/// tokenizer, a 2-layer 64-wide text encoder, a 4-level UNet (32-64 channels) and a 4-level VAE.
fn builtin() -> hdb::Result<Pipeline> {
    let w = RandomWeights { seed: 2023 };
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
    Ok(Pipeline {
        tokenizer: ClipTokenizer::byte_level(77)?,
        text_encoder: TextEncoder::load(te, &w)?,
        unet: std::sync::Arc::new(Unet::load(unet, &w)?),
        vae: Vae::load(vae, &w)?,
        scheduler: SchedulerConfig::default(),
    })
}

/// A random identity over every adaptable layer (rank 1; a, b as large as the paper's 100/50
/// allow for the model's narrowest layer).
fn random_identity(p: &Pipeline, seed: u64) -> Lidb {
    let mut layers: Vec<(String, usize, usize)> = p
        .unet
        .adaptable_layers()
        .into_iter()
        .map(|(k, s)| (k, s.din, s.dout))
        .collect();
    layers.extend(
        p.text_encoder
            .adaptable_layers()
            .into_iter()
            .map(|(k, s)| (k, s.din, s.dout)),
    );
    let a = layers.iter().map(|l| l.1).min().unwrap_or(1).min(100);
    let b = layers.iter().map(|l| l.2).min().unwrap_or(1).min(50);
    let mut rng = SplitMix64(seed);
    let mut g =
        |n: usize| -> Vec<f32> { (0..n).map(|_| 0.6 * (2.0 * rng.next_f32() - 1.0)).collect() };
    Lidb {
        meta: LidbMeta {
            rank: 1,
            a,
            b,
            basis_seed: 0x4844_4221,
            alpha: 1.0,
            base: None,
        },
        layers: layers
            .into_iter()
            .map(|(k, _, _)| (k, (g(a), g(b))))
            .collect(),
    }
}

fn adaptable(p: &Pipeline) -> std::collections::BTreeMap<String, hdb::adapter::LayerShape> {
    let mut t = p.unet.adaptable_layers();
    t.extend(p.text_encoder.adaptable_layers());
    t
}

pub fn run(a: DemoArgs) -> hdb::Result<()> {
    let total = Instant::now();
    let rt = hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: a.threads,
    })?;
    let mut rows: Vec<(String, String)> = Vec::new();
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    std::fs::create_dir_all(&a.out).map_err(|e| hdb::Error::io(&a.out, e))?;

    let t = Instant::now();
    let (pipeline, what) = match &a.model {
        None => (
            rt.install(builtin)?,
            "built-in random model (no download)".to_string(),
        ),
        Some(path) => {
            let m = super::load_model(path)?;
            (
                rt.install(|| Pipeline::from_model(&m))?,
                path.display().to_string(),
            )
        }
    };
    rows.push(("load model".into(), ms(t.elapsed().as_secs_f64())));
    println!("hdb demo on the {what}, {} threads", rt.threads());
    println!("identities are random LiDB adapters until the hypernetwork lands (issue 6)");

    let table = adaptable(&pipeline);
    let ids: Vec<Lidb> = (0..2)
        .map(|i| random_identity(&pipeline, 1000 + i))
        .collect();
    let mut adapters: Vec<Adapter> = Vec::new();
    for (i, l) in ids.iter().enumerate() {
        let path = a.out.join(format!("identity-{i}.lidb.safetensors"));
        l.save(&path)?;
        let t = Instant::now();
        adapters.push(rt.install(|| Lidb::load(&path)?.compose(&table))?);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        rows.push((
            format!(
                "load identity {i} ({size} bytes, {} layers)",
                l.layers.len()
            ),
            ms(t.elapsed().as_secs_f64()),
        ));
    }

    let swap = |mode: ApplyMode, ad: &Adapter| -> hdb::Result<(Applied, Applied, f64)> {
        let t = Instant::now();
        let u = rt.install(|| Applied::new(&[(ad, 1.0)], mode, &*pipeline.unet))?;
        let te = rt.install(|| Applied::new(&[(ad, 1.0)], mode, &pipeline.text_encoder))?;
        Ok((u, te, t.elapsed().as_secs_f64()))
    };
    let (_, _, t0) = swap(ApplyMode::Merge, &adapters[0])?;
    let (mu, mte, t1) = swap(ApplyMode::Merge, &adapters[1])?;
    rows.push((
        "swap identity, merge mode (UNet + text encoder)".into(),
        ms(t0.min(t1)),
    ));
    let (_, _, tr) = swap(ApplyMode::Runtime, &adapters[0])?;
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
    let render = |params: &GenerateParams,
                  ad: GenerateAdapters<'_>,
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
        let out = rt.install(|| pipeline.generate(params, ad, Some(&mut progress)))?;
        bar.finish_and_clear();
        let per_step =
            step_times.iter().skip(1).sum::<f64>() / (step_times.len().max(2) - 1) as f64;
        Ok((out, per_step, start.elapsed().as_secs_f64()))
    };

    let ad = GenerateAdapters {
        unet: Some(&mu),
        text_encoder: Some(&mte),
        per_image: None,
    };
    let (out, step, whole) = render(&params, ad, "identity 1 (merged)")?;
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
    let ru = rt.install(|| Applied::new(&both, ApplyMode::Runtime, &*pipeline.unet))?;
    let rte = rt.install(|| Applied::new(&both, ApplyMode::Runtime, &pipeline.text_encoder))?;
    params.batch = 2;
    let idx = [0, 1];
    let ad = GenerateAdapters {
        unet: Some(&ru),
        text_encoder: Some(&rte),
        per_image: Some(&idx),
    };
    let (out, step, whole) = render(&params, ad, "batch, one identity per image")?;
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
        "\nwrote {} (PNG images and the two identity files)",
        display(&a.out)
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
