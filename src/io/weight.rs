//! A weight as f32 values, wherever it came from: mapped straight from a safetensors file, or
//! owned (converted from f16/bf16, random, or merged with adapters). Every backend takes its
//! weights in this form.

use std::sync::Arc;

use crate::io::safetensors::SafetensorsFile;

/// A weight as f32 values: borrowed straight from the memory-mapped file when it is stored as
/// aligned f32 (no copy: the SD 1.5 UNet stays 3.4 GB, not twice that), else converted once.
pub enum F32Weight {
    Mapped {
        file: Arc<SafetensorsFile>,
        start: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

impl std::ops::Deref for F32Weight {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            F32Weight::Mapped { file, start, len } => {
                // Alignment and range were checked when this value was made.
                bytemuck::try_cast_slice(file.data_range(*start, start + len * 4)).unwrap_or(&[])
            }
            F32Weight::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for F32Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F32Weight[{}]", self.len())
    }
}
