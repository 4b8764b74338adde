//! `hdb bench personalize`: one whole personalization at SD 1.5 shapes, as a user runs it
//! (`hdb personalize`): the default hypernetwork's prediction from a 512x512 face, then 40
//! rank-relaxed finetuning steps (rank 4, checkpointing on; UNet + text encoder), random
//! weights, no download. Prints the wall time of each part and in all, and peak memory;
//! with `--peer-python`, the PyTorch peer's time for the same work measured in the same run
//! (tools/hypernet_ref.py's prediction plus tools/bench_torch_finetune.py's steps).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use hdb::hypernet::HypernetConfig;
use hdb::model::random::RandomWeights;
use hdb::placed::PlacedHypernet;
use hdb::train::finetune::{Face, FinetuneParams};

pub fn run(
    threads: usize,
    steps: usize,
    device: hdb::runtime::DeviceRequest,
    peer: Option<&Path>,
) -> hdb::Result<()> {
    if steps == 0 {
        return Err(hdb::Error::invalid_arg("--steps", "must be at least 1"));
    }
    let rt = Arc::new(super::runtime(device, threads)?);
    let threads = rt.threads();
    let on_gpu = rt.device() != hdb::Device::Cpu;
    let t0 = Instant::now();
    let engine = super::bench_finetune::random_sd15(rt.clone())?;
    let cfg = HypernetConfig::default();
    let iterations = cfg.iterations;
    let net = PlacedHypernet::from_source(&rt, cfg, &RandomWeights { seed: 1 })?;
    eprintln!(
        "random SD 1.5 weights (UNet, text encoder, VAE) and the default hypernetwork made in \
         {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let res = 512;
    let rgb: Vec<u8> = (0..res * res * 3).map(|i| (i * 7 % 251) as u8).collect();
    let face = Face {
        rgb: &rgb,
        width: res,
        height: res,
        stride: res * 3,
    };
    let params = FinetuneParams {
        steps,
        resolution: res,
        checkpoint: true,
        ..FinetuneParams::default()
    };
    super::bench_finetune::reset_peak_rss();
    let start = Instant::now();
    let mut predicted_at = None;
    let mut predict_progress = |_done: usize, _total: usize| {
        predicted_at = Some(Instant::now());
        true
    };
    let mut stamps = Vec::new();
    let mut progress = |done: usize, total: usize, loss: f32| {
        stamps.push(Instant::now());
        eprintln!(
            "step {done}/{total}: loss {loss:.4} ({:.1} s in)",
            start.elapsed().as_secs_f64()
        );
        true
    };
    let run = engine.personalize(
        &net,
        face,
        None,
        4,
        &params,
        Some(&mut predict_progress),
        Some(&mut progress),
    )?;
    let total = start.elapsed().as_secs_f64();
    let peak = super::peak_rss_mb();
    if let Some(step) = run.diverged_at {
        return Err(hdb::Error::Internal(format!(
            "the benchmark's run diverged at step {step}"
        )));
    }
    let predict_s = predicted_at.map_or(f64::NAN, |t| (t - start).as_secs_f64());
    let finetune_s = total - predict_s;
    let mut step_s: Vec<f64> = stamps
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let med = if step_s.is_empty() {
        f64::NAN
    } else {
        super::median(&mut step_s)
    };
    let memory = match super::bench_finetune::device_memory_gb(&engine) {
        Some(gb) => format!("device memory in use after the run {gb:.2} GB (pool included)"),
        None => format!("peak RSS {:.2} GB (weights included)", peak / 1024.0),
    };
    println!(
        "hdb {}, {threads} threads: one personalization (hypernetwork prediction, {iterations} \
         iterations, then {steps} rank-4 finetuning steps at 512x512 with checkpointing, UNet + \
         text encoder): {total:.1} s in all = prediction {predict_s:.2} s + finetuning \
         {finetune_s:.1} s (VAE encoding and first step included; later steps median \
         {med:.2} s), {memory}",
        engine.describe()
    );
    if let Some(py) = peer {
        let dev = if on_gpu { "cuda" } else { "cpu" };
        let net_json = super::bench_pipeline::run_peer(
            py,
            "tools/hypernet_ref.py",
            &[
                "bench",
                "--threads",
                &threads.to_string(),
                "--repeat",
                "1",
                "--device",
                dev,
            ],
        )?;
        let p_predict = net_json["median_s"].as_f64().unwrap_or(f64::NAN);
        // The peer's warm-up step is its first step (its first-use costs, as hdb's first step
        // has): steps - 1 timed runs after it make `steps` steps in all.
        let runs = (steps - 1).to_string();
        let threads = threads.to_string();
        let a = [
            "--threads",
            threads.as_str(),
            "--runs",
            runs.as_str(),
            "--size",
            "64",
            "--device",
            dev,
        ];
        let ft_json = super::bench_pipeline::run_peer(py, "tools/bench_torch_finetune.py", &a)?;
        let p_steps = ft_json["total_s"].as_f64().unwrap_or(f64::NAN);
        let p_total = p_predict + p_steps;
        println!(
            "peer pytorch-eager (torch {}, diffusers {}, peft {}): prediction {p_predict:.2} s + \
             {steps} finetuning steps {p_steps:.1} s = {p_total:.1} s (its VAE encoding not \
             counted), peak {} {:.2} GB in the finetuning process",
            ft_json["torch"].as_str().unwrap_or("?"),
            ft_json["diffusers"].as_str().unwrap_or("?"),
            ft_json["peft"].as_str().unwrap_or("?"),
            ft_json["peak_kind"].as_str().unwrap_or("memory"),
            ft_json["peak_mb"].as_f64().unwrap_or(f64::NAN) / 1024.0
        );
        println!(
            "ratio: hdb's whole personalization is {:.2}x the speed of PyTorch eager's",
            p_total / total
        );
    }
    Ok(())
}
