//! Convolution and layout kernels (kernels/conv.cu, kernels/conv_igemm.cu) against the CPU
//! backend.

use half::{bf16, f16};
use hdb::backend::cpu::Conv2d;
use hdb::backend::cuda::ops;
use hdb::backend::{Backend, Cpu};
use hdb::model::weights::F32Weight;

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};

// ---------------------------------------------------------------------------------------------
// c. Bottom-right zero padding (pad_bottom_right_*): never run on a GPU
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
// d. Implicit-GEMM convolution (conv2d_igemm_*, conv2d_igemm_reduce_*): never run on a GPU
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
