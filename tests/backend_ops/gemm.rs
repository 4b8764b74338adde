//! Memory, linear (cuBLAS), and conv2d: the backend's choice, im2col + GEMM (`conv.cu`'s
//! im2col), and the implicit GEMM (`conv_igemm.cu`) with its split-K.

use hdb::backend::cuda::ops;
use hdb::backend::Conv2d;

use crate::emulation::SMS;
use crate::harness::{Gen, OpCase, Tols, HALF};
use crate::target::Op;

#[allow(clippy::too_many_arguments)]
pub fn conv(
    batch: usize,
    c_in: usize,
    c_out: usize,
    (h, w): (usize, usize),
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

fn conv_name(op: &str, p: &Conv2d, bias: bool) -> String {
    format!(
        "{op} b{} {}->{} {}x{} k{} s{} p{}{}",
        p.batch,
        p.c_in,
        p.c_out,
        p.h,
        p.w,
        p.kernel,
        p.stride,
        p.padding,
        if bias { "" } else { " nobias" }
    )
}

fn conv_work(p: &Conv2d) -> usize {
    let (oh, ow) = p.out_hw();
    p.batch * p.c_out * oh * ow * p.c_in * p.kernel * p.kernel
}

/// x, w (scaled by 1 / sqrt(fan in)) and bias for a conv of shape `p`.
fn conv_inputs(c: OpCase, p: &Conv2d) -> OpCase {
    let kk = p.c_in * p.kernel * p.kernel;
    c.input(Gen::normal(p.batch * p.c_in * p.h * p.w, 1.0))
        .input(Gen::normal(p.c_out * kk, 1.0 / (kk as f32).sqrt()))
        .input(Gen::normal(p.c_out, 0.5))
        .work(conv_work(p))
}

/// conv2d as im2col + GEMM: the kernels' work is im2col's (and the bias); the GEMM is
/// cuBLAS's (emulated natively on the emulated GPU, on the host under the kernel emulation).
fn im2col_gemm(p: Conv2d) -> OpCase {
    let (oh, ow) = p.out_hw();
    conv_inputs(OpCase::new(conv_name("conv2d_im2col", &p, true)), &p)
        .tol(Tols::GEMM)
        .work(p.batch * p.c_in * p.kernel * p.kernel * oh * ow)
        .run(move |t, i| t.conv2d_im2col(&i[0], &i[1], Some(&i[2]), &p))
}

pub fn cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    // Upload/download gives back what the device holds (the rounded values), exactly; a copy
    // owns its values; a weight reads back through a linear with the identity.
    v.push(
        OpCase::new("round_trip n1001")
            .input(Gen::normal(1001, 3.0))
            .tol(Tols::EXACT)
            .run(|t, i| t.op(&Op::RoundTrip, i)),
    );
    v.push(
        OpCase::new("copy n1001")
            .input(Gen::normal(1001, 3.0))
            .tol(Tols::EXACT)
            .run(|t, i| t.op(&Op::Copy, i)),
    );
    v.push(
        OpCase::new("weight n37")
            .input(Gen::normal(37, 1.0))
            .tol(Tols::one_rounding(1e-7))
            .run(|t, i| t.op(&Op::Weight, i)),
    );

    // Linear: SD's transformer widths, CLIP's q projection at batch 2, odd sizes, with and
    // without bias.
    for (rows, din, dout, bias) in [
        (8192, 320, 320, false),
        (154, 768, 640, true),
        (7, 13, 5, true),
        (154, 768, 768, true),
        (5, 33, 17, false),
        (4096, 320, 40, true),
    ] {
        v.push(
            OpCase::new(format!(
                "linear [{rows}, {din}] -> {dout}{}",
                if bias { " +bias" } else { "" }
            ))
            .input(Gen::normal(rows * din, 1.0))
            .input(Gen::normal(dout * din, 1.0 / (din as f32).sqrt()))
            .input(Gen::normal(dout, 0.5))
            .tol(Tols::GEMM)
            // The GEMM is cuBLAS's (emulated natively): the kernels add the bias.
            .work(rows * dout)
            .run(move |t, i| {
                t.op(
                    &Op::Linear {
                        dims: (rows, din, dout),
                        bias,
                    },
                    i,
                )
            }),
        );
    }

    // conv2d as the backend picks it (the implicit GEMM for f16/bf16 up to 512 output
    // channels and wherever im2col's scratch would pass 256 MB, else im2col + cuBLAS).
    for (p, bias) in [
        // 3x3 stride 1 (resnets), padding 1
        (conv(2, 16, 32, (24, 20), 3, 1, 1), true),
        // 3x3 stride 2 (UNet downsampler, odd sizes), padding 1
        (conv(2, 8, 12, (17, 15), 3, 2, 1), true),
        // 3x3 stride 2 unpadded (the VAE encoder's downsampler after pad_bottom_right)
        (conv(1, 8, 8, (17, 17), 3, 2, 0), true),
        // 1x1 (shortcuts, proj_in/out), with and without bias
        (conv(2, 32, 16, (10, 12), 1, 1, 0), true),
        (conv(3, 5, 4, (7, 9), 1, 1, 0), false),
        // An im2col scratch above the backend's 256 MB cap in f16/bf16 (256 x 9 x 256 x 256
        // x 2 bytes = 302 MB): the implicit GEMM runs there, as in the VAE at 512 x 512.
        (conv(1, 256, 8, (256, 256), 3, 1, 1), true),
    ] {
        v.push(
            conv_inputs(OpCase::new(conv_name("conv2d", &p, bias)), &p)
                .tol(Tols::GEMM)
                .run(move |t, i| t.op(&Op::Conv2d { p, bias }, i)),
        );
    }

    // conv2d as im2col + cuBLAS whatever the backend would pick: 3x3, stride 2, 1x1 (one
    // batched GEMM, no im2col), conv_in's 4 channels.
    for p in [
        conv(2, 320, 320, (32, 32), 3, 1, 1),
        conv(2, 64, 128, (16, 16), 3, 2, 1),
        conv(2, 640, 320, (16, 16), 1, 1, 0),
        conv(2, 4, 32, (9, 9), 3, 1, 1),
    ] {
        v.push(im2col_gemm(p));
    }

    // im2col alone, against conv.cu's documented layout: 3x3 pad 1 with an output not a
    // multiple of the block, stride 2 with odd sides, 1x1 (conv2d skips im2col for stride 1,
    // but the kernel takes it), 1x1 stride 2, and 5x5.
    for p in [
        conv(2, 3, 4, (7, 9), 3, 1, 1),
        conv(2, 2, 3, (9, 7), 3, 2, 1),
        conv(1, 5, 2, (6, 5), 1, 1, 0),
        conv(1, 3, 2, (7, 7), 1, 2, 0),
        conv(1, 2, 2, (6, 6), 5, 1, 2),
    ] {
        v.push(
            OpCase::new(conv_name("im2col", &p, false))
                .input(Gen::uniform(p.batch * p.c_in * p.h * p.w, -2.0, 2.0))
                .tol(Tols::EXACT)
                .work(conv_work(&p))
                .run_outputs(move |t, i| t.im2col(&i[0], &p)),
        );
        // ... and its layout is the one conv2d's GEMM expects: W . cols + bias is the CPU's
        // convolution.
        v.push(im2col_gemm(p));
    }

    v.extend(implicit_cases());
    v
}

/// `ops::conv2d_implicit_with` (f16/bf16): the edges of its tiles and its split-K.
fn implicit_cases() -> Vec<OpCase> {
    let mut v = Vec::new();
    let mut add = |p: Conv2d, bias: bool, splits: &[Option<usize>]| {
        for &s in splits {
            let wanted = s.unwrap_or_else(|| ops::conv2d_implicit_splits(&p, SMS));
            let used = ops::conv2d_implicit_plan(&p, wanted)
                .expect("a plan")
                .splits;
            let name = format!(
                "{} split {used}{}",
                conv_name("conv2d_implicit", &p, bias),
                match s {
                    Some(s) if s != used => format!(" (asked {s})"),
                    Some(_) => String::new(),
                    None => " (heuristic)".into(),
                }
            );
            v.push(
                conv_inputs(OpCase::new(name), &p)
                    .dtypes(HALF)
                    .tol(Tols::GEMM)
                    .run(move |t, i| {
                        t.conv2d_implicit(&i[0], &i[1], bias.then_some(&i[2][..]), &p, s)
                    }),
            );
        }
    };
    let every = [None, Some(1), Some(3)];
    let heuristic = [None];
    // SD shapes: the first and the last also with no split and with 3 slices.
    add(conv(2, 320, 320, (32, 32), 3, 1, 1), true, &every);
    add(conv(2, 64, 128, (16, 16), 3, 2, 1), true, &heuristic);
    add(conv(2, 640, 320, (16, 16), 1, 1, 0), true, &heuristic);
    add(conv(2, 4, 32, (9, 9), 3, 1, 1), true, &heuristic);
    // conv_in / conv_out channel counts.
    add(conv(2, 4, 320, (16, 16), 3, 1, 1), true, &heuristic);
    add(conv(2, 320, 4, (16, 16), 3, 1, 1), true, &heuristic);
    // c_in 3 (rows of 27, not a multiple of 8: the 2-byte weight path), odd spatial sizes,
    // batch 3.
    add(conv(3, 3, 8, (11, 9), 3, 1, 1), true, &heuristic);
    add(conv(3, 24, 20, (7, 5), 3, 1, 1), true, &heuristic);
    // 1x1 without bias; stride 2 with c_out past one 128-row tile; k = 7 (the range-compare
    // gather).
    add(conv(2, 48, 33, (7, 5), 1, 1, 0), false, &heuristic);
    add(conv(3, 40, 136, (9, 7), 3, 2, 1), true, &heuristic);
    add(conv(1, 16, 8, (9, 9), 7, 1, 3), true, &heuristic);
    add(conv(2, 640, 256, (8, 8), 3, 1, 1), true, &every);
    // c_in * 9 = 45 (two k-tiles, the second partial, scalar weight loads), 9 x 11 = 99
    // pixels (a partial pixel tile), c_out 20 (a partial channel tile); with and without bias.
    add(conv(2, 5, 20, (9, 11), 3, 1, 1), true, &heuristic);
    add(conv(1, 5, 20, (9, 11), 3, 1, 1), false, &heuristic);
    // c_in * 9 = 144 (16-byte weight rows), c_out over one 128-row tile, 2 pixel tiles.
    add(conv(1, 16, 136, (10, 12), 3, 1, 1), true, &heuristic);
    // Stride 2 (the downsamplers), odd input.
    add(conv(2, 8, 24, (13, 9), 3, 2, 1), true, &heuristic);
    // 1x1 (no padding), c_in not a multiple of 8, odd pixel count.
    add(conv(2, 37, 40, (7, 5), 1, 1, 0), true, &heuristic);
    // 5x5 (k * k = 25 <= 32 taps in the mask) and 7x7 stride 2 (the range-compare path).
    add(conv(1, 3, 8, (8, 8), 5, 1, 2), true, &heuristic);
    add(conv(1, 3, 8, (9, 7), 7, 2, 3), false, &heuristic);
    // Split-K: 32 * 9 = 288 -> 9 k-tiles in 3 slices of 3; 4 asked of 9 tiles -> 3 slices
    // (3, 3, 3); 70 * 9 = 630 -> 20 k-tiles in 7 slices (the last one 2); with and without
    // bias (the reduce adds it).
    let splits = |p: &Conv2d, s: usize| ops::conv2d_implicit_plan(p, s).expect("a plan").splits;
    assert_eq!(splits(&conv(1, 32, 16, (6, 6), 3, 1, 1), 3), 3);
    assert_eq!(splits(&conv(2, 32, 16, (6, 5), 3, 1, 1), 4), 3);
    assert_eq!(splits(&conv(1, 70, 12, (5, 5), 3, 1, 1), 7), 7);
    add(conv(1, 32, 16, (6, 6), 3, 1, 1), true, &[Some(3)]);
    add(conv(2, 32, 16, (6, 5), 3, 1, 1), false, &[Some(4)]);
    add(conv(1, 70, 12, (5, 5), 3, 1, 1), true, &[Some(7)]);
    // What the heuristic picks for a small grid: 256 * 9 = 72 k-tiles at 4x4 splits.
    let small = conv(1, 256, 8, (4, 4), 3, 1, 1);
    assert!(ops::conv2d_implicit_splits(&small, SMS) > 1);
    add(small, true, &heuristic);
    v
}
