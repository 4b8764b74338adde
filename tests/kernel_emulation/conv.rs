//! Convolution and layout kernels (kernels/conv.cu, kernels/conv_igemm.cu) against the CPU
//! backend.

use half::{bf16, f16};
use hdb::backend::cuda::ops;
use hdb::backend::Conv2d;
use hdb::backend::{Backend, Cpu};
use hdb::io::F32Weight;

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};
use crate::EXACT;

// ---------------------------------------------------------------------------------------------
// c. Bottom-right zero padding (pad_bottom_right_*)
// ---------------------------------------------------------------------------------------------

fn pad_case<T: Elem>(planes: usize, h: usize, w: usize) {
    let what = format!("pad_bottom_right_{} {planes} x {h} x {w}", T::SUFFIX);
    let x = T::round(&rand_vec(planes * h * w, (h * 31 + w) as u64, -2.0, 2.0));
    let want = Cpu
        .pad_bottom_right(&x, (planes, h, w))
        .expect("CPU pad_bottom_right");
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.output(want.len() * std::mem::size_of::<T>());
    job.launch(&ops::pad_bottom_right_launch::<T>(ya, xa, planes, h, w).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // A copy: exact.
    check(
        &what,
        &got,
        &want,
        Tol {
            rel_l2: 0.0,
            max_abs: 0.0,
        },
    );
}

#[test]
fn pad_bottom_right_matches_cpu() {
    for (planes, h, w) in [(3, 7, 5), (2, 1, 1), (5, 17, 33), (1, 64, 63)] {
        pad_case::<f32>(planes, h, w);
        pad_case::<f16>(planes, h, w);
        pad_case::<bf16>(planes, h, w);
    }
}

// ---------------------------------------------------------------------------------------------
// d. Implicit-GEMM convolution (conv2d_igemm_*, conv2d_igemm_reduce_*)
// ---------------------------------------------------------------------------------------------

/// Runs `conv2d_implicit_with(.., splits)`'s launches; returns the split count used.
fn conv_case<T: Elem>(p: Conv2d, bias: bool, splits: Option<usize>) -> usize {
    let (oh, ow) = p.out_hw();
    let kk = p.c_in * p.kernel * p.kernel;
    let seed = (p.c_in * 7 + p.c_out * 13 + p.h * 3 + p.kernel) as u64;
    let x = T::round(&rand_vec(p.batch * p.c_in * p.h * p.w, seed, -1.0, 1.0));
    let wscale = 1.0 / (kk as f32).sqrt();
    let w = T::round(&rand_vec(p.c_out * kk, seed + 1, -wscale, wscale));
    let b = T::round(&rand_vec(p.c_out, seed + 2, -0.5, 0.5));
    let want = {
        let wt = Cpu.weight(F32Weight::Owned(w.clone())).expect("weight");
        let bt = Cpu.weight(F32Weight::Owned(b.clone())).expect("bias");
        Cpu.conv2d(&x, &wt, bias.then_some(&bt), &p)
            .expect("CPU conv2d")
    };
    // What conv2d_implicit_with does with no SM count to read: the heuristic for an H100's 132.
    let wanted = splits.unwrap_or_else(|| ops::conv2d_implicit_splits(&p, 132));
    let plan = ops::conv2d_implicit_plan(&p, wanted).expect("conv plan");
    let what = format!(
        "conv2d_igemm_{} {p:?} bias {bias} splits {} (asked {wanted})",
        T::SUFFIX,
        plan.splits
    );
    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let wa = job.input(&T::bytes(&w));
    let ba = if bias { job.input(&T::bytes(&b)) } else { 0 };
    let ya = job.output(p.batch * p.c_out * oh * ow * tsz);
    let pa = if plan.partial_len > 0 {
        job.output(plan.partial_len * 4)
    } else {
        0
    };
    for l in ops::conv2d_implicit_launches::<T>(&p, &plan, [ya, pa, xa, wa, ba]).expect("launches")
    {
        job.launch(&l);
    }
    let got = T::values(&job.run(&what, &[ya])[0]);
    // Operands are exact in T, the sum in f32: the output's one rounding dominates.
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-5,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 4e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 3e-2,
        },
    );
    check(&what, &got, &want, tol);
    plan.splits
}

fn conv(batch: usize, c_in: usize, hw: (usize, usize), c_out: usize, k: usize, s: usize) -> Conv2d {
    Conv2d {
        batch,
        c_in,
        h: hw.0,
        w: hw.1,
        c_out,
        kernel: k,
        stride: s,
        padding: k / 2,
    }
}

fn conv_cases<T: Elem>() {
    // 3x3 pad 1 stride 1: c_in * 9 = 45 (two k-tiles, the second partial, scalar weight loads),
    // 9 x 11 = 99 pixels (a partial pixel tile), c_out 20 (a partial channel tile).
    conv_case::<T>(conv(2, 5, (9, 11), 20, 3, 1), true, None);
    conv_case::<T>(conv(1, 5, (9, 11), 20, 3, 1), false, None);
    // c_in * 9 = 144 (16-byte weight rows), c_out over one 128-row tile, 2 pixel tiles.
    conv_case::<T>(conv(1, 16, (10, 12), 136, 3, 1), true, None);
    // Stride 2 (the downsamplers), odd input.
    conv_case::<T>(conv(2, 8, (13, 9), 24, 3, 2), true, None);
    // 1x1 (no padding), c_in not a multiple of 8, odd pixel count.
    conv_case::<T>(conv(2, 37, (7, 5), 40, 1, 1), true, None);
    // 5x5 (k * k = 25 <= 32 taps in the mask) and 7x7 (the range-compare path).
    conv_case::<T>(conv(1, 3, (8, 8), 8, 5, 1), true, None);
    conv_case::<T>(conv(1, 3, (9, 7), 8, 7, 2), false, None);
    // Split-K: 32 * 9 = 288 -> 9 k-tiles in 3 slices of 3; 4 slices of 3, 3, 3, 0 -> 3 slices;
    // with and without bias (the reduce adds it).
    assert_eq!(
        conv_case::<T>(conv(1, 32, (6, 6), 16, 3, 1), true, Some(3)),
        3
    );
    assert_eq!(
        conv_case::<T>(conv(2, 32, (6, 5), 16, 3, 1), false, Some(4)),
        3
    );
    // 70 * 9 = 630 -> 20 k-tiles, 7 slices of 3 (the last one 2).
    assert_eq!(
        conv_case::<T>(conv(1, 70, (5, 5), 12, 3, 1), true, Some(7)),
        7
    );
    // What the heuristic picks for a small grid: 256 * 9 = 72 k-tiles at 4x4 splits.
    assert!(conv_case::<T>(conv(1, 256, (4, 4), 8, 3, 1), true, None) > 1);
}

#[test]
fn implicit_conv_f16_matches_cpu() {
    conv_cases::<f16>();
}

#[test]
fn implicit_conv_bf16_matches_cpu() {
    conv_cases::<bf16>();
}

// ---------------------------------------------------------------------------------------------
// conv.cu's im2col, transpose and add_bias_channels: these ran on an H100 (tests/cuda_parity/);
// here they guard kernel edits made without a GPU.
// ---------------------------------------------------------------------------------------------

/// im2col of one sample x [c, h, w] as conv.cu's header documents it: cols [c * k * k, oh * ow],
/// row (ci, ky, kx), column (oy, ox), zero outside the image.
fn im2col_ref(x: &[f32], p: &Conv2d) -> Vec<f32> {
    let (oh, ow) = p.out_hw();
    let k = p.kernel;
    let mut cols = vec![0.0; p.c_in * k * k * oh * ow];
    for ci in 0..p.c_in {
        for ky in 0..k {
            for kx in 0..k {
                let row = (ci * k + ky) * k + kx;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                        let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w {
                            cols[row * oh * ow + oy * ow + ox] =
                                x[(ci * p.h + iy as usize) * p.w + ix as usize];
                        }
                    }
                }
            }
        }
    }
    cols
}

fn im2col_case<T: Elem>(p: Conv2d) {
    let what = format!("im2col_{} {p:?}", T::SUFFIX);
    let (oh, ow) = p.out_hw();
    let (plane, kk) = (p.c_in * p.h * p.w, p.c_in * p.kernel * p.kernel);
    let seed = (p.c_in * 5 + p.h * 3 + p.w + p.kernel + p.stride) as u64;
    let x = T::round(&rand_vec(p.batch * plane, seed, -2.0, 2.0));
    let tsz = std::mem::size_of::<T>();
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    // conv2d's per-sample launches (each sample's x at its offset), into one cols buffer each.
    let outs: Vec<u64> = (0..p.batch)
        .map(|b| {
            let ca = job.output(kk * oh * ow * tsz);
            let xb = xa + (b * plane * tsz) as u64;
            job.launch(&ops::im2col_launch::<T>(ca, xb, &p).expect("launch plan"));
            ca
        })
        .collect();
    let got = job.run(&what, &outs);
    for (b, cols) in got.iter().enumerate() {
        let want = im2col_ref(&x[b * plane..(b + 1) * plane], &p);
        check(
            &format!("{what} sample {b}"),
            &T::values(cols),
            &want,
            EXACT,
        );
    }
    // The reference's layout is the one conv2d's GEMM expects: W [c_out, kk] . cols + bias is
    // the CPU backend's convolution.
    if T::SUFFIX == "f32" {
        let w = rand_vec(p.c_out * kk, seed + 1, -0.5, 0.5);
        let bias = rand_vec(p.c_out, seed + 2, -0.5, 0.5);
        let mut want = vec![0.0; p.batch * p.c_out * oh * ow];
        hdb::backend::cpu::conv2d(&mut want, &x, &w, Some(&bias), &p);
        let mut y = Vec::with_capacity(want.len());
        for cols in &got {
            let cols = f32::values(cols);
            for o in 0..p.c_out {
                for j in 0..oh * ow {
                    let s: f64 = (0..kk)
                        .map(|r| w[o * kk + r] as f64 * cols[r * oh * ow + j] as f64)
                        .sum();
                    y.push((s + bias[o] as f64) as f32);
                }
            }
        }
        let tol = Tol {
            rel_l2: 1e-5,
            max_abs: 1e-4,
        };
        check(&format!("{what}: W . cols + bias"), &y, &want, tol);
    }
}

#[test]
fn im2col_matches_reference() {
    for p in [
        // 3x3 pad 1 stride 1, output not a multiple of the block.
        conv(2, 3, (7, 9), 4, 3, 1),
        // Stride 2 (the downsamplers), odd sides.
        conv(2, 2, (9, 7), 3, 3, 2),
        // 1x1 (conv2d skips im2col for stride 1, but the kernel takes it).
        conv(1, 5, (6, 5), 2, 1, 1),
        // 1x1 stride 2 and a 5x5.
        conv(1, 3, (7, 7), 2, 1, 2),
        conv(1, 2, (6, 6), 2, 5, 1),
    ] {
        im2col_case::<f32>(p);
        im2col_case::<f16>(p);
        im2col_case::<bf16>(p);
    }
}

fn transpose_case<T: Elem>(batch: usize, rows: usize, cols: usize) {
    let what = format!("transpose_{} {batch} x {rows} x {cols}", T::SUFFIX);
    let x = T::round(&rand_vec(
        batch * rows * cols,
        (rows * 7 + cols) as u64,
        -2.0,
        2.0,
    ));
    // NCHW -> NHWC with C = rows, HW = cols: y [batch, cols, rows].
    let mut want = vec![0.0; x.len()];
    hdb::backend::cpu::nchw_to_nhwc(&mut want, &x, batch, rows, cols);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.output(x.len() * std::mem::size_of::<T>());
    job.launch(&ops::transpose_launch::<T>(ya, xa, batch, rows, cols).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    check(&what, &got, &want, EXACT);
}

#[test]
fn transpose_matches_cpu() {
    // Partial 32 x 32 tiles on both sides, several tiles, a single column, and a whole tile.
    for (batch, rows, cols) in [(2, 5, 7), (3, 33, 70), (2, 40, 1), (1, 32, 64)] {
        transpose_case::<f32>(batch, rows, cols);
        transpose_case::<f16>(batch, rows, cols);
        transpose_case::<bf16>(batch, rows, cols);
    }
}

fn add_bias_channels_case<T: Elem>(batch: usize, channels: usize, hw: usize) {
    let what = format!(
        "add_bias_channels_{} {batch} x {channels} x {hw}",
        T::SUFFIX
    );
    let y = T::round(&rand_vec(batch * channels * hw, hw as u64, -4.0, 4.0));
    let b = T::round(&rand_vec(channels, channels as u64, -4.0, 4.0));
    let want: Vec<f32> = y
        .iter()
        .enumerate()
        .map(|(i, &v)| v + b[(i / hw) % channels])
        .collect();
    let mut job = Job::new();
    let ya = job.input(&T::bytes(&y));
    let ba = job.input(&T::bytes(&b));
    job.launch(
        &ops::add_bias_channels_launch::<T>(ya, ba, (batch, channels, hw)).expect("launch plan"),
    );
    let got = T::values(&job.run(&what, &[ya])[0]);
    // One f32 addition, then one rounding to T.
    check(&what, &got, &want, crate::rounding_tol::<T>(0.0, 8.0));
}

#[test]
fn add_bias_channels_matches_reference() {
    for (batch, channels, hw) in [(2, 3, 5), (2, 7, 77), (1, 40, 1)] {
        add_bias_channels_case::<f32>(batch, channels, hw);
        add_bias_channels_case::<f16>(batch, channels, hw);
        add_bias_channels_case::<bf16>(batch, channels, hw);
    }
}
