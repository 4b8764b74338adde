//! The CUDA backend (feature `cuda`, chosen at run time; DESIGN.md section 6).
//!
//! - [`kernels`]: the hand-written kernels of `kernels/*.cu`, embedded, and their compilation
//!   to PTX with NVRTC (CI compiles every one on machines without a GPU).
//! - [`device`]: a device, its stream, the kernel module cache and cuBLAS.
//! - [`ops`]: the ops, each a checked launch of one kernel or cuBLAS call.
//! - [`backend`]: [`Cuda`], those ops behind the [`crate::backend::Backend`] trait (what the
//!   model code calls), in f32, f16 or bf16.
//! - [`key_adapters`]: [`CudaKeyAdapters`], a session's identity adapters (resolved on the
//!   CPU) as the trait's [`crate::backend::AdapterHook`] for [`Cuda`]: merged weights, or
//!   runtime LoRA through cuBLAS (the generic path).
//! - [`layer_adapters`]: [`CudaLayerAdapters`], the same keyed by adapter key but with the
//!   fused kernels (`lidb_merge`: merged copies from the pristine base; `lora_bgmv`: per-sample
//!   runtime LoRA): what sessions and the pipeline use on a GPU.
//!
//! The models themselves (UNet, text encoder, VAE, hypernetwork) are the generic model code of
//! `crate::model` and `crate::hypernet` on [`Cuda`].
//!
//! The kernels include no CUDA header, so compiling them at run time needs `libnvrtc` only:
//! no CUDA toolkit on the machine that runs hdb. cudarc loads libcuda, libnvrtc and
//! libcublas dynamically, so builds without CUDA work and report [`crate::Error::NoDevice`].

pub mod backend;
pub mod device;
pub mod kernels;
pub mod key_adapters;
pub mod layer_adapters;
pub mod ops;
pub mod ptx_cache;

pub use backend::Cuda;
pub use device::{driver_available, CudaDevice, DeviceElem};
pub use kernels::{
    compile_ptx, nvrtc_available, ptx_entries, KernelFile, CI_ARCHS, COMMON_HEADER, KERNEL_FILES,
};
pub use key_adapters::CudaKeyAdapters;
pub use layer_adapters::{CudaLayerAdapters, LayerAdaptersCtx};
