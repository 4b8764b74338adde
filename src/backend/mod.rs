//! Compute backends. The CPU backend ([`cpu`]) runs every op; the CUDA backend (feature
//! `cuda`) is chosen at run time by the runtime's device and runs the UNet
//! ([`device_unet`]).

pub mod api;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_unet;
pub mod profile;

pub use api::{Activation, AdapterHook, AttnDims, Backend, Conv2d, NormDims};
pub use cpu::Cpu;
