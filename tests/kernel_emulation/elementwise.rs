//! Element-wise kernels (kernels/elementwise.cu) against the CPU backend.

use half::{bf16, f16};
use hdb::backend::cuda::ops;
use hdb::backend::{Activation, Backend, Cpu};

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};
use crate::{rounding_tol, EXACT};

// ---------------------------------------------------------------------------------------------
// Softmax of f32 scores into T (softmax_rows_from_f32_*)
// ---------------------------------------------------------------------------------------------

fn softmax_case<T: Elem>(rows: usize, n: usize, scale: f32) {
    let what = format!(
        "softmax_rows_from_f32_{} {rows} x {n} (scores x {scale})",
        T::SUFFIX
    );
    // f32 scores, as the materialised attention's first GEMM writes them: not rounded to T.
    let x = rand_vec(rows * n, (rows * 7 + n) as u64, -scale, scale);
    let mut want = x.clone();
    hdb::backend::cpu::softmax_rows(&mut want, rows, n);
    let mut job = Job::new();
    let xa = job.input(&<f32 as Elem>::bytes(&x));
    let ya = job.output(rows * n * std::mem::size_of::<T>());
    job.launch(&ops::softmax_rows_from_f32_launch::<T>(ya, xa, rows, n).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // One rounding of each probability to T.
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-6,
            max_abs: 1e-6,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 1e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 8e-3,
        },
    );
    check(&what, &got, &want, tol);
}

#[test]
fn softmax_of_f32_scores_matches_cpu() {
    // Rows shorter than a warp, not a multiple of 32, more rows than a block's 8 warps, and
    // large scores (where rounding them to T first would show).
    for (rows, n, scale) in [(3, 5, 1.0), (17, 77, 4.0), (9, 300, 40.0), (1, 1, 1.0)] {
        softmax_case::<f32>(rows, n, scale);
        softmax_case::<f16>(rows, n, scale);
        softmax_case::<bf16>(rows, n, scale);
    }
}
// ---------------------------------------------------------------------------------------------
// b. GELU and quick GELU (gelu_*, quick_gelu_*)
// ---------------------------------------------------------------------------------------------

fn activation_case<T: Elem>(act: Activation) {
    let what = format!("{act:?} {}", T::SUFFIX);
    // The usual range, then the large negative tail (where 1 + erf cancels) and large values.
    let mut x = rand_vec(3000, 7, -6.0, 6.0);
    x.extend(rand_vec(500, 8, -40.0, -5.0));
    x.extend([
        -1e4, -300.0, -88.0, -20.0, -10.0, -5.5, 0.0, -0.0, 1e-3, 5.5, 20.0, 300.0, 1e4,
    ]);
    x.extend(rand_vec(1000, 9, 5.0, 40.0));
    let x = T::round(&x);
    let n = x.len();
    let mut want = x.clone();
    Cpu.activate(&mut want, act).expect("CPU activation");

    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let l = match act {
        Activation::Gelu => ops::gelu_launch::<T>(xa, n).expect("launch plan"),
        Activation::QuickGelu => ops::quick_gelu_launch::<T>(xa, n).expect("launch plan"),
        Activation::Silu => unreachable!("not a case"),
    };
    job.launch(&l);
    let got = T::values(&job.run(&what, &[xa])[0]);
    // One rounding of the output: half an ulp of the type, relative (plus the f32 erf/exp
    // differences, a few f32 ulps).
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 1e-6,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 1e4 * 1e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 1e4 * 8e-3,
        },
    );
    check(&what, &got, &want, tol);
    // Element by element too: a relative error per element (the tail values are tiny).
    let ulp = match T::SUFFIX {
        "f32" => 1e-5,
        "f16" => 1e-3,
        _ => 8e-3,
    };
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let err = (g - w).abs();
        // f16 flushes results below its subnormal range; allow its smallest step there.
        let floor = if T::SUFFIX == "f16" { 6e-8 } else { 1e-37 };
        assert!(
            err <= ulp * w.abs() + floor && !g.is_nan(),
            "{what}: element {i} (x = {}): got {g}, want {w}",
            x[i]
        );
    }
}

#[test]
fn gelu_and_quick_gelu_match_cpu() {
    for act in [Activation::Gelu, Activation::QuickGelu] {
        activation_case::<f32>(act);
        activation_case::<f16>(act);
        activation_case::<bf16>(act);
    }
}

// ---------------------------------------------------------------------------------------------
// The rest of elementwise.cu: these ran on an H100 (tests/cuda_parity/); here they guard
// kernel edits made without a GPU. The elementwise contract grid-strides, so any grid is
// right: what these check is the indexing, the kernel's name and its argument list.
// ---------------------------------------------------------------------------------------------

fn size_of<T>() -> usize {
    std::mem::size_of::<T>()
}

fn geglu_case<T: Elem>(rows: usize, d: usize) {
    let what = format!("geglu_{} {rows} x {d}", T::SUFFIX);
    let x = T::round(&rand_vec(rows * 2 * d, (rows * 31 + d) as u64, -4.0, 4.0));
    let mut want = vec![0.0; rows * d];
    hdb::backend::cpu::geglu(&mut want, &x, rows, d);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.output(rows * d * size_of::<T>());
    job.launch(&ops::geglu_launch::<T>(ya, xa, rows, d).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // |x| <= 4, so |y| <= 16; erf in f32 on both sides, a few ulps apart.
    check(&what, &got, &want, rounding_tol::<T>(2e-6, 16.0));
}

fn silu_case<T: Elem>(n: usize) {
    let what = format!("silu_{} n {n}", T::SUFFIX);
    let mut x = rand_vec(n, n as u64, -8.0, 8.0);
    x.extend([-100.0, -20.0, -0.0, 0.0, 20.0, 100.0]);
    let x = T::round(&x);
    let mut want = x.clone();
    hdb::backend::cpu::silu_inplace(&mut want);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    job.launch(&ops::silu_launch::<T>(xa, x.len()).expect("launch plan"));
    let got = T::values(&job.run(&what, &[xa])[0]);
    check(&what, &got, &want, rounding_tol::<T>(2e-6, 100.0));
}

#[test]
fn geglu_and_silu_match_cpu() {
    // Outputs not a multiple of the 256-thread block; d odd, and SD's 1280 with one row.
    for (rows, d) in [(3, 5), (17, 77), (1, 1280)] {
        geglu_case::<f32>(rows, d);
        geglu_case::<f16>(rows, d);
        geglu_case::<bf16>(rows, d);
    }
    for n in [1, 1000] {
        silu_case::<f32>(n);
        silu_case::<f16>(n);
        silu_case::<bf16>(n);
    }
}

fn softmax_inplace_case<T: Elem>(rows: usize, n: usize, scale: f32) {
    let what = format!(
        "softmax_rows_{} {rows} x {n} (x {scale}), in place",
        T::SUFFIX
    );
    let x = T::round(&rand_vec(rows * n, (rows * 5 + n) as u64, -scale, scale));
    let mut want = x.clone();
    hdb::backend::cpu::softmax_rows(&mut want, rows, n);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    job.launch(&ops::softmax_rows_launch::<T>(xa, rows, n).expect("launch plan"));
    let got = T::values(&job.run(&what, &[xa])[0]);
    // Probabilities <= 1; the CPU's exp is its own (SIMD) one.
    check(&what, &got, &want, rounding_tol::<T>(2e-6, 1.0));
}

#[test]
fn softmax_rows_in_place_matches_cpu() {
    // Rows shorter than a warp, over a block's 8 warps (a partial second block), long rows.
    for (rows, n, scale) in [(3, 5, 1.0), (17, 77, 4.0), (9, 300, 20.0), (1, 1, 1.0)] {
        softmax_inplace_case::<f32>(rows, n, scale);
        softmax_inplace_case::<f16>(rows, n, scale);
        softmax_inplace_case::<bf16>(rows, n, scale);
    }
}

fn timestep_case<T: Elem>(dim: usize, flip: bool, shift: f32) {
    let what = format!(
        "timestep_embedding_{} dim {dim} flip {flip} shift {shift}",
        T::SUFFIX
    );
    // SD's range of timesteps, fractional ones (DPM-style schedules) and 0.
    let t = [0.0f32, 1.0, 17.5, 261.0, 500.25, 999.0, 3.0];
    let n = t.len();
    let mut want = vec![0.0; n * dim];
    hdb::backend::cpu::timestep_embedding(&mut want, &t, dim, flip, shift, 10000.0);
    let mut job = Job::new();
    let ta = job.input(&f32::bytes(&t));
    let ya = job.output(n * dim * size_of::<T>());
    job.launch(
        &ops::timestep_embedding_launch::<T>(ya, ta, n, dim, (flip, shift, 10000.0))
            .expect("launch plan"),
    );
    let got = T::values(&job.run(&what, &[ya])[0]);
    // The same f32 steps and f64 sin/cos as the CPU: equal in f32 up to the host libm's
    // double exp/sin/cos, which the two share here.
    check(&what, &got, &want, rounding_tol::<T>(1e-7, 1.0));
}

#[test]
fn timestep_embedding_matches_cpu() {
    // SD 1.5's 320 (flip, shift 0), diffusers' default (no flip, shift 1), an odd dim (a zero
    // last column) and one under a warp.
    for (dim, flip, shift) in [
        (320, true, 0.0),
        (320, false, 1.0),
        (33, true, 0.0),
        (33, false, 1.0),
        (7, false, 0.0),
    ] {
        timestep_case::<f32>(dim, flip, shift);
        timestep_case::<f16>(dim, flip, shift);
        timestep_case::<bf16>(dim, flip, shift);
    }
}

fn upsample_case<T: Elem>(planes: usize, h: usize, w: usize) {
    let what = format!("upsample_nearest2x_{} {planes} x {h} x {w}", T::SUFFIX);
    let x = T::round(&rand_vec(
        planes * h * w,
        (planes + h * 7 + w) as u64,
        -3.0,
        3.0,
    ));
    let mut want = vec![0.0; 4 * x.len()];
    hdb::backend::cpu::upsample_nearest2x(&mut want, &x, planes, h, w);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ya = job.output(want.len() * size_of::<T>());
    job.launch(&ops::upsample_nearest2x_launch::<T>(ya, xa, planes, h, w).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    check(&what, &got, &want, EXACT);
}

#[test]
fn upsample_nearest2x_matches_cpu() {
    for (planes, h, w) in [(3, 5, 7), (2, 1, 1), (5, 16, 9)] {
        upsample_case::<f32>(planes, h, w);
        upsample_case::<f16>(planes, h, w);
        upsample_case::<bf16>(planes, h, w);
    }
}

fn add_case<T: Elem>(n: usize) {
    let what = format!("add_{} n {n} (in place, as add_inplace)", T::SUFFIX);
    let y = T::round(&rand_vec(n, n as u64, -4.0, 4.0));
    let x = T::round(&rand_vec(n, n as u64 + 1, -4.0, 4.0));
    let mut want = y.clone();
    hdb::backend::cpu::add_inplace(&mut want, &x);
    let mut job = Job::new();
    let ya = job.input(&T::bytes(&y));
    let xa = job.input(&T::bytes(&x));
    job.launch(&ops::add_launch::<T>(ya, ya, xa, n).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    // One f32 addition on both sides (exact in f32), then one rounding.
    check(&what, &got, &want, rounding_tol::<T>(0.0, 8.0));
}

fn add_channel_bias_case<T: Elem>(batch: usize, channels: usize, hw: usize) {
    let what = format!("add_channel_bias_{} {batch} x {channels} x {hw}", T::SUFFIX);
    let y = T::round(&rand_vec(batch * channels * hw, hw as u64, -4.0, 4.0));
    let v = T::round(&rand_vec(batch * channels, channels as u64, -4.0, 4.0));
    let mut want = y.clone();
    hdb::backend::cpu::add_channel_bias(&mut want, &v, batch, channels, hw);
    let mut job = Job::new();
    let ya = job.input(&T::bytes(&y));
    let va = job.input(&T::bytes(&v));
    job.launch(
        &ops::add_channel_bias_launch::<T>(ya, va, (batch, channels, hw)).expect("launch plan"),
    );
    let got = T::values(&job.run(&what, &[ya])[0]);
    check(&what, &got, &want, rounding_tol::<T>(0.0, 8.0));
}

fn add_bias_rows_case<T: Elem>(rows: usize, n: usize) {
    let what = format!("add_bias_rows_{} {rows} x {n}", T::SUFFIX);
    let y = T::round(&rand_vec(rows * n, (rows + n) as u64, -4.0, 4.0));
    let b = T::round(&rand_vec(n, n as u64 + 3, -4.0, 4.0));
    let want: Vec<f32> = y.iter().enumerate().map(|(i, &v)| v + b[i % n]).collect();
    let mut job = Job::new();
    // y at an offset into its buffer, as the op's `At` passes it.
    let off = 3;
    let mut y_buf = vec![0.0; off];
    y_buf.extend(&y);
    let ya = job.input(&T::bytes(&y_buf));
    let ba = job.input(&T::bytes(&b));
    let y_at = ya + (off * size_of::<T>()) as u64;
    job.launch(&ops::add_bias_rows_launch::<T>(y_at, ba, rows, n).expect("launch plan"));
    let got = T::values(&job.run(&what, &[ya])[0]);
    assert!(
        got[..off].iter().all(|&v| v == 0.0),
        "{what}: wrote before y"
    );
    check(&what, &got[off..], &want, rounding_tol::<T>(0.0, 8.0));
}

#[test]
fn additions_match_cpu() {
    for n in [1, 777] {
        add_case::<f32>(n);
        add_case::<f16>(n);
        add_case::<bf16>(n);
    }
    for (batch, channels, hw) in [(2, 3, 5), (2, 7, 77), (1, 40, 1)] {
        add_channel_bias_case::<f32>(batch, channels, hw);
        add_channel_bias_case::<f16>(batch, channels, hw);
        add_channel_bias_case::<bf16>(batch, channels, hw);
    }
    for (rows, n) in [(1, 1), (5, 77), (3, 320)] {
        add_bias_rows_case::<f32>(rows, n);
        add_bias_rows_case::<f16>(rows, n);
        add_bias_rows_case::<bf16>(rows, n);
    }
}
