//! Every CUDA op against the CPU backend, on fresh random inputs (the seed is printed), for
//! f32, f16 and bf16. Half-precision cases feed the CPU the same rounded inputs, so the error
//! measured is the kernel's own (accumulation order, one output rounding, and for flash
//! attention the rounding of P).
//!
//! Each case prints `cuda-parity <op> <dtype> ... rel_l2=... max_abs=...` and fails with the
//! worst element. Outputs are poisoned with NaN before each launch, so an unwritten element
//! fails. The tests are `#[ignore]`d, so a plain `cargo test` counts them as skipped; on a GPU
//! machine run them with `--include-ignored` (scripts/gpu-check.sh does, one process per
//! test). Without a usable GPU they print `SKIPPED (no CUDA device): <reason>` and return;
//! gpu-check.sh counts those lines as failures.
//!
//!     cargo test --release --features cuda --test cuda_parity -- --include-ignored \
//!         --test-threads=1 --nocapture
//!
//! One module per op family; the device, seeds (`HDB_TEST_SEED` replays one) and the comparison
//! are tests/common/cuda.rs's, shared with the `Cuda<T>` backend tests.
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;

mod adapters;
mod attention;
mod elementwise;
mod faults;
mod gemm;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use hdb::backend::cpu;
use hdb::backend::cuda::ops::{
    self, At, AttnKernel, AttnShape, BgmvShape, BlasElem, ComposeLayer, Conv2d, Factor, MergeLayer,
};
use hdb::backend::cuda::{CudaDevice, DeviceElem};
use hdb::rng::SplitMix64;
use hdb::Error;

use common::cuda::{check, device, seed, tol, too_big_for_the_emulated_gpu};

/// Normal values times `scale` in f32 (cases round them with [`rounded`] where the device
/// holds T).
fn randn(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    hdb::rng::normals(rng, n)
        .into_iter()
        .map(|v| v as f32 * scale)
        .collect()
}

/// `x` rounded to T and back: what the device holds.
fn rounded<T: DeviceElem>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

/// A device buffer of NaNs, so an element an op leaves unwritten fails the comparison.
fn poisoned<T: DeviceElem>(dev: &CudaDevice, n: usize) -> CudaSlice<T> {
    dev.upload(&vec![T::from_f32(f32::NAN); n]).expect("alloc")
}
