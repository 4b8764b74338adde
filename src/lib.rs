//! hdb: a HyperDreamBooth runtime for Stable Diffusion 1.x with a stable C ABI.
//!
//! A host loads a model on a runtime once ([`Engine`]), opens a [`Session`] per thread, gives
//! it identity adapters (loaded from files, or predicted from a face photo by a hypernetwork)
//! and renders with them. The C API (`ffi`, `include/hdb.h`) and the CLI (`src/bin/hdb`) are
//! thin layers over those two types. docs/architecture.md draws the layers and says where a
//! new op, model component or binding goes; `../shared/DESIGN.md` is the design.
//!
//! ## Module order
//!
//! Imports go down only: a module may use the modules on its own floor and below, never above
//! (tests/module_order.rs reads this list and fails on an upward `crate::` path).
//!
//! 1. leaves: `tensor` (element types, shapes), `error` (the one error type), `limits` (bounds
//!    on sizes from outside, checked arithmetic), `rng` (hdb's random stream), `progress`
//!    (progress callbacks), `logging`
//! 2. `io`: files (safetensors, diffusers folders, LDM key names), f32 weights
//! 3. `backend` (the op trait, CPU and CUDA backends), `runtime` (device, threads)
//! 4. `model`: UNet, text encoder, VAE, tokenizer, schedulers, the list of adaptable layers
//! 5. `adapter`: LiDB and LoRA files, adapter sets on each backend
//! 6. `hypernet`: face image -> LiDB weights
//! 7. `train`: adapter gradients of the diffusion loss, optimizer, finetuning
//! 8. placed models and sessions: `placed` (a component on a backend), `session` (`Engine`,
//!    `Session`)
//! 9. `pipeline`: text to image on a session
//! 10. `ffi`: the C ABI (the CLI in src/bin is a separate crate above it)

pub mod adapter;
pub mod backend;
pub mod error;
pub mod ffi;
pub mod hypernet;
pub mod io;
pub mod limits;
pub mod logging;
pub mod model;
pub mod pipeline;
pub mod placed;
pub mod progress;
pub mod rng;
pub mod runtime;
pub mod session;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use model::Model;
pub use runtime::{Device, Runtime, RuntimeOptions};
pub use session::{Engine, Session};

/// The crate version, `MAJOR.MINOR.PATCH`, from Cargo metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The C ABI version; `libhdb.so.<ABI_VERSION>` is the SONAME.
pub const ABI_VERSION: u32 = parse_u32(env!("HDB_ABI_VERSION"));

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0u32;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}
