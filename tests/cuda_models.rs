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
use hdb::backend::Backend;
use hdb::io::diffusers::Variant;
use hdb::model::text_encoder::TextEncoder;
use hdb::model::unet::Unet;
use hdb::model::vae::Vae;
use hdb::model::{LoadOptions, Model};
use hdb::rng::SplitMix64;

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
    let want = cpu(|| te.forward(&ids, batch)).expect("cpu forward");
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
// Adapter sets as sessions build them (hdb::adapter::set::AdapterSet: on CUDA the fused
// lidb_merge / lora_bgmv kernels of hdb::adapter::cuda), on the UNet and the text encoder,
// against the CPU's set, in merge mode and in runtime mode with and without one adapter per
// sample. (More UNet fixtures and set shapes: tests/cuda_unet/.)
// ---------------------------------------------------------------------------------------------

use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::set::AdapterSet;
use hdb::adapter::Adapter;
use hdb::model::Adaptable;

/// Random LoRA factors of `rank` on every other projection of `table` (a component's
/// adaptable layers).
fn random_adapter(
    table: std::collections::BTreeMap<String, hdb::adapter::LayerShape>,
    seed: u64,
    rank: usize,
) -> Adapter {
    common::random_lora(table, seed, rank, |i| (i + seed as usize).is_multiple_of(2))
}

fn adapter_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let m = tiny_sd();
    let unet = Unet::from_model(&m).expect("cpu unet");
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
        let applied = Applied::new(&set, mode, &unet).expect("set");
        let ctx = AdapterCtx {
            applied: &applied,
            per_sample: idx,
        };
        let want = cpu(|| unet.forward_adapted(&inp.args(), &ctx)).expect("cpu forward");
        let got = AdapterSet::build(gpu.backend(), &gpu, &set, mode, None).and_then(|s| {
            let s = s.ok_or_else(|| hdb::Error::Internal("the set changes no layer".into()))?;
            s.with_hook(idx, |h| gpu.forward_adapted(&inp.args(), h))
        });
        failures.extend(judge::<T>(&format!("unet-adapter-set/{name}"), got, &want));
    }
}

/// The text encoder with adapters, as a session runs it on a CUDA runtime.
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
        let set = [(&a[0], 0.8), (&a[1], 1.0)];
        let applied = Applied::new(&set, mode, &te).expect("set");
        let ctx = AdapterCtx {
            applied: &applied,
            per_sample: idx,
        };
        let want = cpu(|| te.forward_adapted(&ids, 2, &ctx)).expect("cpu forward");
        let got = AdapterSet::build(gpu.backend(), &gpu, &set, mode, None).and_then(|s| {
            let s = s.ok_or_else(|| hdb::Error::Internal("the set changes no layer".into()))?;
            s.with_hook(idx, |h| gpu.forward_adapted(&ids, 2, h))
        });
        failures.extend(judge::<T>(
            &format!("text-encoder-adapter-set/{name}"),
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
fn unet_adapter_sets_on_cuda_match_the_cpu() {
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
    hypernet_cases::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

/// `src` (a hypernetwork file) rewritten with every tensor in `dtype` (its values as f32,
/// rounded), metadata kept.
fn retyped_copy(src: &std::path::Path, out: &std::path::Path, dtype: hdb::tensor::DType) {
    use hdb::io::safetensors::SafetensorsFile;
    use hdb::tensor::DType;
    use safetensors::tensor::{Dtype, TensorView};
    let f = SafetensorsFile::open(src).expect("open");
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = f
        .tensors()
        .map(|e| {
            let v = f.to_f32(&e.name).expect("f32");
            let bytes = v
                .iter()
                .flat_map(|&x| match dtype {
                    DType::F32 => x.to_le_bytes().to_vec(),
                    DType::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
                    DType::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
                })
                .collect();
            (e.name.clone(), e.shape.dims().to_vec(), bytes)
        })
        .collect();
    let dtype = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, b)| {
            (
                n.clone(),
                TensorView::new(dtype, shape.clone(), b).expect("view"),
            )
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = f
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    safetensors::tensor::serialize_to_file(views, Some(meta), out).expect("write");
}

/// On a CUDA runtime a hypernetwork runs in its file's storage type (`PlacedHypernet::load`,
/// what `hdb_hypernet_load` and `hdb predict` use): the tiny fixture's f32 copy in f32, its
/// f16 and bf16 copies in half precision with f32 accumulation. Each prediction against the CPU's f32 one
/// of the same file, at that type's tolerance (1e-4, 1e-2, 4e-2 relative L2 error).
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn hypernet_runs_in_its_files_storage_type_on_a_gpu() {
    use hdb::placed::PlacedHypernet;
    use hdb::runtime::DeviceRequest;
    use hdb::tensor::DType;
    let Some(_dev) = device() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = fixtures().join("hypernet/tiny.hypernet.safetensors");
    let path = |t: DType| {
        let p = dir.path().join(format!("{t}.safetensors"));
        retyped_copy(&fixture, &p, t);
        p
    };
    let (f32_path, f16_path, bf16_path) = (path(DType::F32), path(DType::F16), path(DType::BF16));
    let runtime =
        |device| hdb::Runtime::new(hdb::RuntimeOptions { device, threads: 2 }).expect("runtime");
    let (gpu, host) = (runtime(DeviceRequest::Cuda(0)), runtime(DeviceRequest::Cpu));
    let mut failures = Vec::new();
    for (path, dtype, tol) in [
        (&f32_path, "f32", 1e-4),
        (&f16_path, "f16", 1e-2),
        (&bf16_path, "bf16", 4e-2),
    ] {
        let on_cpu = PlacedHypernet::load(&host, path).expect("cpu load");
        let s = on_cpu.config().img_size();
        let image = noise(3 * s * s, 31);
        let want = host
            .install(|| on_cpu.predict(&image, Some(3), None))
            .expect("cpu predict");
        let on_gpu = PlacedHypernet::load(&gpu, path).expect("gpu load");
        let described = on_gpu.describe();
        println!("hypernetwork file in {dtype}: runs on {described}");
        if !described.starts_with("cuda") || !described.ends_with(dtype) {
            failures.push(format!(
                "the {dtype} file runs on '{described}', not cuda {dtype}"
            ));
        }
        let got = on_gpu.predict(&image, Some(3), None);
        failures.extend(common::judge("hypernet-file-theta", dtype, got, &want, tol));
    }
    finish(failures);
}

// ---------------------------------------------------------------------------------------------
// Training on a GPU: the adapter factors' gradient GEMM (Backend::outer_f32, f32 output from
// storage-type inputs) against the CPU's, in every storage type.
// ---------------------------------------------------------------------------------------------

fn outer_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    let be = Cuda::<T>::new(dev.clone());
    for (rows, m, n) in [(1, 1, 1), (77, 4, 768), (4096, 320, 4), (5, 3, 7)] {
        // Inputs rounded to T, so both sides see the same values.
        let a: Vec<f32> = noise(rows * m, 5)
            .iter()
            .map(|&x| T::from_f32(x).to_f32())
            .collect();
        let b: Vec<f32> = noise(rows * n, 6)
            .iter()
            .map(|&x| T::from_f32(x).to_f32())
            .collect();
        let want = hdb::backend::Cpu
            .outer_f32(&a, &b, (rows, m, n))
            .expect("cpu");
        let got = be
            .upload(&a)
            .and_then(|ga| Ok((ga, be.upload(&b)?)))
            .and_then(|(ga, gb)| be.outer_f32(&ga, &gb, (rows, m, n)));
        // f32 accumulation on both sides: within 1e-4 whatever T.
        failures.extend(common::judge(
            &format!("outer_f32 {rows}x{m}x{n}"),
            T::SUFFIX,
            got,
            &want,
            1e-4,
        ));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn adapter_gradient_gemm_on_cuda_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    outer_cases::<f32>(&dev, &mut failures);
    outer_cases::<half::f16>(&dev, &mut failures);
    outer_cases::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

// ---------------------------------------------------------------------------------------------
// Whole-model adapter gradients on Cuda<T> against the CPU's (which equal torch autograd:
// tests/grad_model.rs), on the four fixtures of tools/make_grad_fixtures.py: LiDB v1 with hidden
// states, v2 with token ids (the text encoder's backward too), kohya with alpha and ids, PEFT.
// Every gradient within `tol` of the largest CPU gradient: f32 1e-4, f16 2e-2, bf16 6e-2
// (fp16 and bf16 activations through two passes of the UNet and the text encoder).
// ---------------------------------------------------------------------------------------------

/// The gradient tolerance of [`grad_cases`] and [`flash_grad_case`], relative to the
/// largest CPU gradient.
fn grad_tol<T: BlasElem>() -> f64 {
    match T::SUFFIX {
        "f32" => 1e-4,
        "f16" => 2e-2,
        _ => 6e-2,
    }
}

/// Pushes a failure unless every gradient of `got` is within [`grad_tol`] of the largest of
/// `want` (and the loss within it relatively); prints the worst element either way.
fn compare_gradients<T: BlasElem>(
    case: &str,
    (cpu_loss, want): (f64, &[hdb::train::LayerGrad]),
    (loss, got): (f64, &[hdb::train::LayerGrad]),
    failures: &mut Vec<String>,
) {
    let tol = grad_tol::<T>();
    let flat = |g: &[hdb::train::LayerGrad]| -> Vec<f32> {
        g.iter()
            .flat_map(|l| l.down.iter().chain(&l.up).copied())
            .collect()
    };
    let (w, gv) = (flat(want), flat(got));
    let scale = w.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
    let mut worst = (0f64, 0usize);
    for (i, (a, b)) in gv.iter().zip(&w).enumerate() {
        let e = (*a as f64 - *b as f64).abs() / scale;
        if e.is_nan() || e > worst.0 {
            worst = (if e.is_nan() { f64::INFINITY } else { e }, i);
        }
    }
    let loss_rel = ((loss - cpu_loss) / cpu_loss).abs();
    println!(
        "cuda-parity grad/{case} {} loss {loss:.6} (cpu {cpu_loss:.6}) worst gradient {:.2e} of max|grad| at {} (tol {tol:e})",
        T::SUFFIX,
        worst.0,
        worst.1
    );
    // A NaN loss or largest gradient fails here (NaN gradients make `worst` infinite).
    let finite = scale.is_finite() && scale > 0.0 && loss_rel.is_finite();
    if gv.len() != w.len() || !finite || worst.0 > tol || loss_rel > tol {
        failures.push(format!(
            "grad {case} {}: worst gradient {:.2e} of max|grad| {scale:.3e} at {} (hdb {} vs cpu {}), loss {loss} vs {cpu_loss}",
            T::SUFFIX,
            worst.0,
            worst.1,
            gv.get(worst.1).copied().unwrap_or(f32::NAN),
            w.get(worst.1).copied().unwrap_or(f32::NAN),
        ));
    }
}

fn grad_cases<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    use hdb::io::safetensors::SafetensorsFile;
    use hdb::model::text_encoder::TextEncoder;
    use hdb::train::{loss_and_gradients, GradInput, Trainable};
    let m = tiny_sd();
    let bases = hdb::adapter::lidb::BasisCache::default();
    let table = m.adaptable_layers();
    let cpu_unet = Unet::from_model(&m).expect("unet");
    let cpu_te = TextEncoder::from_model(&m).expect("text encoder");
    let be = Cuda::<T>::new(dev.clone());
    let (gpu_unet, gpu_te) = match (
        Unet::from_model_on(be.clone(), &m),
        TextEncoder::from_model_on(be.clone(), &m),
    ) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            return failures.push(format!("grad {}: upload: {e}", T::SUFFIX))
        }
    };
    for (case, adapter) in [
        ("lidb-v1-hidden", "grad-id.v1.lidb.safetensors"),
        ("lidb-v2-ids", "grad-id.v2.lidb.safetensors"),
        ("kohya-ids", "grad-lora.kohya.safetensors"),
        ("peft-hidden", "grad-lora.peft.safetensors"),
    ] {
        let g = fixtures().join("grad");
        let f = SafetensorsFile::open(&g.join(adapter)).expect("adapter");
        let t = Trainable::from_file(&f, &table, &bases).expect("trainable");
        let input = GradInput::from_safetensors(
            &SafetensorsFile::open(&g.join(format!("{case}.in.safetensors"))).expect("input"),
        )
        .expect("input");
        let (cpu_loss, want) =
            cpu(|| loss_and_gradients(&cpu_unet, Some(&cpu_te), &t, &input, true)).expect("cpu");
        let got = match loss_and_gradients(&gpu_unet, Some(&gpu_te), &t, &input, true) {
            Ok(g) => g,
            Err(e) => {
                failures.push(format!("grad {case} {}: {e}", T::SUFFIX));
                continue;
            }
        };
        compare_gradients::<T>(case, (cpu_loss, &want), (got.0, &got.1), failures);
    }
    // The tiny model's head dims (2 to 8) take the materialised attention backward.
    let (flash, materialized) = be.attention_backward_paths();
    println!(
        "cuda-parity grad {}: attention backward calls: flash {flash}, materialized {materialized}",
        T::SUFFIX
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn adapter_gradients_on_cuda_match_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    grad_cases::<f32>(&dev, &mut failures);
    grad_cases::<half::f16>(&dev, &mut failures);
    grad_cases::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

/// Whole-model gradients through the flash attention backward: a small random model whose
/// head dims the flash kernels take (UNet channels 40 and 80 with one head: self-attention at
/// d 40 over 10 x 10 = 100 latent tokens, two query tiles, the last partial, and d 80 in the mid
/// block over 25; cross-attention over 77 text tokens; the text encoder's causal
/// self-attention at d 64 over 77), a rank-2 LoRA on every adaptable layer, token ids so the
/// text encoder's backward runs too, batch 2. The CPU computes the same model in f32.
fn flash_grad_case<T: BlasElem>(dev: &Arc<CudaDevice>, failures: &mut Vec<String>) {
    use hdb::model::config::{BlockKind, UnetConfig};
    use hdb::model::random::RandomWeights;
    use hdb::model::text_encoder::TextEncoderConfig;
    use hdb::model::Adaptable;
    use hdb::train::params::{Layout, TrainLayer};
    use hdb::train::{loss_and_gradients, Condition, GradInput, Trainable};
    let te_cfg = TextEncoderConfig {
        vocab_size: 100,
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        ..TextEncoderConfig::default()
    };
    let unet_cfg = UnetConfig {
        block_out_channels: vec![40, 80],
        layers_per_block: 1,
        down_blocks: vec![BlockKind::CrossAttn, BlockKind::Plain],
        up_blocks: vec![BlockKind::Plain, BlockKind::CrossAttn],
        heads: vec![1, 1],
        transformer_layers: vec![1, 1],
        cross_attention_dim: 128,
        norm_num_groups: 8,
        ..UnetConfig::default()
    };
    let w = RandomWeights { seed: 16 };
    let cpu_unet = Unet::load(unet_cfg.clone(), &w).expect("unet");
    let cpu_te = TextEncoder::load(te_cfg.clone(), &w).expect("text encoder");
    let be = Cuda::<T>::new(dev.clone());
    let (gpu_unet, gpu_te) = match (
        Unet::load_on(be.clone(), unet_cfg, &w),
        TextEncoder::load_on(be.clone(), te_cfg, &w),
    ) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            return failures.push(format!("grad flash {}: upload: {e}", T::SUFFIX))
        }
    };
    let mut rng = SplitMix64(0x16f1a5);
    let mut uniform = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| scale * (2.0 * rng.next_f32() - 1.0))
            .collect()
    };
    let mut table = cpu_unet.adaptable_layers();
    table.extend(cpu_te.adaptable_layers());
    let rank = 2;
    let layers = table
        .iter()
        .map(|(key, l)| TrainLayer {
            key: key.clone(),
            din: l.din,
            dout: l.dout,
            rank,
            down: uniform(rank * l.din, 1.0 / (l.din as f32).sqrt()),
            up: uniform(l.dout * rank, 0.5),
            names: None,
            scale: 1.0,
            basis: None,
        })
        .collect();
    let t = Trainable {
        layout: Layout::Lora {
            format: hdb::adapter::lora::LoraFormat::Kohya,
        },
        layers,
    };
    let (b, hw, len) = (2, 10, 77);
    let input = GradInput {
        sample: uniform(b * 4 * hw * hw, 1.5),
        timesteps: vec![999.0, 37.0],
        target: uniform(b * 4 * hw * hw, 1.5),
        condition: Condition::Ids {
            ids: (0..b * len).map(|i| (i * 37 % 100) as u32).collect(),
            len,
        },
        batch: b,
        height: hw,
        width: hw,
    };
    let (cpu_loss, want) =
        cpu(|| loss_and_gradients(&cpu_unet, Some(&cpu_te), &t, &input, true)).expect("cpu");
    let case = "flash-lora-ids";
    match loss_and_gradients(&gpu_unet, Some(&gpu_te), &t, &input, true) {
        Ok((loss, got)) => compare_gradients::<T>(case, (cpu_loss, &want), (loss, &got), failures),
        Err(e) => failures.push(format!("grad {case} {}: {e}", T::SUFFIX)),
    }
    // Every attention backward (9: self and cross in the 4 transformer blocks, one in down
    // block 0, the mid block's, two in up block 1; the text encoder's layer) must have taken
    // the flash kernels in f16 and bf16, the materialised path in f32.
    let (flash, materialized) = be.attention_backward_paths();
    println!(
        "cuda-parity grad/{case} {}: attention backward calls: flash {flash}, materialized {materialized}",
        T::SUFFIX
    );
    let want_flash = T::SUFFIX != "f32";
    if (flash > 0) != want_flash || (materialized > 0) == want_flash {
        failures.push(format!(
            "grad {case} {}: attention backward took flash {flash} times, materialized {materialized}",
            T::SUFFIX
        ));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn adapter_gradients_through_the_flash_attention_backward_match_the_cpu() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    flash_grad_case::<f32>(&dev, &mut failures);
    flash_grad_case::<half::f16>(&dev, &mut failures);
    flash_grad_case::<half::bf16>(&dev, &mut failures);
    finish(failures);
}

/// Finetuning through the engine on a CUDA runtime: a few LiDB-from-zero steps run, the
/// losses are finite and near the CPU run's (the same stream of draws), the adapter loads.
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn finetuning_runs_on_a_cuda_runtime() {
    use hdb::train::finetune::{Face, FinetuneParams, Start};
    let Some(_dev) = device() else { return };
    let rgb: Vec<u8> = (0..40 * 48 * 3).map(|i| (i * 37 % 251) as u8).collect();
    let face = Face {
        rgb: &rgb,
        width: 40,
        height: 48,
        stride: 40 * 3,
    };
    let params = FinetuneParams {
        steps: 3,
        resolution: 64,
        seed: 9,
        ..FinetuneParams::default()
    };
    let start = Start::LidbFromZero {
        rank: 1,
        a: 100,
        b: 50,
        basis_seed: 7,
        alpha: 1.0,
    };
    let engine = |device| {
        let rt = hdb::Runtime::new(hdb::RuntimeOptions { device, threads: 2 }).expect("runtime");
        hdb::Engine::new(Arc::new(rt), tiny_sd())
    };
    let gpu = engine(hdb::runtime::DeviceRequest::Cuda(0));
    let cpu_e = engine(hdb::runtime::DeviceRequest::Cpu);
    let on_gpu = gpu
        .finetune(face, start.clone(), &params, None)
        .expect("cuda finetune");
    let on_cpu = cpu_e
        .finetune(face, start, &params, None)
        .expect("cpu finetune");
    println!(
        "finetune losses: cuda {:?} cpu {:?}",
        on_gpu.losses, on_cpu.losses
    );
    assert_eq!(on_gpu.losses.len(), 3);
    for (g, c) in on_gpu.losses.iter().zip(&on_cpu.losses) {
        // fp16 on the GPU: the first step's loss equals the CPU's closely; later steps move
        // apart as the parameters do.
        assert!(
            g.is_finite() && (g - c).abs() < 5e-2 * c.abs(),
            "cuda {g} vs cpu {c}"
        );
    }
    let adapter = on_gpu.trainable.to_adapter();
    gpu.adaptable_layers();
    let identity = hdb::model::adaptable::identity_layers(&cpu_e.adaptable_layers());
    assert_eq!(adapter.layers.len(), identity.len());
}
