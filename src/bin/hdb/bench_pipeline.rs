//! `hdb bench pipeline`: SD 1.5's components at full size with random weights: text encoder,
//! one UNet step with guidance, VAE decode at 512x512, each against PyTorch in the same run.

use std::path::Path;
use std::time::Instant;

use hdb::model::config::UnetConfig;
use hdb::model::text_encoder::{TextEncoder, TextEncoderConfig};
use hdb::model::unet::{Unet, UnetInput};
use hdb::model::vae::{Vae, VaeConfig};
use hdb::{model::random::RandomWeights, rng::SplitMix64};

/// Runs a PyTorch peer script of tools/ with `python` and returns the JSON line it prints last.
///
/// Where hdb's CPU kernels run AVX2 (an AVX2 machine, or a build without the `avx512` feature on
/// an AVX-512 one) the peer is held to AVX2 as well: PyTorch's own kernels
/// (`ATEN_CPU_CAPABILITY`), oneDNN's (`ONEDNN_MAX_CPU_ISA`) and MKL's (`MKL_ENABLE_INSTRUCTIONS`),
/// so both sides of a ratio run the same instruction set. On an AVX2 machine these change nothing.
pub fn run_peer(python: &Path, script: &str, args: &[&str]) -> hdb::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&script).args(args);
    if cfg!(target_arch = "x86_64") && hdb::backend::cpu::instruction_set() == "AVX2+FMA" {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            println!(
                "peer held to AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
                 MKL_ENABLE_INSTRUCTIONS=AVX2"
            )
        });
        cmd.env("ATEN_CPU_CAPABILITY", "avx2")
            .env("ONEDNN_MAX_CPU_ISA", "AVX2")
            .env("MKL_ENABLE_INSTRUCTIONS", "AVX2");
    }
    let out = cmd.output().map_err(|e| hdb::Error::io(python, e))?;
    let json = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .ok_or_else(|| {
            hdb::Error::Internal(format!(
                "the peer {} printed no JSON: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
    if let Some(isa) = json.get("cpu_capability").and_then(|v| v.as_str()) {
        println!("peer: PyTorch's CPU kernels ran {isa}");
    }
    Ok(json)
}

/// Median of `runs` (at least 1) timed calls of `f` after one warm-up call, in seconds.
pub fn median_time(runs: usize, mut f: impl FnMut() -> hdb::Result<()>) -> hdb::Result<f64> {
    f()?; // warm-up
    let mut v = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

pub fn run(threads: usize, runs: usize, peer: Option<&Path>) -> hdb::Result<()> {
    let rt = super::cpu_runtime(threads)?;
    let threads = rt.threads();
    let w = RandomWeights { seed: 0x5D15 };
    // On the profiling wrapper, collecting only for the profile runs at the end.
    let be = hdb::backend::profile::Profiled::new(hdb::backend::Cpu);
    let te = rt.install(|| TextEncoder::load_on(be.clone(), TextEncoderConfig::default(), &w))?;
    let unet = rt.install(|| Unet::load_on(be.clone(), UnetConfig::default(), &w))?;
    let vae = rt.install(|| Vae::load_on(be.clone(), VaeConfig::default(), &w))?;
    let mut rng = SplitMix64(3);
    let ids: Vec<u32> = (0..2 * 77)
        .map(|_| (rng.next_u64() % 49408) as u32)
        .collect();
    let mut noise = |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };
    let (sample, ctx, z) = (
        noise(2 * 4 * 64 * 64),
        noise(2 * 77 * 768),
        noise(4 * 64 * 64),
    );
    let ts = [500.0f32, 500.0];
    let input = UnetInput {
        sample: &sample,
        timesteps: &ts,
        context: &ctx,
        batch: 2,
        height: 64,
        width: 64,
        context_len: 77,
    };
    let t_te = median_time(runs, || {
        rt.install(|| te.forward_hooked(&ids, 2, None)).map(|_| ())
    })?;
    let t_unet = median_time(runs, || {
        rt.install(|| unet.forward_hooked(&input, None)).map(|_| ())
    })?;
    let t_vae = median_time(runs, || {
        rt.install(|| vae.decode(&z, 1, 64, 64)).map(|_| ())
    })?;
    let rows = [
        ("text encoder (2 x 77 tokens)", t_te, "text_encoder_s"),
        ("UNet step with CFG (batch 2, 64x64)", t_unet, "unet_step_s"),
        ("VAE decode 512x512", t_vae, "vae_decode_s"),
    ];
    let peer_json = match peer {
        None => None,
        Some(py) => {
            let (t, r) = (threads.to_string(), runs.to_string());
            Some(run_peer(
                py,
                "tools/bench_torch_pipeline.py",
                &["--threads", &t, "--runs", &r],
            )?)
        }
    };
    println!("SD 1.5 components, random weights, f32, {threads} threads, median of {runs} (after a warm-up)");
    println!("{:<38} {:>10} {:>12} {:>8}", "", "hdb", "PyTorch", "ratio");
    for (name, t, key) in rows {
        match peer_json.as_ref().and_then(|j| j[key].as_f64()) {
            Some(p) => println!("{name:<38} {t:>9.3}s {p:>11.3}s {:>7.2}x", p / t),
            None => println!("{name:<38} {t:>9.3}s"),
        }
    }
    if let Some(j) = &peer_json {
        println!("peer: torch {}", j["torch"].as_str().unwrap_or("?"));
    }
    // Where the time goes: one more run of each component with the op profiler on.
    type Job<'a> = Box<dyn Fn() -> hdb::Result<Vec<f32>> + Sync + 'a>;
    let jobs: [(&str, Job<'_>); 3] = [
        (
            "text encoder",
            Box::new(|| te.forward_hooked(&ids, 2, None)),
        ),
        ("UNet step", Box::new(|| unet.forward_hooked(&input, None))),
        ("VAE decode", Box::new(|| vae.decode(&z, 1, 64, 64))),
    ];
    for (name, job) in jobs {
        be.enable(true);
        let r = rt.install(&*job);
        let spent = be.report();
        be.enable(false);
        r?;
        println!("where the time goes, {name}:");
        for (op, d, n) in spent.iter().take(8) {
            println!("  {op:<24} {:>9.1} ms {n:>6} calls", d.as_secs_f64() * 1e3);
        }
    }
    Ok(())
}
