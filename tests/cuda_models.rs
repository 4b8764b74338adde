//! The model code (text encoder, VAE and hypernetwork, and the UNet with the generic adapter
//! hook) on the CUDA backend (`hdb::backend::cuda::Cuda<T>`) against the same code on the CPU
//! backend, which the text_encoder, vae, hypernet and unet_parity tests check against
//! transformers, diffusers and timm. The UNet itself and its fused adapter sets are
//! tests/cuda_unet/'s. Same fixtures and measure as tests/cuda_unet/: relative L2 error bounded by 1e-4 (f32), 1e-2
//! (f16) and 4e-2 (bf16); a failure prints the worst element. `#[ignore]`d without a GPU
//! (counted as skipped); scripts/gpu-check.sh runs them with `--include-ignored`, and
//! `SKIPPED (no CUDA device)` counts as a failure there.
#![cfg(feature = "cuda")]

mod common;
use common::{fixtures, read_input};
use std::sync::Arc;

use hdb::backend::cuda::ops::BlasElem;
use hdb::backend::cuda::{Cuda, CudaDevice};
use hdb::io::diffusers::Variant;
use hdb::model::random::SplitMix64;
use hdb::model::text_encoder::TextEncoder;
use hdb::model::unet::Unet;
use hdb::model::vae::Vae;
use hdb::model::{LoadOptions, Model};

fn device() -> Option<Arc<CudaDevice>> {
    match CudaDevice::open(0) {
        Ok(d) => {
            println!("cuda device: {}", d.name());
            Some(Arc::new(d))
        }
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            None
        }
    }
}

fn tiny_sd() -> Model {
    Model::load(
        &fixtures().join("tiny-sd"),
        LoadOptions {
            variant: Variant::Full,
            ..Default::default()
        },
    )
    .expect("tiny-sd")
}

fn cpu<R>(f: impl FnOnce() -> R + Send) -> R
where
    R: Send,
{
    let rt = hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime");
    rt.install(f)
}

fn tol<T: BlasElem>() -> f64 {
    match T::SUFFIX {
        "f32" => 1e-4,
        "f16" => 1e-2,
        _ => 4e-2,
    }
}

/// Compares one output in storage type T; returns a failure message, if any.
fn judge<T: BlasElem>(what: &str, got: hdb::Result<Vec<f32>>, want: &[f32]) -> Option<String> {
    common::judge(what, T::SUFFIX, got, want, tol::<T>())
}

fn finish(failures: Vec<String>) {
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect()
}

fn text_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let m = tiny_sd();
    let te = TextEncoder::from_model(&m).expect("cpu text encoder");
    let (batch, len) = (2, te.config.max_position_embeddings);
    let mut rng = SplitMix64(77);
    let ids: Vec<u32> = (0..batch * len)
        .map(|_| {
            (rng.next_f32() * te.config.vocab_size as f32) as u32 % te.config.vocab_size as u32
        })
        .collect();
    let want = cpu(|| te.forward(&ids, batch, None)).expect("cpu forward");
    let got = TextEncoder::from_model_on(Cuda::<T>::new(dev.clone()), &m)
        .and_then(|g| g.forward_hooked(&ids, batch, None));
    failures.extend(judge::<T>("text-encoder/tiny-sd", got, &want));
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn text_encoder_on_cuda_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    text_cases::<f32>(&dev, &mut failures);
    text_cases::<half::f16>(&dev, &mut failures);
    text_cases::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

fn vae_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    for (case, path) in [
        ("tiny-sd", fixtures().join("tiny-sd")),
        ("noquant", fixtures().join("vae/noquant")),
    ] {
        let m = Model::load(
            &path,
            LoadOptions {
                variant: Variant::Auto,
                ..Default::default()
            },
        )
        .expect("model");
        let vae = Vae::from_model(&m).expect("cpu vae");
        let gpu = match Vae::from_model_on(Cuda::<T>::new(dev.clone()), &m) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("vae/{case} {}: {e}", T::SUFFIX));
                continue;
            }
        };
        let (f, lc) = (vae.config.downscale(), vae.config.latent_channels);
        let (b, h, w) = (2, 8, 6);
        let z = noise(b * lc * h * w, 11);
        let want = cpu(|| vae.decode(&z, b, h, w)).expect("cpu decode");
        failures.extend(judge::<T>(
            &format!("vae-decode/{case}"),
            gpu.decode(&z, b, h, w),
            &want,
        ));
        let img = noise(b * vae.config.in_channels * h * f * w * f, 12);
        let (mean, logvar) = cpu(|| vae.encode(&img, b, h * f, w * f)).expect("cpu encode");
        match gpu.encode(&img, b, h * f, w * f) {
            Ok((gm, gl)) => {
                failures.extend(judge::<T>(&format!("vae-mean/{case}"), Ok(gm), &mean));
                failures.extend(judge::<T>(&format!("vae-logvar/{case}"), Ok(gl), &logvar));
            }
            Err(e) => failures.push(format!("vae-encode/{case} {}: {e}", T::SUFFIX)),
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn vae_on_cuda_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    vae_cases::<f32>(&dev, &mut failures);
    vae_cases::<half::f16>(&dev, &mut failures);
    vae_cases::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

// ---------------------------------------------------------------------------------------------
// Adapters through the generic adapter hook, hdb::backend::cuda::CudaKeyAdapters (merged
// weight copies, or two GEMMs per factor; the text encoder's host sets take it on a GPU), on
// the UNet against the CPU's AdapterCtx on the same set, in merge mode and in runtime mode
// with and without one adapter per sample. (The fused CudaLayerAdapters: tests/cuda_unet/.)
// ---------------------------------------------------------------------------------------------

use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::Adapter;
use hdb::backend::cuda::CudaKeyAdapters;

/// Random LoRA factors of `rank` on every other projection of `table` (a component's
/// adaptable layers).
fn random_adapter(
    table: std::collections::BTreeMap<String, hdb::adapter::LayerShape>,
    seed: u64,
    rank: usize,
) -> Adapter {
    common::random_lora(table, seed, rank, |i| (i + seed as usize) % 2 == 0)
}

fn adapter_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let m = tiny_sd();
    let unet = m.unet().expect("cpu unet");
    let inp = read_input("tiny-sd");
    let gpu = match Unet::from_model_on(Cuda::<T>::new(dev.clone()), &m) {
        Ok(g) => g,
        Err(e) => return failures.push(format!("generic-unet {}: {e}", T::SUFFIX)),
    };
    let a = [
        random_adapter(unet.adaptable_layers(), 1, 4),
        random_adapter(unet.adaptable_layers(), 2, 8),
    ];
    let per_sample: Vec<i32> = (0..inp.b as i32).map(|i| i % 2).collect();
    for (name, set, mode, idx) in [
        (
            "merge",
            vec![(&a[0], 0.7), (&a[1], 0.5)],
            ApplyMode::Merge,
            None,
        ),
        (
            "runtime",
            vec![(&a[0], 0.7), (&a[1], 0.5)],
            ApplyMode::Runtime,
            None,
        ),
        (
            "runtime-per-sample",
            vec![(&a[0], 1.0), (&a[1], 1.0)],
            ApplyMode::Runtime,
            Some(per_sample.as_slice()),
        ),
    ] {
        let applied = Applied::new(&set, mode, &*unet).expect("set");
        let ctx = AdapterCtx {
            applied: &applied,
            per_sample: idx,
        };
        let want = cpu(|| unet.forward_with(&inp.args(), Some(&ctx))).expect("cpu forward");
        // The generic hook (cuBLAS), from the set resolved in its mode.
        let got = CudaKeyAdapters::new(gpu.backend(), &applied, idx)
            .and_then(|hook| gpu.forward_hooked(&inp.args(), Some(&hook)));
        failures.extend(judge::<T>(
            &format!("generic-unet-adapters/{name}"),
            got,
            &want,
        ));
    }
}

/// The text encoder with adapters, as the pipeline runs it on a CUDA runtime.
fn text_adapter_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let m = tiny_sd();
    let te = TextEncoder::from_model(&m).expect("cpu text encoder");
    let gpu = match TextEncoder::from_model_on(Cuda::<T>::new(dev.clone()), &m) {
        Ok(g) => g,
        Err(e) => return failures.push(format!("text-encoder {}: {e}", T::SUFFIX)),
    };
    let a = [
        random_adapter(te.adaptable_layers(), 3, 4),
        random_adapter(te.adaptable_layers(), 4, 2),
    ];
    let len = te.config.max_position_embeddings;
    let ids: Vec<u32> = (0..2 * len)
        .map(|i| (i * 131 % te.config.vocab_size) as u32)
        .collect();
    let per_sample = [1, 0];
    for (name, mode, idx) in [
        ("merge", ApplyMode::Merge, None),
        (
            "runtime-per-sample",
            ApplyMode::Runtime,
            Some(&per_sample[..]),
        ),
    ] {
        let applied = Applied::new(&[(&a[0], 0.8), (&a[1], 1.0)], mode, &te).expect("set");
        let ctx = AdapterCtx {
            applied: &applied,
            per_sample: idx,
        };
        let want = cpu(|| te.forward(&ids, 2, Some(&ctx))).expect("cpu forward");
        let got = CudaKeyAdapters::new(gpu.backend(), &applied, idx)
            .and_then(|hook| gpu.forward_hooked(&ids, 2, Some(&hook)));
        failures.extend(judge::<T>(
            &format!("text-encoder-adapters/{name}"),
            got,
            &want,
        ));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn text_encoder_adapters_on_cuda_match_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    text_adapter_cases::<f32>(&dev, &mut failures);
    text_adapter_cases::<half::f16>(&dev, &mut failures);
    finish(failures);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn unet_key_adapters_on_cuda_match_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    adapter_cases::<f32>(&dev, &mut failures);
    adapter_cases::<half::f16>(&dev, &mut failures);
    finish(failures);
}

// ---------------------------------------------------------------------------------------------
// The hypernetwork (ViT encoder, transformer decoder) on Cuda<T> against the CPU, on the tiny
// fixture of tests/hypernet.rs: the image tokens and every iteration's theta.
// ---------------------------------------------------------------------------------------------

use hdb::hypernet::Hypernet;

fn hypernet_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let path = fixtures().join("hypernet/tiny.hypernet.safetensors");
    let net = Hypernet::load(&path).expect("cpu hypernetwork");
    let s = net.config.img_size();
    let image = noise(3 * s * s, 21);
    let want = cpu(|| net.predict_trace(&image, Some(3), None)).expect("cpu predict");
    let gpu = match Hypernet::load_on(Cuda::<T>::new(dev.clone()), &path) {
        Ok(g) => g,
        Err(e) => return failures.push(format!("hypernet {}: {e}", T::SUFFIX)),
    };
    match gpu.predict_trace(&image, Some(3), None) {
        Ok(got) => {
            failures.extend(judge::<T>(
                "hypernet-tokens",
                Ok(got.image_tokens),
                &want.image_tokens,
            ));
            for (i, (g, w)) in got.thetas.into_iter().zip(&want.thetas).enumerate() {
                failures.extend(judge::<T>(&format!("hypernet-theta-{}", i + 1), Ok(g), w));
            }
        }
        Err(e) => failures.push(format!("hypernet {}: {e}", T::SUFFIX)),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn hypernet_on_cuda_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    hypernet_cases::<f32>(&dev, &mut failures);
    hypernet_cases::<half::f16>(&dev, &mut failures);
    finish(failures);
}
