//! `hdb bench finetune`: rank-relaxed finetuning steps at SD 1.5 shapes (512x512 by default,
//! batch 1, rank-4 LoRA on the UNet's and the text encoder's 176 attention projections; random
//! weights, no download), time per step and peak memory with and without activation
//! checkpointing, against the PyTorch peer (tools/bench_torch_finetune.py: diffusers + peft,
//! the same recipe and precision) in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use hdb::model::config::UnetConfig;
use hdb::model::random::RandomWeights;
use hdb::model::scheduler::SchedulerConfig;
use hdb::model::text_encoder::TextEncoderConfig;
use hdb::model::tokenizer::ClipTokenizer;
use hdb::model::vae::VaeConfig;
use hdb::session::BuiltModel;
use hdb::train::finetune::{Face, FinetuneParams, Start};
use hdb::Engine;

/// Resets the kernel's peak-RSS counter of this process (Linux `clear_refs` 5), so the next
/// reading covers only what follows.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The CPU's model name (Linux), for the report.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Device memory in use on the runtime's GPU, in GB (the allocator's pool included: after a
/// run, an upper bound of its peak); `None` on the CPU.
pub fn device_memory_gb(engine: &Engine) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Some(dev) = engine.runtime().cuda() {
        return dev
            .memory()
            .ok()
            .map(|(free, total)| (total - free) as f64 / (1u64 << 30) as f64);
    }
    let _ = engine;
    None
}

/// SD 1.5 (UNet, text encoder, VAE) with random weights on `rt`: what the training
/// benchmarks run (no download).
pub fn random_sd15(rt: Arc<hdb::Runtime>) -> hdb::Result<Engine> {
    Engine::from_parts(
        rt,
        BuiltModel {
            unet: UnetConfig::default(),
            text_encoder: TextEncoderConfig::default(),
            vae: VaeConfig::default(),
            weights: &RandomWeights { seed: 0x5D15 },
            tokenizer: ClipTokenizer::byte_level(77)?,
            scheduler: SchedulerConfig::default(),
        },
    )
}

pub fn run(
    threads: usize,
    runs: usize,
    size: usize,
    device: hdb::runtime::DeviceRequest,
    peer: Option<&Path>,
) -> hdb::Result<()> {
    let rt = Arc::new(super::runtime(device, threads)?);
    let threads = rt.threads();
    let on_gpu = rt.device() != hdb::Device::Cpu;
    let t0 = Instant::now();
    let engine = random_sd15(rt)?;
    eprintln!(
        "random SD 1.5 weights (UNet, text encoder, VAE) made in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let res = 8 * size;
    let rgb: Vec<u8> = (0..res * res * 3).map(|i| (i * 7 % 251) as u8).collect();
    let face = Face {
        rgb: &rgb,
        width: res,
        height: res,
        stride: res * 3,
    };
    let mut rows = Vec::new();
    for checkpoint in [true, false] {
        let params = FinetuneParams {
            steps: runs + 1,
            resolution: res,
            checkpoint,
            ..FinetuneParams::default()
        };
        // A rank-1 LiDB on every layer (the hypernetwork's kind of prediction), relaxed to 4.
        let lidb = Start::LidbFromZero {
            rank: 1,
            a: 100,
            b: 50,
            basis_seed: 1,
            alpha: 1.0,
        };
        let predicted = engine.initial_tensors(lidb, &params)?.to_adapter();
        let start = Start::Relaxed {
            from: predicted,
            rank: 4,
        };
        reset_peak_rss();
        let mut stamps = vec![Instant::now()];
        let mut progress = |done: usize, total: usize, loss: f32| {
            stamps.push(Instant::now());
            eprintln!("step {done}/{total}: loss {loss:.4}");
            true
        };
        let run = engine.finetune(face, start, &params, Some(&mut progress))?;
        let peak = super::peak_rss_mb();
        let device_gb = device_memory_gb(&engine);
        if run.diverged_at.is_some() {
            return Err(hdb::Error::Internal("the benchmark's run diverged".into()));
        }
        // Step times after the first (which includes the VAE encoding and first-use costs).
        let mut steps: Vec<f64> = stamps
            .windows(2)
            .skip(1)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let med = super::median(&mut steps);
        let memory = match device_gb {
            Some(gb) => format!("device memory in use after the run {gb:.2} GB (pool included)"),
            None => format!("peak RSS {:.2} GB", peak / 1024.0),
        };
        // The UNet's work per step, counted as whole forwards: the forward, the backward (input
        // gradients through frozen weights: the same GEMMs transposed, so about one forward;
        // the adapters' own gradients are rank-4 and negligible) and, with checkpointing, the
        // recomputed forward. The text encoder's share is under 1% at this size.
        let unet_flops = UnetConfig::default().flops(1, size, size, 77);
        let work = unet_flops * if checkpoint { 3.0 } else { 2.0 };
        println!(
            "hdb {}, {threads} threads: one finetuning step ({res}x{res}, batch 1, rank-4 LoRA \
             on 176 projections, UNet + text encoder, checkpointing {}): {med:.3} s (median of \
             {}), {:.0} GFLOP/s ({:.2} TFLOP counted as {} UNet forwards), {memory}",
            engine.describe(),
            if checkpoint { "on" } else { "off" },
            steps.len(),
            work / med / 1e9,
            work / 1e12,
            if checkpoint { 3 } else { 2 },
        );
        rows.push((checkpoint, med, device_gb.map_or(peak, |g| g * 1024.0)));
    }
    if let Some(py) = peer {
        for (checkpoint, hdb_s, hdb_peak) in rows {
            let mut args = vec![
                "--threads".to_string(),
                threads.to_string(),
                "--runs".into(),
                runs.max(1).to_string(),
                "--size".into(),
                size.to_string(),
            ];
            if !checkpoint {
                args.push("--no-checkpointing".into());
            }
            if on_gpu {
                args.push("--device".into());
                args.push("cuda".into());
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let json = super::bench_pipeline::run_peer(py, "tools/bench_torch_finetune.py", &a)?;
            let p = json["median_s"].as_f64().unwrap_or(f64::NAN);
            let mem = json["peak_mb"].as_f64().unwrap_or(f64::NAN);
            println!(
                "peer pytorch-eager (torch {}, diffusers {}, peft {}, checkpointing {}): {p:.3} s, \
                 peak {} {:.2} GB",
                json["torch"].as_str().unwrap_or("?"),
                json["diffusers"].as_str().unwrap_or("?"),
                json["peft"].as_str().unwrap_or("?"),
                if checkpoint { "on" } else { "off" },
                json["peak_kind"].as_str().unwrap_or("memory"),
                mem / 1024.0
            );
            println!(
                "ratio (checkpointing {}): hdb is {:.2}x the speed of PyTorch eager, {:.2}x its \
                 peak memory",
                if checkpoint { "on" } else { "off" },
                p / hdb_s,
                hdb_peak / mem
            );
        }
    }
    Ok(())
}
