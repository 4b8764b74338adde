//! Every backend op against the CPU backend, from one table (ggml's test-backend-ops is the
//! model). Each row ([`harness::OpCase`]) is an op at one shape, described once: its inputs'
//! generators, its tolerance per type (f32, f16, bf16), and the op as a call on a
//! [`target::Target`]. The same row runs on
//!
//! - the CPU backend, `hdb::backend::Cpu` (with the CUDA-only ops' math on the host): the
//!   reference every other target is compared with;
//! - `gpu::<family>`: `Cuda<T>` and its ops on the device, in f32, f16 and bf16: a real GPU
//!   (scripts/gpu-check.sh; `#[ignore]`d, so a plain `cargo test` counts them as skipped, and
//!   without a usable GPU they print `SKIPPED (no CUDA device)` and return), or the emulated
//!   GPU (scripts/emulated-gpu.sh runs this binary with `--include-ignored --skip emu::`).
//!   Rows above 4e8 multiply-adds print "skipped on the emulated GPU" there;
//! - `emu::<family>`: the kernels compiled for the host (tests/emu/cuda_emu.h), launched with
//!   the ops' own launch plans, under two thread schedules that must agree (races), with
//!   guarded buffers and NaN-filled outputs, in plain `cargo test --features cuda` (g++, no
//!   GPU, no CUDA toolkit). Ops without a kernel (cuBLAS, device copies) are not run there;
//!   nor SD-sized rows (above [`EMU_MAX_WORK`] or [`EMU_MAX_INPUTS`]): each emulated thread
//!   is a fiber, so they would take seconds each where the small edge-case rows, which reach
//!   every path of the same kernels, take milliseconds (the emulated GPU runs them all).
//!
//! Each comparison prints `cuda-op <row> <type> rel_l2=... max_abs=...` (`emu-op` under the
//! kernel emulation) with the tolerance that applies; a failure names the metric, its
//! tolerance and the worst element (index, got, want), and any NaN fails. Inputs come from
//! the run's seed (printed; `HDB_TEST_SEED=<hex>` replays one), each row's name and type.
//! Half-precision rows feed the reference the same rounded inputs, so the error measured is
//! the kernel's own (accumulation order, one output rounding, and for the tensor-core and
//! materialised attention the rounding of P).
//!
//! A new op, or a backward op, is one method on `Target` (its reference beside it) and rows
//! in its family's file; a new kernel also needs a row the kernel emulation runs (see
//! `every_kernel_has_a_case`). The backward ops' rows are in `backward.rs` and
//! `attention_backward.rs`.
//!
//!     cargo test --features cuda --test backend_ops                  # the kernel emulation
//!     scripts/emulated-gpu.sh --test backend_ops gpu:: -- --nocapture  # the emulated GPU
//!     cargo test --release --features cuda --test backend_ops -- --include-ignored gpu::
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;
#[path = "../emu/harness.rs"]
mod emu_harness;

mod device;
mod emulation;
mod emulation_flash;
mod faults;
mod harness;
mod selftest;
mod target;

mod adapters;
mod attention;
mod attention_backward;
mod backward;
mod elementwise;
mod gemm;
mod layout;
mod norm;

use half::{bf16, f16};
use hdb::backend::cuda::Cuda;

use harness::{run_cases, run_seed, Dtype, OpCase, Tally};

/// The most work (multiply-adds, or elements) a row may take under the kernel emulation,
/// which also runs it twice (two schedules): larger rows are the emulated GPU's.
pub const EMU_MAX_WORK: f64 = 2e6;

/// The most input values a row may have under the kernel emulation (element-wise kernels run
/// a thread, an emulated fiber, per few elements).
pub const EMU_MAX_INPUTS: usize = 100_000;

fn finish(test: &str, t: Tally) {
    println!(
        "{test}: {} comparisons, {} rows too large here, {} rows not on this target",
        t.compared, t.too_big, t.not_here
    );
    assert!(
        t.failures.is_empty(),
        "{test}: {} failed:\n{}",
        t.failures.len(),
        t.failures.join("\n")
    );
    assert!(t.compared > 0, "{test}: nothing was compared");
}

/// The family's rows on the device, in every type.
fn on_gpu(family: &str, cases: fn() -> Vec<OpCase>) {
    let Some((_lock, dev)) = common::cuda::device() else {
        return;
    };
    let test = format!("gpu::{family}");
    let seed = run_seed(&test);
    let cases = cases();
    let too_big = |what: &str, c: &OpCase| common::cuda::too_big_for_the_emulated_gpu(what, c.work);
    let mut t = Tally::default();
    let p = "cuda-op";
    let f32_be = device::Device::new(Cuda::<f32>::new(dev.clone()));
    run_cases(p, &cases, Dtype::F32, &f32_be, seed, &too_big, &mut t);
    let f16_be = device::Device::new(Cuda::<f16>::new(dev.clone()));
    run_cases(p, &cases, Dtype::F16, &f16_be, seed, &too_big, &mut t);
    let bf16_be = device::Device::new(Cuda::<bf16>::new(dev));
    run_cases(p, &cases, Dtype::Bf16, &bf16_be, seed, &too_big, &mut t);
    finish(&test, t);
}

/// The family's rows under the kernel emulation, in every type.
fn on_emu(family: &str, cases: fn() -> Vec<OpCase>) {
    let test = format!("emu::{family}");
    let seed = run_seed(&test);
    let cases = cases();
    let too_big = |_: &str, c: &OpCase| c.work > EMU_MAX_WORK || c.input_len() > EMU_MAX_INPUTS;
    let mut t = Tally::default();
    let p = "emu-op";
    run_cases(
        p,
        &cases,
        Dtype::F32,
        &emulation::Emu::<f32>::new(),
        seed,
        &too_big,
        &mut t,
    );
    run_cases(
        p,
        &cases,
        Dtype::F16,
        &emulation::Emu::<f16>::new(),
        seed,
        &too_big,
        &mut t,
    );
    run_cases(
        p,
        &cases,
        Dtype::Bf16,
        &emulation::Emu::<bf16>::new(),
        seed,
        &too_big,
        &mut t,
    );
    finish(&test, t);
}

/// One `gpu::<family>` and one `emu::<family>` test per family of rows.
macro_rules! families {
    ($($f:ident),*) => {
        mod gpu {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
                fn $f() {
                    crate::on_gpu(stringify!($f), crate::$f::cases);
                }
            )*

            /// Shape mistakes are errors, not panics or device faults, in every type.
            #[test]
            #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
            fn shape_errors() {
                let Some((_lock, dev)) = crate::common::cuda::device() else {
                    return;
                };
                crate::faults::shape_errors(&hdb::backend::cuda::Cuda::<f32>::new(dev.clone()));
                crate::faults::shape_errors(&hdb::backend::cuda::Cuda::<half::f16>::new(dev.clone()));
                crate::faults::shape_errors(&hdb::backend::cuda::Cuda::<half::bf16>::new(dev));
            }

            /// Faults are errors, and the device stays usable.
            #[test]
            #[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
            fn faults() {
                let Some((_lock, dev)) = crate::common::cuda::device() else {
                    return;
                };
                crate::faults::device_faults(&dev);
            }
        }
        mod emu {
            $(
                #[test]
                fn $f() {
                    crate::on_emu(stringify!($f), crate::$f::cases);
                }
            )*
        }
    };
}

families!(
    gemm,
    attention,
    norm,
    elementwise,
    layout,
    adapters,
    backward,
    attention_backward
);

/// Every kernel of `KERNEL_FILES` some row runs under the kernel emulation, by name without
/// its type suffix (the rows run each in f32, f16 and bf16 where the kernel has them).
const COVERED: &[&str] = &[
    // adapters.rs
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
    // gemm.rs, layout.rs
    "im2col",
    "transpose",
    "pad_bottom_right",
    "conv2d_igemm",
    "conv2d_igemm_reduce",
    // elementwise.rs
    "add_bias_channels",
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
    // backward.rs
    "col2im",
    "group_norm_backward",
    "group_norm_backward_sums",
    "group_norm_backward_apply",
    "layer_norm_backward",
    "silu_backward",
    "gelu_backward",
    "quick_gelu_backward",
    "geglu_backward",
    "upsample_nearest2x_backward",
    "cast_from_f32",
    // attention_backward.rs
    "attention_backward_rows",
    "flash_attn_bwd_dq_d40",
    "flash_attn_bwd_dq_d64",
    "flash_attn_bwd_dq_d80",
    "flash_attn_bwd_dq_d160",
    "flash_attn_bwd_dkv_d40",
    "flash_attn_bwd_dkv_d64",
    "flash_attn_bwd_dkv_d80",
    "flash_attn_bwd_dkv_d160",
    "flash_attn_bwd_reduce",
];

/// A new kernel fails this until a row runs it under the kernel emulation (and its name is
/// in `COVERED`).
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
                "{k} ({}) has no row in tests/backend_ops/ that the kernel emulation runs: add \
                 one, and its name to COVERED in main.rs",
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
    let lib = emu_harness::build_gpu_library(&dir);
    println!("emulated GPU: {}", lib.display());
}
