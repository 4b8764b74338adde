//! `hdb bench gemm`: the CPU GEMM hdb's linear layers and convolutions run on (the `gemm`
//! crate, through `hdb::backend::cpu::linear`) against the BLAS PyTorch calls for
//! `torch.nn.functional.linear` (tools/bench_torch_gemm.py), at the shapes of SD 1.5's UNet
//! (batch 2, 64x64: attention projections, GEGLU, the 3x3 convolutions as im2col GEMMs), of its
//! text encoder (2 x 77 tokens) and of the hypernetwork's ViT-H/14 (257 tokens), in the same
//! run on the same threads. Then whole 3x3 convolutions (`hdb::backend::cpu::conv2d`: Winograd
//! from 32x32 up, im2col below) against `F.conv2d` (oneDNN) at the UNet's and the VAE decoder's
//! shapes; their GFLOP/s count a direct convolution's FLOPs.

use std::path::Path;

use super::bench_pipeline::median_time;

use hdb::rng::SplitMix64;

/// (what, m, k, n): `y [m, n] = x [m, k] . w [n, k]^T`.
const SHAPES: [(&str, usize, usize, usize); 15] = [
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
    ("hypernet decoder q/k/v", 176, 1024, 3072),
    ("hypernet decoder ff in", 176, 1024, 4096),
    ("hypernet decoder ff out", 176, 4096, 1024),
];

/// (what, batch, c_in, c_out, size): 3x3, stride 1, padding 1 convolutions.
const CONVS: [(&str, usize, usize, usize, usize); 8] = [
    ("UNet 64x64", 2, 320, 320, 64),
    ("UNet 32x32", 2, 640, 640, 32),
    ("UNet 16x16", 2, 1280, 1280, 16),
    ("UNet 8x8", 2, 1280, 1280, 8),
    ("VAE 64x64", 1, 512, 512, 64),
    ("VAE 128x128", 1, 512, 512, 128),
    ("VAE 256x256", 1, 256, 256, 256),
    ("VAE 512x512", 1, 128, 128, 512),
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
        times.push(median_time(runs, || {
            rt.install(|| hdb::backend::cpu::linear(&mut y, &x, &w, None, m, k, n));
            Ok(())
        })?);
    }
    let mut conv_times = Vec::with_capacity(CONVS.len());
    for (_, batch, c_in, c_out, size) in CONVS {
        let p = conv_shape(batch, c_in, c_out, size);
        let x: Vec<f32> = (0..batch * c_in * size * size)
            .map(|_| rng.next_f32() - 0.5)
            .collect();
        let w: Vec<f32> = (0..c_out * c_in * 9)
            .map(|_| (rng.next_f32() - 0.5) * 0.1)
            .collect();
        let bias: Vec<f32> = (0..c_out).map(|_| rng.next_f32() - 0.5).collect();
        let mut y = vec![0f32; batch * c_out * size * size];
        conv_times.push(median_time(runs, || {
            rt.install(|| hdb::backend::cpu::conv2d(&mut y, &x, &w, Some(&bias), &p));
            Ok(())
        })?);
    }
    let peer_json = match peer {
        None => None,
        Some(py) => {
            let (t, r) = (threads.to_string(), runs.to_string());
            let shapes: Vec<String> = SHAPES
                .iter()
                .map(|(_, m, k, n)| format!("{m},{k},{n}"))
                .collect();
            let convs: Vec<String> = CONVS
                .iter()
                .map(|(_, b, ci, co, hw)| format!("{b},{ci},{co},{hw}"))
                .collect();
            let mut args = vec!["--threads", t.as_str(), "--runs", r.as_str()];
            for c in &convs {
                args.extend(["--conv", c.as_str()]);
            }
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
    println!(
        "\nf32 3x3 convolutions (stride 1, padding 1, with bias) against F.conv2d; GFLOP/s count \
         a direct convolution's FLOPs"
    );
    println!(
        "{:<14} {:>22} {:>20} {:>9} {:>10} {:>10} {:>10} {:>7}",
        "shape",
        "batch x c_in>c_out x HW",
        "hdb algorithm",
        "hdb ms",
        "GFLOP/s",
        "torch ms",
        "GFLOP/s",
        "ratio"
    );
    for (i, ((what, batch, c_in, c_out, size), t)) in CONVS.iter().zip(&conv_times).enumerate() {
        let p = conv_shape(*batch, *c_in, *c_out, *size);
        let flop = 2.0 * (batch * c_out * c_in * 9 * size * size) as f64;
        let dims = format!("{batch}x{c_in}>{c_out}x{size}^2");
        let algo = hdb::backend::cpu::conv::algorithm(&p);
        let peer_t = peer_json.as_ref().and_then(|j| j["convs"][i]["s"].as_f64());
        match peer_t {
            Some(pt) => println!(
                "{what:<14} {dims:>22} {algo:>20} {:>9.3} {:>10.1} {:>10.3} {:>10.1} {:>6.2}x",
                t * 1e3,
                flop / t / 1e9,
                pt * 1e3,
                flop / pt / 1e9,
                pt / t
            ),
            None => println!(
                "{what:<14} {dims:>22} {algo:>20} {:>9.3} {:>10.1}",
                t * 1e3,
                flop / t / 1e9
            ),
        }
    }
    Ok(())
}

fn conv_shape(batch: usize, c_in: usize, c_out: usize, size: usize) -> hdb::backend::api::Conv2d {
    hdb::backend::api::Conv2d {
        batch,
        c_in,
        h: size,
        w: size,
        c_out,
        kernel: 3,
        stride: 1,
        padding: 1,
    }
}
