//! `hdb unet`: one UNet evaluation from a safetensors file of inputs, with adapters, on any
//! device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hdb::adapter::apply::ApplyMode;
use hdb::io::safetensors::{write_f32, SafetensorsFile};
use hdb::model::unet::UnetInput;
use hdb::{Engine, Session};

use crate::generate::load_adapters;
use crate::{load_model, runtime, Mode};

/// The adapters of `hdb unet`: `--adapter` files with their scales, and `--shared-adapter`
/// files stacked into each of them.
pub struct AdapterArgs<'a> {
    pub paths: &'a [PathBuf],
    pub scales: &'a [f32],
    pub shared: &'a [PathBuf],
    pub shared_scales: &'a [f32],
    pub allow_unmatched: bool,
}

pub fn unet(
    model_path: &Path,
    input: &Path,
    output: &Path,
    (device, threads): (hdb::runtime::DeviceRequest, usize),
    adapter_args: AdapterArgs<'_>,
    mode: Mode,
) -> hdb::Result<()> {
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
    let engine = Arc::new(Engine::new(Arc::new(rt), model));
    let start = std::time::Instant::now();
    let cfg = engine.unet_config()?;
    let built = start.elapsed();
    if c != cfg.in_channels {
        return Err(bad(
            "sample",
            &s_shape,
            &format!("[B, {}, H, W]", cfg.in_channels),
        ));
    }
    if c_shape[2] != cfg.cross_attention_dim {
        return Err(bad(
            "encoder_hidden_states",
            &c_shape,
            &format!("[B, L, {}]", cfg.cross_attention_dim),
        ));
    }
    let AdapterArgs {
        paths,
        scales,
        shared,
        shared_scales,
        allow_unmatched,
    } = adapter_args;
    let mut adapters = load_adapters(&engine, paths, scales, allow_unmatched)?;
    if !shared.is_empty() {
        if adapters.is_empty() {
            return Err(hdb::Error::invalid_arg(
                "--shared-adapter",
                "is stacked into each --adapter; give at least one --adapter",
            ));
        }
        let shared = load_adapters(&engine, shared, shared_scales, allow_unmatched)?;
        adapters = adapters
            .iter()
            .map(|(a, s)| {
                let mut parts = vec![(a, *s)];
                parts.extend(shared.iter().map(|(b, t)| (b, *t)));
                Ok((hdb::adapter::stack(&parts)?, 1.0))
            })
            .collect::<hdb::Result<_>>()?;
    }
    let set: Vec<(&hdb::adapter::Adapter, f32)> = adapters.iter().map(|(a, s)| (a, *s)).collect();
    let mode = match mode {
        Mode::Merge => ApplyMode::Merge,
        Mode::Runtime => ApplyMode::Runtime,
    };
    let mut session = Session::new(engine.clone());
    session.set_adapters(&set, mode)?;
    if ins.adapter_index.is_some() {
        session.set_sample_adapters(ins.adapter_index.clone())?;
    }
    let x = UnetInput {
        sample: &ins.sample,
        timesteps: &ins.timesteps,
        context: &ins.context,
        batch: b,
        height: h,
        width: w,
        context_len: l,
    };
    let t0 = std::time::Instant::now();
    let y = session.unet(&x)?;
    log::info!(
        "UNet built in {built:?}, forward in {:?} on {}",
        t0.elapsed(),
        engine.describe()
    );
    let shape = vec![b, cfg.out_channels, h, w];
    write_f32(output, &[("out", shape.clone(), &y)])?;
    println!("wrote {} (out {shape:?}, f32)", output.display());
    Ok(())
}
