//! The backward ops (training adapters: input gradients through frozen weights) but
//! attention's (attention_backward.rs): linear and conv2d (cuBLAS; conv2d's col2im in
//! `conv.cu`), group norm (+ SiLU) and layer norm (`norm.cu`), the activations, GEGLU and the
//! nearest upsampling (`elementwise.cu`), the channel split (device copies), and the f32 -> T
//! cast the attention backward ends with. The reference is the CPU backend's backward
//! (`backend::cpu::backward`, itself checked against torch autograd by tests/grad_ops.rs) on
//! the same rounded inputs.
//!
//! Tolerances: the GEMM-based ops round their output to T once after f32 accumulation
//! (`Tols::GEMM`: 1e-5 relative L2 in f32, 1e-3 in f16, 8e-3 in bf16; conv2d's column
//! gradient stays f32 until col2im's one rounding). The norms recompute their statistics in
//! f32 (the CPU in f64) and round once: 1e-5 / 1e-3 / 8e-3. The element-wise ops are one
//! rounding of an f32 value: half an ulp of T (relative) beyond a few f32 ulps, bounded per
//! case by the largest output (`Tols::rounding`). Moving values is exact.

use hdb::backend::{Activation, Conv2d, NormDims};

use crate::harness::{Gen, OpCase, Tols, F32_ONLY};
use crate::target::Op;

#[allow(clippy::too_many_arguments)]
fn conv(
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Conv2d {
    Conv2d {
        batch,
        c_in,
        h,
        w,
        c_out,
        kernel,
        stride,
        padding,
    }
}

fn conv_name(what: &str, p: &Conv2d) -> String {
    format!(
        "{what} b{} {}->{} {}x{} k{} s{} p{}",
        p.batch, p.c_in, p.c_out, p.h, p.w, p.kernel, p.stride, p.padding
    )
}

/// dy and the weight of a convolution's backward: dy normal, w normal / sqrt(fan_in).
fn conv_inputs(c: OpCase, p: &Conv2d) -> OpCase {
    let (oh, ow) = p.out_hw();
    let fan_in = p.c_in * p.kernel * p.kernel;
    c.input(Gen::normal(p.batch * p.c_out * oh * ow, 1.0))
        .input(Gen::normal(p.c_out * fan_in, 1.0 / (fan_in as f32).sqrt()))
        .work(p.batch * p.c_out * oh * ow * fan_in)
}

fn nd(batch: usize, channels: usize, hw: usize, groups: usize) -> NormDims {
    NormDims {
        batch,
        channels,
        hw,
        groups,
        eps: 1e-5,
    }
}

/// x (mean away from 0), gamma, beta, dy for a group norm's backward; bounded (x in [-1, 3],
/// gamma in [0.5, 1.5], beta and dy in [-1, 1]) or normal.
fn gn_inputs(c: OpCase, d: &NormDims, bounded: bool) -> OpCase {
    let n = d.batch * d.channels * d.hw;
    let c = if bounded {
        c.input(Gen::uniform(n, -1.0, 3.0))
            .input(Gen::uniform(d.channels, 0.5, 1.5))
            .input(Gen::uniform(d.channels, -1.0, 1.0))
            .input(Gen::uniform(n, -1.0, 1.0))
    } else {
        c.input(Gen::Normal {
            n,
            scale: 2.0,
            offset: 0.5,
        })
        .input(Gen::normal(d.channels, 1.0))
        .input(Gen::normal(d.channels, 1.0))
        .input(Gen::normal(n, 1.0))
    };
    c.work(6 * n)
}

fn gn_name(op: &str, d: &NormDims, silu: bool) -> String {
    format!(
        "{op}{} b{} c{} hw{} g{}",
        if silu { " silu" } else { "" },
        d.batch,
        d.channels,
        d.hw,
        d.groups
    )
}

/// The norms' input gradients: f32 statistics against the CPU's f64 ones, one rounding.
const NORM: Tols = Tols::one_rounding(1e-5);

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    linear_and_conv(&mut v);
    norms(&mut v);
    elementwise(&mut v);
    v
}

fn linear_and_conv(v: &mut Vec<OpCase>) {
    // Linear: odd sizes, CLIP's k/v projections' input (77 tokens, 768 -> 320), SD 1.5's
    // feed-forward at 16 x 16 (320 -> 1280), and its GEGLU projection at 64 x 64 (320 -> 2560,
    // 4096 rows: a real GPU's).
    for (rows, din, dout) in [
        (7, 33, 5),
        (77, 768, 320),
        (256, 320, 1280),
        (4096, 320, 2560),
    ] {
        v.push(
            OpCase::new(format!(
                "linear_backward [{rows}, {dout}] x [{dout}, {din}]"
            ))
            .input(Gen::normal(rows * dout, 1.0))
            .input(Gen::normal(dout * din, 1.0 / (dout as f32).sqrt()))
            .tol(Tols::GEMM)
            .work(rows * din * dout)
            .run(move |t, i| {
                t.op(
                    &Op::LinearBackward {
                        dims: (rows, din, dout),
                    },
                    i,
                )
            }),
        );
    }
    // conv2d through the backend: 1x1 (one GEMM; SD 1.5's proj_in/out at 16 x 16, and odd),
    // 3x3 stride 1 (small, SD 1.5's 320 channels at 16 x 16 and at 64 x 64, a real GPU's),
    // 3x3 stride 2 (the downsamplers) on even and odd sizes, unpadded (the last row and
    // column no output reads: zero gradient), a 1x1 stride 2 (col2im with k = 1).
    let shapes = [
        conv(2, 320, 16, 16, 320, 1, 1, 0),
        conv(1, 4, 7, 5, 6, 1, 1, 0),
        conv(2, 4, 8, 8, 6, 3, 1, 1),
        conv(2, 32, 16, 16, 48, 3, 1, 1),
        conv(1, 320, 16, 16, 320, 3, 1, 1),
        conv(1, 320, 64, 64, 320, 3, 1, 1),
        conv(2, 16, 16, 16, 16, 3, 2, 1),
        conv(1, 320, 32, 32, 320, 3, 2, 1),
        conv(1, 6, 15, 15, 5, 3, 2, 1),
        conv(1, 8, 9, 10, 8, 3, 2, 1),
        conv(1, 5, 8, 8, 3, 3, 2, 0),
        conv(1, 3, 6, 7, 4, 3, 1, 0),
        conv(2, 4, 5, 5, 5, 1, 2, 0),
    ];
    for p in shapes {
        v.push(
            conv_inputs(OpCase::new(conv_name("conv2d_backward", &p)), &p)
                .tol(Tols::GEMM)
                .run(move |t, i| t.op(&Op::Conv2dBackward { p }, i)),
        );
    }
    // Chunks of input channels (ops::conv2d_backward_with): one channel a chunk, chunks that
    // do not divide c_in (3 + 3 + 1), stride 2 in chunks of 4 + 2, batch 2.
    let chunked = [
        (conv(2, 7, 9, 8, 5, 3, 1, 1), 1),
        (conv(2, 7, 9, 8, 5, 3, 1, 1), 3),
        (conv(1, 6, 9, 9, 4, 3, 2, 1), 4),
    ];
    for (p, channels) in chunked {
        let (oh, ow) = p.out_hw();
        let bytes = channels * p.kernel * p.kernel * oh * ow * 4;
        v.push(
            conv_inputs(
                OpCase::new(format!(
                    "{} chunks of {channels}",
                    conv_name("conv2d_backward_with", &p)
                )),
                &p,
            )
            .tol(Tols::GEMM)
            .run(move |t, i| t.conv2d_backward_with(&i[0], &i[1], &p, bytes)),
        );
    }
}

fn norms(v: &mut Vec<OpCase>) {
    // Group norm through the backend (the heuristic's split): small runs; SD 1.5's UNet at
    // 64 x 64, batch 1 (32 runs of 10 x 4096: the split trio), and the VAE decoder's at
    // 128 x 128 (32 runs of 4 x 16384).
    for d in [
        nd(2, 64, 100, 32),
        nd(1, 12, 33, 3),
        nd(1, 320, 4096, 32),
        nd(1, 128, 16384, 32),
    ] {
        for silu in [false, true] {
            v.push(
                gn_inputs(
                    OpCase::new(gn_name("group_norm_backward", &d, silu)),
                    &d,
                    false,
                )
                .tol(NORM)
                .run(move |t, i| t.op(&Op::GroupNormBackward { d, silu }, i)),
            );
        }
    }
    // ops::group_norm_backward_with with the chunks given: one block a run (runs under,
    // over and not a multiple of the 512 threads, one channel a group, hw 1), then the split
    // trio with chunks that divide the run, that do not, chunks past the end (empty ones).
    let one_block = [
        (2, 32, 77, 8),
        (1, 64, 45, 4),
        (2, 12, 1000, 3),
        (1, 6, 5, 6),
        (3, 8, 1, 2),
    ];
    let split = [
        ((2, 12, 1000, 3), 4),
        ((1, 64, 45, 4), 7),
        ((1, 6, 5, 6), 3),
        ((2, 10, 1, 2), 7),
        ((3, 8, 2, 4), 2),
    ];
    for ((b, c, hw, g), chunks) in one_block.iter().map(|&s| (s, 1)).chain(split) {
        let d = nd(b, c, hw, g);
        for silu in [false, true] {
            v.push(
                gn_inputs(
                    OpCase::new(format!(
                        "{} chunks {chunks}",
                        gn_name("group_norm_backward_with", &d, silu)
                    )),
                    &d,
                    true,
                )
                .tol(NORM)
                .run(move |t, i| t.group_norm_backward_with(i, d, silu, Some(chunks))),
            );
        }
    }

    // Layer norm: CLIP's width at batch 2 (154 rows), SD 1.5's transformer widths (9 rows: a
    // block of 8 warps and one more), SD 1.5's 64 x 64 (4096 rows of 320), odd sizes.
    for (rows, dim) in [
        (154, 768),
        (9, 320),
        (9, 1280),
        (4096, 320),
        (7, 33),
        (1, 5),
    ] {
        let c = OpCase::new(format!("layer_norm_backward [{rows}, {dim}]"))
            .input(Gen::Normal {
                n: rows * dim,
                scale: 2.0,
                offset: 0.5,
            })
            .input(Gen::uniform(dim, 0.5, 1.5))
            .input(Gen::normal(rows * dim, 1.0))
            .tol(NORM)
            .work(6 * rows * dim)
            .run(move |t, i| {
                t.op(
                    &Op::LayerNormBackward {
                        rows_dim: (rows, dim),
                        eps: 1e-5,
                    },
                    i,
                )
            });
        v.push(if rows == 1 { c.dtypes(F32_ONLY) } else { c });
    }
}

/// The activations' inputs: the usual range, the tails (SiLU's and the GELUs' derivatives
/// saturate to 0 and 1), exact zeros and huge values.
fn activation_inputs() -> Gen {
    Gen::Cat(vec![
        Gen::uniform(3000, -6.0, 6.0),
        Gen::uniform(300, -40.0, -5.0),
        Gen::Values(vec![
            -1e4, -300.0, -88.0, -20.0, -10.0, -5.5, 0.0, -0.0, 1e-3, 5.5, 20.0, 300.0, 1e4,
        ]),
        Gen::uniform(300, 5.0, 40.0),
    ])
}

fn elementwise(v: &mut Vec<OpCase>) {
    // dx = dy act'(x) with |dy| <= 1 and |act'| < 1.13: |dx| < 1.2.
    let x = activation_inputs();
    let n = x.len();
    for act in [Activation::Silu, Activation::Gelu, Activation::QuickGelu] {
        v.push(
            OpCase::new(format!("activate_backward {act:?} n{n}"))
                .input(x.clone())
                .input(Gen::uniform(n, -1.0, 1.0))
                .tol(Tols::rounding(2e-6, 1.2))
                .work(n)
                .run(move |t, i| t.op(&Op::ActivateBackward(act), i)),
        );
        // SD 1.5's SiLU at 64 x 64 x 320 (and the same size for the others).
        let big = 64 * 64 * 320;
        v.push(
            OpCase::new(format!("activate_backward {act:?} n{big}"))
                .input(Gen::uniform(big, -6.0, 6.0))
                .input(Gen::uniform(big, -1.0, 1.0))
                .tol(Tols::rounding(2e-6, 1.2))
                .work(big)
                .run(move |t, i| t.op(&Op::ActivateBackward(act), i)),
        );
    }
    // GEGLU: a, g in [-3, 3], dy in [-1, 1]: |da| <= 3, |dg| <= 3 * 1.13.
    for (rows, d) in [(7, 33), (77, 1280), (1024, 1280), (3, 1)] {
        v.push(
            OpCase::new(format!("geglu_backward [{rows}, {d}]"))
                .input(Gen::uniform(rows * 2 * d, -3.0, 3.0))
                .input(Gen::uniform(rows * d, -1.0, 1.0))
                .tol(Tols::rounding(2e-6, 3.5))
                .work(rows * d)
                .run(move |t, i| t.op(&Op::GegluBackward { rows_d: (rows, d) }, i)),
        );
    }
    // Nearest upsampling: sums of four values in [-3, 3], in the CPU's order (exact in f32).
    for (p, h, w) in [
        (6, 9, 11),
        (2, 1, 1),
        (3, 5, 7),
        (1280, 8, 8),
        (640, 32, 32),
    ] {
        v.push(
            OpCase::new(format!("upsample_nearest2x_backward [{p}, {h}, {w}]"))
                .input(Gen::uniform(4 * p * h * w, -3.0, 3.0))
                .tol(Tols::rounding(0.0, 12.0))
                .work(4 * p * h * w)
                .run(move |t, i| t.op(&Op::UpsampleNearest2xBackward { dims: (p, h, w) }, i)),
        );
    }
    // The skip concatenations' split: values moved.
    for (b, ca, cb, hw) in [(2, 5, 7, 30), (1, 640, 320, 64), (2, 1280, 640, 16)] {
        v.push(
            OpCase::new(format!("split_channels b{b} {ca}+{cb} hw{hw}"))
                .input(Gen::normal(b * (ca + cb) * hw, 1.0))
                .tol(Tols::EXACT)
                .work(b * (ca + cb) * hw)
                .run(move |t, i| {
                    t.op(
                        &Op::SplitChannels {
                            dims: (b, ca, cb, hw),
                        },
                        i,
                    )
                }),
        );
    }
    // The f32 -> T rounding (values normal, |x| < 20 but for a 6.7-sigma draw; f32: exact).
    v.push(
        OpCase::new("cast_from_f32 n1000")
            .input(Gen::normal(1000, 3.0).f32())
            .tol(Tols::rounding(0.0, 20.0))
            .work(1000)
            .run(|t, i| t.cast_from_f32(&i[0])),
    );
}
