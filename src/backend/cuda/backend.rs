//! [`Cuda`]: the CUDA ops of [`super::ops`] behind the [`Backend`] trait, so the model code
//! that runs on [`crate::backend::Cpu`] runs on a GPU in f32, f16 or bf16 (`T`).
//!
//! Activations and weights are `CudaSlice<T>` holding exactly the tensor's elements (weights
//! converted from f32 once, by [`Backend::weight`]); arithmetic and accumulation are f32 in
//! every kernel and GEMM, with one rounding to `T` per output. Every op allocates its output
//! (stream-ordered, uninitialised where the kernel writes every element) and checks buffer
//! lengths as the CPU backend does, so a shape mistake is an `Error::Internal` naming the op
//! and argument. cudarc cannot allocate zero elements, so an op whose output would be empty is
//! an `Error::Internal` too (the CPU backend returns an empty vector there).
//!
//! Work is queued on the device's one stream; [`Backend::download`] waits for it. The cuBLAS
//! ops make the device's context current on the calling thread themselves (cuBLAS does not),
//! so a `Cuda` may be used from any thread, one call at a time per device stream.
//!
//! Attention: non-causal with head dim <= 256 takes [`ops::attention`] with the backend's
//! kernel choice ([`Cuda::set_attention_kernel`]; `AttnKernel::Auto` by default: the
//! tensor-core kernels for f16/bf16 at head dims 40, 64, 80 and 160, else the scalar kernel); causal (CLIP's text encoder) takes [`ops::attention_causal`] (the scalar kernel
//! with a mask, head dim <= 256); head dims above 256 (the VAE's single-head mid-block
//! attention, d = 512) take [`ops::attention_materialized`]: f32 scores in chunks of query
//! rows, at most 64 MiB of them plus their probabilities in `T` at any resolution.
//!
//! The backward ops (training: input gradients through frozen weights) mirror the CPU
//! backend's: linear and 1x1 convolutions as cuBLAS GEMMs, other convolutions as an f32
//! column GEMM and `col2im` ([`ops::conv2d_backward`]), the norms' reductions, attention by
//! the flash kernels in f16/bf16 at head dims 40, 64, 80 and 160, else materialised per chunk
//! of query rows ([`ops::attention_backward`]; [`Cuda::set_attention_backward`] can force the
//! materialised path, [`Cuda::attention_backward_paths`] counts which ran), element-wise
//! kernels.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::device::CudaDevice;
use super::ops::{self, At, AttnBackwardKernel, AttnKernel, AttnShape, BlasElem, Conv2d};
use crate::backend::api::{check_len, shapes, volume, Activation, AttnDims, Backend, NormDims};
use crate::error::{Error, Result};
use crate::io::F32Weight;

/// The largest im2col scratch [`Backend::conv2d`] allocates; larger 16-bit convolutions take
/// the implicit GEMM. The UNet's largest at 64 x 64 latents is 47 MB (batch 2, 640 channels
/// at 64 x 64), so only the VAE's full-resolution convolutions cross it.
const IM2COL_MAX_BYTES: usize = 256 << 20;

/// The CUDA backend on one device, storing tensors as `T` (f32, f16 or bf16).
pub struct Cuda<T: BlasElem> {
    dev: Arc<CudaDevice>,
    /// The attention kernel choice ([`AttnKernel`] as its index in [`ATTN_KERNELS`]), shared
    /// by this backend's clones: a model keeps a clone of the backend it was loaded on, so a
    /// bench can time one loaded model under each choice.
    attention: Arc<AtomicU8>,
    /// The attention backward's choice and what ran, shared by the clones likewise.
    backward: Arc<BackwardPaths>,
    _t: PhantomData<T>,
}

/// [`Cuda`]'s attention-backward state: the choice (1 = materialised only) and how many calls
/// took each path, so a test or bench can say which kernels a model's gradients went through.
#[derive(Default)]
struct BackwardPaths {
    materialized_only: AtomicU8,
    flash: AtomicU64,
    materialized: AtomicU64,
}

/// Every [`AttnKernel`], indexed as [`Cuda`] stores its choice.
const ATTN_KERNELS: [AttnKernel; 5] = [
    AttnKernel::Auto,
    AttnKernel::Flash1,
    AttnKernel::Flash2,
    AttnKernel::Flash3,
    AttnKernel::Scalar,
];

impl<T: BlasElem> Cuda<T> {
    /// The backend on `dev` (opened with [`CudaDevice::open`]), with the measured attention
    /// kernel choice (`AttnKernel::Auto`).
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        Cuda {
            dev,
            attention: Arc::new(AtomicU8::new(0)),
            backward: Arc::default(),
            _t: PhantomData,
        }
    }

    /// The device this backend runs on.
    pub fn dev(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The kernel [`Backend::attention`] asks for where the fused kernels apply (non-causal,
    /// head dim <= 256, f16/bf16): a variant that does not apply to a call falls back to
    /// `Auto`'s choice ([`ops::attention`]).
    pub fn attention_kernel(&self) -> AttnKernel {
        ATTN_KERNELS[self.attention.load(Ordering::Relaxed) as usize % ATTN_KERNELS.len()]
    }

    /// Sets [`Cuda::attention_kernel`] for this backend and its clones (the models loaded on
    /// it); returns the previous choice. `hdb bench cuda` times the UNet under each.
    pub fn set_attention_kernel(&self, k: AttnKernel) -> AttnKernel {
        let i = ATTN_KERNELS.iter().position(|&p| p == k).unwrap_or(0) as u8;
        let prev = self.attention.swap(i, Ordering::Relaxed);
        ATTN_KERNELS[prev as usize % ATTN_KERNELS.len()]
    }

    /// The path [`Backend::attention_backward`] takes where the flash kernels apply
    /// ([`ops::attention_backward`]).
    pub fn attention_backward_kernel(&self) -> AttnBackwardKernel {
        match self.backward.materialized_only.load(Ordering::Relaxed) {
            0 => AttnBackwardKernel::Auto,
            _ => AttnBackwardKernel::Materialized,
        }
    }

    /// Sets [`Cuda::attention_backward_kernel`] for this backend and its clones; returns the
    /// previous choice. `hdb bench cuda` times both paths.
    pub fn set_attention_backward(&self, k: AttnBackwardKernel) -> AttnBackwardKernel {
        let v = (k == AttnBackwardKernel::Materialized) as u8;
        match self.backward.materialized_only.swap(v, Ordering::Relaxed) {
            0 => AttnBackwardKernel::Auto,
            _ => AttnBackwardKernel::Materialized,
        }
    }

    /// How many [`Backend::attention_backward`] calls on this backend and its clones took the
    /// flash kernels and how many the materialised path: `(flash, materialized)`.
    pub fn attention_backward_paths(&self) -> (u64, u64) {
        (
            self.backward.flash.load(Ordering::Relaxed),
            self.backward.materialized.load(Ordering::Relaxed),
        )
    }

    /// An output of `n` elements, every one of which the op writes.
    fn out(&self, op: &str, n: usize) -> Result<CudaSlice<T>> {
        if n == 0 {
            return Err(Error::Internal(format!(
                "{op}: the output is empty (the CUDA backend holds no zero-sized tensors)"
            )));
        }
        self.dev.alloc(n)
    }
}

impl<T: BlasElem> Clone for Cuda<T> {
    fn clone(&self) -> Self {
        Cuda {
            dev: self.dev.clone(),
            attention: self.attention.clone(),
            backward: self.backward.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: BlasElem> std::fmt::Debug for Cuda<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("dev", &self.dev)
            .field("dtype", &T::SUFFIX)
            .field("attention", &self.attention_kernel())
            .field("attention_backward", &self.attention_backward_kernel())
            .finish()
    }
}

impl<T: BlasElem> Backend for Cuda<T> {
    type Buf = CudaSlice<T>;
    type Weight = CudaSlice<T>;

    fn describe(&self) -> String {
        format!("cuda:{} {}", self.dev.ordinal(), T::SUFFIX)
    }

    fn weight(&self, w: F32Weight) -> Result<CudaSlice<T>> {
        self.dev.upload_f32(&w)
    }

    fn upload(&self, x: &[f32]) -> Result<CudaSlice<T>> {
        self.dev.upload_f32(x)
    }

    fn download(&self, x: &CudaSlice<T>) -> Result<Vec<f32>> {
        self.dev.download_f32(x, x.len())
    }

    fn len(&self, x: &CudaSlice<T>) -> usize {
        x.len()
    }

    fn copy(&self, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let mut y = self.out("copy", x.len())?;
        ops::copy(&self.dev, &mut y, 0, x, 0, x.len())?;
        Ok(y)
    }

    fn linear(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        b: Option<&CudaSlice<T>>,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "linear";
        let n = shapes::linear(x.len(), w.len(), b.map(|b| b.len()), (rows, din, dout))?;
        let y = self.out(op, n)?;
        ops::linear(
            &self.dev,
            At::from(&y),
            dout,
            At::from(x),
            w,
            b,
            (rows, din, dout),
        )?;
        Ok(y)
    }

    fn conv2d(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        b: Option<&CudaSlice<T>>,
        p: &Conv2d,
    ) -> Result<CudaSlice<T>> {
        let op = "conv2d";
        let n = shapes::conv2d(x.len(), w.len(), b.map(|b| b.len()), p)?;
        let (oh, ow) = p.out_hw();
        let mut y = self.out(op, n)?;
        // im2col scratch for one sample (none for 1x1 stride-1 unpadded convs), per call:
        // ops::conv2d_scratch's size, with its product checked.
        let scratch_len = if p.kernel == 1 && p.stride == 1 && p.padding == 0 {
            0
        } else {
            volume(op, &[p.c_in, p.kernel, p.kernel, oh, ow])?
        };
        // The implicit GEMM (tensor cores: f16/bf16 only) where it is the faster of the two
        // (ops::conv2d_prefers_implicit), and wherever im2col's scratch would pass
        // IM2COL_MAX_BYTES: it grows with the image (1.2 GB in fp16 for the VAE's 256-channel
        // convolution at 512 x 512, 4.8 GB at 1024 x 1024), and the implicit GEMM needs none.
        let big = scratch_len.saturating_mul(std::mem::size_of::<T>()) > IM2COL_MAX_BYTES;
        if (big || ops::conv2d_prefers_implicit(p)) && std::mem::size_of::<T>() == 2 {
            ops::conv2d_implicit(&self.dev, &mut y, x, w, b, p)?;
            return Ok(y);
        }
        let mut scratch = self.dev.alloc::<T>(scratch_len)?;
        ops::conv2d(&self.dev, &mut y, x, w, b, p, &mut scratch)?;
        Ok(y)
    }

    fn group_norm(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        d: NormDims,
        silu: bool,
    ) -> Result<CudaSlice<T>> {
        let op = "group_norm";
        shapes::group_norm(x.len(), gamma.len(), beta.len(), &d)?;
        let y = self.out(op, x.len())?;
        ops::group_norm(
            &self.dev,
            &y,
            x,
            gamma,
            beta,
            (d.batch, d.channels, d.hw),
            d.groups,
            d.eps,
            silu,
        )?;
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let op = "layer_norm";
        shapes::layer_norm(x.len(), gamma.len(), beta.len(), (rows, dim))?;
        let y = self.out(op, x.len())?;
        ops::layer_norm(&self.dev, &y, x, gamma, beta, rows, dim, eps)?;
        Ok(y)
    }

    fn attention(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        d: AttnDims,
    ) -> Result<CudaSlice<T>> {
        let op = "attention";
        shapes::attention(q.len(), k.len(), v.len(), &d)?;
        if d.heads == 0 || d.head_dim == 0 || d.lk == 0 {
            return Err(Error::Internal(format!("{op}: empty shape {d:?}")));
        }
        let out = self.out(op, q.len())?;
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let dev = &self.dev;
        let (o, q, k, v) = (At::from(&out), At::from(q), At::from(k), At::from(v));
        // f32 has no fused tensor-core kernel: the scalar one took 0.33 ms a call at the
        // hypernetwork's ViT-H shape (257 tokens, 16 heads, d 80) on an H100, where the scores
        // through cuBLAS (a few MB) cost a fraction of that.
        let f32 = std::mem::size_of::<T>() == 4;
        if d.causal {
            ops::attention_causal(dev, o, q, k, v, s)?;
        } else if d.head_dim <= 256 && !f32 {
            ops::attention(dev, o, q, k, v, s, self.attention_kernel())?;
        } else {
            ops::attention_materialized(dev, o, q, k, v, s)?;
        }
        Ok(out)
    }

    fn activate(&self, x: &mut CudaSlice<T>, act: Activation) -> Result<()> {
        let n = x.len();
        match act {
            Activation::Silu => ops::silu_inplace(&self.dev, x, n),
            Activation::Gelu => ops::gelu_inplace(&self.dev, x, n),
            Activation::QuickGelu => ops::quick_gelu_inplace(&self.dev, x, n),
        }
    }

    fn geglu(&self, x: &CudaSlice<T>, (rows, d): (usize, usize)) -> Result<CudaSlice<T>> {
        let op = "geglu";
        let mut y = self.out(op, shapes::geglu(x.len(), (rows, d))?)?;
        ops::geglu(&self.dev, &mut y, x, rows, d)?;
        Ok(y)
    }

    fn add_inplace(&self, y: &mut CudaSlice<T>, x: &CudaSlice<T>) -> Result<()> {
        check_len("add", "x", x.len(), y.len())?;
        let n = y.len();
        ops::add_inplace(&self.dev, y, x, n)
    }

    fn add_channel_bias(
        &self,
        y: &mut CudaSlice<T>,
        v: &CudaSlice<T>,
        (batch, channels, hw): (usize, usize, usize),
    ) -> Result<()> {
        shapes::add_channel_bias(y.len(), v.len(), (batch, channels, hw))?;
        ops::add_channel_bias(&self.dev, y, v, (batch, channels, hw))
    }

    fn timestep_embedding(
        &self,
        t: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> Result<CudaSlice<T>> {
        let op = "timestep_embedding";
        let mut y = self.out(op, volume(op, &[t.len(), dim])?)?;
        let td = self.dev.upload(t)?;
        ops::timestep_embedding(
            &self.dev,
            &mut y,
            &td,
            t.len(),
            dim,
            (flip_sin_to_cos, shift, 10000.0),
        )?;
        Ok(y)
    }

    fn transpose(
        &self,
        x: &CudaSlice<T>,
        (batch, c, hw): (usize, usize, usize),
        to_tokens: bool,
    ) -> Result<CudaSlice<T>> {
        let op = "transpose";
        shapes::transpose(x.len(), (batch, c, hw))?;
        let mut y = self.out(op, x.len())?;
        // [batch, rows, cols] -> [batch, cols, rows]: NCHW -> tokens is rows = c, cols = hw.
        let (rows, cols) = if to_tokens { (c, hw) } else { (hw, c) };
        ops::transpose(&self.dev, &mut y, x, batch, rows, cols)?;
        Ok(y)
    }

    fn concat_channels(
        &self,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "concat_channels";
        let n = shapes::concat_channels(a.len(), b.len(), (batch, ca, cb, hw))?;
        let mut y = self.out(op, n)?;
        ops::concat_channels(&self.dev, &mut y, a, b, (batch, ca, cb, hw))?;
        Ok(y)
    }

    fn upsample_nearest2x(
        &self,
        x: &CudaSlice<T>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "upsample_nearest2x";
        let mut y = self.out(op, shapes::upsample_nearest2x(x.len(), (planes, h, w))?)?;
        ops::upsample_nearest2x(&self.dev, &mut y, x, planes, h, w)?;
        Ok(y)
    }

    fn pad_bottom_right(
        &self,
        x: &CudaSlice<T>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "pad_bottom_right";
        let mut y = self.out(op, shapes::pad_bottom_right(x.len(), (planes, h, w))?)?;
        ops::pad_bottom_right(&self.dev, &mut y, x, planes, h, w)?;
        Ok(y)
    }

    fn linear_backward(
        &self,
        dy: &CudaSlice<T>,
        w: &CudaSlice<T>,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "linear_backward";
        check_len(op, "dy", dy.len(), volume(op, &[rows, dout])?)?;
        check_len(op, "weight", w.len(), volume(op, &[dout, din])?)?;
        let dx = self.out(op, volume(op, &[rows, din])?)?;
        ops::linear_backward(&self.dev, At::from(&dx), At::from(dy), w, (rows, din, dout))?;
        Ok(dx)
    }

    fn conv2d_backward(
        &self,
        dy: &CudaSlice<T>,
        w: &CudaSlice<T>,
        p: &Conv2d,
    ) -> Result<CudaSlice<T>> {
        let op = "conv2d_backward";
        let n = volume(op, &[p.batch, p.c_in, p.h, p.w])?;
        check_len(op, "dy", dy.len(), shapes::conv2d(n, w.len(), None, p)?)?;
        let mut dx = self.out(op, n)?;
        ops::conv2d_backward(&self.dev, &mut dx, dy, w, p)?;
        Ok(dx)
    }

    fn group_norm_backward(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        d: NormDims,
        silu: bool,
    ) -> Result<CudaSlice<T>> {
        let op = "group_norm_backward";
        shapes::group_norm(x.len(), gamma.len(), beta.len(), &d)?;
        check_len(op, "dy", dy.len(), x.len())?;
        let dx = self.out(op, x.len())?;
        ops::group_norm_backward(
            &self.dev,
            &dx,
            x,
            gamma,
            beta,
            dy,
            (d.batch, d.channels, d.hw),
            d.groups,
            d.eps,
            silu,
        )?;
        Ok(dx)
    }

    fn layer_norm_backward(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        (rows, dim): (usize, usize),
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        let op = "layer_norm_backward";
        shapes::layer_norm(x.len(), gamma.len(), gamma.len(), (rows, dim))?;
        check_len(op, "dy", dy.len(), x.len())?;
        let dx = self.out(op, x.len())?;
        ops::layer_norm_backward(&self.dev, &dx, x, gamma, dy, rows, dim, eps)?;
        Ok(dx)
    }

    fn attention_backward(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        dout: &CudaSlice<T>,
        d: AttnDims,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
        let op = "attention_backward";
        shapes::attention(q.len(), k.len(), v.len(), &d)?;
        check_len(op, "dout", dout.len(), q.len())?;
        if d.heads == 0 || d.head_dim == 0 || d.lk == 0 {
            return Err(Error::Internal(format!("{op}: empty shape {d:?}")));
        }
        let (dq, dk, dv) = (
            self.out(op, q.len())?,
            self.out(op, k.len())?,
            self.out(op, v.len())?,
        );
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let path = ops::attention_backward(
            &self.dev,
            [&dq, &dk, &dv],
            q,
            k,
            v,
            dout,
            s,
            d.causal,
            self.attention_backward_kernel(),
        )?;
        let count = if path == "flash" {
            &self.backward.flash
        } else {
            &self.backward.materialized
        };
        count.fetch_add(1, Ordering::Relaxed);
        Ok((dq, dk, dv))
    }

    fn activate_backward(
        &self,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        act: Activation,
    ) -> Result<CudaSlice<T>> {
        let op = "activate_backward";
        check_len(op, "dy", dy.len(), x.len())?;
        let dx = self.out(op, x.len())?;
        ops::activate_backward(&self.dev, &dx, x, dy, x.len(), act)?;
        Ok(dx)
    }

    fn geglu_backward(
        &self,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        (rows, d): (usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "geglu_backward";
        check_len(op, "dy", dy.len(), shapes::geglu(x.len(), (rows, d))?)?;
        let dx = self.out(op, x.len())?;
        ops::geglu_backward(&self.dev, &dx, x, dy, rows, d)?;
        Ok(dx)
    }

    fn upsample_nearest2x_backward(
        &self,
        dy: &CudaSlice<T>,
        (planes, h, w): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        let op = "upsample_nearest2x_backward";
        let n = volume(op, &[planes, h, w])?;
        check_len(op, "dy", dy.len(), volume(op, &[4, n])?)?;
        let dx = self.out(op, n)?;
        ops::upsample_nearest2x_backward(&self.dev, &dx, dy, planes, h, w)?;
        Ok(dx)
    }

    fn outer_f32(
        &self,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        (rows, m, n): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let op = "outer_f32";
        check_len(op, "a", a.len(), volume(op, &[rows, m])?)?;
        check_len(op, "b", b.len(), volume(op, &[rows, n])?)?;
        let len = volume(op, &[m, n])?;
        if len == 0 || rows == 0 {
            return Ok(vec![0.0; len]);
        }
        let mut c = self.dev.alloc::<f32>(len)?;
        ops::outer_f32(&self.dev, a, b, &mut c, rows, m, n)?;
        self.dev.download(&c, len)
    }

    fn split_channels(
        &self,
        x: &CudaSlice<T>,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
        let op = "split_channels";
        shapes::split_channels(x.len(), (batch, ca, cb, hw))?;
        let mut a = self.out(op, volume(op, &[batch, ca, hw])?)?;
        let mut b = self.out(op, volume(op, &[batch, cb, hw])?)?;
        ops::split_channels(&self.dev, &mut a, &mut b, x, (batch, ca, cb, hw))?;
        Ok((a, b))
    }
}
