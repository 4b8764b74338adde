//! `hdb bench gemm`: the CPU GEMM hdb's linear layers and convolutions run on (the `gemm`
//! crate, through `hdb::backend::cpu::linear`) against the BLAS PyTorch calls for
//! `torch.nn.functional.linear` (tools/bench_torch_gemm.py), at the shapes of SD 1.5's UNet
//! (batch 2, 64x64: attention projections, GEGLU, the 3x3 convolutions as im2col GEMMs), of its
//! text encoder (2 x 77 tokens) and of the hypernetwork's ViT-H/14 (257 tokens), in the same
//! run on the same threads.

use std::path::Path;
use std::time::Instant;

use hdb::rng::SplitMix64;

/// (what, m, k, n): `y [m, n] = x [m, k] . w [n, k]^T`.
const SHAPES: [(&str, usize, usize, usize); 12] = [
    ("UNet 64x64 attention proj", 8192, 320, 320),
    ("UNet 64x64 GEGLU in", 8192, 320, 2560),
    ("UNet 64x64 ff out", 8192, 1280, 320),
    ("UNet 64x64 conv 3x3 (im2col)", 8192, 2880, 320),
    ("UNet 32x32 conv 3x3 (im2col)", 2048, 5760, 640),
    ("UNet 8x8 attention proj", 128, 1280, 1280),
    ("text encoder q/k/v/out", 154, 768, 768),
    ("text encoder fc1", 154, 768, 3072),
    ("text encoder fc2", 154, 3072, 768),
    ("ViT-H/14 qkv", 257, 1280, 3840),
    ("ViT-H/14 fc1", 257, 1280, 5120),
    ("ViT-H/14 fc2", 257, 5120, 1280),
];

pub fn run(threads: usize, runs: usize, peer: Option<&Path>) -> hdb::Result<()> {
    let rt = super::cpu_runtime(threads)?;
    let threads = rt.threads();
    let runs = runs.max(1);
    let mut rng = SplitMix64(7);
    let mut times = Vec::with_capacity(SHAPES.len());
    for (_, m, k, n) in SHAPES {
        let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32() - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next_f32() - 0.5).collect();
        let mut y = vec![0f32; m * n];
        let mut once = || rt.install(|| hdb::backend::cpu::linear(&mut y, &x, &w, None, m, k, n));
        once(); // warm-up
        let mut v: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                once();
                t.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(f64::total_cmp);
        times.push(v[v.len() / 2]);
    }
    let peer_json = match peer {
        None => None,
        Some(py) => {
            let (t, r) = (threads.to_string(), runs.to_string());
            let shapes: Vec<String> = SHAPES
                .iter()
                .map(|(_, m, k, n)| format!("{m},{k},{n}"))
                .collect();
            let mut args = vec!["--threads", t.as_str(), "--runs", r.as_str()];
            args.extend(shapes.iter().map(String::as_str));
            Some(super::bench_pipeline::run_peer(
                py,
                "tools/bench_torch_gemm.py",
                &args,
            )?)
        }
    };
    println!("f32 GEMM y = x . w^T, {threads} threads, median of {runs} (after a warm-up)");
    if let Some(j) = &peer_json {
        println!(
            "peer: torch {} (BLAS {}, oneDNN {})",
            j["torch"].as_str().unwrap_or("?"),
            j["blas"].as_str().unwrap_or("?"),
            j["mkldnn"]
        );
    }
    println!(
        "{:<30} {:>16} {:>9} {:>10} {:>10} {:>10} {:>7}",
        "shape", "m x k x n", "hdb ms", "GFLOP/s", "torch ms", "GFLOP/s", "ratio"
    );
    for (i, ((what, m, k, n), t)) in SHAPES.iter().zip(&times).enumerate() {
        let flop = 2.0 * (m * k * n) as f64;
        let dims = format!("{m}x{k}x{n}");
        let peer_t = peer_json
            .as_ref()
            .and_then(|j| j["shapes"][i]["s"].as_f64());
        match peer_t {
            Some(p) => println!(
                "{what:<30} {dims:>16} {:>9.3} {:>10.1} {:>10.3} {:>10.1} {:>6.2}x",
                t * 1e3,
                flop / t / 1e9,
                p * 1e3,
                flop / p / 1e9,
                p / t
            ),
            None => println!(
                "{what:<30} {dims:>16} {:>9.3} {:>10.1}",
                t * 1e3,
                flop / t / 1e9
            ),
        }
    }
    Ok(())
}
