//! Adapters on the CUDA UNet through the fused kernels (`CudaLayerAdapters`,
//! src/adapter/cuda.rs: what sessions use) against the CPU UNet with the same adapters: merge
//! mode, runtime mode with several adapters on every sample, and one adapter per sample (-1
//! included; LoCon convolutions too). f32 storage within 1e-4 (a missed or
//! doubled layer shows there), f16 within 1e-2.

use super::*;

use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::cuda::CudaLayerAdapters;
use hdb::adapter::Adapter;
use hdb::backend::{AdapterHook, Cpu};
use hdb::model::Adaptable;

pub(crate) fn fixture_adapter(m: &Model, file: &str) -> Adapter {
    let f = SafetensorsFile::open(&fixtures().join(format!("adapter/{file}"))).expect("adapter");
    hdb::adapter::load(&f, &m.adaptable_layers()).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Random LoRA factors of `rank` on every `every`-th adaptable projection of `unet` (the
/// first at `skip`), so sets mix adapters that touch a projection with ones that do not.
pub(crate) fn random_adapter(
    unet: &Unet,
    seed: u64,
    rank: usize,
    every: usize,
    skip: usize,
) -> Adapter {
    common::random_lora(unet.adaptable_layers(), seed, rank, |i| {
        i >= skip && (i - skip).is_multiple_of(every)
    })
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
    source: Source,
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
        source: Source::Fixture(fixtures().join("tiny-sd"), Variant::Full),
        unet: Arc::new(Unet::from_model(&m).expect("unet")),
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
        source,
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
    rt.install(|| unet.forward_hooked(&inp.args(), ad.map(|a| a as &dyn AdapterHook<Cpu>)))
        .expect("cpu forward")
}

/// Every set of [`adapter_sets`] in storage type T against the CPU; returns failures.
fn check_adapters<T: BlasElem>(dev: &Arc<CudaDevice>, case: &AdapterCase, tol: f64) -> Vec<String> {
    let dtype = T::SUFFIX;
    let mut failures = Vec::new();
    let g = match on_device::<T>(dev, &case.source) {
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
        let change = compare(&want, &base).rel_l2;
        let got = build(&g, &set, mode).and_then(|a| {
            let hook = a.with_samples(per_sample.as_deref())?;
            g.forward_hooked(&case.inp.args(), Some(&hook))
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
        let tol = Tol::RelL2(tol);
        let d = compare(&got, &want);
        println!(
            "cuda-parity unet-adapter/{label} {dtype} {} case={} (the adapters change the \
             output by rel_l2 {change:.2e})",
            d.figures(tol),
            case.name
        );
        if !(change.is_finite() && change >= 1e-2) {
            failures.push(format!(
                "{what}: the adapters barely change the output ({change:e})"
            ));
        }
        if !d.within(tol) {
            failures.push(d.failure(&what, tol));
        }
    }
    failures
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn cuda_unet_with_adapters_matches_the_cpu_unet() {
    let Some(dev) = device() else { return };
    let emulated = common::cuda::on_emulated_gpu();
    let mut failures = Vec::new();
    for case in adapter_cases() {
        // f32 on the larger case only on a real GPU (the emulated one's run stays short).
        if !emulated || case.name == "tiny-sd" {
            failures.extend(check_adapters::<f32>(&dev, &case, 1e-4));
        }
        failures.extend(check_adapters::<half::f16>(&dev, &case, 1e-2));
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `set` resolved against `unet`'s own projections and built on its device in `mode`, as a
/// session's `AdapterSet` does.
fn build<T: BlasElem>(
    unet: &Unet<Cuda<T>>,
    set: &[(&Adapter, f32)],
    mode: ApplyMode,
) -> hdb::Result<CudaLayerAdapters<T>> {
    let resolved = Applied::new(set, ApplyMode::Runtime, unet)?;
    CudaLayerAdapters::new(unet.backend(), unet, &resolved, mode)
}

pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn merge_then_clear_restores_the_base_bit_for_bit() {
    let Some(dev) = device() else { return };
    for case in adapter_cases() {
        let g = on_device::<half::f16>(&dev, &case.source).expect("upload");
        let args = case.inp.args();
        let run = |a: Option<&CudaLayerAdapters<half::f16>>| {
            let out = match a {
                Some(a) => a
                    .with_samples(None)
                    .and_then(|hook| g.forward_hooked(&args, Some(&hook))),
                None => g.forward_hooked(&args, None),
            };
            bits(&out.expect("forward"))
        };
        let base = run(None);
        let set: Vec<(&Adapter, f32)> = case.adapters.iter().map(|a| (a, 1.0)).collect();
        let merged = build(&g, &set, ApplyMode::Merge).expect("merge set");
        let with = run(Some(&merged));
        assert_ne!(
            with, base,
            "{}: the merged set changes the output",
            case.name
        );
        // Clearing: the session drops its set (no adapters), or holds an empty one.
        drop(merged);
        let none = run(None);
        let empty = build(&g, &[], ApplyMode::Merge).expect("empty set");
        let with_empty = run(Some(&empty));
        let exact = none == base && with_empty == base;
        println!(
            "cuda-parity unet-adapter/merge-clear f16 bit-exact={exact} case={}",
            case.name
        );
        assert!(
            exact,
            "{}: after the merged set, the base output must come back bit for bit (no set: \
             {}, empty set: {})",
            case.name,
            none == base,
            with_empty == base
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn adapter_limits_and_mismatches_are_clear_errors() {
    let Some(dev) = device() else { return };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let unet = Unet::from_model(&m).expect("unet");
    let source = Source::Fixture(fixtures().join("tiny-sd"), Variant::Full);
    let g = on_device::<half::f16>(&dev, &source).expect("upload");
    // Sets resolve against the device UNet's own dims, which must be the host UNet's.
    assert_eq!(g.adaptable_layers(), unet.adaptable_layers());
    let big = random_adapter(&unet, 9, 129, 40, 5);
    let key = big.layers.keys().next().expect("a layer").clone();
    let e = build(&g, &[(&big, 1.0)], ApplyMode::Runtime).expect_err("rank 129 in runtime mode");
    assert!(
        matches!(&e, hdb::Error::Unsupported(msg) if msg.contains(&key) && msg.contains("129")),
        "{e}"
    );
    build(&g, &[(&big, 1.0)], ApplyMode::Merge).expect("rank 129 merges");
    let e = build(&g, &[(&big, 1.0), (&big, 0.5)], ApplyMode::Merge)
        .expect_err("total rank 258 in merge mode");
    assert!(
        matches!(&e, hdb::Error::Unsupported(msg) if msg.contains(&key) && msg.contains("258")),
        "{e}"
    );
    // Per-sample checks are the CPU's.
    let id1 = fixture_adapter(&m, "id1.lidb.safetensors");
    let set = build(&g, &[(&id1, 1.0)], ApplyMode::Runtime).expect("set");
    let Err(e) = set.with_samples(Some(&[0, 1])) else {
        panic!("index 1 of a set of 1 was accepted")
    };
    assert!(
        e.to_string().contains("'adapter_index'") && e.to_string().contains("index 1"),
        "{e}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn lora_files_on_every_layer_kind_match_the_cpu() {
    // The style LoRA (every linear layer) and the LoCon (every convolution) of
    // tests/lora_layers.rs: merge mode takes both through lidb_merge; runtime mode the linear
    // layers through lora_bgmv and the convolutions as two conv2d each, on every sample or,
    // per sample, on the samples gathered per adapter (a sample with none, two samples sharing
    // one apart and side by side). f32 within rel_l2 1e-4 of the CPU on the same batch.
    let Some(dev) = device() else { return };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let table = m.adaptable_layers();
    let load = |file: &str| {
        let f = SafetensorsFile::open(&fixtures().join(format!("lora-layers/{file}")))
            .expect("fixture");
        hdb::adapter::load(&f, &table).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let (style, locon) = (
        load("style.kohya.safetensors"),
        load("locon.kohya.safetensors"),
    );
    let (unet, inp) = tiny_sd();
    let quad = doubled(&inp);
    let g = on_device::<f32>(
        &dev,
        &Source::Fixture(fixtures().join("tiny-sd"), Variant::Full),
    )
    .expect("upload");
    let mut failures = Vec::new();
    // Two LoCons of different strengths (the file at 1.0 and at -0.6) and the style LoRA.
    let three = vec![(&locon, 1.0), (&style, 1.0), (&locon, -0.6)];
    // (label, set, mode, per-sample indices)
    type Case<'a> = (
        &'a str,
        Vec<(&'a Adapter, f32)>,
        ApplyMode,
        Option<Vec<i32>>,
    );
    let cases: Vec<Case<'_>> = vec![
        ("style merge", vec![(&style, 1.0)], ApplyMode::Merge, None),
        (
            "style runtime",
            vec![(&style, 1.0)],
            ApplyMode::Runtime,
            None,
        ),
        (
            "locon+style merge",
            vec![(&locon, 0.8), (&style, 1.0)],
            ApplyMode::Merge,
            None,
        ),
        (
            "locon+style runtime",
            vec![(&locon, 0.8), (&style, 1.0)],
            ApplyMode::Runtime,
            None,
        ),
        (
            "locon per sample [0, -1, 2, 0]",
            three.clone(),
            ApplyMode::Runtime,
            Some(vec![0, -1, 2, 0]),
        ),
        (
            "locon per sample [1, 0, 0, 2]",
            three,
            ApplyMode::Runtime,
            Some(vec![1, 0, 0, 2]),
        ),
    ];
    for (label, set, mode, per_sample) in cases {
        let inp = if per_sample.is_some() { &quad } else { &inp };
        let applied = Applied::new(&set, mode, &*unet).expect("cpu set");
        let ad = AdapterCtx {
            applied: &applied,
            per_sample: per_sample.as_deref(),
        };
        let want = cpu_forward_with(&unet, inp, Some(&ad));
        let change = compare(&want, &cpu_forward(&unet, inp)).rel_l2;
        if !(change.is_finite() && change >= 1e-2) {
            failures.push(format!(
                "{label}: the adapters barely change the output ({change:e})"
            ));
        }
        let got = build(&g, &set, mode).and_then(|a| {
            let hook = a.with_samples(per_sample.as_deref())?;
            g.forward_hooked(&inp.args(), Some(&hook))
        });
        match got {
            Ok(got) => {
                let tol = Tol::RelL2(1e-4);
                let d = compare(&got, &want);
                println!(
                    "cuda-parity unet-lora-layers/{label} f32 {} (the adapters change the \
                     output by rel_l2 {change:.2e})",
                    d.figures(tol)
                );
                if !d.within(tol) {
                    failures.push(d.failure(label, tol));
                }
            }
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// (label, set, the reference's output) of the host-merge test.
type MergeCase<'a> = (&'a str, Vec<(&'a Adapter, f32)>, Option<&'a str>);

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn loha_lokr_and_dora_merge_on_cuda_as_on_the_cpu() {
    // Merge-only layouts on CUDA: each layer a LoHa, LoKr or DoRA touches is merged on the host
    // by the CPU's merge from the device base; a LoCon stacked with one keeps lidb_merge on the
    // layers only it touches. Against the CPU UNet with the same set: f32 storage within rel_l2
    // 1e-4, and within tests/lora_layers.rs's 1e-4 x max|ref| of the reference (peft, LyCORIS)
    // output; f16 storage (the base downloaded from f16, the merge uploaded to it) within
    // 1e-2 (the adapters change the output by 2e-2 to 0.7). Dropping the set restores the base bit for bit; runtime mode refuses them.
    let Some(dev) = device() else { return };
    let m = Model::load(&fixtures().join("tiny-sd"), Default::default()).expect("tiny-sd");
    let table = m.adaptable_layers();
    let load = |file: &str| {
        let f = SafetensorsFile::open(&fixtures().join(file)).expect("fixture");
        hdb::adapter::load(&f, &table).unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let loha = load("lora-layers/loha.kohya.safetensors");
    let lokr = load("lora-layers/lokr.kohya.safetensors");
    let dora = load("lora-layers/dora.peft.safetensors");
    // LyCORIS' dora_scale per input channel on a LoHa with Tucker convolutions.
    let lycoris = load("lycoris/loha-tucker-dora-in.safetensors");
    let locon = load("lora-layers/locon.kohya.safetensors");
    let cases: Vec<MergeCase<'_>> = vec![
        (
            "loha",
            vec![(&loha, 1.0)],
            Some("lora-layers/loha.out.safetensors"),
        ),
        (
            "lokr",
            vec![(&lokr, 1.0)],
            Some("lora-layers/lokr.out.safetensors"),
        ),
        (
            "dora",
            vec![(&dora, 1.0)],
            Some("lora-layers/dora.out.safetensors"),
        ),
        (
            "lycoris loha dora_scale x0.6",
            vec![(&lycoris, 0.6)],
            Some("lycoris/loha-tucker-dora-in-x0.6.out.safetensors"),
        ),
        ("locon x0.8 + loha", vec![(&locon, 0.8), (&loha, 1.0)], None),
    ];
    let mut failures = check_host_merge::<f32>(&dev, &cases, 1e-4);
    // f16 on the DoRA and the mixed set only (the emulated GPU takes 10 s per case in f16).
    let f16_cases: Vec<MergeCase<'_>> = cases
        .into_iter()
        .filter(|c| matches!(c.0, "dora" | "locon x0.8 + loha"))
        .collect();
    failures.extend(check_host_merge::<half::f16>(&dev, &f16_cases, 1e-2));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// [`loha_lokr_and_dora_merge_on_cuda_as_on_the_cpu`] in storage type T (the references are
/// compared in f32 only); returns failures.
fn check_host_merge<T: BlasElem>(
    dev: &Arc<CudaDevice>,
    cases: &[MergeCase<'_>],
    tol: f64,
) -> Vec<String> {
    use hdb::adapter::set::AdapterSet;
    let dtype = T::SUFFIX;
    let (unet, inp) = tiny_sd();
    let g = on_device::<T>(
        dev,
        &Source::Fixture(fixtures().join("tiny-sd"), Variant::Full),
    )
    .expect("upload");
    let args = inp.args();
    let base = bits(&g.forward_hooked(&args, None).expect("base"));
    let cpu_base = cpu_forward(&unet, &inp);
    let mut failures = Vec::new();
    for (label, set, ref_file) in cases {
        let what = format!("{label} {dtype}");
        let applied = Applied::new(set, ApplyMode::Merge, &*unet).expect("cpu set");
        let ad = AdapterCtx {
            applied: &applied,
            per_sample: None,
        };
        let want = cpu_forward_with(&unet, &inp, Some(&ad));
        let change = compare(&want, &cpu_base).rel_l2;
        if !(change.is_finite() && change >= 1e-2) {
            failures.push(format!(
                "{what}: the adapters barely change the output ({change:e})"
            ));
        }
        let got = AdapterSet::build(g.backend(), &g, set, ApplyMode::Merge, None).and_then(|s| {
            let s = s.ok_or_else(|| hdb::Error::Internal("the set touches no layer".into()))?;
            s.with_hook(None, |h| g.forward_hooked(&args, Some(h)))
        });
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        let t = Tol::RelL2(tol);
        let d = compare(&got, &want);
        println!(
            "cuda-parity unet-merge-host/{label} {dtype} {} (the adapters change the output by \
             rel_l2 {change:.2e})",
            d.figures(t)
        );
        if !d.within(t) {
            failures.push(d.failure(&what, t));
        }
        if let (Some(file), "f32") = (ref_file, dtype) {
            let reference = SafetensorsFile::open(&fixtures().join(file))
                .expect("reference")
                .to_f32("out")
                .expect("out");
            let t = Tol::MaxAbsOfRef(1e-4);
            let d = compare(&got, &reference);
            println!(
                "cuda-parity unet-merge-host/{label} {dtype} against {file}: {}",
                d.figures(t)
            );
            if !d.within(t) {
                failures.push(d.failure(&format!("{what} against {file}"), t));
            }
        }
        // The set is dropped: the model's own weights were never written.
        let after = bits(&g.forward_hooked(&args, None).expect("base again"));
        if after != base {
            failures.push(format!("{what}: the base output changed after the set"));
        }
        match AdapterSet::build(g.backend(), &g, set, ApplyMode::Runtime, None) {
            Ok(_) => failures.push(format!("{what}: runtime mode accepted")),
            Err(e) if !e.to_string().contains("merge mode") => {
                failures.push(format!("{what}: runtime mode: unclear error: {e}"))
            }
            Err(_) => {}
        }
    }
    failures
}
