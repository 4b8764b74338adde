//! The CUDA ops, one file per kernel family of `kernels/` (`attention.rs` runs
//! `kernels/attention.cu`, `norm.rs` `norm.cu`, ...; each op's launch contract is in its
//! kernel file's top comment), plus the cuBLAS GEMMs (`gemm.rs`) and the launch builder
//! (`launch.rs`). conv2d runs as im2col + cuBLAS (`conv.rs`) or, in f16/bf16, as an implicit
//! GEMM on the tensor cores (`conv_igemm.rs`).
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
mod conv;
mod conv_igemm;
mod elementwise;
mod gemm;
mod launch;
mod lidb;
mod lora;
mod norm;

pub use attention::*;
pub use conv::*;
pub use conv_igemm::*;
pub use elementwise::*;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_splits_only_where_the_gpu_would_idle() {
        // An H100's 132 SMs. SD 1.5's UNet at batch 2 and 64x64: 64 runs of 10 x 4096.
        assert_eq!(group_norm_chunks(64, 40960, 132), 5);
        // The VAE decoder at 512x512, batch 1: 32 runs of 4 x 262144.
        assert_eq!(group_norm_chunks(32, 1 << 20, 132), 17);
        // Enough runs already, runs too short to split, no runs, more runs than a grid's y.
        assert_eq!(group_norm_chunks(256, 1 << 20, 132), 1);
        assert_eq!(group_norm_chunks(32, 8191, 132), 1);
        assert_eq!(group_norm_chunks(0, 1 << 20, 132), 1);
        assert_eq!(group_norm_chunks(70000, 1 << 20, 1 << 20), 1);
        // At most 64 chunks.
        assert_eq!(group_norm_chunks(1, 1 << 30, 132), 64);
    }

    fn conv(c_in: usize, c_out: usize, hw: usize, kernel: usize, stride: usize) -> Conv2d {
        Conv2d {
            batch: 2,
            c_in,
            h: hw,
            w: hw,
            c_out,
            kernel,
            stride,
            padding: kernel / 2,
        }
    }

    /// The generic backend's conv path at the shapes `hdb bench cuda` measured: the implicit
    /// GEMM up to 512 output channels (3x3), im2col + cuBLAS at 640 and 1280 and for 1x1.
    #[test]
    fn implicit_conv_where_it_measured_faster() {
        for (c_in, c_out, hw, k, s) in [
            (4, 320, 64, 3, 1),
            (320, 320, 64, 3, 1),
            (320, 320, 64, 3, 2),
            (320, 4, 64, 3, 1),
            (512, 512, 128, 3, 1),
            (256, 256, 512, 3, 1),
            (128, 3, 512, 3, 1),
        ] {
            assert!(
                conv2d_prefers_implicit(&conv(c_in, c_out, hw, k, s)),
                "{c_in}->{c_out} {hw}"
            );
        }
        for (c_in, c_out, hw, k, s) in [
            (640, 640, 32, 3, 1),
            (1280, 1280, 16, 3, 1),
            (1280, 1280, 8, 3, 1),
            (640, 1280, 16, 1, 1),
            (320, 320, 64, 1, 1),
        ] {
            assert!(
                !conv2d_prefers_implicit(&conv(c_in, c_out, hw, k, s)),
                "{c_in}->{c_out} {hw}"
            );
        }
    }

    /// The split-K heuristic at SD 1.5's UNet shapes (64x64 latents, batch 2) on an H100's
    /// 132 SMs: no split where the grid fills the GPU, a few slices at 16x16 and 8x8.
    #[test]
    fn implicit_conv_splits_only_small_grids() {
        let sms = 132;
        assert_eq!(conv2d_implicit_splits(&conv(4, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 640, 32, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(320, 4, 64, 3, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(640, 1280, 16, 1, 1), sms), 1);
        assert_eq!(conv2d_implicit_splits(&conv(1280, 1280, 16, 3, 1), sms), 3);
        assert_eq!(conv2d_implicit_splits(&conv(320, 320, 64, 3, 2), sms), 4);
        let s = conv2d_implicit_splits(&conv(1280, 1280, 8, 3, 1), sms);
        assert!((4..=5).contains(&s), "{s}");
        // Never more than 16 slices, each of at least 8 k-tiles; nothing to split is 1.
        for (c_in, hw) in [(64, 4), (2048, 4), (9, 2)] {
            let p = conv(c_in, 8, hw, 3, 1);
            let s = conv2d_implicit_splits(&p, sms);
            let tiles = (c_in * 9).div_ceil(32);
            assert!(s == 1 || (s <= 16 && tiles / s >= 8), "{c_in} {hw}: {s}");
        }
        assert_eq!(conv2d_implicit_splits(&conv(0, 8, 4, 3, 1), sms), 1);
    }
}
