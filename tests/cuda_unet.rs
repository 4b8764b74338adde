//! The CUDA UNet against the CPU UNet on the tiny diffusers fixtures of tests/unet_parity.rs
//! (the CPU UNet is itself checked against diffusers there), in f32, f16 and bf16 storage.
//! Measure: relative L2 error ||gpu - cpu|| / ||cpu||, bounded by 1e-4 (f32: cuBLAS sums in
//! another order), 1e-2 (f16) and 4e-2 (bf16). The tests are `#[ignore]`d, so a plain
//! `cargo test` counts them as skipped; run them with `--include-ignored` on a GPU machine
//! (scripts/gpu-check.sh does). Without a usable device they print
//! `SKIPPED (no CUDA device): <reason>`, which gpu-check.sh counts as a failure.
#![cfg(feature = "cuda")]

mod common;
use common::{compare, fixtures, judge, read_input, Input};
use std::path::PathBuf;
use std::sync::Arc;

use hdb::backend::cuda::ops::BlasElem;
use hdb::backend::cuda::unet::CudaUnet;
use hdb::backend::cuda::CudaDevice;
use hdb::io::diffusers::Variant;
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::config::UnetConfig;
use hdb::model::random::{RandomWeights, SplitMix64};
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::{LoadOptions, Model};

/// The device, or None after printing why the test is skipped.
fn device() -> Option<CudaDevice> {
    match CudaDevice::open(0) {
        Ok(d) => {
            println!(
                "cuda device: {} (sm_{}{})",
                d.name(),
                d.compute_capability().0,
                d.compute_capability().1
            );
            Some(d)
        }
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            None
        }
    }
}

/// Where a case's UNet comes from.
enum Source {
    /// A fixture model of tests/unet_parity.rs, with its input and the variant to load.
    Fixture(PathBuf, Variant),
    /// Random weights (hdb::model::random) and a random input of [2, 4, size, size].
    Random(UnetConfig, usize),
}

/// The fixtures of tests/unet_parity.rs, then a random-weight UNet whose head dims reach the
/// tensor-core attention kernel (the fixtures' head dims of 2 to 6 take the scalar one).
fn cases() -> Vec<(&'static str, Source)> {
    let f = fixtures();
    vec![
        // SD 1.5-shaped: conv projections, cross-attention in the first down blocks.
        ("tiny-sd", Source::Fixture(f.join("tiny-sd"), Variant::Full)),
        // The same model from its fp16 weights (rounded to f16 on disk).
        (
            "tiny-sd-fp16",
            Source::Fixture(f.join("tiny-sd"), Variant::Fp16),
        ),
        // SD 2-style: linear proj_in/proj_out, per-block head counts.
        (
            "sd2-linear",
            Source::Fixture(f.join("unet/sd2-linear"), Variant::Auto),
        ),
        // One resnet per block, three blocks, two transformer layers per attention.
        ("lpb1", Source::Fixture(f.join("unet/lpb1"), Variant::Auto)),
        // An LDM single file with an inferred config.
        (
            "ldm-sd1",
            Source::Fixture(f.join("unet/ldm-sd1.safetensors"), Variant::Auto),
        ),
        // Head dims 40, 64, 80 (down/up blocks) and 160 (mid): every flash_attn instantiation,
        // 256 query rows at the top level, 77 keys in cross-attention.
        (
            "random-flash",
            Source::Random(
                UnetConfig {
                    block_out_channels: vec![80, 128, 160, 160],
                    heads: vec![2, 2, 2, 1],
                    cross_attention_dim: 96,
                    norm_num_groups: 16,
                    ..UnetConfig::default()
                },
                16,
            ),
        ),
    ]
}

fn load(source: &Source, case: &str) -> (Arc<Unet>, Input) {
    match source {
        Source::Fixture(model, variant) => {
            let m = Model::load(
                model,
                LoadOptions {
                    variant: *variant,
                    progress: None,
                },
            )
            .expect("model");
            (m.unet().expect("unet"), read_input(case))
        }
        Source::Random(cfg, size) => {
            let unet = Unet::load(cfg.clone(), &RandomWeights { seed: 0xC0DA }).expect("unet");
            let (b, l) = (2, 77);
            let mut rng = SplitMix64(7);
            let mut noise =
                |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };
            let inp = Input {
                sample: noise(b * cfg.in_channels * size * size),
                t: vec![999.0, 10.0],
                ctx: noise(b * l * cfg.cross_attention_dim),
                b,
                h: *size,
                w: *size,
                l,
            };
            (Arc::new(unet), inp)
        }
    }
}

/// The SD 1.5-shaped fixture and its input.
fn tiny_sd() -> (Arc<Unet>, Input) {
    load(
        &Source::Fixture(fixtures().join("tiny-sd"), Variant::Full),
        "tiny-sd",
    )
}

fn cpu_forward(unet: &Unet, inp: &Input) -> Vec<f32> {
    let rt = hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime");
    rt.install(|| unet.forward(&inp.args()))
        .expect("cpu forward")
}

/// Runs one case in storage type T; returns a failure message, if any.
fn check<T: BlasElem>(
    dev: &CudaDevice,
    case: &str,
    unet: &Unet,
    inp: &Input,
    want: &[f32],
    tol: f64,
) -> Option<String> {
    let result = CudaUnet::<T>::upload(dev, unet).and_then(|g| g.forward(dev, &inp.args()));
    judge(&format!("unet/{case}"), T::SUFFIX, result, want, tol)
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn cuda_unet_matches_the_cpu_unet_in_f32_f16_and_bf16() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    for (case, source) in cases() {
        let (unet, inp) = load(&source, case);
        let want = cpu_forward(&unet, &inp);
        failures.extend(check::<f32>(&dev, case, &unet, &inp, &want, 1e-4));
        failures.extend(check::<half::f16>(&dev, case, &unet, &inp, &want, 1e-2));
        failures.extend(check::<half::bf16>(&dev, case, &unet, &inp, &want, 4e-2));
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn forward_device_gives_what_forward_gives() {
    let Some(dev) = device() else { return };
    let (unet, inp) = tiny_sd();
    let g = CudaUnet::<half::f16>::upload(&dev, &unet).expect("upload");
    let host = g.forward(&dev, &inp.args()).expect("forward");
    let s = dev.upload_f32::<half::f16>(&inp.sample).expect("sample");
    let c = dev.upload_f32::<half::f16>(&inp.ctx).expect("context");
    let out = g
        .forward_device(&dev, &s, &inp.t, &c, inp.b, inp.h, inp.w, inp.l)
        .expect("forward_device");
    let n = inp.b * g.config().out_channels * inp.h * inp.w;
    assert_eq!(out.len(), n);
    let got = dev.download_f32(&out, n).expect("download");
    let (rel, max_abs, at) = compare(&got, &host);
    assert!(
        rel <= 1e-6,
        "forward_device vs forward: rel_l2 {rel:e}, max abs {max_abs:e} at {at}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn wrong_input_shapes_are_the_cpu_unets_errors() {
    let Some(dev) = device() else { return };
    let (unet, inp) = tiny_sd();
    let g = CudaUnet::<f32>::upload(&dev, &unet).expect("upload");
    let args = inp.args();
    // A height that is no multiple of the UNet's downsampling factor.
    let odd = vec![0.0; inp.sample.len() / inp.h * (inp.h - 1)];
    let bad = [
        UnetInput {
            sample: &inp.sample[1..],
            ..args
        },
        UnetInput {
            context: &inp.ctx[1..],
            ..args
        },
        UnetInput {
            timesteps: &inp.t[..1],
            ..args
        },
        UnetInput {
            sample: &odd,
            height: inp.h - 1,
            ..args
        },
        UnetInput {
            sample: &[],
            timesteps: &[],
            context: &[],
            batch: 0,
            ..args
        },
        UnetInput {
            batch: usize::MAX,
            ..args
        },
    ];
    for (i, x) in bad.iter().enumerate() {
        let gpu = g.forward(&dev, x).expect_err("bad shape").to_string();
        let cpu = unet.forward(x).expect_err("bad shape").to_string();
        assert_eq!(gpu, cpu, "case {i}");
        assert!(gpu.contains("invalid argument '"), "case {i}: {gpu}");
    }
    // forward_device checks the device buffers' lengths the same way.
    let s = dev.upload_f32::<f32>(&inp.sample).expect("sample");
    let c = dev.upload_f32::<f32>(&inp.ctx[1..]).expect("context");
    let e = g
        .forward_device(&dev, &s, &inp.t, &c, inp.b, inp.h, inp.w, inp.l)
        .expect_err("short context")
        .to_string();
    assert!(e.contains("'encoder_hidden_states'"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Adapters on the CUDA UNet (src/backend/cuda/adapters.rs) against the CPU UNet's
// `forward_with` with the same adapters: merge mode, runtime mode with several adapters on
// every sample, and one identity per sample (-1 included). f32 storage within 1e-4 (a missed or
// doubled layer shows there), f16 within 1e-2.
// ---------------------------------------------------------------------------------------------

use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::{adaptable_layers, Adapter, AdapterSource, LoraLayer};
use hdb::backend::cuda::adapters::{CudaAdapterCtx, CudaAdapters};

fn fixture_adapter(m: &Model, file: &str) -> Adapter {
    let f = SafetensorsFile::open(&fixtures().join(format!("adapter/{file}"))).expect("adapter");
    hdb::adapter::load(&f, &adaptable_layers(m)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Random LoRA factors of `rank` on every `every`-th adaptable projection of `unet` (the
/// first at `skip`), so sets mix adapters that touch a projection with ones that do not.
fn random_adapter(unet: &Unet, seed: u64, rank: usize, every: usize, skip: usize) -> Adapter {
    let mut rng = SplitMix64(seed);
    let mut u = |n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| (2.0 * rng.next_f32() - 1.0) * s).collect()
    };
    let layers = unet
        .adaptable_layers()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i >= skip && (i - skip) % every == 0)
        .map(|(_, (k, s))| {
            let down = u(rank * s.din, 1.0 / (s.din as f32).sqrt());
            let up = u(s.dout * rank, 0.5 / (rank as f32).sqrt());
            (k, LoraLayer { rank, down, up })
        })
        .collect();
    Adapter {
        layers,
        source: AdapterSource::Lora,
    }
}

/// `inp` with its batch repeated twice (4 samples from the fixtures' 2).
fn doubled(inp: &Input) -> Input {
    let twice = |v: &[f32]| [v, v].concat();
    Input {
        sample: twice(&inp.sample),
        t: twice(&inp.t),
        ctx: twice(&inp.ctx),
        b: 2 * inp.b,
        ..*inp
    }
}

/// A UNet, a batch-4 input and three adapters (the third touching only some projections).
struct AdapterCase {
    name: &'static str,
    unet: Arc<Unet>,
    inp: Input,
    adapters: Vec<Adapter>,
}

fn adapter_cases() -> Vec<AdapterCase> {
    // The adapter fixtures of tests/adapter.rs on the SD 1.5-shaped tiny model (widths 4 to
    // 12: the kernels' element paths).
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let tiny = AdapterCase {
        name: "tiny-sd",
        unet: m.unet().expect("unet"),
        inp: doubled(&read_input("tiny-sd")),
        adapters: ["id1.lidb", "id2.lidb", "id1-half.lidb"]
            .iter()
            .map(|f| fixture_adapter(&m, &format!("{f}.safetensors")))
            .collect(),
    };
    // SD-like widths (80 to 160: 16-byte aligned rows, the kernels' vector paths; q/k/v
    // column offsets of 80 and 160 in the stacked outputs), random ranks 4, 8 and 128.
    let (name, source) = cases()
        .into_iter()
        .find(|(n, _)| *n == "random-flash")
        .expect("random-flash");
    let (unet, inp) = load(&source, name);
    let adapters = vec![
        random_adapter(&unet, 1, 4, 1, 0),
        random_adapter(&unet, 2, 8, 2, 0),
        random_adapter(&unet, 3, 128, 3, 1),
    ];
    let random = AdapterCase {
        name,
        inp: doubled(&inp),
        unet,
        adapters,
    };
    vec![tiny, random]
}

/// (label, adapter indices with scales, mode, per-sample indices) of every checked set.
type SetSpec = (&'static str, Vec<(usize, f32)>, ApplyMode, Option<Vec<i32>>);

fn adapter_sets() -> Vec<SetSpec> {
    vec![
        ("merge", vec![(0, 0.7), (1, 0.5)], ApplyMode::Merge, None),
        ("merge-partial", vec![(2, 1.0)], ApplyMode::Merge, None),
        (
            "runtime",
            vec![(0, 0.7), (1, 0.5), (2, 1.0)],
            ApplyMode::Runtime,
            None,
        ),
        (
            "per-sample",
            vec![(0, 1.0), (1, 0.8), (2, 1.0)],
            ApplyMode::Runtime,
            Some(vec![2, -1, 0, 1]),
        ),
    ]
}

fn cpu_forward_with(unet: &Unet, inp: &Input, ad: Option<&AdapterCtx<'_>>) -> Vec<f32> {
    let rt = hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cpu,
        threads: 2,
    })
    .expect("runtime");
    rt.install(|| unet.forward_with(&inp.args(), ad))
        .expect("cpu forward")
}

/// Every set of [`adapter_sets`] in storage type T against the CPU; returns failures.
fn check_adapters<T: BlasElem>(dev: &CudaDevice, case: &AdapterCase, tol: f64) -> Vec<String> {
    let dtype = T::SUFFIX;
    let mut failures = Vec::new();
    let g = match CudaUnet::<T>::upload(dev, &case.unet) {
        Ok(g) => g,
        Err(e) => return vec![format!("{} {dtype}: upload: {e}", case.name)],
    };
    let base = cpu_forward(&case.unet, &case.inp);
    for (label, picks, mode, per_sample) in adapter_sets() {
        let set: Vec<(&Adapter, f32)> =
            picks.iter().map(|&(i, s)| (&case.adapters[i], s)).collect();
        let applied = Applied::new(&set, mode, &*case.unet).expect("cpu set");
        let want = cpu_forward_with(
            &case.unet,
            &case.inp,
            Some(&AdapterCtx {
                applied: &applied,
                per_sample: per_sample.as_deref(),
            }),
        );
        let (change, _, _) = compare(&want, &base);
        let got = CudaAdapters::resolve(dev, &g, &set, mode).and_then(|a| {
            g.forward_with(
                dev,
                &case.inp.args(),
                Some(CudaAdapterCtx {
                    adapters: &a,
                    per_sample: per_sample.as_deref(),
                }),
            )
        });
        let what = format!("unet-adapter/{label} {dtype} case={}", case.name);
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                println!("cuda-parity {what} ERROR {e}");
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        let (rel, max_abs, at) = compare(&got, &want);
        println!(
            "cuda-parity unet-adapter/{label} {dtype} rel_l2={rel:.3e} max_abs={max_abs:.3e} \
             case={} (the adapters change the output by rel_l2 {change:.2e})",
            case.name
        );
        if change < 1e-2 {
            failures.push(format!(
                "{what}: the adapters barely change the output ({change:e})"
            ));
        }
        if rel > tol {
            failures.push(format!(
                "{what}: rel_l2 {rel:.3e} > {tol:e}; worst at {at}: gpu {} vs cpu {}",
                got[at], want[at]
            ));
        }
    }
    failures
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn cuda_unet_with_adapters_matches_the_cpu_unet() {
    let Some(dev) = device() else { return };
    let mut failures = Vec::new();
    for case in adapter_cases() {
        failures.extend(check_adapters::<f32>(&dev, &case, 1e-4));
        failures.extend(check_adapters::<half::f16>(&dev, &case, 1e-2));
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn merge_then_clear_restores_the_base_bit_for_bit() {
    let Some(dev) = device() else { return };
    for case in adapter_cases() {
        let g = CudaUnet::<half::f16>::upload(&dev, &case.unet).expect("upload");
        let args = case.inp.args();
        let base = bits(&g.forward(&dev, &args).expect("base"));
        let set: Vec<(&Adapter, f32)> = case.adapters.iter().map(|a| (a, 1.0)).collect();
        let merged = CudaAdapters::resolve(&dev, &g, &set, ApplyMode::Merge).expect("merge set");
        fn ctx<T: BlasElem>(a: &CudaAdapters<T>) -> Option<CudaAdapterCtx<'_, T>> {
            Some(CudaAdapterCtx {
                adapters: a,
                per_sample: None,
            })
        }
        let with = bits(&g.forward_with(&dev, &args, ctx(&merged)).expect("merged"));
        assert_ne!(
            with, base,
            "{}: the merged set changes the output",
            case.name
        );
        // Clearing: the session drops its set (no adapters), or holds an empty one.
        drop(merged);
        let none = bits(&g.forward_with(&dev, &args, None).expect("cleared"));
        let empty = CudaAdapters::resolve(&dev, &g, &[], ApplyMode::Merge).expect("empty set");
        let with_empty = bits(&g.forward_with(&dev, &args, ctx(&empty)).expect("empty"));
        let again = bits(&g.forward(&dev, &args).expect("again"));
        let exact = none == base && with_empty == base && again == base;
        println!(
            "cuda-parity unet-adapter/merge-clear f16 bit-exact={exact} case={}",
            case.name
        );
        assert!(
            exact,
            "{}: after the merged set, the base output must come back bit for bit (no set: \
             {}, empty set: {}, the UNet's weights unchanged: {})",
            case.name,
            none == base,
            with_empty == base,
            again == base
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn adapter_limits_and_mismatches_are_clear_errors() {
    let Some(dev) = device() else { return };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let unet = m.unet().expect("unet");
    let g = CudaUnet::<half::f16>::upload(&dev, &unet).expect("upload");
    // Sets resolve against the device UNet's own dims, which must be the host UNet's.
    assert_eq!(g.adaptable_layers(), unet.adaptable_layers());
    let big = random_adapter(&unet, 9, 129, 40, 5);
    let key = big.layers.keys().next().expect("a layer").clone();
    let e = CudaAdapters::resolve(&dev, &g, &[(&big, 1.0)], ApplyMode::Runtime)
        .expect_err("rank 129 in runtime mode");
    assert!(
        matches!(&e, hdb::Error::Unsupported(msg) if msg.contains(&key) && msg.contains("129")),
        "{e}"
    );
    CudaAdapters::resolve(&dev, &g, &[(&big, 1.0)], ApplyMode::Merge).expect("rank 129 merges");
    let e = CudaAdapters::resolve(&dev, &g, &[(&big, 1.0), (&big, 0.5)], ApplyMode::Merge)
        .expect_err("total rank 258 in merge mode");
    assert!(
        matches!(&e, hdb::Error::Unsupported(msg) if msg.contains(&key) && msg.contains("258")),
        "{e}"
    );
    // A set built for one upload is refused by another; per-sample checks are the CPU's.
    let id1 = fixture_adapter(&m, "id1.lidb.safetensors");
    let set = CudaAdapters::resolve(&dev, &g, &[(&id1, 1.0)], ApplyMode::Runtime).expect("set");
    let other = CudaUnet::<half::f16>::upload(&dev, &unet).expect("upload");
    let inp = read_input("tiny-sd");
    let ctx = |per_sample| {
        Some(CudaAdapterCtx {
            adapters: &set,
            per_sample,
        })
    };
    let e = other
        .forward_with(&dev, &inp.args(), ctx(None))
        .expect_err("another UNet");
    assert!(e.to_string().contains("another CUDA UNet"), "{e}");
    let e = g
        .forward_with(&dev, &inp.args(), ctx(Some(&[0, 1])))
        .expect_err("index 1 of 1");
    assert!(
        e.to_string().contains("'adapter_index'") && e.to_string().contains("index 1"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The library's normal paths on a CUDA runtime: sessions through the C API's functions, and
// the pipeline, against the same calls on a CPU runtime.
// ---------------------------------------------------------------------------------------------

use std::ffi::{CStr, CString};

use hdb::ffi::adapter::{hdb_adapter, hdb_adapter_free, hdb_adapter_load};
use hdb::ffi::boundary::hdb_last_error_message;
use hdb::ffi::hdb_status;
use hdb::ffi::model::{hdb_model, hdb_model_free, hdb_model_load};
use hdb::ffi::runtime::{
    hdb_runtime, hdb_runtime_free, hdb_runtime_get_info, hdb_runtime_info, hdb_runtime_new,
    hdb_runtime_params_default, HDB_DEVICE_CPU, HDB_DEVICE_CUDA,
};
use hdb::ffi::session::{
    hdb_session, hdb_session_free, hdb_session_new, hdb_session_set_adapters,
    hdb_session_set_sample_adapters, hdb_session_unet, HDB_APPLY_MERGE, HDB_APPLY_RUNTIME,
};

fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(hdb_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn cpath(p: &std::path::Path) -> CString {
    CString::new(p.to_str().expect("utf-8 path")).expect("no NUL")
}

/// A runtime, the tiny SD model, a session on it and loaded adapters, freed on drop.
struct Host {
    rt: *mut hdb_runtime,
    model: *mut hdb_model,
    session: *mut hdb_session,
    adapters: Vec<*mut hdb_adapter>,
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: every handle was created by the matching hdb call and is freed once.
        unsafe {
            hdb_session_free(self.session);
            for a in self.adapters.drain(..) {
                hdb_adapter_free(a);
            }
            hdb_model_free(self.model);
            hdb_runtime_free(self.rt);
        }
    }
}

impl Host {
    /// Opens `device`; the status of hdb_runtime_new when it fails.
    fn open(device: &str) -> Result<Host, (hdb_status, String)> {
        let dev = CString::new(device).expect("device");
        let mut p = hdb_runtime_params_default();
        p.device = dev.as_ptr();
        p.num_threads = 2;
        let mut rt = std::ptr::null_mut();
        // SAFETY: valid params and out-pointers.
        let st = unsafe { hdb_runtime_new(&p, &mut rt) };
        if st != hdb_status::HDB_STATUS_OK {
            return Err((st, last_error()));
        }
        let mut h = Host {
            rt,
            model: std::ptr::null_mut(),
            session: std::ptr::null_mut(),
            adapters: Vec::new(),
        };
        let dir = cpath(&fixtures().join("tiny-sd"));
        // SAFETY: live runtime, valid path and out-pointers.
        let st = unsafe { hdb_model_load(h.rt, dir.as_ptr(), std::ptr::null(), &mut h.model) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "model: {}", last_error());
        // SAFETY: live model.
        let st = unsafe { hdb_session_new(h.model, std::ptr::null(), &mut h.session) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "session: {}", last_error());
        Ok(h)
    }

    fn device_kind(&self) -> u32 {
        let mut info = hdb_runtime_info {
            struct_size: std::mem::size_of::<hdb_runtime_info>() as u32,
            device_kind: u32::MAX,
            device_index: 0,
            num_threads: 0,
        };
        // SAFETY: live runtime, sized struct.
        let st = unsafe { hdb_runtime_get_info(self.rt, &mut info) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        info.device_kind
    }

    fn load_adapter(&mut self, path: &std::path::Path) -> *mut hdb_adapter {
        let p = cpath(path);
        let mut a = std::ptr::null_mut();
        // SAFETY: live model, valid path and out-pointer.
        let st = unsafe { hdb_adapter_load(self.model, p.as_ptr(), &mut a) };
        assert_eq!(
            st,
            hdb_status::HDB_STATUS_OK,
            "{}: {}",
            path.display(),
            last_error()
        );
        self.adapters.push(a);
        a
    }

    fn set_adapters(
        &mut self,
        set: &[*mut hdb_adapter],
        scales: Option<&[f32]>,
        mode: u32,
    ) -> hdb_status {
        let ptrs: Vec<*const hdb_adapter> = set.iter().map(|&a| a as *const _).collect();
        // SAFETY: live session and adapters; scales NULL or one per adapter.
        unsafe {
            hdb_session_set_adapters(
                self.session,
                ptrs.as_ptr(),
                scales.map_or(std::ptr::null(), |s| s.as_ptr()),
                ptrs.len(),
                mode,
            )
        }
    }

    fn set_sample_adapters(&mut self, idx: &[i32]) {
        // SAFETY: live session, idx valid for its length.
        let st = unsafe { hdb_session_set_sample_adapters(self.session, idx.as_ptr(), idx.len()) };
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
    }

    fn unet(&mut self, inp: &Input) -> Vec<f32> {
        let mut out = vec![0f32; inp.sample.len()];
        // SAFETY: live session; every buffer valid for its length.
        let st = unsafe {
            hdb_session_unet(
                self.session,
                inp.sample.as_ptr(),
                inp.sample.len(),
                inp.t.as_ptr(),
                inp.t.len(),
                inp.ctx.as_ptr(),
                inp.ctx.len(),
                inp.b as u32,
                inp.h as u32,
                inp.w as u32,
                inp.l as u32,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        assert_eq!(
            st,
            hdb_status::HDB_STATUS_OK,
            "hdb_session_unet: {}",
            last_error()
        );
        out
    }
}

/// The same session calls on a runtime: (case, output) after each.
fn session_run(h: &mut Host, inp: &Input) -> Vec<(&'static str, Vec<f32>)> {
    let id1 = h.load_adapter(&fixtures().join("adapter/id1.lidb.safetensors"));
    let id2 = h.load_adapter(&fixtures().join("adapter/id2.lidb.safetensors"));
    let mut outs = vec![("none", h.unet(inp))];
    let ok = hdb_status::HDB_STATUS_OK;
    assert_eq!(
        h.set_adapters(&[id1, id2], Some(&[0.7, 0.5]), HDB_APPLY_MERGE),
        ok,
        "{}",
        last_error()
    );
    outs.push(("merge", h.unet(inp)));
    assert_eq!(
        h.set_adapters(&[id1, id2], None, HDB_APPLY_RUNTIME),
        ok,
        "{}",
        last_error()
    );
    outs.push(("runtime", h.unet(inp)));
    h.set_sample_adapters(&[1, -1]);
    outs.push(("per-sample", h.unet(inp)));
    outs
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn session_unet_on_a_cuda_runtime_matches_the_cpu_runtime() {
    let mut gpu = match Host::open("cuda") {
        Ok(h) => h,
        Err((st, msg)) => {
            println!("SKIPPED (no CUDA device): {st:?}: {msg}");
            return;
        }
    };
    assert_eq!(gpu.device_kind(), HDB_DEVICE_CUDA);
    let mut cpu = Host::open("cpu").expect("cpu runtime");
    assert_eq!(cpu.device_kind(), HDB_DEVICE_CPU);
    let inp = read_input("tiny-sd");
    let want = session_run(&mut cpu, &inp);
    let got = session_run(&mut gpu, &inp);
    let mut failures = Vec::new();
    for ((case, g), (_, w)) in got.iter().zip(&want) {
        let (rel, max_abs, _) = compare(g, w);
        println!("cuda-parity session-unet/{case} f16 rel_l2={rel:.3e} max_abs={max_abs:.3e}");
        if rel > 1e-2 {
            failures.push(format!("session-unet/{case}: rel_l2 {rel:.3e} > 1e-2"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let before = bits(&got[3].1);

    // A set the device cannot apply (rank 129 in runtime mode) fails naming the layer and
    // leaves the previous set (and its per-sample indices) in place.
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let big = random_adapter(&m.unet().expect("unet"), 9, 129, 40, 5);
    let key = big.layers.keys().next().expect("a layer").clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rank129.safetensors");
    hdb::adapter::lora::export(&big, hdb::adapter::lora::LoraFormat::Peft, &path).expect("export");
    let big = gpu.load_adapter(&path);
    let st = gpu.set_adapters(&[big], None, HDB_APPLY_RUNTIME);
    let msg = last_error();
    assert_eq!(st, hdb_status::HDB_STATUS_UNSUPPORTED, "{msg}");
    assert!(
        msg.contains(key.trim_start_matches("unet.")) && msg.contains("129"),
        "{msg}"
    );
    let after = bits(&gpu.unet(&inp));
    println!(
        "cuda-parity session-unet/failed-set-keeps-previous f16 bit-exact={}",
        after == before
    );
    assert_eq!(
        after, before,
        "a failed set must leave the previous one active"
    );

    // n = 0 removes every adapter: the no-adapter output, bit for bit.
    assert_eq!(
        gpu.set_adapters(&[], None, HDB_APPLY_MERGE),
        hdb_status::HDB_STATUS_OK
    );
    let cleared = bits(&gpu.unet(&inp));
    println!(
        "cuda-parity session-unet/cleared f16 bit-exact={}",
        cleared == bits(&got[0].1)
    );
    assert_eq!(
        cleared,
        bits(&got[0].1),
        "clearing restores the base output"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn pipeline_on_a_cuda_runtime_matches_the_cpu_pipeline() {
    use hdb::pipeline::{GenerateAdapters, Pipeline};
    let rt = match hdb::Runtime::new(hdb::RuntimeOptions {
        device: hdb::runtime::DeviceRequest::Cuda(0),
        threads: 2,
    }) {
        Ok(rt) => rt,
        Err(e) => {
            println!("SKIPPED (no CUDA device): {e}");
            return;
        }
    };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let gpu = Pipeline::from_model_on(&m, &rt).expect("cuda pipeline");
    let d = gpu.device_unet.as_ref().expect("the UNet on the device");
    println!("pipeline UNet on {}", d.describe());
    let cpu = Pipeline::from_model(&m).expect("cpu pipeline");
    let cpu_unet = cpu.unet.as_deref().expect("a CPU pipeline has its UNet");
    let params = common::gpu_pipeline_params();
    assert!(
        gpu.unet.is_none() && gpu.text_encoder.is_none() && gpu.vae.is_none(),
        "a CUDA pipeline keeps no host copies of its UNet, text encoder and VAE"
    );
    let id1 = fixture_adapter(&m, "id1.lidb.safetensors");
    let set = [(&id1, 1.0)];
    let host_set = Applied::new(&set, ApplyMode::Runtime, cpu_unet).expect("cpu set");
    let dev_set = d.adapters(&set, ApplyMode::Runtime).expect("device set");
    // An identity on the UNet and the text encoder: the text encoder's set built once on the
    // device (fused kernels), in both modes, and a host set uploaded per call (compatibility).
    let mut both = fixture_adapter(&m, "id1.lidb.safetensors");
    let te_file = fixtures().join("text_encoder/te-id.lidb.safetensors");
    let te_id = hdb::adapter::load(
        &SafetensorsFile::open(&te_file).expect("te adapter"),
        &adaptable_layers(&m),
    )
    .expect("te adapter");
    both.layers.extend(te_id.layers);
    let both_set = [(&both, 1.0)];
    let mut sets = Vec::new();
    for mode in [ApplyMode::Merge, ApplyMode::Runtime] {
        let cpu_set = Applied::new(&both_set, mode, cpu_unet).expect("cpu unet set");
        let (cpu_te, none) = cpu.text_adapters(&both_set, mode).expect("cpu te set");
        assert!(none.is_none());
        let gpu_unet = d.adapters(&both_set, mode).expect("device unet set");
        let (host_te, gpu_te) = gpu.text_adapters(&both_set, mode).expect("device te set");
        assert!(
            host_te.is_none(),
            "a CUDA pipeline builds its text encoder set on the device"
        );
        sets.push((mode, cpu_set, cpu_te, gpu_unet, gpu_te));
    }
    let per_image: &[i32] = &[-1, 0];
    let mut cases = vec![
        (
            "none".to_string(),
            GenerateAdapters::default(),
            GenerateAdapters::default(),
        ),
        (
            "per-image".to_string(),
            GenerateAdapters {
                unet: Some(&host_set),
                per_image: Some(per_image),
                ..Default::default()
            },
            GenerateAdapters {
                device_unet: Some(&dev_set),
                per_image: Some(per_image),
                ..Default::default()
            },
        ),
    ];
    for (mode, cpu_set, cpu_te, gpu_unet, gpu_te) in &sets {
        let cpu_ad = GenerateAdapters {
            unet: Some(cpu_set),
            text_encoder: cpu_te.as_ref(),
            ..Default::default()
        };
        let gpu_ad = GenerateAdapters {
            device_unet: Some(gpu_unet),
            device_text_encoder: gpu_te.as_ref(),
            ..Default::default()
        };
        cases.push((format!("unet+te-{mode:?}"), cpu_ad, gpu_ad));
        if *mode == ApplyMode::Runtime {
            fn per<'a>(ad: GenerateAdapters<'a>, idx: &'a [i32]) -> GenerateAdapters<'a> {
                GenerateAdapters {
                    per_image: Some(idx),
                    ..ad
                }
            }
            let p = per_image;
            cases.push(("unet+te-per-image".into(), per(cpu_ad, p), per(gpu_ad, p)));
            // A host set on the device text encoder: uploaded for the call.
            let host_te = GenerateAdapters {
                device_text_encoder: None,
                text_encoder: cpu_te.as_ref(),
                ..gpu_ad
            };
            cases.push((
                "unet+host-te-per-image".into(),
                per(cpu_ad, p),
                per(host_te, p),
            ));
        }
    }
    let mut failures = Vec::new();
    for (case, cpu_ad, gpu_ad) in cases {
        let want = rt
            .install(|| cpu.generate(&params, cpu_ad, None))
            .expect("cpu generate");
        let mut steps = 0;
        let mut progress = |done: usize, total: usize| {
            steps += 1;
            assert_eq!((done, total), (steps, 4));
            true
        };
        let got = rt
            .install(|| gpu.generate(&params, gpu_ad, Some(&mut progress)))
            .expect("cuda generate");
        assert_eq!(steps, 4, "one progress call per step");
        let (rel, max_abs, _) = compare(&got.latents, &want.latents);
        let (px_rel, px, _) = compare(&got.pixels, &want.pixels);
        println!(
            "cuda-parity pipeline/{case} f16 rel_l2={rel:.3e} max_abs={max_abs:.3e} \
             pixels_rel_l2={px_rel:.3e} pixels_max_abs={px:.3e}"
        );
        // The pixels come from the VAE on the GPU too (fp16, since the text encoder and VAE
        // moved there): the latents' error, decoded.
        if px_rel > 5e-2 {
            failures.push(format!(
                "pipeline/{case}: pixels rel_l2 {px_rel:.3e} > 5e-2"
            ));
        }
        // Guidance 7.5 amplifies the UNet's error about 10x in the latents (on the CPU, a
        // perturbation of 1.9e-3 rel_l2 per UNet call gives 2.0e-2 after these 4 DDIM steps),
        // and the f16 UNet is within ~2e-3 per call.
        if rel > 5e-2 {
            failures.push(format!("pipeline/{case}: latents rel_l2 {rel:.3e} > 5e-2"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Cancelling stops within one step, as on the CPU.
    let mut calls = 0;
    let mut cancel = |done: usize, _total: usize| {
        calls += 1;
        done < 2
    };
    let e = rt
        .install(|| gpu.generate(&params, GenerateAdapters::default(), Some(&mut cancel)))
        .expect_err("cancelled");
    assert!(matches!(e, hdb::Error::Cancelled), "{e}");
    assert_eq!(calls, 2, "cancelled at the second step");

    // A set built for the CPU UNet is refused by the device pipeline, and the other way round.
    let e = gpu
        .generate(
            &params,
            GenerateAdapters {
                unet: Some(&host_set),
                ..Default::default()
            },
            None,
        )
        .expect_err("cpu set on the device");
    assert!(e.to_string().contains("'adapters'"), "{e}");
    let e = cpu
        .generate(
            &params,
            GenerateAdapters {
                device_unet: Some(&dev_set),
                ..Default::default()
            },
            None,
        )
        .expect_err("device set on the cpu");
    assert!(e.to_string().contains("'adapters'"), "{e}");
}
