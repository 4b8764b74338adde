//! The CUDA ops, one file per kernel family of `kernels/` (`attention.rs` runs
//! `kernels/attention.cu`, `norm.rs` `norm.cu`, ...; each op's launch contract is in its
//! kernel file's top comment), plus the cuBLAS GEMMs (`gemm.rs`) and the launch builder
//! (`launch.rs`). conv2d runs as im2col + cuBLAS (`conv.rs`) or, in f16/bf16, as an implicit
//! GEMM on the tensor cores (`conv_igemm.rs`). The backward ops (training: input gradients
//! through frozen weights) sit beside their forwards' (`norm.rs`, `elementwise.rs`, `conv.rs`,
//! `gemm.rs`), attention's in `attention_backward.rs` (materialised) and `flash_backward.rs`
//! (`kernels/attention_backward.cu`).
//!
//! Tensors are `CudaSlice<T>` with explicit shapes, like the CPU backend's `&[f32]`; an op
//! checks that every buffer is large enough before it launches, so a shape error is an
//! [`Error::Internal`] naming the op and argument, never an out-of-bounds device access.
//! Kernels receive raw device addresses (a buffer may be both input and output where the
//! contract allows it). Each kernel launch is data ([`KernelLaunch`]) built by a pure
//! `*_launch` function through the launch builder, which converts every size with a check
//! naming the kernel and the argument. The cuBLAS ops make the device's context current on
//! the calling thread themselves (cuBLAS does not, unlike cudarc's own calls).

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DeviceRepr};

use super::device::{driver_err, guard, CudaDevice, DeviceElem};
use crate::error::{Error, Result};

mod attention;
mod attention_backward;
mod conv;
mod conv_igemm;
mod elementwise;
mod flash_backward;
mod gemm;
mod launch;
mod lidb;
mod lora;
mod norm;

pub use attention::*;
pub use attention_backward::*;
pub use conv::*;
pub use conv_igemm::*;
pub use elementwise::*;
pub use flash_backward::*;
pub use gemm::*;
pub use launch::{KernelLaunch, Param};
pub use lidb::*;
pub use lora::*;
pub use norm::*;

use launch::Launch;

/// A position in a device buffer: `buf` from element `off` on.
#[derive(Clone, Copy)]
pub struct At<'a, T> {
    pub buf: &'a CudaSlice<T>,
    pub off: usize,
}

impl<'a, T> At<'a, T> {
    pub fn new(buf: &'a CudaSlice<T>, off: usize) -> Self {
        At { buf, off }
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for At<'a, T> {
    fn from(buf: &'a CudaSlice<T>) -> Self {
        At { buf, off: 0 }
    }
}

fn need<T>(buf: &CudaSlice<T>, off: usize, n: usize, op: &str, arg: &str) -> Result<()> {
    if off.checked_add(n).is_none_or(|end| end > buf.len()) {
        return Err(Error::Internal(format!(
            "{op}: '{arg}' needs elements {off}..{} but the buffer holds {}",
            off.saturating_add(n),
            buf.len()
        )));
    }
    Ok(())
}

fn addr<T>(dev: &CudaDevice, buf: &CudaSlice<T>, off: usize) -> u64 {
    dev.ptr(buf) + (off * std::mem::size_of::<T>()) as u64
}

/// `v` as a cuBLAS `int`, or an error naming the op and the argument.
fn to_i32(v: usize, op: &str, arg: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Internal(format!("{op}: '{arg}' = {v} exceeds i32")))
}

/// `v` as a cuBLAS `long long` stride, or an error naming the op and the argument.
fn to_i64(v: usize, op: &str, arg: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Internal(format!("{op}: '{arg}' = {v} exceeds i64")))
}

/// Copies `n` elements from `src[src_off..]` to `dst[dst_off..]` on the stream.
pub fn copy<T: DeviceRepr>(
    dev: &CudaDevice,
    dst: &mut CudaSlice<T>,
    dst_off: usize,
    src: &CudaSlice<T>,
    src_off: usize,
    n: usize,
) -> Result<()> {
    need(src, src_off, n, "copy", "src")?;
    need(dst, dst_off, n, "copy", "dst")?;
    if n == 0 {
        return Ok(());
    }
    guard("device copy", || {
        let s = src.slice(src_off..src_off + n);
        let mut d = dst.slice_mut(dst_off..dst_off + n);
        dev.stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(driver_err("device-to-device copy"))
    })
}
