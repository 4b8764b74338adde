//! The CUDA backend (feature `cuda`, chosen at run time; DESIGN.md section 6).
//!
//! So far it holds the hand-written kernels ([`kernels`]) and their compilation to PTX with
//! NVRTC, which CI checks on machines without a GPU. Device selection, memory, launches and
//! the backend ops come next (issue 7); nothing here touches the driver.
//!
//! The kernels include no CUDA header, so compiling them at run time needs `libnvrtc` only:
//! no CUDA toolkit on the machine that runs hdb.

pub mod kernels;

pub use kernels::{
    compile_ptx, nvrtc_available, ptx_entries, KernelFile, CI_ARCHS, COMMON_HEADER, KERNEL_FILES,
};
