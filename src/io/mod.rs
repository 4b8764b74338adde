//! Reading files: safetensors through mmap, diffusers folders, LDM single files, and the
//! key-name table that maps LDM names to canonical diffusers names.

pub mod diffusers;
pub mod keymap;
#[cfg(feature = "png")]
pub mod png;
pub mod safetensors;
