//! `hdb bench cuda`: the CUDA backend at SD 1.5 shapes against PyTorch on the same GPU, in
//! the same run (tools/bench_torch_cuda.py): fused attention per shape, the UNet's convolutions
//! and the VAE's as im2col + cuBLAS against the implicit GEMM (and cuDNN), f32 linear layers,
//! the LiDB merge of all 128 UNet projections against a device-to-device copy, the
//! runtime-mode swap, a batch of 8 identities against one over the projections; attention's
//! backward, flash and materialised, against SDPA's (bench_cuda_backward.rs); then with --unet
//! the whole models in fp16 and a whole 25-step 512x512 generation against diffusers' pipeline
//! (bench_cuda_models.rs).
//!
//! Device times are CUDA events around the work, the median of `runs` after warm-up.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaSlice};
use half::{bf16, f16};
use hdb::backend::cuda::ops::{
    self, At, AttnKernel, AttnShape, BgmvShape, Conv2d, Factor, MergeLayer,
};
use hdb::backend::cuda::{CudaDevice, DeviceElem};
use hdb::backend::profile::Profiled;
use hdb::backend::Backend;
use hdb::model::adaptable::identity_layers;
use hdb::model::config::UnetConfig;
use hdb::model::text_encoder::TextEncoderConfig;
use hdb::model::unet::Unet;
use hdb::model::vae::VaeConfig;
use hdb::model::Adaptable;
use hdb::{
    model::random::RandomWeights,
    rng::{normals, SplitMix64},
};
use hdb::{Error, Result};

use crate::bench_cuda_backward::{self, BackwardShape};
use crate::bench_pipeline::run_peer;

/// Median device time in ms of `f` (after `warmup` calls), timed with CUDA events around each
/// call. The calls are queued back to back and waited for once at the end, so a call's time is
/// the device's time for it, not the host's launch latency on an idle device (a per-call wait
/// would count that, a few us here and more for a Python peer: tools/bench_torch_cuda.py
/// times the same way). A host that cannot queue as fast as the device runs still shows, as
/// the gaps it leaves.
pub(crate) fn gpu_ms(
    dev: &CudaDevice,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let ev = |what| {
        dev.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::Device(format!("{what}: {e:?}")))
    };
    let dev_err = |e| Error::Device(format!("{e:?}"));
    let (warmup, runs) = if SMOKE.load(Ordering::Relaxed) {
        (0, 1)
    } else {
        (warmup, runs)
    };
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let runs = runs.max(1);
    let mut events = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (a, b) = (ev("event")?, ev("event")?);
        a.record(dev.stream()).map_err(dev_err)?;
        f()?;
        b.record(dev.stream()).map_err(dev_err)?;
        events.push((a, b));
    }
    dev.synchronize()?;
    let mut v = events
        .iter()
        .map(|(a, b)| a.elapsed_ms(b).map(f64::from).map_err(dev_err))
        .collect::<Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

pub(crate) fn random<T: DeviceElem>(
    dev: &CudaDevice,
    rng: &mut SplitMix64,
    n: usize,
    s: f32,
) -> Result<CudaSlice<T>> {
    let v: Vec<T> = normals(rng, n)
        .into_iter()
        .map(|x| T::from_f32(x as f32 * s))
        .collect();
    dev.upload(&v)
}

/// `--smoke`: every timed call runs once, without warm-up.
pub(crate) static SMOKE: AtomicBool = AtomicBool::new(false);

/// The sizes a run uses: SD 1.5's ([`Scale::sd15`], what the figures are), or small ones
/// ([`Scale::smoke`], `hdb bench cuda --smoke`) that take every path of the bench in seconds,
/// e.g. on the emulated GPU (scripts/emulated-gpu.sh) before a GPU's time is spent on it.
pub(crate) struct Scale {
    /// Attention shapes (lq, lk, head dim) at batch 2, 8 heads.
    attn: Vec<(usize, usize, usize)>,
    /// The text encoder's causal self-attention (batch, heads, length, head dim), for the
    /// backward rows.
    attn_causal: (usize, usize, usize, usize),
    /// f32 linear layers (rows, in, out): the hypernetwork's (it runs in f32).
    linear: Vec<(usize, usize, usize)>,
    conv: Vec<ConvShape>,
    pub(crate) unet: UnetConfig,
    /// Latent height and width.
    pub(crate) latent: usize,
    /// Text tokens (the context length).
    pub(crate) tokens: usize,
    pub(crate) text: TextEncoderConfig,
    pub(crate) vae: VaeConfig,
}

impl Scale {
    pub(crate) fn sd15() -> Scale {
        Scale {
            attn: ATTN.to_vec(),
            attn_causal: (2, 12, 77, 64),
            linear: LINEAR_F32.to_vec(),
            conv: CONV.to_vec(),
            unet: UnetConfig::default(),
            latent: 64,
            tokens: 77,
            text: TextEncoderConfig::default(),
            vae: VaeConfig::default(),
        }
    }

    /// The attention-backward rows' shapes: [`Scale::attn`]'s, then the causal one.
    fn attn_backward(&self) -> Vec<BackwardShape> {
        let (b, h, len, d) = self.attn_causal;
        self.attn
            .iter()
            .map(|&(lq, lk, d)| (2, 8, lq, lk, d, false))
            .chain([(b, h, len, len, d, true)])
            .collect()
    }

    pub(crate) fn smoke() -> Scale {
        Scale {
            attn: vec![(64, 64, 40), (64, 8, 40), (16, 16, 80), (16, 8, 160)],
            attn_causal: (1, 2, 16, 64),
            linear: vec![(17, 64, 96)],
            conv: vec![
                ("conv_in", 2, 4, 16, 8, 3, 1, 1),
                ("3x3 s2", 2, 16, 16, 8, 3, 2, 1),
                ("1x1", 2, 16, 32, 4, 1, 1, 0),
                ("vae 3x3", 1, 16, 16, 16, 3, 1, 1),
            ],
            // One layer per block (two per up block): every block kind, half the work of
            // SD 1.5's two; the emulated GPU spends minutes on each UNet row.
            unet: UnetConfig {
                block_out_channels: vec![32, 64, 64, 64],
                layers_per_block: 1,
                heads: vec![2, 2, 2, 2],
                cross_attention_dim: 64,
                norm_num_groups: 16,
                ..UnetConfig::default()
            },
            latent: 8,
            tokens: 8,
            text: TextEncoderConfig {
                vocab_size: 1000,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                ..TextEncoderConfig::default()
            },
            vae: VaeConfig {
                block_out_channels: vec![32, 32],
                layers_per_block: 1,
                norm_num_groups: 16,
                ..VaeConfig::default()
            },
        }
    }
}

/// SD 1.5 attention shapes at 64x64 latents, batch 2: (lq, lk, head_dim), 8 heads.
const ATTN: &[(usize, usize, usize)] = &[
    (4096, 4096, 40),
    (4096, 77, 40),
    (1024, 1024, 80),
    (1024, 77, 80),
    (256, 256, 160),
    (256, 77, 160),
    (64, 64, 160),
    (64, 77, 160),
];

pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) ours_ms: f64,
    pub(crate) rate: String,
    pub(crate) peer_ms: Option<f64>,
}

/// Where the device time of one more call of `f` goes, per op category: the ops of `be`, a
/// profiling wrapper whose ops each wait for the device ([`Profiled::synced`]), so the launch
/// gaps a plain run hides count here and the total exceeds the timed call's. Returned as lines
/// for the notes after the table.
pub(crate) fn device_profile<B: Backend>(
    be: &Profiled<B>,
    dev: &Arc<CudaDevice>,
    what: &str,
    f: impl FnOnce() -> Result<()>,
) -> Result<String> {
    dev.synchronize()?;
    be.enable(true);
    let t = std::time::Instant::now();
    let r = f().and_then(|()| dev.synchronize());
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    let spent = be.report();
    be.enable(false);
    r?;
    let mut s = format!(
        "where {what}'s time goes (one more call, every op waited for: {total_ms:.2} ms in all):"
    );
    for (name, d, n) in &spent {
        s += &format!(
            "\n  {name:<24} {:>9.3} ms {n:>6} calls",
            d.as_secs_f64() * 1e3
        );
    }
    Ok(s)
}

/// The table's rows. Each is printed as it is measured too, so a bench cut short by a time
/// limit (a GPU session's minutes) still leaves every figure it reached in the log.
pub(crate) struct Rows(Vec<Row>);

impl Rows {
    pub(crate) fn push(&mut self, r: Row) {
        println!("measured: {} {:.4} ms", r.what, r.ours_ms);
        self.0.push(r);
    }
}

/// The hypernetwork's f32 linear layers at its default config: ViT-H/14's at 257 tokens (qkv,
/// out projection, MLP up and down).
const LINEAR_F32: &[(usize, usize, usize)] = &[
    (257, 1280, 3840),
    (257, 1280, 1280),
    (257, 1280, 5120),
    (257, 5120, 1280),
];

/// f32 `y = x w^T + b` (cuBLAS SGEMM, then the bias kernel) at each shape, against PyTorch's
/// `F.linear` in f32 where the peer ran.
fn linear_rows(
    dev: &CudaDevice,
    shapes: &[(usize, usize, usize)],
    runs: usize,
    peer: &serde_json::Value,
    rows: &mut Rows,
) -> Result<()> {
    let mut rng = SplitMix64(17);
    for &(m, k, n) in shapes {
        let x = random::<f32>(dev, &mut rng, m * k, 1.0)?;
        let w = random::<f32>(dev, &mut rng, n * k, 0.02)?;
        let b = random::<f32>(dev, &mut rng, n, 0.1)?;
        let y = dev.zeros::<f32>(m * n)?;
        let ms = gpu_ms(dev, 3, runs, || {
            ops::linear(dev, At::from(&y), n, At::from(&x), &w, Some(&b), (m, k, n))
        })?;
        let peer_ms = peer["linear"].as_array().and_then(|a| {
            a.iter()
                .find(|e| e["m"] == m && e["k"] == k && e["n"] == n)
                .and_then(|e| e["ms"].as_f64())
        });
        rows.push(Row {
            what: format!("linear f32 {m} x {k} -> {n} (SGEMM + bias)"),
            ours_ms: ms,
            rate: format!("{:.1} TFLOP/s", 2.0 * (m * k * n) as f64 / ms / 1e9),
            peer_ms,
        });
    }
    Ok(())
}

/// A convolution: (name, batch, c_in, c_out, height = width, kernel, stride, padding).
type ConvShape = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// SD 1.5 UNet convolutions at 64x64 latents, batch 2: one per level (the 3x3 resnet convs),
/// the stride-2 downsampler, a 1x1 resnet shortcut, conv_in and conv_out; then the VAE
/// decoder's 3x3 convolutions of one 64x64 latent (batch 1), one per channel count and size
/// (the 512-channel upsampler at 256x256, the 256-channel one at 512x512), and its conv_out.
const CONV: &[ConvShape] = &[
    ("conv_in", 2, 4, 320, 64, 3, 1, 1),
    ("3x3", 2, 320, 320, 64, 3, 1, 1),
    ("3x3 s2", 2, 320, 320, 64, 3, 2, 1),
    ("3x3", 2, 640, 640, 32, 3, 1, 1),
    ("3x3", 2, 1280, 1280, 16, 3, 1, 1),
    ("1x1", 2, 640, 1280, 16, 1, 1, 0),
    ("3x3", 2, 1280, 1280, 8, 3, 1, 1),
    ("conv_out", 2, 320, 4, 64, 3, 1, 1),
    ("vae 3x3", 1, 512, 512, 64, 3, 1, 1),
    ("vae 3x3", 1, 512, 512, 128, 3, 1, 1),
    ("vae 3x3", 1, 512, 512, 256, 3, 1, 1),
    ("vae 3x3", 1, 256, 256, 256, 3, 1, 1),
    ("vae 3x3", 1, 256, 256, 512, 3, 1, 1),
    ("vae 3x3", 1, 128, 128, 512, 3, 1, 1),
    ("vae conv_out", 1, 128, 3, 512, 3, 1, 1),
];

/// One convolution shape timed both ways (fp16, bias fused or added).
struct ConvCmp {
    label: String,
    flops: f64,
    im2col_ms: f64,
    implicit_ms: f64,
    /// The split-K count the heuristic chose, and the time with no split where it split.
    splits: usize,
    nosplit_ms: Option<f64>,
    /// torch.nn.functional.conv2d (cuDNN), fp16, from the peer.
    cudnn_ms: Option<f64>,
}

/// `ops::conv2d` (im2col + cuBLAS, then the bias pass) against `ops::conv2d_implicit` (one
/// tensor-core kernel, bias fused; split along K where the grid is small) at [`CONV`]'s
/// shapes in fp16; both rows go into the table, with cuDNN (the peer) as "torch ms".
fn conv_rows(
    dev: &CudaDevice,
    shapes: &[ConvShape],
    runs: usize,
    peer: &serde_json::Value,
    rows: &mut Rows,
) -> Result<Vec<ConvCmp>> {
    let mut rng = SplitMix64(13);
    let mut out = Vec::new();
    for &(name, b, c_in, c_out, hw, k, stride, pad) in shapes {
        let p = Conv2d {
            batch: b,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel: k,
            stride,
            padding: pad,
        };
        let (oh, ow) = p.out_hw();
        let x = random::<f16>(dev, &mut rng, b * c_in * hw * hw, 1.0)?;
        let w = random::<f16>(dev, &mut rng, c_out * c_in * k * k, 0.02)?;
        let bias = random::<f16>(dev, &mut rng, c_out, 0.1)?;
        let mut y = dev.zeros::<f16>(b * c_out * oh * ow)?;
        let mut scratch = dev.zeros::<f16>(ops::conv2d_scratch(&p).max(1))?;
        let im2col_ms = gpu_ms(dev, 3, runs, || {
            ops::conv2d(dev, &mut y, &x, &w, Some(&bias), &p, &mut scratch)
        })?;
        let mut splits = 1;
        let implicit_ms = gpu_ms(dev, 3, runs, || {
            splits = ops::conv2d_implicit_with(dev, &mut y, &x, &w, Some(&bias), &p, None)?;
            Ok(())
        })?;
        let nosplit_ms = if splits > 1 {
            Some(gpu_ms(dev, 3, runs, || {
                ops::conv2d_implicit_with(dev, &mut y, &x, &w, Some(&bias), &p, Some(1)).map(|_| ())
            })?)
        } else {
            None
        };
        let flops = 2.0 * (b * c_out * oh * ow * c_in * k * k) as f64;
        let cudnn_ms = peer["conv"].as_array().and_then(|a| {
            a.iter()
                .find(|e| {
                    e["b"] == b
                        && e["c_in"] == c_in
                        && e["c_out"] == c_out
                        && e["h"] == hw
                        && e["k"] == k
                        && e["stride"] == stride
                        && e["pad"] == pad
                        && e["dtype"] == "f16"
                })
                .and_then(|e| e["ms"].as_f64())
        });
        let label = if stride > 1 {
            format!("{name} {c_in}->{c_out} {hw}x{hw}->{oh}x{ow}")
        } else {
            format!("{name} {c_in}->{c_out} {hw}x{hw}")
        };
        let rate = |ms: f64| format!("{:.1} TFLOP/s", flops / ms / 1e9);
        rows.push(Row {
            what: format!("conv2d f16 {label} im2col+cuBLAS"),
            ours_ms: im2col_ms,
            rate: rate(im2col_ms),
            peer_ms: cudnn_ms,
        });
        rows.push(Row {
            what: if splits > 1 {
                format!("conv2d f16 {label} implicit GEMM, split {splits}")
            } else {
                format!("conv2d f16 {label} implicit GEMM")
            },
            ours_ms: implicit_ms,
            rate: rate(implicit_ms),
            peer_ms: cudnn_ms,
        });
        if let Some(ms) = nosplit_ms {
            rows.push(Row {
                what: format!("conv2d f16 {label} implicit GEMM, no split"),
                ours_ms: ms,
                rate: rate(ms),
                peer_ms: cudnn_ms,
            });
        }
        out.push(ConvCmp {
            label,
            flops,
            im2col_ms,
            implicit_ms,
            splits,
            nosplit_ms,
            cudnn_ms,
        });
    }
    Ok(out)
}

/// The conv comparison after the table: per shape both times, TFLOP/s, and the ratio
/// implicit / im2col (below 1: the implicit GEMM is faster); against cuDNN where the peer ran.
fn print_conv_summary(convs: &[ConvCmp]) {
    let tf = |flops: f64, ms: f64| flops / ms / 1e9;
    println!(
        "conv2d fp16 (the UNet's at batch 2, the VAE's at 1): implicit GEMM vs im2col + cuBLAS"
    );
    println!(
        "  {:<32} {:>10} {:>8} {:>11} {:>8} {:>5} {:>16} {:>9} {:>15}",
        "shape",
        "im2col ms",
        "TFLOP/s",
        "implicit ms",
        "TFLOP/s",
        "split",
        "implicit/im2col",
        "cuDNN ms",
        "implicit/cuDNN"
    );
    for c in convs {
        let (cudnn, vs) = match c.cudnn_ms {
            Some(p) => (format!("{p:.4}"), format!("{:.2}", c.implicit_ms / p)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "  {:<32} {:>10.4} {:>8.1} {:>11.4} {:>8.1} {:>5} {:>16.2} {:>9} {:>15}",
            c.label,
            c.im2col_ms,
            tf(c.flops, c.im2col_ms),
            c.implicit_ms,
            tf(c.flops, c.implicit_ms),
            c.splits,
            c.implicit_ms / c.im2col_ms,
            cudnn,
            vs
        );
        if let Some(ms) = c.nosplit_ms {
            println!(
                "  {:<32} {:>10} {:>8} {:>11.4} {:>8.1} {:>5} {:>16.2}",
                "  (same, no split)",
                "",
                "",
                ms,
                tf(c.flops, ms),
                1,
                ms / c.im2col_ms
            );
        }
    }
    let (sum_i, sum_m) = convs
        .iter()
        .fold((0.0, 0.0), |(i, m), c| (i + c.im2col_ms, m + c.implicit_ms));
    println!(
        "  all {} shapes: im2col {sum_i:.4} ms, implicit {sum_m:.4} ms, implicit/im2col {:.2}",
        convs.len(),
        sum_m / sum_i
    );
}

fn attention_rows<T: DeviceElem>(
    dev: &CudaDevice,
    shapes: &[(usize, usize, usize)],
    runs: usize,
    peer: &serde_json::Value,
    rows: &mut Rows,
    kernel: AttnKernel,
) -> Result<()> {
    let mut rng = SplitMix64(7);
    for &(lq, lk, d) in shapes {
        let (b, h) = (2, 8);
        let hd = h * d;
        let q = random::<T>(dev, &mut rng, b * lq * hd, 1.0)?;
        let k = random::<T>(dev, &mut rng, b * lk * hd, 1.0)?;
        let v = random::<T>(dev, &mut rng, b * lk * hd, 1.0)?;
        let o = dev.zeros::<T>(b * lq * hd)?;
        let s = AttnShape::dense(b, h, lq, lk, d);
        let mut kname = String::new();
        let ms = gpu_ms(dev, 3, runs, || {
            kname = ops::attention(
                dev,
                At::from(&o),
                At::from(&q),
                At::from(&k),
                At::from(&v),
                s,
                kernel,
            )?;
            Ok(())
        })?;
        let flops = 4.0 * (b * h * lq * lk * d) as f64;
        let peer_ms = peer["attention"].as_array().and_then(|a| {
            a.iter()
                .find(|e| e["lq"] == lq && e["lk"] == lk && e["d"] == d && e["dtype"] == T::SUFFIX)
                .and_then(|e| e["ms"].as_f64())
        });
        rows.push(Row {
            what: format!("attention {} lq{lq} lk{lk} d{d} ({kname})", T::SUFFIX),
            ours_ms: ms,
            rate: format!("{:.1} TFLOP/s", flops / ms / 1e9),
            peer_ms,
        });
    }
    Ok(())
}

/// Token count of the level a UNet projection's key sits at (`latent` x `latent` latents, a
/// four-level UNet), and whether its input is the text context (attn2's to_k / to_v).
fn level_tokens(key: &str, latent: usize) -> (usize, bool) {
    let level = if key.contains("down_blocks.0") || key.contains("up_blocks.3") {
        0
    } else if key.contains("down_blocks.1") || key.contains("up_blocks.2") {
        1
    } else if key.contains("down_blocks.2") || key.contains("up_blocks.1") {
        2
    } else {
        3
    };
    let side = (latent >> level).max(1);
    let hw = side * side;
    let ctx = key.contains("attn2.to_k") || key.contains("attn2.to_v");
    (hw, ctx)
}

pub fn run(runs: usize, peer_python: Option<&Path>, with_unet: bool, smoke: bool) -> Result<()> {
    if smoke && peer_python.is_some() {
        return Err(Error::InvalidArgument {
            name: "--peer-python",
            reason: "--smoke runs small shapes without a peer".into(),
        });
    }
    let scale = if smoke { Scale::smoke() } else { Scale::sd15() };
    SMOKE.store(smoke, Ordering::Relaxed);
    if smoke {
        println!("smoke run: small shapes, one timed call each; the figures mean nothing");
    }
    let lat = scale.latent;
    let tokens = scale.tokens;
    let dev = Arc::new(CudaDevice::open(0)?);
    let (free, total) = dev.memory()?;
    let (ma, mi) = dev.compute_capability();
    println!(
        "device: {} (sm_{ma}{mi}), {:.1} of {:.1} GiB free",
        dev.name(),
        free as f64 / (1u64 << 30) as f64,
        total as f64 / (1u64 << 30) as f64
    );
    let t0 = std::time::Instant::now();
    let cfg = scale.unet.clone();
    let unet = Unet::load(cfg.clone(), &RandomWeights { seed: 0x5D15 })?;
    let layers: Vec<(String, usize, usize)> = identity_layers(&unet.adaptable_layers())
        .into_iter()
        .map(|(k, s)| (k, s.dout, s.din))
        .collect();
    println!(
        "built the UNet with random weights in {:.1} s ({} adapted projections)",
        t0.elapsed().as_secs_f64(),
        layers.len()
    );
    let total_w: usize = layers.iter().map(|(_, o, i)| o * i).sum();
    let copy_bytes = total_w * 2;

    let peer = match peer_python {
        Some(py) => {
            let mut args: Vec<String> = scale
                .attn
                .iter()
                .flat_map(|&(lq, lk, d)| ["--attn".to_string(), format!("2,8,{lq},{lk},{d}")])
                .collect();
            args.extend(
                scale
                    .conv
                    .iter()
                    .flat_map(|&(_, b, c_in, c_out, hw, k, s, p)| {
                        [
                            "--conv".to_string(),
                            format!("{b},{c_in},{c_out},{hw},{hw},{k},{s},{p}"),
                        ]
                    }),
            );
            args.extend(
                scale
                    .linear
                    .iter()
                    .flat_map(|&(m, k, n)| ["--linear".to_string(), format!("{m},{k},{n}")]),
            );
            args.extend(bench_cuda_backward::peer_args(&scale.attn_backward()));
            args.extend(["--copy-bytes".into(), copy_bytes.to_string()]);
            args.extend(["--runs".into(), runs.to_string()]);
            if with_unet {
                args.push("--unet".into());
                args.push("--vae".into());
                args.push("--text-encoder".into());
                args.push("--generate".into());
                args.push(format!(
                    "{},{}",
                    crate::bench_cuda_models::generate_size(&scale),
                    crate::bench_cuda_models::generate_steps()
                ));
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let t = std::time::Instant::now();
            let v = run_peer(py, "tools/bench_torch_cuda.py", &a)?;
            println!(
                "peer: torch {} on {} ({:.0} s; f32 matmuls: allow_tf32 {}, precision {})",
                v["torch"],
                v["device"],
                t.elapsed().as_secs_f64(),
                v["matmul_allow_tf32"],
                v["float32_matmul_precision"]
            );
            v
        }
        None => serde_json::Value::Null,
    };

    let mut rows = Rows(Vec::new());
    let attn = &scale.attn;
    attention_rows::<f16>(&dev, attn, runs, &peer, &mut rows, AttnKernel::Auto)?;
    attention_rows::<bf16>(&dev, attn, runs, &peer, &mut rows, AttnKernel::Auto)?;
    attention_rows::<f16>(&dev, attn, runs, &peer, &mut rows, AttnKernel::Flash2)?;
    attention_rows::<bf16>(&dev, attn, runs, &peer, &mut rows, AttnKernel::Flash2)?;
    attention_rows::<f16>(&dev, attn, runs, &peer, &mut rows, AttnKernel::Flash1)?;
    let backward_notes =
        bench_cuda_backward::rows(&dev, &scale.attn_backward(), runs, &peer, &mut rows)?;
    linear_rows(&dev, &scale.linear, runs, &peer, &mut rows)?;
    let convs = conv_rows(&dev, &scale.conv, runs, &peer, &mut rows)?;

    // LiDB merge of all adapted projections (fp16) against a device-to-device copy.
    let mut rng = SplitMix64(11);
    let base = random::<f16>(&dev, &mut rng, total_w, 0.02)?;
    let mut w = dev.zeros::<f16>(total_w)?;
    let mut keep = Vec::new();
    let mut table = Vec::new();
    let mut factors = Vec::new();
    let mut off = 0;
    for (i, (_, dout, din)) in layers.iter().enumerate() {
        let down = random::<f32>(&dev, &mut rng, *din, 0.1)?;
        let up = random::<f32>(&dev, &mut rng, *dout, 0.1)?;
        factors.push(Factor {
            down: dev.ptr(&down),
            up: dev.ptr(&up),
            rank: 1,
            scale: 1.0,
        });
        keep.push((down, up));
        table.push(MergeLayer {
            w_base: dev.ptr(&base) + (off * 2) as u64,
            w: dev.ptr(&w) + (off * 2) as u64,
            dout: *dout as i64,
            din: *din as i64,
            first_factor: i as i32,
            n_factors: 1,
        });
        off += dout * din;
    }
    let max_dout = layers.iter().map(|l| l.1).max().unwrap_or(0);
    let tdev = dev.upload(&table)?;
    let fdev = dev.upload(&factors)?;
    let merge_ms = gpu_ms(&dev, 3, runs, || {
        ops::lidb_merge::<f16>(&dev, &tdev, table.len(), max_dout, &fdev)
    })?;
    let copy_ms = gpu_ms(&dev, 3, runs, || {
        ops::copy(&dev, &mut w, 0, &base, 0, total_w)
    })?;
    let gbs = |ms: f64| 2.0 * copy_bytes as f64 / ms / 1e6;
    rows.push(Row {
        what: format!(
            "LiDB merge, {} layers, {:.1} M fp16 weights",
            table.len(),
            total_w as f64 / 1e6
        ),
        ours_ms: merge_ms,
        rate: format!("{:.0} GB/s", gbs(merge_ms)),
        peer_ms: None,
    });
    rows.push(Row {
        what: "device-to-device copy of the same bytes (cuMemcpy)".into(),
        ours_ms: copy_ms,
        rate: format!("{:.0} GB/s", gbs(copy_ms)),
        peer_ms: peer["copy"]["ms"].as_f64(),
    });

    // Runtime-mode swap: the next identity's factor table (device-resident factors) replaces
    // the current one: one small host-to-device copy, waited for.
    let mut live = dev.upload(&factors)?;
    let other: Vec<Factor> = factors
        .iter()
        .map(|f| Factor { scale: 0.5, ..*f })
        .collect();
    let mut swaps = Vec::new();
    for i in 0..(runs * 10).max(20) {
        let src = if i % 2 == 0 { &other } else { &factors };
        let t = std::time::Instant::now();
        dev.stream()
            .memcpy_htod(src, &mut live)
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        dev.synchronize()?;
        swaps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    swaps.sort_by(f64::total_cmp);
    let swap_ms = swaps[swaps.len() / 2];
    rows.push(Row {
        what: format!(
            "runtime swap: {}-layer factor table ({} B) to the device",
            factors.len(),
            std::mem::size_of_val(&factors[..])
        ),
        ours_ms: swap_ms,
        rate: "host wall".into(),
        peer_ms: None,
    });

    // A batch of 8 with 8 identities against the same batch with one: every adapted
    // projection's base GEMM (cuBLAS) plus its multi-identity LoRA update.
    let batch = 8;
    let mut ids = Vec::new();
    for _ in 0..batch {
        let mut per_layer = Vec::new();
        for (_, dout, din) in &layers {
            let down = random::<f32>(&dev, &mut rng, *din, 0.1)?;
            let up = random::<f32>(&dev, &mut rng, *dout, 0.1)?;
            per_layer.push((down, up));
        }
        ids.push(per_layer);
    }
    let max_in = layers
        .iter()
        .map(|(k, _, din)| {
            let (hw, ctx) = level_tokens(k, lat);
            batch * if ctx { tokens } else { hw } * din
        })
        .max()
        .unwrap_or(1);
    let max_y = layers
        .iter()
        .map(|(k, dout, _)| batch * level_tokens(k, lat).0 * dout)
        .max()
        .unwrap_or(1);
    let x = random::<f16>(&dev, &mut rng, max_in, 1.0)?;
    let y = dev.zeros::<f16>(max_y)?;
    let mut wts = Vec::new();
    let mut tables = Vec::new();
    for (li, (k, dout, din)) in layers.iter().enumerate() {
        wts.push(random::<f16>(&dev, &mut rng, dout * din, 0.02)?);
        let t: Vec<Factor> = ids
            .iter()
            .map(|per| Factor {
                down: dev.ptr(&per[li].0),
                up: dev.ptr(&per[li].1),
                rank: 1,
                scale: 1.0,
            })
            .collect();
        tables.push((dev.upload(&t)?, level_tokens(k, lat)));
    }
    let one: CudaSlice<i32> = dev.upload(&vec![0i32; batch])?;
    let eight: CudaSlice<i32> = dev.upload(&(0..batch as i32).collect::<Vec<_>>())?;
    let projections = |index: Option<&CudaSlice<i32>>| -> Result<()> {
        for (li, (_, dout, din)) in layers.iter().enumerate() {
            let (t, (hw, ctx)) = &tables[li];
            let tokens = if *ctx { tokens } else { *hw };
            let rows = batch * tokens;
            ops::linear(
                &dev,
                At::from(&y),
                *dout,
                At::from(&x),
                &wts[li],
                None,
                (rows, *din, *dout),
            )?;
            if let Some(ix) = index {
                let s = BgmvShape {
                    rows,
                    rows_per_sample: tokens,
                    din: *din,
                    dout: *dout,
                    ld_x: *din,
                    ld_y: *dout,
                };
                ops::lora_bgmv(&dev, At::from(&y), At::from(&x), ix, t, batch, s)?;
            }
        }
        Ok(())
    };
    let base_ms = gpu_ms(&dev, 2, runs, || projections(None))?;
    let one_ms = gpu_ms(&dev, 2, runs, || projections(Some(&one)))?;
    let eight_ms = gpu_ms(&dev, 2, runs, || projections(Some(&eight)))?;
    let n = layers.len();
    for (what, ms) in [
        ("no adapter (cuBLAS only)", base_ms),
        ("1 identity (+ lora_bgmv)", one_ms),
        ("8 identities (+ lora_bgmv)", eight_ms),
    ] {
        rows.push(Row {
            what: format!("{n} projections, batch 8, {what}"),
            ours_ms: ms,
            rate: String::new(),
            peer_ms: None,
        });
    }

    // The whole models in fp16: the UNet step against diffusers eager, identities on it, the
    // text encoder and the VAE.
    let mut unet_ms = None;
    let mut notes: Vec<String> = Vec::new();
    if with_unet {
        let (n, ms) = crate::bench_cuda_models::rows(&dev, &scale, runs, &peer, &mut rows)?;
        notes = n;
        unet_ms = Some(ms);
    }

    println!();
    println!(
        "{:<64} {:>10} {:>16} {:>10} {:>8}",
        "what", "hdb ms", "rate", "torch ms", "ratio"
    );
    for r in &rows.0 {
        let (p, ratio) = match r.peer_ms {
            Some(p) => (format!("{p:.4}"), format!("{:.2}x", p / r.ours_ms)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<64} {:>10.4} {:>16} {:>10} {:>8}",
            r.what, r.ours_ms, r.rate, p, ratio
        );
    }
    println!();
    for n in &backward_notes {
        println!("{n}");
    }
    print_conv_summary(&convs);
    println!();
    println!(
        "LiDB merge at {:.0}% of the device copy's bandwidth (target >= 80%)",
        100.0 * copy_ms / merge_ms
    );
    println!("runtime swap {:.1} us", swap_ms * 1e3);
    println!(
        "8 identities vs 1 over the adapted projections: {:+.1}% (target <= +10%); LoRA adds \
         {:+.1}% to the base GEMMs",
        100.0 * (eight_ms / one_ms - 1.0),
        100.0 * (one_ms / base_ms - 1.0)
    );
    for n in &notes {
        println!("{n}");
    }
    if let (Some(ms), Some(p)) = (unet_ms, peer["unet"]["ms"].as_f64()) {
        println!(
            "UNet fp16 step: hdb {ms:.2} ms vs diffusers eager {p:.2} ms (median; min {:.2}, \
             max {:.2} over {} runs; {}), {:.2}x",
            peer["unet"]["min_ms"].as_f64().unwrap_or(f64::NAN),
            peer["unet"]["max_ms"].as_f64().unwrap_or(f64::NAN),
            peer["unet"]["runs"],
            peer["unet"]["attn_processor"],
            p / ms
        );
    }
    Ok(())
}
