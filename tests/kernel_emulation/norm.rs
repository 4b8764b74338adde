//! Normalisation kernels (kernels/norm.cu) against the CPU backend. These ran on an H100
//! (tests/cuda_parity/); here they guard kernel edits made without a GPU.

use half::{bf16, f16};
use hdb::backend::cuda::ops;

use crate::harness::{check, rand_vec, Elem, Job};
use crate::rounding_tol;

/// `chunks` 1: the one-block-per-run kernel; more: the split pair (stats, then apply).
fn group_norm_case<T: Elem>(
    (batch, channels, hw, groups): (usize, usize, usize, usize),
    chunks: usize,
    silu: bool,
) {
    let what = format!(
        "group_norm{}_{} {batch} x {channels} x {hw}, {groups} groups, {chunks} chunks",
        if silu { "_silu" } else { "" },
        T::SUFFIX
    );
    let n = batch * channels * hw;
    let seed = (channels * 17 + hw + groups) as u64;
    // A mean away from 0 (the second sweep's centring matters) and a spread of a few units.
    let x = T::round(&rand_vec(n, seed, -1.0, 3.0));
    let gamma = T::round(&rand_vec(channels, seed + 1, 0.5, 1.5));
    let beta = T::round(&rand_vec(channels, seed + 2, -0.5, 0.5));
    let eps = 1e-5;
    let mut want = vec![0.0; n];
    hdb::backend::cpu::group_norm(
        &mut want, &x, &gamma, &beta, batch, channels, hw, groups, eps, silu,
    );
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ga = job.input(&T::bytes(&gamma));
    let ba = job.input(&T::bytes(&beta));
    let ya = job.output(n * std::mem::size_of::<T>());
    let shape = (batch, channels, hw);
    if chunks == 1 {
        job.launch(
            &ops::group_norm_launch::<T>([ya, xa, ga, ba], shape, groups, eps, silu)
                .expect("launch plan"),
        );
    } else {
        let stats = job.output(batch * groups * chunks * 2 * 4);
        let addrs = [ya, xa, ga, ba];
        for l in ops::group_norm_split_launches::<T>(addrs, stats, shape, groups, chunks, eps, silu)
            .expect("launch plan")
        {
            job.launch(&l);
        }
    }
    let got = T::values(&job.run(&what, &[ya])[0]);
    // |x_hat| < 2.5 (uniform data), gamma < 1.5: |y| < 4.5. f32 statistics against the CPU's
    // f64 ones: a few f32 ulps.
    check(&what, &got, &want, rounding_tol::<T>(4e-6, 4.5));
}

#[test]
fn group_norm_matches_cpu() {
    // (batch, channels, hw, groups): groups of several channels; a group's run under the
    // 512-thread block (4 x 77), over it and not a multiple (16 x 45 = 720, 4 x 1000), one
    // channel a group, and hw 1.
    for shape in [
        (2, 32, 77, 8),
        (1, 64, 45, 4),
        (2, 12, 1000, 3),
        (1, 6, 5, 6),
        (3, 8, 1, 2),
    ] {
        for silu in [false, true] {
            group_norm_case::<f32>(shape, 1, silu);
            group_norm_case::<f16>(shape, 1, silu);
            group_norm_case::<bf16>(shape, 1, silu);
        }
    }
}

#[test]
fn group_norm_split_matches_cpu() {
    // The split pair: chunks that divide the run (4 x 1000 in 4), that do not (16 x 45 = 720 in
    // 7), chunks past the end (5 elements in 7 chunks: two are empty), and 4 elements in 2.
    // (Not one element a run: its variance is 0, rstd = 1/sqrt(eps), and the CPU's
    // scale-and-shift form then rounds differently from x - mean = 0 by ~1e-4.)
    for (shape, chunks) in [
        ((2, 12, 1000, 3), 4),
        ((1, 64, 45, 4), 7),
        ((1, 6, 5, 6), 3),
        ((2, 10, 1, 2), 7),
        ((3, 8, 2, 4), 2),
    ] {
        for silu in [false, true] {
            group_norm_case::<f32>(shape, chunks, silu);
            group_norm_case::<f16>(shape, chunks, silu);
            group_norm_case::<bf16>(shape, chunks, silu);
        }
    }
}

fn layer_norm_case<T: Elem>(rows: usize, dim: usize) {
    let what = format!("layer_norm_{} {rows} x {dim}", T::SUFFIX);
    let seed = (rows * 3 + dim) as u64;
    let x = T::round(&rand_vec(rows * dim, seed, -1.0, 3.0));
    let gamma = T::round(&rand_vec(dim, seed + 1, 0.5, 1.5));
    let beta = T::round(&rand_vec(dim, seed + 2, -0.5, 0.5));
    let eps = 1e-5;
    let mut want = vec![0.0; rows * dim];
    hdb::backend::cpu::layer_norm(&mut want, &x, &gamma, &beta, rows, dim, eps);
    let mut job = Job::new();
    let xa = job.input(&T::bytes(&x));
    let ga = job.input(&T::bytes(&gamma));
    let ba = job.input(&T::bytes(&beta));
    let ya = job.output(rows * dim * std::mem::size_of::<T>());
    job.launch(
        &ops::layer_norm_launch::<T>([ya, xa, ga, ba], rows, dim, eps).expect("launch plan"),
    );
    let got = T::values(&job.run(&what, &[ya])[0]);
    check(&what, &got, &want, rounding_tol::<T>(4e-6, 4.5));
}

#[test]
fn layer_norm_matches_cpu() {
    // SD 1.5's transformer widths and CLIP's 768, and an odd one; 9 rows: a block of 8 warps
    // and a second block with one.
    for dim in [320, 768, 1280, 77] {
        layer_norm_case::<f32>(9, dim);
        layer_norm_case::<f16>(9, dim);
        layer_norm_case::<bf16>(9, dim);
    }
    layer_norm_case::<f32>(1, 5);
}
