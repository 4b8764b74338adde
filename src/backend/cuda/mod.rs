//! The CUDA backend (feature `cuda`, chosen at run time; DESIGN.md section 6).
//!
//! - [`kernels`]: the hand-written kernels of `kernels/*.cu`, embedded, and their compilation
//!   to PTX with NVRTC (CI compiles every one on machines without a GPU).
//! - [`device`]: a device, its stream, the kernel module cache and cuBLAS.
//! - [`ops`]: the ops, each a checked launch of one kernel or cuBLAS call.
//! - [`backend`]: [`Cuda`], those ops behind the [`crate::backend::Backend`] trait (what the
//!   model code calls), in f32, f16 or bf16.
//!
//! The models themselves (UNet, text encoder, VAE, hypernetwork) are the generic model code of
//! `crate::model` and `crate::hypernet` on [`Cuda`]; a session's adapter sets on it are built
//! in `crate::adapter::cuda` with the `lidb_merge` and `lora_bgmv` kernels of [`ops`].
//!
//! The kernels include no CUDA header, so compiling them at run time needs `libnvrtc` only:
//! no CUDA toolkit on the machine that runs hdb. cudarc loads libcuda, libnvrtc and
//! libcublas dynamically, so builds without CUDA work and report [`crate::Error::NoDevice`].

pub mod backend;
pub mod device;
pub mod kernels;
pub mod ops;
pub mod ptx_cache;

pub use backend::Cuda;
pub use device::{driver_available, CudaDevice, DeviceElem};
pub use kernels::{
    compile_ptx, nvrtc_available, ptx_entries, KernelFile, CI_ARCHS, COMMON_HEADER, KERNEL_FILES,
};
