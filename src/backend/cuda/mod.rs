//! The CUDA backend (feature `cuda`, chosen at run time; DESIGN.md section 6).
//!
//! - [`kernels`]: the hand-written kernels of `kernels/*.cu`, embedded, and their compilation
//!   to PTX with NVRTC (CI compiles every one on machines without a GPU).
//! - [`device`]: a device, its stream, the kernel module cache and cuBLAS.
//! - [`ops`]: the ops, each a checked launch of one kernel or cuBLAS call.
//! - [`unet`]: the SD UNet over those ops, weights uploaded from the CPU model.
//! - [`adapters`]: a session's identity adapters on that UNet (merged weight copies or
//!   per-sample runtime LoRA).
//!
//! The kernels include no CUDA header, so compiling them at run time needs `libnvrtc` only:
//! no CUDA toolkit on the machine that runs hdb. cudarc loads libcuda, libnvrtc and
//! libcublas dynamically, so builds without CUDA work and report [`crate::Error::NoDevice`].

pub mod adapters;
pub mod device;
pub mod kernels;
pub mod ops;
pub mod unet;

pub use device::{driver_available, CudaDevice, DeviceElem};
pub use kernels::{
    compile_ptx, nvrtc_available, ptx_entries, KernelFile, CI_ARCHS, COMMON_HEADER, KERNEL_FILES,
};
