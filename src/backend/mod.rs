//! Compute backends. The CPU backend arrives with the UNet; the CUDA backend is chosen at
//! run time (see `runtime`).
