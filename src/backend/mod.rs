//! Compute backends behind one trait ([`Backend`]): the CPU backend ([`cpu`]) runs every op;
//! the CUDA backend (feature `cuda`) runs the same ops on a GPU, chosen at run time by the
//! runtime's device. Models are placed on one in `crate::placed`.

pub mod api;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;

pub use api::{Activation, AdapterHook, AttnDims, Backend, Conv2d, NormDims};
pub use cpu::Cpu;
