//! `hdb generate` and `hdb demo`: text to PNG images, with identity adapters.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hdb::adapter::apply::{Applied, ApplyMode};
use hdb::adapter::Adapter;
use hdb::backend::device_unet::DeviceAdapters;
use hdb::io::safetensors::{read_as_f32, write_f32, SafetensorsFile};
use hdb::model::scheduler::SamplerKind;
use hdb::pipeline::{GenerateAdapters, GenerateParams, Pipeline};
use hdb::runtime::DeviceRequest;

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
    pub params: GenerateParams,
    pub adapters: Vec<PathBuf>,
    pub scales: Vec<f32>,
    pub mode: ApplyMode,
    pub latents: Option<PathBuf>,
    pub dump_latents: Option<PathBuf>,
    pub output: PathBuf,
    pub threads: usize,
    pub device: DeviceRequest,
}

/// A set of adapters resolved for a pipeline: the UNet's on the CPU or on the pipeline's
/// device, and the text encoder's when the set touches it.
pub struct PipelineAdapters {
    pub unet: Option<Applied>,
    pub device_unet: Option<DeviceAdapters>,
    pub text_encoder: Option<Applied>,
    pub device_text_encoder: Option<DeviceAdapters>,
}

impl PipelineAdapters {
    pub fn generate_adapters(&self) -> GenerateAdapters<'_> {
        GenerateAdapters {
            unet: self.unet.as_ref(),
            text_encoder: self.text_encoder.as_ref(),
            per_image: None,
            device_unet: self.device_unet.as_ref(),
            device_text_encoder: self.device_text_encoder.as_ref(),
        }
    }
}

/// The session's adapters for the pipeline's text encoder and UNet (on the pipeline's device
/// when it has one); an empty list gives no sets.
pub fn apply(
    p: &Pipeline,
    adapters: &[Adapter],
    scales: &[f32],
    mode: ApplyMode,
) -> hdb::Result<PipelineAdapters> {
    if !scales.is_empty() && scales.len() != adapters.len() {
        return Err(hdb::Error::invalid_arg(
            "--scale",
            format!("{} scales for {} adapters", scales.len(), adapters.len()),
        ));
    }
    let set: Vec<(&Adapter, f32)> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| (a, scales.get(i).copied().unwrap_or(1.0)))
        .collect();
    let (unet, device_unet) = if adapters.is_empty() {
        (None, None)
    } else {
        p.unet_adapters(&set, mode)?
    };
    let (text_encoder, device_text_encoder) = p.text_adapters(&set, mode)?;
    Ok(PipelineAdapters {
        unet,
        device_unet,
        text_encoder,
        device_text_encoder,
    })
}

pub fn generate(mut a: GenerateArgs) -> hdb::Result<()> {
    let rt = super::runtime(a.device, a.threads)?;
    let model = super::load_model(&a.model)?;
    let t = Instant::now();
    let pipeline = Pipeline::from_model_on(&model, &rt)?;
    log::info!("pipeline built in {:?}", t.elapsed());
    if let Some(path) = &a.latents {
        let f = SafetensorsFile::open(path)?;
        let (shape, v) = read_as_f32(&f, "latents")?;
        a.params.batch = shape.first().copied().unwrap_or(1);
        a.params.latents = Some(v);
    }
    let table = hdb::adapter::adaptable_layers(&model);
    let adapters = a
        .adapters
        .iter()
        .map(|p| hdb::adapter::load(&SafetensorsFile::open(p)?, &table))
        .collect::<hdb::Result<Vec<_>>>()?;
    let sets = rt.install(|| apply(&pipeline, &adapters, &a.scales, a.mode))?;
    let ad = sets.generate_adapters();
    let bar = step_bar(a.params.steps);
    let mut progress = |done: usize, _total: usize| {
        bar.set_position(done as u64);
        true
    };
    let out = rt.install(|| pipeline.generate(&a.params, ad, Some(&mut progress)))?;
    bar.finish_and_clear();
    let n = out.images.len();
    for (i, img) in out.images.iter().enumerate() {
        let path = numbered(&a.output, i, n);
        write_png(&path, img, out.width, out.height)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.dump_latents {
        let f = pipeline.vae_config()?.downscale();
        let shape = vec![
            n,
            pipeline.unet_config()?.in_channels,
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
