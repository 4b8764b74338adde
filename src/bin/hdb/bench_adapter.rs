//! `hdb bench adapter`: what swapping identities costs at SD 1.5 shapes.

use std::time::Instant;

use hdb::adapter::apply::{AdapterCtx, Applied, ApplyMode};
use hdb::adapter::lidb::{Lidb, LidbMeta};
use hdb::model::adaptable::identity_layers;
use hdb::model::config::UnetConfig;
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::Adaptable;
use hdb::{model::random::RandomWeights, rng::SplitMix64};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn random_identity(unet: &Unet, seed: u64) -> Lidb {
    let mut rng = SplitMix64(seed);
    let mut g =
        |n: usize| -> Vec<f32> { (0..n).map(|_| 0.5 * (2.0 * rng.next_f32() - 1.0)).collect() };
    let layers = identity_layers(&unet.adaptable_layers())
        .into_keys()
        .map(|k| (k, (g(100), g(50))))
        .collect();
    Lidb {
        meta: LidbMeta {
            rank: 1,
            a: 100,
            b: 50,
            basis_seed: 42,
            alpha: 1.0,
            base: Some("sd15".into()),
        },
        layers,
    }
}

pub fn run(threads: usize, runs: usize, size: usize, batch: usize) -> hdb::Result<()> {
    let rt = super::cpu_runtime(threads)?;
    let threads = rt.threads();
    let unet = rt.install(|| Unet::load(UnetConfig::default(), &RandomWeights { seed: 0x5D15 }))?;
    let table = identity_layers(&unet.adaptable_layers());
    let bytes: usize = table.values().map(|s| s.din * s.dout * 4).sum();
    println!(
        "SD 1.5 UNet: {} adapted projections, {:.1} MB of f32 weights; {threads} threads",
        table.len(),
        bytes as f64 / 1e6
    );

    let ids: Vec<Lidb> = (0..batch as u64)
        .map(|i| random_identity(&unet, 100 + i))
        .collect();
    let cache = hdb::adapter::lidb::BasisCache::default();
    let mut adapters = Vec::new();
    for (i, l) in ids.iter().enumerate() {
        let t = Instant::now();
        adapters.push(rt.install(|| l.compose_cached(&table, &cache))?);
        if i < 2 {
            let what = if i == 0 {
                "first identity (computes the basis)"
            } else {
                "next identity (basis cached)"
            };
            println!("compose {what}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        }
    }

    // Merge-mode swap against a memcpy of the same weights, both into already-mapped buffers.
    let mut dst: Vec<Vec<f32>> = table.values().map(|s| vec![0.0; s.din * s.dout]).collect();
    let mut copy = Vec::new();
    let mut merge = Vec::new();
    let mut applied =
        rt.install(|| Applied::new(&[(&adapters[0], 1.0)], ApplyMode::Merge, &unet))?;
    for i in 0..runs.max(3) {
        let t = Instant::now();
        rt.install(|| {
            use rayon::prelude::*;
            dst.par_iter_mut()
                .zip(table.keys().collect::<Vec<_>>())
                .for_each(|(d, k)| {
                    if let Some((w, _, _)) = unet.projection(k) {
                        d.copy_from_slice(w);
                    }
                })
        });
        copy.push(t.elapsed().as_secs_f64());
        let a = &adapters[(i + 1) % adapters.len()];
        let t = Instant::now();
        applied = rt.install(|| {
            Applied::replacing(Some(&mut applied), &[(a, 1.0)], ApplyMode::Merge, &unet)
        })?;
        merge.push(t.elapsed().as_secs_f64());
    }
    let (c, m) = (median(copy), median(merge));
    let gbs = |s: f64| 2.0 * bytes as f64 / s / 1e9;
    println!(
        "merge swap: {:.2} ms ({:.1} GB/s read+write) vs memcpy {:.2} ms ({:.1} GB/s): {:.2} of memcpy",
        m * 1e3,
        gbs(m),
        c * 1e3,
        gbs(c),
        c / m
    );
    let mut swaps = Vec::new();
    for i in 0..runs.max(3) {
        let a = &adapters[i % adapters.len()];
        let t = Instant::now();
        let r = Applied::new(&[(a, 1.0)], ApplyMode::Runtime, &unet)?;
        swaps.push(t.elapsed().as_secs_f64());
        drop(r);
    }
    println!("runtime swap: {:.3} ms", median(swaps) * 1e3);

    // A style LoRA of rank 32 on every adaptable layer (linear and convolution).
    let (style, style_bytes, n_style) = rt.install(|| random_style(&unet, 32));
    println!(
        "style LoRA: rank 32 on {n_style} layers (every linear and convolution layer), {:.1} MB \
         of f32 weights touched",
        style_bytes as f64 / 1e6
    );
    let all = unet.adaptable_layers();
    let mut dst: Vec<Vec<f32>> = all.values().map(|s| vec![0.0; s.din * s.dout]).collect();
    let (mut copy, mut merge, mut swap) = (Vec::new(), Vec::new(), Vec::new());
    let mut applied = rt.install(|| Applied::new(&[(&style, 1.0)], ApplyMode::Merge, &unet))?;
    for _ in 0..runs.max(3) {
        let t = Instant::now();
        rt.install(|| {
            use rayon::prelude::*;
            dst.par_iter_mut()
                .zip(all.keys().collect::<Vec<_>>())
                .for_each(|(d, k)| {
                    if let Some((w, _, _)) = unet.projection(k) {
                        d.copy_from_slice(w);
                    }
                })
        });
        copy.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        applied = rt.install(|| {
            Applied::replacing(
                Some(&mut applied),
                &[(&style, 1.0)],
                ApplyMode::Merge,
                &unet,
            )
        })?;
        merge.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        drop(Applied::new(&[(&style, 1.0)], ApplyMode::Runtime, &unet)?);
        swap.push(t.elapsed().as_secs_f64());
    }
    drop(applied);
    let (c, m) = (median(copy), median(merge));
    let gbs = |s: f64| 2.0 * style_bytes as f64 / s / 1e9;
    println!(
        "style merge swap: {:.2} ms ({:.1} GB/s read+write) vs memcpy {:.2} ms ({:.1} GB/s): \
         {:.2} of memcpy; runtime swap {:.3} ms",
        m * 1e3,
        gbs(m),
        c * 1e3,
        gbs(c),
        c / m,
        median(swap) * 1e3
    );

    // A batch with one identity per sample against the same batch with one identity.
    let set: Vec<(&hdb::adapter::Adapter, f32)> = adapters.iter().map(|a| (a, 1.0)).collect();
    let many = Applied::new(&set, ApplyMode::Runtime, &unet)?;
    let one = Applied::new(&set[..1], ApplyMode::Runtime, &unet)?;
    let idx_many: Vec<i32> = (0..batch as i32).collect();
    let idx_one = vec![0i32; batch];
    let mut rng = SplitMix64(9);
    let mut noise = |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };
    let (sample, ctx) = (noise(batch * 4 * size * size), noise(batch * 77 * 768));
    let ts = vec![500.0; batch];
    let input = UnetInput {
        sample: &sample,
        timesteps: &ts,
        context: &ctx,
        batch,
        height: size,
        width: size,
        context_len: 77,
    };
    let time = |applied: &Applied, idx: &[i32]| -> hdb::Result<f64> {
        let ad = AdapterCtx {
            applied,
            per_sample: Some(idx),
        };
        let mut v = Vec::new();
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            rt.install(|| unet.forward_adapted(&input, &ad))?;
            v.push(t.elapsed().as_secs_f64());
        }
        Ok(median(v))
    };
    time(&one, &idx_one)?; // warm-up
    let t1 = time(&one, &idx_one)?;
    let tn = time(&many, &idx_many)?;
    println!(
        "batch {batch} at {size}x{size}: one identity {t1:.3} s, {batch} identities {tn:.3} s: {:+.1}%",
        100.0 * (tn / t1 - 1.0)
    );
    // The per-step cost of runtime mode with an identity and the style on every sample:
    // each identity stacked with the style (ranks add), against the identity alone and against
    // the base UNet, in the same run.
    let stacked: Vec<hdb::adapter::Adapter> = adapters
        .iter()
        .map(|a| hdb::adapter::stack(&[(a, 1.0), (&style, 1.0)]))
        .collect::<hdb::Result<_>>()?;
    let set: Vec<(&hdb::adapter::Adapter, f32)> = stacked.iter().map(|a| (a, 1.0)).collect();
    let with_style = Applied::new(&set, ApplyMode::Runtime, &unet)?;
    let empty = Applied::new(&[], ApplyMode::Runtime, &unet)?;
    let ts_style = time(&with_style, &idx_many)?;
    let mut v = Vec::new();
    for _ in 0..runs.max(1) {
        let ad = AdapterCtx {
            applied: &empty,
            per_sample: None,
        };
        let t = Instant::now();
        rt.install(|| unet.forward_adapted(&input, &ad))?;
        v.push(t.elapsed().as_secs_f64());
    }
    let tb = median(v);
    println!(
        "batch {batch} at {size}x{size}, runtime mode: base {tb:.3} s, {batch} identities {tn:.3} s \
         ({:+.1}%), {batch} identities + the style {ts_style:.3} s ({:+.1}% over base)",
        100.0 * (tn / tb - 1.0),
        100.0 * (ts_style / tb - 1.0)
    );
    Ok(())
}

/// A random LoRA of `rank` on every adaptable layer of `unet` (its convolutions as LoCon), the
/// bytes of the f32 weights it touches, and its layer count.
fn random_style(unet: &Unet, rank: usize) -> (hdb::adapter::Adapter, usize, usize) {
    let mut rng = SplitMix64(0x0057_171E);
    let mut u = |n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| s * (2.0 * rng.next_f32() - 1.0)).collect()
    };
    let table = unet.adaptable_layers();
    let bytes = table.values().map(|s| s.din * s.dout * 4).sum();
    let layers = table
        .iter()
        .map(|(k, s)| {
            let r = rank.min(s.din).min(s.dout);
            let conv_kernel = match s.kind {
                hdb::model::LayerKind::Conv { kernel, .. } => Some(kernel),
                hdb::model::LayerKind::Linear => None,
            };
            let layer = hdb::adapter::LoraLayer {
                rank: r,
                down: u(r * s.din, 1.0 / (s.din as f32).sqrt()),
                up: u(s.dout * r, 0.01),
                conv_kernel,
            };
            (k.clone(), layer)
        })
        .collect();
    let n = table.len();
    let a = hdb::adapter::Adapter {
        layers,
        source: hdb::adapter::AdapterSource::Lora,
    };
    (a, bytes, n)
}
