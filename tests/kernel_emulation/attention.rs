//! Attention kernels (kernels/attention.cu) against the CPU backend.

use half::{bf16, f16};
use hdb::backend::cuda::ops::{self, AttnKernel, AttnShape, KernelLaunch};
use hdb::backend::{AttnDims, Backend, Cpu};

use crate::harness::{check, rand_vec, tol_for, Elem, Job, Tol};

/// Random q, k, v for `dims` (dense rows, rounded to T; scores of a few units, so the softmax
/// is neither flat nor one-hot), the CPU's attention of them, and the kernel `plan` picks for
/// the shape run on them: (kernel name, what it wrote, what the CPU gives).
fn attention_job<T: Elem>(
    dims: AttnDims,
    seed: u64,
    plan: impl FnOnce(&AttnShape, [u64; 4]) -> KernelLaunch,
) -> (String, Vec<f32>, Vec<f32>) {
    let hd = dims.heads * dims.head_dim;
    let q = T::round(&rand_vec(dims.batch * dims.lq * hd, seed, -1.5, 1.5));
    let k = T::round(&rand_vec(dims.batch * dims.lk * hd, seed + 1, -1.5, 1.5));
    let v = T::round(&rand_vec(dims.batch * dims.lk * hd, seed + 2, -1.0, 1.0));
    let want = Cpu.attention(&q, &k, &v, dims).expect("CPU attention");
    let mut job = Job::new();
    let qa = job.input(&T::bytes(&q));
    let ka = job.input(&T::bytes(&k));
    let va = job.input(&T::bytes(&v));
    let oa = job.output(want.len() * std::mem::size_of::<T>());
    let s = AttnShape::dense(dims.batch, dims.heads, dims.lq, dims.lk, dims.head_dim);
    let l = plan(&s, [oa, qa, ka, va]);
    let what = format!("{} {dims:?}", l.kernel);
    job.launch(&l);
    let got = T::values(&job.run(&what, &[oa])[0]);
    (l.kernel, got, want)
}

// ---------------------------------------------------------------------------------------------
// a. Causal attention (attention_scalar_causal_*)
// ---------------------------------------------------------------------------------------------

/// The scalar kernels' tolerance (causal and not): f32 throughout, one rounding of the output
/// (|out| <= 1) to T.
fn scalar_tol<T: Elem>() -> Tol {
    tol_for::<T>(
        Tol {
            rel_l2: 1e-5,
            max_abs: 1e-5,
        },
        Tol {
            rel_l2: 1e-3,
            max_abs: 2e-3,
        },
        Tol {
            rel_l2: 8e-3,
            max_abs: 1.6e-2,
        },
    )
}

fn causal_attention_case<T: Elem>(batch: usize, heads: usize, len: usize, d: usize) {
    let what = format!(
        "attention_scalar_causal_{} batch {batch} heads {heads} len {len} d {d}",
        T::SUFFIX
    );
    let dims = AttnDims {
        batch,
        lq: len,
        lk: len,
        heads,
        head_dim: d,
        causal: true,
    };
    let (_, got, want) = attention_job::<T>(dims, (len * 1000 + d) as u64, |s, at| {
        ops::attention_causal_launch::<T>(s, at).expect("launch plan")
    });
    let tol = scalar_tol::<T>();
    check(&what, &got, &want, tol);
}

#[test]
fn causal_attention_matches_cpu() {
    for (len, d) in [(7, 16), (77, 16), (7, 64), (77, 64)] {
        causal_attention_case::<f32>(2, 2, len, d);
        causal_attention_case::<f16>(2, 2, len, d);
        causal_attention_case::<bf16>(2, 2, len, d);
    }
    // Odd head dims and more than 32 keys a row beyond the first chunk.
    causal_attention_case::<f32>(1, 3, 40, 24);
}
// ---------------------------------------------------------------------------------------------
// e. The tensor-core attention kernels (flash_attn_*, flash2_attn_*, flash3_attn_*): these ran
//    on an H100; here they guard kernel edits and cross-check the emulated mma.sync, ldmatrix
//    and cp.async against kernels known to be right.
// ---------------------------------------------------------------------------------------------

fn flash_case<T: Elem>(kernel: AttnKernel, stem: &str, lq: usize, lk: usize, d: usize) {
    let dims = AttnDims {
        batch: 1,
        lq,
        lk,
        heads: 2,
        head_dim: d,
        causal: false,
    };
    let (name, got, want) = attention_job::<T>(dims, (lq * 100 + lk * 7 + d) as u64, |s, at| {
        ops::attention_launch::<T>(s, kernel, at).expect("launch plan")
    });
    assert_eq!(
        name,
        format!("{stem}_d{d}_{}", T::SUFFIX),
        "{kernel:?} at d = {d} picks"
    );
    let what = format!("{name} lq {lq} lk {lk}");
    // P is rounded to T before P v (FlashAttention-2's precision): ~1e-3 (f16), ~8e-3 (bf16).
    let tol = tol_for::<T>(
        Tol {
            rel_l2: 0.0,
            max_abs: 0.0,
        },
        Tol {
            rel_l2: 2e-3,
            max_abs: 4e-3,
        },
        Tol {
            rel_l2: 1.2e-2,
            max_abs: 3e-2,
        },
    );
    check(&what, &got, &want, tol);
}

fn flash_cases<T: Elem>() {
    // Partial query and key tiles (lq 70 of 64-row tiles, lk 77 of 64- or 32-key tiles).
    flash_case::<T>(AttnKernel::Flash1, "flash_attn", 70, 77, 40);
    // flash_attn_* at its other head dims (d160: 32-key tiles).
    flash_case::<T>(AttnKernel::Flash1, "flash_attn", 20, 77, 64);
    flash_case::<T>(AttnKernel::Flash1, "flash_attn", 20, 77, 80);
    flash_case::<T>(AttnKernel::Flash1, "flash_attn", 20, 77, 160);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 70, 77, 40);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 70, 77, 80);
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 33, 77, 160);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 150, 77, 40);
    // More than two key tiles (the double buffer wraps) and a single short one.
    flash_case::<T>(AttnKernel::Flash2, "flash2_attn", 20, 200, 64);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 20, 150, 40);
    flash_case::<T>(AttnKernel::Flash3, "flash3_attn", 5, 3, 40);
}

#[test]
fn flash_attention_f16_matches_cpu() {
    flash_cases::<f16>();
}

#[test]
fn flash_attention_bf16_matches_cpu() {
    flash_cases::<bf16>();
}

// ---------------------------------------------------------------------------------------------
// The non-causal scalar kernel (attention_scalar_*): ran on an H100; here for kernel edits
// without a GPU. Any dtype, any head dim up to 256, lq != lk (cross-attention).
// ---------------------------------------------------------------------------------------------

fn scalar_case<T: Elem>(batch: usize, heads: usize, lq: usize, lk: usize, d: usize) {
    let dims = AttnDims {
        batch,
        lq,
        lk,
        heads,
        head_dim: d,
        causal: false,
    };
    let (name, got, want) = attention_job::<T>(dims, (lq * 31 + lk * 5 + d) as u64, |s, at| {
        ops::attention_launch::<T>(s, AttnKernel::Scalar, at).expect("launch plan")
    });
    assert_eq!(name, format!("attention_scalar_{}", T::SUFFIX));
    let what = format!("{name} batch {batch} heads {heads} lq {lq} lk {lk} d {d}");
    let tol = scalar_tol::<T>();
    check(&what, &got, &want, tol);
}

#[test]
fn scalar_attention_matches_cpu() {
    // Query rows not a multiple of the block's 4 warps, more than 32 keys and a partial chunk,
    // fewer keys than a warp.
    for d in [24, 40, 64, 160] {
        scalar_case::<f32>(2, 2, 7, 77, d);
        scalar_case::<f16>(2, 2, 7, 77, d);
        scalar_case::<bf16>(2, 2, 7, 77, d);
    }
    scalar_case::<f32>(1, 3, 45, 5, 40);
    scalar_case::<f16>(1, 1, 1, 40, 24);
}
