//! The backend trait: every op the model code (UNet, text encoder, VAE) calls, in op groups,
//! so the same model code runs on the CPU ([`crate::backend::cpu::Cpu`]) and, with the `cuda`
//! feature, on a GPU (`crate::backend::cuda::Cuda<T>`). DESIGN.md section 3: models never
//! call a device API; they call these.
//!
//! Layouts are PyTorch's, as the CPU ops document them: NCHW activations, `[out, in]` linear
//! weights, `[c_out, c_in, k, k]` conv weights, attention rows `[batch, len, heads * d]`.
//! Every op allocates and returns its output (or updates its first argument in place), so an
//! op is a pure function of explicit inputs: what a backward pass will need (section 9).
//! Shapes are the caller's promise; a backend checks buffer extents it would otherwise read
//! or write past, and reports a mismatch as `Error::Internal` naming the op.

use crate::error::{Error, Result};
use crate::io::F32Weight;

/// A convolution's shape: x [batch, c_in, h, w], weight [c_out, c_in, kernel, kernel] ->
/// y [batch, c_out, ho, wo].
#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// (ho, wo) = ((h + 2 padding - kernel) / stride + 1, likewise for w); 0 when the kernel
    /// does not fit.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize| {
            let padded = n + 2 * self.padding;
            if padded < self.kernel || self.stride == 0 {
                0
            } else {
                (padded - self.kernel) / self.stride + 1
            }
        };
        (o(self.h), o(self.w))
    }

    /// A rank-`r` LoCon update of this convolution over `batch` samples, as two convolutions:
    /// the down factor's (this kernel, stride and padding, `r` outputs) and the up factor's
    /// 1x1 over the first one's output.
    pub fn locon(&self, batch: usize, r: usize) -> (Conv2d, Conv2d) {
        let (ho, wo) = self.out_hw();
        let down = Conv2d {
            batch,
            c_out: r,
            ..*self
        };
        let up = Conv2d {
            batch,
            c_in: r,
            h: ho,
            w: wo,
            c_out: self.c_out,
            kernel: 1,
            stride: 1,
            padding: 0,
        };
        (down, up)
    }
}

/// An element-wise activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP's quick GELU).
    QuickGelu,
}

/// One attention call: `out = softmax(q k^T / sqrt(head_dim) [+ causal mask]) v` per batch and
/// head; q, out `[batch, lq, heads * head_dim]`, k, v `[batch, lk, heads * head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query i sees keys 0..=i only (CLIP's text encoder; needs lq == lk).
    pub causal: bool,
}

/// A group norm's dims: x `[batch, channels, hw]`, `groups` dividing `channels`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormDims {
    pub batch: usize,
    pub channels: usize,
    pub hw: usize,
    pub groups: usize,
    pub eps: f32,
}

/// A compute backend. `Buf` holds an activation, `Weight` a frozen weight, both in the
/// backend's own memory and storage type (the CPU backend: f32 in host memory, weights
/// borrowed from the mapped file; CUDA: f32, f16 or bf16 on the device).
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// An activation: a flat, row-major tensor.
    type Buf: Send + Sync;
    /// A weight, uploaded once.
    type Weight: Send + Sync;

    /// Where this backend runs and in which storage type, e.g. `cpu f32`, `cuda:0 f16`.
    fn describe(&self) -> String;

    // --- memory ------------------------------------------------------------------------------

    /// Takes a weight (f32 on the host) into this backend.
    fn weight(&self, w: F32Weight) -> Result<Self::Weight>;
    /// A weight's values as host f32 when the backend keeps them so (the CPU), else `None`:
    /// what merging adapters on the host reads (`crate::adapter::apply::Applied`).
    fn host_f32(w: &Self::Weight) -> Option<&[f32]> {
        let _ = w;
        None
    }
    /// An activation from host f32 values.
    fn upload(&self, x: &[f32]) -> Result<Self::Buf>;
    /// An activation's values as host f32.
    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>>;
    /// Elements in an activation.
    fn len(&self, x: &Self::Buf) -> usize;
    /// A copy of an activation.
    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf>;

    // --- GEMMs -------------------------------------------------------------------------------

    /// x `[rows, din]` -> x w^T + b: `[rows, dout]` (w `[dout, din]`, b `[dout]`).
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        b: Option<&Self::Weight>,
        rows_din_dout: (usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// x `[batch, c_in, h, w]` -> `[batch, c_out, oh, ow]` (torch's conv2d, zero padding).
    fn conv2d(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        b: Option<&Self::Weight>,
        p: &Conv2d,
    ) -> Result<Self::Buf>;
    // --- norms -------------------------------------------------------------------------------

    /// torch's group_norm with per-channel affine, then SiLU when `silu`.
    fn group_norm(
        &self,
        x: &Self::Buf,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        d: NormDims,
        silu: bool,
    ) -> Result<Self::Buf>;
    /// torch's layer_norm over the last `dim` of x `[rows, dim]`.
    fn layer_norm(
        &self,
        x: &Self::Buf,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<Self::Buf>;

    // --- attention ---------------------------------------------------------------------------

    /// Scaled dot-product attention (see [`AttnDims`]).
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        d: AttnDims,
    ) -> Result<Self::Buf>;

    // --- element-wise ------------------------------------------------------------------------

    /// x = act(x).
    fn activate(&self, x: &mut Self::Buf, act: Activation) -> Result<()>;
    /// x `[rows, 2d]` -> `x[:, :d] * gelu(x[:, d:])`: `[rows, d]` (diffusers' GEGLU).
    fn geglu(&self, x: &Self::Buf, rows_d: (usize, usize)) -> Result<Self::Buf>;
    /// y += x (same length).
    fn add_inplace(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// y `[batch, channels, hw]` += v `[batch, channels]` broadcast over hw.
    fn add_channel_bias(
        &self,
        y: &mut Self::Buf,
        v: &Self::Buf,
        batch_channels_hw: (usize, usize, usize),
    ) -> Result<()>;
    /// diffusers' `get_timestep_embedding` of host timesteps t: `[t.len(), dim]`.
    fn timestep_embedding(
        &self,
        t: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> Result<Self::Buf>;

    // --- layout ------------------------------------------------------------------------------

    /// `[batch, c, hw]` -> `[batch, hw, c]` (`to_tokens`), or back.
    fn transpose(
        &self,
        x: &Self::Buf,
        batch_c_hw: (usize, usize, usize),
        to_tokens: bool,
    ) -> Result<Self::Buf>;
    /// a `[batch, ca, hw]`, b `[batch, cb, hw]` -> `[batch, ca + cb, hw]`.
    fn concat_channels(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        batch_ca_cb_hw: (usize, usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// `[planes, h, w]` -> `[planes, 2h, 2w]`, nearest.
    fn upsample_nearest2x(
        &self,
        x: &Self::Buf,
        planes_h_w: (usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// `[planes, h, w]` -> `[planes, h + 1, w + 1]`, one zero row at the bottom and one zero
    /// column at the right (the VAE encoder's downsampler).
    fn pad_bottom_right(
        &self,
        x: &Self::Buf,
        planes_h_w: (usize, usize, usize),
    ) -> Result<Self::Buf>;

    // --- backward (training adapters: input gradients through frozen weights) -------------

    /// linear's input gradient: dy `[rows, dout]` -> dy w: `[rows, din]`.
    fn linear_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows_din_dout: (usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// conv2d's input gradient: dy `[batch, c_out, oh, ow]` -> dx `[batch, c_in, h, w]`.
    fn conv2d_backward(&self, dy: &Self::Buf, w: &Self::Weight, p: &Conv2d) -> Result<Self::Buf>;
    /// group_norm's (+ SiLU's) input gradient; `x` is the op's input (statistics recomputed).
    fn group_norm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Weight,
        beta: &Self::Weight,
        dy: &Self::Buf,
        d: NormDims,
        silu: bool,
    ) -> Result<Self::Buf>;
    /// layer_norm's input gradient over the last `dim` of x `[rows, dim]`, its input.
    fn layer_norm_backward(
        &self,
        x: &Self::Buf,
        gamma: &Self::Weight,
        dy: &Self::Buf,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<Self::Buf>;
    /// Attention's input gradients (dq, dk, dv) from dout (see [`AttnDims`]); the
    /// probabilities are recomputed from q and k.
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dout: &Self::Buf,
        d: AttnDims,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// dy * act'(x), x the activation's input.
    fn activate_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        act: Activation,
    ) -> Result<Self::Buf>;
    /// GEGLU's input gradient: x `[rows, 2d]` its input, dy `[rows, d]` -> `[rows, 2d]`.
    fn geglu_backward(
        &self,
        x: &Self::Buf,
        dy: &Self::Buf,
        rows_d: (usize, usize),
    ) -> Result<Self::Buf>;
    /// The nearest 2x upsample's input gradient: dy `[planes, 2h, 2w]` -> `[planes, h, w]`
    /// (`planes_h_w` are the input's dims).
    fn upsample_nearest2x_backward(
        &self,
        dy: &Self::Buf,
        planes_h_w: (usize, usize, usize),
    ) -> Result<Self::Buf>;
    /// `a^T b` summed over the rows, in f32 on the host: a `[rows, m]`, b `[rows, n]` ->
    /// `[m, n]` (an adapter factor's gradient, e.g. `dU = dy^T (x D^T)`; small outputs, f32
    /// accumulation whatever the storage type).
    fn outer_f32(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        rows_m_n: (usize, usize, usize),
    ) -> Result<Vec<f32>>;
    /// `[batch, ca + cb, hw]` -> (`[batch, ca, hw]`, `[batch, cb, hw]`): concat_channels'
    /// input gradients.
    fn split_channels(
        &self,
        x: &Self::Buf,
        batch_ca_cb_hw: (usize, usize, usize, usize),
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// `[planes, h, w]` -> `[planes, oh, ow]`, the top-left `oh x ow` of each plane. After a 2x
    /// nearest upsample this is torch's nearest interpolation to a size of `2h - 1` (the UNet's
    /// skip sizes at odd latent sizes). The default goes through host memory: the UNet needs it
    /// only for images whose size is not a multiple of 64.
    fn crop_top_left(
        &self,
        x: &Self::Buf,
        (planes, h, w): (usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Result<Self::Buf> {
        check_len(
            "crop_top_left",
            "x",
            self.len(x),
            volume("crop_top_left", &[planes, h, w])?,
        )?;
        if oh > h || ow > w {
            return Err(Error::Internal(format!(
                "crop_top_left: {oh}x{ow} is larger than {h}x{w}"
            )));
        }
        let v = self.download(x)?;
        let mut out = Vec::with_capacity(volume("crop_top_left", &[planes, oh, ow])?);
        for p in v.chunks_exact(h * w).take(planes) {
            for row in p.chunks_exact(w).take(oh) {
                out.extend_from_slice(&row[..ow]);
            }
        }
        self.upload(&out)
    }
    /// [`Backend::crop_top_left`]'s adjoint (its input gradient): `[planes, oh, ow]` ->
    /// `[planes, h, w]`, each plane's values at the top left and zeros in the rows and columns
    /// the crop dropped. Through host memory, as the crop.
    fn uncrop_top_left(
        &self,
        dy: &Self::Buf,
        (planes, oh, ow): (usize, usize, usize),
        (h, w): (usize, usize),
    ) -> Result<Self::Buf> {
        check_len(
            "uncrop_top_left",
            "dy",
            self.len(dy),
            volume("uncrop_top_left", &[planes, oh, ow])?,
        )?;
        if oh > h || ow > w || ow == 0 {
            return Err(Error::Internal(format!(
                "uncrop_top_left: {oh}x{ow} does not fit in {h}x{w}"
            )));
        }
        let v = self.download(dy)?;
        let mut out = vec![0f32; volume("uncrop_top_left", &[planes, h, w])?];
        for (src, dst) in v.chunks_exact(oh * ow).zip(out.chunks_exact_mut(h * w)) {
            for (r, row) in src.chunks_exact(ow).enumerate() {
                dst[r * w..r * w + ow].copy_from_slice(row);
            }
        }
        self.upload(&out)
    }
}

/// A session's identity adapters as a model's adaptable projections see them on backend `B`:
/// a replacement (merged) weight, and/or a low-rank update added to the projection's output.
pub trait AdapterHook<B: Backend> {
    /// Checks the hook against a batch (per-sample indices).
    fn validate(&self, batch: usize) -> Result<()>;
    /// The merged weight of projection `key`, if the adapters replaced it.
    fn weight(&self, key: &str) -> Option<&B::Weight>;
    /// y `[rows, dout]` += the adapters' update of projection `key` for input x `[rows, din]`,
    /// whose rows are `batch` equal runs of samples.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        be: &B,
        key: &str,
        y: &mut B::Buf,
        x: &B::Buf,
        batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()>;

    /// y `[batch, c_out, ho, wo]` += the adapters' update of convolution `key` (dims `p`) for
    /// input x `[batch, c_in, h, w]`: each adapter's down factor as a convolution with the
    /// layer's kernel, stride and padding, then its up factor as a 1x1 convolution. The
    /// default adds nothing: hooks that hold no runtime factors for convolutions (training
    /// adapts the attention projections only) need no more.
    fn add_conv(&self, be: &B, key: &str, y: &mut B::Buf, x: &B::Buf, p: &Conv2d) -> Result<()> {
        let _ = (be, key, y, x, p);
        Ok(())
    }

    /// Training: dx `[rows, din]` += the adapters' share of the input gradient of projection
    /// `key` for dy `[rows, dout]` (x its input), and the gradients of the adapters' own
    /// parameters are accumulated in the hook. Hooks that do not train refuse.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &B,
        key: &str,
        dx: &mut B::Buf,
        x: &B::Buf,
        dy: &B::Buf,
        batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let _ = (be, dx, x, dy, batch, din, dout);
        Err(Error::Internal(format!(
            "adapter '{key}': this adapter set applies adapters, it does not train them"
        )))
    }
}

/// Errors unless `got == want`, naming the op and the argument (for backends' length checks).
pub(crate) fn check_len(op: &str, arg: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{op}: {arg} has {got} values, expected {want}"
        )))
    }
}

/// `a * b * ...`, or an error naming the op when it overflows.
pub(crate) fn volume(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |p, &d| p.checked_mul(d))
        .ok_or_else(|| Error::Internal(format!("{op}: size {dims:?} overflows")))
}

/// The shape checks of the trait's ops, shared by every backend so they refuse the same calls
/// with the same messages. Each takes the lengths of the op's arguments and returns the length
/// of its output where it makes one.
pub(crate) mod shapes {
    use super::{check_len, volume, AttnDims, Conv2d, NormDims};
    use crate::error::{Error, Result};

    pub fn linear(
        x: usize,
        w: usize,
        b: Option<usize>,
        (rows, din, dout): (usize, usize, usize),
    ) -> Result<usize> {
        let op = "linear";
        check_len(op, "x", x, volume(op, &[rows, din])?)?;
        check_len(op, "weight", w, volume(op, &[dout, din])?)?;
        if let Some(b) = b {
            check_len(op, "bias", b, dout)?;
        }
        volume(op, &[rows, dout])
    }

    pub fn conv2d(x: usize, w: usize, b: Option<usize>, p: &Conv2d) -> Result<usize> {
        let op = "conv2d";
        check_len(op, "x", x, volume(op, &[p.batch, p.c_in, p.h, p.w])?)?;
        let kk = [p.c_out, p.c_in, p.kernel, p.kernel];
        check_len(op, "weight", w, volume(op, &kk)?)?;
        if let Some(b) = b {
            check_len(op, "bias", b, p.c_out)?;
        }
        let padded = |n: usize| p.padding.checked_mul(2).and_then(|p2| n.checked_add(p2));
        if p.kernel == 0
            || p.stride == 0
            || padded(p.h).is_none_or(|n| n < p.kernel)
            || padded(p.w).is_none_or(|n| n < p.kernel)
        {
            return Err(Error::Internal(format!("{op}: bad shape {p:?}")));
        }
        let (oh, ow) = p.out_hw();
        volume(op, &[p.batch, p.c_out, oh, ow])
    }

    pub fn group_norm(x: usize, gamma: usize, beta: usize, d: &NormDims) -> Result<()> {
        let op = "group_norm";
        check_len(op, "x", x, volume(op, &[d.batch, d.channels, d.hw])?)?;
        check_len(op, "gamma", gamma, d.channels)?;
        check_len(op, "beta", beta, d.channels)?;
        if d.groups == 0 || !d.channels.is_multiple_of(d.groups) {
            return Err(Error::Internal(format!(
                "{op}: {} groups do not divide {} channels",
                d.groups, d.channels
            )));
        }
        Ok(())
    }

    pub fn layer_norm(
        x: usize,
        gamma: usize,
        beta: usize,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        let op = "layer_norm";
        check_len(op, "x", x, volume(op, &[rows, dim])?)?;
        check_len(op, "gamma", gamma, dim)?;
        check_len(op, "beta", beta, dim)
    }

    pub fn attention(q: usize, k: usize, v: usize, d: &AttnDims) -> Result<()> {
        let op = "attention";
        let hd = volume(op, &[d.heads, d.head_dim])?;
        check_len(op, "q", q, volume(op, &[d.batch, d.lq, hd])?)?;
        check_len(op, "k", k, volume(op, &[d.batch, d.lk, hd])?)?;
        check_len(op, "v", v, k)?;
        if d.causal && d.lq != d.lk {
            return Err(Error::Internal(format!(
                "{op}: causal attention needs lq == lk, got {} and {}",
                d.lq, d.lk
            )));
        }
        Ok(())
    }

    pub fn geglu(x: usize, (rows, d): (usize, usize)) -> Result<usize> {
        let op = "geglu";
        check_len(op, "x", x, volume(op, &[rows, 2, d])?)?;
        volume(op, &[rows, d])
    }

    pub fn add_channel_bias(
        y: usize,
        v: usize,
        (batch, channels, hw): (usize, usize, usize),
    ) -> Result<()> {
        let op = "add_channel_bias";
        check_len(op, "y", y, volume(op, &[batch, channels, hw])?)?;
        check_len(op, "v", v, volume(op, &[batch, channels])?)
    }

    pub fn transpose(x: usize, (batch, c, hw): (usize, usize, usize)) -> Result<()> {
        let op = "transpose";
        check_len(op, "x", x, volume(op, &[batch, c, hw])?)
    }

    pub fn concat_channels(
        a: usize,
        b: usize,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<usize> {
        let op = "concat_channels";
        check_len(op, "a", a, volume(op, &[batch, ca, hw])?)?;
        check_len(op, "b", b, volume(op, &[batch, cb, hw])?)?;
        Ok(a + b)
    }

    pub fn upsample_nearest2x(x: usize, (planes, h, w): (usize, usize, usize)) -> Result<usize> {
        let op = "upsample_nearest2x";
        check_len(op, "x", x, volume(op, &[planes, h, w])?)?;
        volume(op, &[4, x])
    }

    pub fn split_channels(
        x: usize,
        (batch, ca, cb, hw): (usize, usize, usize, usize),
    ) -> Result<()> {
        let op = "split_channels";
        let c = ca
            .checked_add(cb)
            .ok_or_else(|| Error::Internal(format!("{op}: channels overflow")))?;
        check_len(op, "x", x, volume(op, &[batch, c, hw])?)
    }

    pub fn pad_bottom_right(x: usize, (planes, h, w): (usize, usize, usize)) -> Result<usize> {
        let op = "pad_bottom_right";
        check_len(op, "x", x, volume(op, &[planes, h, w])?)?;
        // (saturating: an h or w of usize::MAX then overflows the volume, an error)
        volume(op, &[planes, h.saturating_add(1), w.saturating_add(1)])
    }
}
