//! CPU op timings at Stable Diffusion 1.5 shapes, against raw GEMM speed on the same machine.
//!
//! `cargo bench --bench cpu_ops` (release). Runs inside a rayon pool of `HDB_THREADS` threads
//! (default: all cores). Each line: median ms over several runs, GFLOP/s (2·m·k·n for
//! products and convolutions, 4·B·H·Lq·Lk·d for attention) and that as a fraction of the gemm
//! crate's GFLOP/s on a 2048³ product measured in the same run. A name given as an argument
//! runs only the cases whose name contains it; `HDB_BENCH_PEER=0` skips the reference
//! product.

use std::time::Instant;

use hdb::backend::{cpu, Conv2d};

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median seconds of `runs` timed calls after one warm-up call.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

struct Report {
    peer: f64,
}

impl Report {
    fn line(&self, name: &str, secs: f64, flops: f64) {
        let g = flops / secs / 1e9;
        if self.peer > 0.0 {
            println!(
                "{name:<44} {:>9.2} ms {:>8.1} GFLOP/s {:>6.0}% of gemm",
                secs * 1e3,
                g,
                100.0 * g / self.peer
            );
        } else {
            println!("{name:<44} {:>9.2} ms {:>8.1} GFLOP/s", secs * 1e3, g);
        }
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let threads = std::env::var("HDB_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    println!("cpu_ops: {threads} thread(s)");
    pool.install(|| run(&want));
}

fn run(want: &dyn Fn(&str) -> bool) {
    let mut rep = Report { peer: 0.0 };
    // HDB_BENCH_PEER=0 skips the reference product (e.g. when profiling one op).
    if std::env::var("HDB_BENCH_PEER").map_or(true, |v| v != "0") {
        let n = 2048;
        let a = rand_vec(n * n, 1);
        let b = rand_vec(n * n, 2);
        let mut c = vec![0f32; n * n];
        let s = time(5, || cpu::matmul(&mut c, &a, &b, n, n, n, false, false));
        rep.line("gemm 2048^3 (peer)", s, 2.0 * (n * n * n) as f64);
        rep.peer = 2.0 * (n * n * n) as f64 / s / 1e9;
    }

    for &(m, k, n, name) in &[
        (8192, 320, 320, "linear 8192x320 . 320x320"),
        (2048, 640, 5120, "linear 2048x640 . 640x5120 (geglu proj)"),
        (8192, 320, 2560, "linear 8192x320 . 320x2560 (geglu proj)"),
        (8192, 1280, 320, "linear 8192x1280 . 1280x320 (ff out)"),
        (257, 1280, 5120, "linear 257x1280 . 1280x5120 (ViT-H mlp)"),
        (
            257,
            5120,
            1280,
            "linear 257x5120 . 5120x1280 (ViT-H mlp out)",
        ),
    ] {
        if !want(name) {
            continue;
        }
        let x = rand_vec(m * k, 3);
        let w = rand_vec(n * k, 4);
        let b = rand_vec(n, 5);
        let mut y = vec![0f32; m * n];
        let s = time(7, || cpu::linear(&mut y, &x, &w, Some(&b), m, k, n));
        rep.line(name, s, 2.0 * (m * k * n) as f64);
    }

    let convs = [
        ("conv3x3 320->320 64x64 b2", 2, 320, 64, 320, 3, 1, 1),
        ("conv3x3 640->640 32x32 b2", 2, 640, 32, 640, 3, 1, 1),
        (
            "conv3x3 1280->1280 32x32 b2 (upsampler)",
            2,
            1280,
            32,
            1280,
            3,
            1,
            1,
        ),
        ("conv3x3 1280->1280 16x16 b2", 2, 1280, 16, 1280, 3, 1, 1),
        ("conv3x3 1280->1280 8x8 b2", 2, 1280, 8, 1280, 3, 1, 1),
        ("conv3x3 s2 320->320 64x64 b2", 2, 320, 64, 320, 3, 2, 1),
        ("conv1x1 640->320 64x64 b2", 2, 640, 64, 320, 1, 1, 0),
        ("conv3x3 4->320 64x64 b2 (conv_in)", 2, 4, 64, 320, 3, 1, 1),
    ];
    for &(name, batch, c_in, hw, c_out, kernel, stride, padding) in &convs {
        if !want(name) {
            continue;
        }
        let p = Conv2d {
            batch,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding,
        };
        let (ho, wo) = p.out_hw();
        let x = rand_vec(batch * c_in * hw * hw, 6);
        let w = rand_vec(c_out * c_in * kernel * kernel, 7);
        let b = rand_vec(c_out, 8);
        let mut y = vec![0f32; batch * c_out * ho * wo];
        let s = time(5, || cpu::conv2d(&mut y, &x, &w, Some(&b), &p));
        rep.line(
            name,
            s,
            2.0 * (batch * c_out * ho * wo * c_in * kernel * kernel) as f64,
        );
    }

    let attns = [
        ("self-attn b2 h8 4096x4096 d40", 2, 4096, 4096, 8, 40),
        ("cross-attn b2 h8 4096x77 d40", 2, 4096, 77, 8, 40),
        ("self-attn b2 h8 1024x1024 d80", 2, 1024, 1024, 8, 80),
        ("self-attn b2 h8 256x256 d160", 2, 256, 256, 8, 160),
    ];
    for &(name, batch, lq, lk, heads, d) in &attns {
        if !want(name) {
            continue;
        }
        let hd = heads * d;
        let q = rand_vec(batch * lq * hd, 9);
        let k = rand_vec(batch * lk * hd, 10);
        let v = rand_vec(batch * lk * hd, 11);
        let mut out = vec![0f32; q.len()];
        let s = time(5, || {
            cpu::attention(&mut out, &q, &k, &v, batch, lq, lk, heads, d)
        });
        rep.line(name, s, 4.0 * (batch * heads * lq * lk * d) as f64);
    }

    // Memory-bound ops: GFLOP/s means little, so report GB/s of input + output instead.
    let (b, c, hw) = (2, 320, 4096);
    let n = b * c * hw;
    let x = rand_vec(n, 12);
    let mut y = vec![0f32; n];
    let g = rand_vec(c, 13);
    let be = rand_vec(c, 14);
    let mem = |name: &str, secs: f64, bytes: usize| {
        println!(
            "{name:<44} {:>9.2} ms {:>8.1} GB/s",
            secs * 1e3,
            bytes as f64 / secs / 1e9
        );
    };
    if want("group_norm") {
        let s = time(7, || {
            cpu::group_norm(&mut y, &x, &g, &be, b, c, hw, 32, 1e-5, true)
        });
        mem("group_norm+silu 2x320x64x64", s, 8 * n);
    }
    if want("layer_norm") {
        let s = time(7, || cpu::layer_norm(&mut y, &x, &g, &be, b * hw, c, 1e-5));
        mem("layer_norm 8192x320", s, 8 * n);
    }
    if want("geglu") {
        let xg = rand_vec(2 * 4096 * 2560, 15);
        let mut yg = vec![0f32; 2 * 4096 * 1280];
        let s = time(7, || cpu::geglu(&mut yg, &xg, 2 * 4096, 1280));
        mem("geglu 8192x2560 -> 8192x1280", s, 12 * yg.len());
    }
    if want("silu") {
        let mut z = x.clone();
        let s = time(7, || cpu::silu_inplace(&mut z));
        mem("silu 2x320x64x64", s, 8 * n);
    }
    if want("nchw_to_nhwc") {
        let s = time(7, || cpu::nchw_to_nhwc(&mut y, &x, b, c, hw));
        mem("nchw_to_nhwc 2x320x4096", s, 8 * n);
        let s = time(7, || cpu::nhwc_to_nchw(&mut y, &x, b, c, hw));
        mem("nhwc_to_nchw 2x320x4096", s, 8 * n);
    }
    if want("softmax") {
        let mut z = rand_vec(8 * 4096 * 77, 16);
        let s = time(7, || cpu::softmax_rows(&mut z, 8 * 4096, 77));
        mem("softmax 32768x77", s, 8 * z.len());
    }
}
