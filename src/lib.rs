//! hdb: a HyperDreamBooth runtime for Stable Diffusion 1.x with a stable C ABI.
//!
//! Data flows one way: [`io`] reads files -> [`model`] describes weights and shapes ->
//! [`backend`] runs ops -> [`ffi`] exposes it all to C. See `../shared/DESIGN.md` (in the
//! repository: README.md) for the picture.

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
pub mod runtime;
pub mod tensor;

pub use error::{Error, Result};
pub use model::Model;
pub use runtime::{Device, Runtime, RuntimeOptions};

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
