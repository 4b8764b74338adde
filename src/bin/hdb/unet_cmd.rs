//! `hdb unet`: one UNet evaluation from a safetensors file of inputs, with adapters, on any
//! device.

use std::path::{Path, PathBuf};

use hdb::io::safetensors::SafetensorsFile;
use hdb::model::unet::UnetInput;

use crate::{load_model, runtime, Mode};

pub fn unet(
    model_path: &Path,
    input: &Path,
    output: &Path,
    (device, threads): (hdb::runtime::DeviceRequest, usize),
    adapter_paths: &[PathBuf],
    scales: &[f32],
    mode: Mode,
) -> hdb::Result<()> {
    use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
    use hdb::backend::device_unet::DeviceUnet;
    use hdb::io::safetensors::write_f32;
    let rt = runtime(device, threads)?;
    let inp = SafetensorsFile::open(input)?;
    let bad = |name: &str, shape: &[usize], want: &str| hdb::Error::InvalidFile {
        path: input.to_path_buf(),
        format: "UNet input",
        reason: format!("'{name}' has shape {shape:?}, expected {want}"),
    };
    let ins = hdb::io::inputs::UnetInputs::read(&inp)?;
    let (b, c, h, w, l) = (
        ins.batch,
        ins.channels,
        ins.height,
        ins.width,
        ins.context_len,
    );
    let s_shape = [b, c, h, w];
    let c_shape = [b, l, ins.context_dim];
    let model = load_model(model_path)?;
    let start = std::time::Instant::now();
    let unet = model.unet()?;
    if c != unet.config.in_channels {
        return Err(bad(
            "sample",
            &s_shape,
            &format!("[B, {}, H, W]", unet.config.in_channels),
        ));
    }
    if c_shape[2] != unet.config.cross_attention_dim {
        return Err(bad(
            "encoder_hidden_states",
            &c_shape,
            &format!("[B, L, {}]", unet.config.cross_attention_dim),
        ));
    }
    if !scales.is_empty() && scales.len() != adapter_paths.len() {
        return Err(hdb::Error::invalid_arg(
            "--scale",
            format!(
                "{} scales for {} adapters",
                scales.len(),
                adapter_paths.len()
            ),
        ));
    }
    let table = hdb::adapter::adaptable_layers(&model);
    let adapters = adapter_paths
        .iter()
        .map(|p| hdb::adapter::load(&SafetensorsFile::open(p)?, &table))
        .collect::<hdb::Result<Vec<_>>>()?;
    let set: Vec<(&hdb::adapter::Adapter, f32)> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| (a, scales.get(i).copied().unwrap_or(1.0)))
        .collect();
    let mode = match mode {
        Mode::Merge => ApplyMode::Merge,
        Mode::Runtime => ApplyMode::Runtime,
    };
    let device_unet = DeviceUnet::for_runtime(&rt, &model)?;
    let per_sample = ins.adapter_index.clone();
    let with_adapters = !adapters.is_empty() || per_sample.is_some();
    let x = UnetInput {
        sample: &ins.sample,
        timesteps: &ins.timesteps,
        context: &ins.context,
        batch: b,
        height: h,
        width: w,
        context_len: l,
    };
    let (y, built) = match &device_unet {
        Some(d) => {
            let set = rt.install(|| d.adapters(&set, mode))?;
            let built = start.elapsed();
            let ad = with_adapters.then_some(&set);
            (d.forward(&x, ad, per_sample.as_deref())?, built)
        }
        None => {
            let applied = rt.install(|| Applied::new(&set, mode, &*unet))?;
            let ad = with_adapters.then_some(AdapterCtx {
                applied: &applied,
                per_sample: per_sample.as_deref(),
            });
            let built = start.elapsed();
            (rt.install(|| unet.forward_with(&x, ad.as_ref()))?, built)
        }
    };
    log::info!(
        "UNet built in {built:?}, forward in {:?}{}",
        start.elapsed() - built,
        device_unet
            .as_ref()
            .map(|d| format!(" on {}", d.describe()))
            .unwrap_or_default()
    );
    write_f32(
        output,
        &[("out", vec![b, unet.config.out_channels, h, w], &y)],
    )
}
