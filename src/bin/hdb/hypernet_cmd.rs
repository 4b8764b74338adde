//! `hdb predict` (face image -> identity adapter), `hdb bench hypernet`, and the hypernetwork
//! side of `hdb info`.

use std::path::Path;
use std::time::Instant;

use hdb::backend::profile::Profiled;
use hdb::backend::Backend;
use hdb::hypernet::{Hypernet, HypernetConfig};
use hdb::io::safetensors::SafetensorsFile;
use hdb::model::random::RandomWeights;
use hdb::placed::PlacedHypernet;

use hdb::io::png::read_png;

pub fn predict(
    hypernet: &Path,
    model: &Path,
    face: &Path,
    iterations: Option<usize>,
    output: &Path,
    (threads, device): (usize, hdb::runtime::DeviceRequest),
) -> hdb::Result<()> {
    let rt = std::sync::Arc::new(super::runtime(device, threads)?);
    let net = PlacedHypernet::load(&rt, hypernet)?;
    let engine = hdb::Engine::new(rt, super::load_model(model)?);
    let (rgb, w, h) = read_png(face)?;
    let total = iterations.unwrap_or(net.config().iterations);
    let bar = indicatif::ProgressBar::new(total as u64);
    let t = Instant::now();
    let mut progress = |done: usize, _: usize| {
        bar.set_position(done as u64);
        true
    };
    let adapter = engine.predict(&net, (&rgb, w, h, w * 3), iterations, Some(&mut progress))?;
    bar.finish_and_clear();
    let hdb::adapter::AdapterSource::Lidb(lidb) = &adapter.source else {
        return Err(hdb::Error::Internal(
            "a prediction is a LiDB adapter".into(),
        ));
    };
    lidb.save(output)?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} layers, {size} bytes) in {:.2} s",
        output.display(),
        lidb.layers.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `hdb info` for a hypernetwork file; `Ok(false)` when the file is not one.
pub fn info(path: &Path, json: bool) -> hdb::Result<bool> {
    let f = SafetensorsFile::open(path)?;
    if !hdb::hypernet::is_hypernet(&f) {
        return Ok(false);
    }
    let net = Hypernet::load(path)?;
    let c = &net.config;
    if json {
        println!("{}", c.to_json());
        return Ok(true);
    }
    println!("hypernetwork v1: {}", path.display());
    println!("parameters:    {:.1} M", c.parameter_count() as f64 / 1e6);
    println!("image size:    {} px", c.img_size());
    println!(
        "layer tokens:  {} (rank {}, a {}, b {})",
        c.layer_keys.len(),
        c.rank,
        c.a,
        c.b
    );
    println!(
        "decoder:       d_model {}, {} heads, {} layers; {} iterations by default",
        c.d_model, c.heads, c.layers, c.iterations
    );
    Ok(true)
}

/// Multiply-adds x 2 of one prediction at `c` (matrix products and attention; norms and
/// element-wise ops are noise).
fn predict_flops(c: &HypernetConfig) -> f64 {
    let e = &c.encoder;
    let (n, w, hid) = (e.tokens() as f64, e.width as f64, e.mlp_hidden() as f64);
    let patch = 2.0 * (e.grid() * e.grid()) as f64 * w * (3 * e.patch_size * e.patch_size) as f64;
    let block = 2.0 * n * (4.0 * w * w + 2.0 * w * hid) + 4.0 * n * n * w;
    let (l, d, t) = (
        c.layer_keys.len() as f64,
        c.d_model as f64,
        c.token_dim() as f64,
    );
    let memory = 2.0 * n * w * d + c.layers as f64 * 2.0 * n * 2.0 * d * d;
    let layer = 2.0 * l * (4.0 * d * d) + 4.0 * l * l * d // self-attention
        + 2.0 * l * (2.0 * d * d) + 4.0 * l * n * d // cross-attention
        + 2.0 * l * 8.0 * d * d; // MLP
    let iteration = 2.0 * l * t * d + c.layers as f64 * layer + 2.0 * l * t * d;
    patch + e.depth as f64 * block + memory + c.iterations as f64 * iteration
}

pub fn bench(
    threads: usize,
    runs: usize,
    peer: Option<&Path>,
    device: hdb::runtime::DeviceRequest,
    dtype: hdb::tensor::DType,
) -> hdb::Result<()> {
    let rt = super::runtime(device, threads)?;
    let t = Instant::now();
    let cfg = HypernetConfig::default();
    let src = RandomWeights { seed: 1 };
    // On the profiling wrapper, collecting only for the one profiled prediction at the end.
    #[cfg(feature = "cuda")]
    if let Some(dev) = rt.cuda() {
        use hdb::backend::cuda::Cuda;
        use hdb::tensor::DType;
        return match dtype {
            DType::F32 => bench_cuda(&rt, Cuda::<f32>::new(dev.clone()), cfg, &src, t, runs, peer),
            DType::F16 => bench_cuda(
                &rt,
                Cuda::<half::f16>::new(dev.clone()),
                cfg,
                &src,
                t,
                runs,
                peer,
            ),
            DType::BF16 => bench_cuda(
                &rt,
                Cuda::<half::bf16>::new(dev.clone()),
                cfg,
                &src,
                t,
                runs,
                peer,
            ),
        };
    }
    if dtype != hdb::tensor::DType::F32 {
        return Err(hdb::Error::invalid_arg(
            "--dtype",
            format!(
                "{dtype}: the CPU runs the hypernetwork in f32; half precision needs --device cuda"
            ),
        ));
    }
    let be = Profiled::new(hdb::backend::Cpu);
    let net = rt.install(|| Hypernet::from_source_on(be, cfg, &src))?;
    bench_net(&rt, &net, t, runs, peer, ("cpu", "f32"))
}

/// [`bench`] on a GPU backend `be` (each profiled op waits for the device).
#[cfg(feature = "cuda")]
fn bench_cuda<T: hdb::backend::cuda::ops::BlasElem>(
    rt: &hdb::Runtime,
    be: hdb::backend::cuda::Cuda<T>,
    cfg: HypernetConfig,
    src: &RandomWeights,
    t: Instant,
    runs: usize,
    peer: Option<&Path>,
) -> hdb::Result<()> {
    let d = be.dev().clone();
    let be = Profiled::synced(be, move || {
        // A failed wait shows up as the op's own error.
        let _ = d.synchronize();
    });
    let net = Hypernet::from_source_on(be, cfg, src)?;
    bench_net(rt, &net, t, runs, peer, ("cuda", T::SUFFIX))
}

/// [`bench`] of `net` (made at `t`) on `rt`, against the PyTorch peer on `peer_device` in
/// `dtype` (the storage type `net` runs in: "f32", "f16" or "bf16").
fn bench_net<B: Backend>(
    rt: &hdb::Runtime,
    net: &Hypernet<Profiled<B>>,
    t: Instant,
    runs: usize,
    peer: Option<&Path>,
    (peer_device, dtype): (&str, &str),
) -> hdb::Result<()> {
    let threads = rt.threads();
    eprintln!(
        "default hypernetwork ({:.1} M parameters, random weights) made in {:.1} s",
        net.config.parameter_count() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let size = 256;
    let rgb: Vec<u8> = (0..size * size * 3).map(|i| (i * 7 % 251) as u8).collect();
    let image = net.preprocess(&rgb, size, size, size * 3)?;
    let predict = || net.predict(&image, None, None);
    let mut times = Vec::new();
    for i in 0..=runs.max(1) {
        let t = Instant::now();
        rt.install(predict)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let flops = predict_flops(&net.config);
    let be = net.backend();
    be.enable(true);
    let t = Instant::now();
    let r = rt.install(predict);
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    let spent = be.report();
    be.enable(false);
    r?;
    eprintln!(
        "where the time goes (one more prediction{}):",
        if peer_device == "cpu" {
            String::new()
        } else {
            format!(", every op waited for: {total_ms:.2} ms in all")
        }
    );
    for (name, d, n) in &spent {
        eprintln!(
            "  {name:<24} {:>9.3} ms {n:>6} calls",
            d.as_secs_f64() * 1e3
        );
    }
    let where_ = if peer_device == "cpu" {
        format!("cpu f32, {threads} threads")
    } else {
        be.describe()
    };
    println!(
        "hdb {where_}: one prediction at the default config (ViT-H/14 224 px, d_model 1024, 176 layer tokens, {} iterations): {med:.4} s (median of {}), {:.1} TFLOP/s",
        net.config.iterations,
        times.len(),
        flops / med / 1e12
    );
    if let Some(py) = peer {
        let r = runs.max(1).to_string();
        let json = super::bench_pipeline::run_peer(
            py,
            "tools/hypernet_ref.py",
            &[
                "bench",
                "--threads",
                &threads.to_string(),
                "--repeat",
                &r,
                "--device",
                peer_device,
                "--dtype",
                dtype,
            ],
        )?;
        let p = json["median_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "peer pytorch-eager (torch {}, {peer_device}, {}): {p:.4} s, {:.1} TFLOP/s",
            json["torch"].as_str().unwrap_or("?"),
            json["dtype"].as_str().unwrap_or("?"),
            flops / p / 1e12
        );
        println!("ratio: hdb is {:.2}x the speed of PyTorch eager", p / med);
    }
    Ok(())
}
