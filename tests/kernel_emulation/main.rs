//! The CUDA kernels run on the host, without a GPU: tests/emu/driver.cpp includes the kernel
//! sources under a small emulation of CUDA's execution model (tests/emu/cuda_emu.h: blocks one
//! at a time, a block's threads as cooperative fibers, warp shuffles, mma.sync, ldmatrix and
//! cp.async with the PTX ISA's layouts), and each case compares a kernel's output with the
//! CPU backend, which is itself checked against PyTorch, or with an f64 reference of the math
//! in the kernel's header (the adapter kernels). One module per kernel family: attention,
//! elementwise, norm, conv (conv.cu and conv_igemm.cu), lidb (lidb.cu and lora.cu).
//!
//! Every launch (kernel name, grid, block, shared memory, arguments) comes from the same pure
//! `*_launch` function of `backend::cuda::ops` the real op calls, so a wrong launch fails here
//! too; the driver checks each argument's kind against the kernel's C signature and the CUDA
//! launch limits, and guards every buffer against out-of-bounds writes. Output buffers start as
//! NaN bytes, so an element the kernel never writes fails the comparison.
//!
//! Needs a C++20 compiler (`c++`, or `$CXX`); without one the test fails (CI installs g++).
//! No GPU and no CUDA toolkit are needed, but the launch plans live behind the `cuda` feature:
//!
//!     cargo test --features cuda --test kernel_emulation
//!
//! What the emulation cannot see (timing, races the sequential schedule hides, the GPU's own
//! rounding of tensor-core sums and approximate exponentials) is scripts/gpu-check.sh's job.
#![cfg(feature = "cuda")]

#[path = "../emu/harness.rs"]
mod harness;

mod attention;
mod conv;
mod elementwise;
mod lidb;
mod norm;
mod selftest;

use harness::{Elem, Tol};

/// The tolerance of an op whose result is one rounding to T of a value the CPU backend also
/// computes in f32 or better, for outputs up to `mag` in magnitude: `f32_err`, the relative
/// difference of the two f32 computations (summation order, libm), plus, in f16 and bf16, half
/// an ulp of T relative (2^-11 and 2^-8; f16's subnormals round to 2^-25 absolute).
pub fn rounding_tol<T: Elem>(f32_err: f64, mag: f64) -> Tol {
    let (half_ulp, floor) = match T::SUFFIX {
        "f32" => (0.0, 0.0),
        "f16" => (2f64.powi(-11), 2f64.powi(-25)),
        _ => (2f64.powi(-8), 0.0),
    };
    Tol {
        rel_l2: half_ulp + f32_err,
        max_abs: (half_ulp + f32_err) * mag + floor,
    }
}

/// An exact result (a copy, or the same single f32 operation as the CPU's).
pub const EXACT: Tol = Tol {
    rel_l2: 0.0,
    max_abs: 0.0,
};

/// Every kernel of `KERNEL_FILES` some case above launches, by name without its dtype suffix
/// (the cases run each in f32, f16 and bf16 where the kernel has them).
const COVERED: &[&str] = &[
    // lidb.rs
    "lidb_compose",
    "lidb_merge",
    "lora_bgmv",
    // attention.rs
    "flash_attn_d40",
    "flash_attn_d64",
    "flash_attn_d80",
    "flash_attn_d160",
    "flash2_attn_d40",
    "flash2_attn_d64",
    "flash2_attn_d80",
    "flash2_attn_d160",
    "flash3_attn_d40",
    "attention_scalar",
    "attention_scalar_causal",
    // norm.rs
    "group_norm",
    "group_norm_silu",
    "group_norm_stats",
    "group_norm_apply",
    "group_norm_apply_silu",
    "layer_norm",
    // conv.rs
    "im2col",
    "transpose",
    "add_bias_channels",
    "pad_bottom_right",
    "conv2d_igemm",
    "conv2d_igemm_reduce",
    // elementwise.rs
    "geglu",
    "silu",
    "gelu",
    "quick_gelu",
    "softmax_rows",
    "softmax_rows_from_f32",
    "timestep_embedding",
    "upsample_nearest2x",
    "add",
    "add_channel_bias",
    "add_bias_rows",
];

/// A new kernel fails this until it has a case here (and an entry in `COVERED`).
#[test]
fn every_kernel_has_a_case() {
    for f in hdb::backend::cuda::KERNEL_FILES {
        for k in f.kernels {
            let stem = ["_f32", "_f16", "_bf16"]
                .iter()
                .find_map(|s| k.strip_suffix(s))
                .unwrap_or(k);
            assert!(
                COVERED.contains(&stem),
                "{k} ({}) has no case in tests/kernel_emulation/: add one, and its name to \
                 COVERED in main.rs",
                f.file
            );
        }
    }
}

/// Builds the emulated GPU (tests/emu/gpu.cpp) into `target/tmp/emulated-gpu/`, for
/// scripts/emulated-gpu.sh, which runs the GPU tests on it.
#[test]
#[ignore = "run by scripts/emulated-gpu.sh"]
fn emulated_gpu_library() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulated-gpu");
    let lib = harness::build_gpu_library(&dir);
    println!("emulated GPU: {}", lib.display());
}
