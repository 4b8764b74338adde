//! Compute backends. The CPU backend ([`cpu`]) runs every op; the CUDA backend is chosen at
//! run time (see `runtime`) once it exists.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod profile;
