//! Element-wise kernels (kernels/elementwise.cu) against the CPU backend.

use half::{bf16, f16};
use hdb::backend::cuda::ops;
use hdb::backend::{Activation, Backend, Cpu};

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};

// ---------------------------------------------------------------------------------------------
// Softmax of f32 scores into T (softmax_rows_from_f32_*): never run on a GPU
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
// b. GELU and quick GELU (gelu_*, quick_gelu_*): never run on a GPU
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
        Activation::Gelu => ops::gelu_launch::<T>(xa, n),
        Activation::QuickGelu => ops::quick_gelu_launch::<T>(xa, n),
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
