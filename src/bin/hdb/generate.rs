//! `hdb generate`: text to PNG images with identity adapters, and the PNG and progress-bar
//! helpers `hdb demo` shares.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hdb::adapter::apply::ApplyMode;
use hdb::adapter::Adapter;
use hdb::io::safetensors::{read_as_f32, write_f32, SafetensorsFile};
use hdb::model::scheduler::SamplerKind;
use hdb::pipeline::GenerateParams;
use hdb::runtime::DeviceRequest;
use hdb::{Engine, Session};

/// Writes RGB8 pixels as a PNG.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> hdb::Result<()> {
    let file = std::fs::File::create(path).map_err(|e| hdb::Error::io(path, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let fail = |e: png::EncodingError| hdb::Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    };
    let mut w = enc.write_header().map_err(fail)?;
    w.write_image_data(rgb).map_err(fail)?;
    w.finish().map_err(fail)
}

/// `out.png` for one image, `out-0.png`, `out-1.png`, ... for several.
pub fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// A progress bar over the denoising steps.
pub fn step_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    bar
}

pub struct GenerateArgs {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub params: GenerateParams,
    pub adapters: Vec<PathBuf>,
    pub scales: Vec<f32>,
    pub allow_unmatched: bool,
    pub mode: ApplyMode,
    pub latents: Option<PathBuf>,
    pub dump_latents: Option<PathBuf>,
    pub output: PathBuf,
    pub threads: usize,
    pub device: DeviceRequest,
}

/// The adapters at `paths` (with `scales`, 1.0 each when empty) loaded for `engine`.
pub fn load_adapters(
    engine: &Engine,
    paths: &[PathBuf],
    scales: &[f32],
    allow_unmatched: bool,
) -> hdb::Result<Vec<(Adapter, f32)>> {
    if !scales.is_empty() && scales.len() != paths.len() {
        return Err(hdb::Error::invalid_arg(
            "--scale",
            format!("{} scales for {} adapters", scales.len(), paths.len()),
        ));
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let opts = hdb::adapter::LoadOptions { allow_unmatched };
            let a = engine.load_adapter_with(&SafetensorsFile::open(p)?, opts)?;
            Ok((a, scales.get(i).copied().unwrap_or(1.0)))
        })
        .collect()
}

pub fn generate(mut a: GenerateArgs) -> hdb::Result<()> {
    let rt = Arc::new(super::runtime(a.device, a.threads)?);
    let model = super::load_model_with(&a.model, a.tokenizer.as_deref())?;
    let engine = Arc::new(Engine::new(rt, model));
    if let Some(path) = &a.latents {
        let f = SafetensorsFile::open(path)?;
        let (shape, v) = read_as_f32(&f, "latents")?;
        a.params.batch = shape.first().copied().unwrap_or(1);
        a.params.latents = Some(v);
    }
    let adapters = load_adapters(&engine, &a.adapters, &a.scales, a.allow_unmatched)?;
    let mut session = Session::new(engine.clone());
    let set: Vec<(&Adapter, f32)> = adapters.iter().map(|(a, s)| (a, *s)).collect();
    session.set_adapters(&set, a.mode)?;
    let bar = step_bar(a.params.steps);
    let mut progress = |done: usize, _total: usize| {
        bar.set_position(done as u64);
        true
    };
    let out = session.generate(&a.params, Some(&mut progress))?;
    bar.finish_and_clear();
    let n = out.images.len();
    for (i, img) in out.images.iter().enumerate() {
        let path = numbered(&a.output, i, n);
        write_png(&path, img, out.width, out.height)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.dump_latents {
        let f = engine.vae_config()?.downscale();
        let shape = vec![
            n,
            engine.unet_config()?.in_channels,
            out.height / f,
            out.width / f,
        ];
        write_f32(path, &[("latents", shape, &out.latents)])?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

pub fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    s.parse::<SamplerKind>().map_err(|e| e.to_string())
}
