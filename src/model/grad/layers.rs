//! The backward passes of the shared layers: each `*_saved` forward returns its output and what
//! its backward needs; each `backward` takes that and the output gradient and returns the input
//! gradient. Weights are frozen: only input gradients are computed, and an adaptable
//! projection hands its share to the adapter hook ([`AdapterHook::backward`]), which
//! accumulates the gradients of the adapters' own factors.

use crate::backend::{AttnDims, Backend, Conv2d, NormDims};
use crate::error::Result;
use crate::model::layers::{add, transpose, Act, Conv, GroupNorm, Hook, LayerNorm, Linear, Resnet};

impl<B: Backend> Linear<B> {
    /// dx for dy `[rows, dout]` at input x `[rows, din]` (`batch` equal runs of samples), with
    /// the adapters' share when this projection is adaptable.
    pub(crate) fn backward(
        &self,
        be: &B,
        x: &B::Buf,
        dy: &B::Buf,
        rows: usize,
        batch: usize,
        ad: Hook<'_, B>,
    ) -> Result<B::Buf> {
        let mut dx = be.linear_backward(dy, &self.w, (rows, self.din, self.dout))?;
        if let (Some(ad), Some(key)) = (ad, &self.key) {
            ad.backward(be, key, &mut dx, x, dy, batch, self.din, self.dout)?;
        }
        Ok(dx)
    }
}

impl<B: Backend> Conv<B> {
    fn params(&self, x: &Act<B>) -> Conv2d {
        Conv2d {
            batch: x.b,
            c_in: self.cin,
            h: x.h,
            w: x.w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding: self.k / 2,
        }
    }

    /// dx (with x's dims) for the output gradient `dy`; x is the forward's input.
    pub(crate) fn backward(&self, be: &B, x: &Act<B>, dy: &B::Buf) -> Result<Act<B>> {
        let p = self.params(x);
        Ok(Act {
            data: be.conv2d_backward(dy, &self.w, &p)?,
            ..*x
        })
    }

    /// As [`Conv::backward`] knowing only x's dims.
    pub(crate) fn backward_dims(&self, be: &B, dims: &Dims, dy: &B::Buf) -> Result<B::Buf> {
        let p = Conv2d {
            batch: dims.b,
            c_in: self.cin,
            h: dims.h,
            w: dims.w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding: self.k / 2,
        };
        be.conv2d_backward(dy, &self.w, &p)
    }
}

/// An activation's dims without its data.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl<B: Backend> Act<B> {
    pub(crate) fn dims(&self) -> Dims {
        Dims {
            b: self.b,
            c: self.c,
            h: self.h,
            w: self.w,
        }
    }
}

impl<B: Backend> GroupNorm<B> {
    pub(crate) fn backward(&self, be: &B, x: &Act<B>, dy: &B::Buf, silu: bool) -> Result<B::Buf> {
        let d = NormDims {
            batch: x.b,
            channels: x.c,
            hw: x.h * x.w,
            groups: self.groups,
            eps: self.eps,
        };
        be.group_norm_backward(&x.data, &self.gamma, &self.beta, dy, d, silu)
    }
}

impl<B: Backend> LayerNorm<B> {
    pub(crate) fn backward(&self, be: &B, x: &B::Buf, dy: &B::Buf) -> Result<B::Buf> {
        let rows = be.len(x) / self.dim.max(1);
        be.layer_norm_backward(x, &self.gamma, dy, (rows, self.dim), self.eps)
    }
}

/// What a resnet's backward needs: its input and the inputs of its inner ops.
pub(crate) struct ResnetSaved<B: Backend> {
    /// The resnet's input.
    pub(crate) x: Act<B>,
    /// conv1's input: SiLU(norm1(x)).
    a: Act<B>,
    /// norm2's input: conv1(a) + the time embedding's projection.
    h: Act<B>,
    /// conv2's input: SiLU(norm2(h)).
    c: Act<B>,
}

impl<B: Backend> Resnet<B> {
    /// The forward of [`Resnet::forward`], keeping what [`Resnet::backward`] needs (it takes
    /// its input by value: the saved state holds it).
    pub(crate) fn forward_saved(
        &self,
        be: &B,
        x: Act<B>,
        emb_silu: Option<&B::Buf>,
    ) -> Result<(Act<B>, ResnetSaved<B>)> {
        let a = self.norm1.forward(be, &x, true)?;
        let mut h = self.conv1.forward(be, &a)?;
        if let (Some(proj), Some(e)) = (&self.time_emb_proj, emb_silu) {
            let t = proj.forward(be, e, x.b)?;
            be.add_channel_bias(&mut h.data, &t, (h.b, h.c, h.h * h.w))?;
        }
        let c = self.norm2.forward(be, &h, true)?;
        let mut out = self.conv2.forward(be, &c)?;
        match &self.shortcut {
            Some(s) => {
                let sc = s.forward(be, &x)?;
                add(be, &mut out.data, &sc.data)?;
            }
            None => add(be, &mut out.data, &x.data)?,
        }
        Ok((out, ResnetSaved { x, a, h, c }))
    }

    /// dx for the output gradient `dy` (the time embedding gets none: it holds no adapters).
    pub(crate) fn backward(&self, be: &B, s: &ResnetSaved<B>, dy: &B::Buf) -> Result<B::Buf> {
        let dc = self.conv2.backward(be, &s.c, dy)?;
        let dh = self.norm2.backward(be, &s.h, &dc.data, true)?;
        let da = self.conv1.backward(be, &s.a, &dh)?;
        let mut dx = self.norm1.backward(be, &s.x, &da.data, true)?;
        match &self.shortcut {
            Some(sc) => {
                let d = sc.backward(be, &s.x, dy)?;
                add(be, &mut dx, &d.data)?;
            }
            None => add(be, &mut dx, dy)?,
        }
        Ok(dx)
    }
}

/// Attention's saved state: the projections' inputs and outputs.
pub(crate) struct AttentionSaved<B: Backend> {
    x: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    o: B::Buf,
}

/// The attention of a UNet transformer block or a text-encoder layer, seen through its parts.
pub(crate) struct AttnParts<'a, B: Backend> {
    pub to_q: &'a Linear<B>,
    pub to_k: &'a Linear<B>,
    pub to_v: &'a Linear<B>,
    pub to_out: &'a Linear<B>,
    pub heads: usize,
    pub causal: bool,
}

/// One attention call's sizes: `b` samples of `lq` queries over `lk` keys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnSize {
    pub b: usize,
    pub lq: usize,
    pub lk: usize,
}

impl<B: Backend> AttnParts<'_, B> {
    fn dims(&self, s: AttnSize) -> AttnDims {
        let c = self.to_q.dout;
        AttnDims {
            batch: s.b,
            lq: s.lq,
            lk: s.lk,
            heads: self.heads,
            head_dim: c / self.heads.max(1),
            causal: self.causal,
        }
    }

    /// out = to_out(attention(to_q(x), to_k(kv), to_v(kv))), kv = ctx or x; keeps x, q, k, v
    /// and the attention's output.
    pub(crate) fn forward_saved(
        &self,
        be: &B,
        x: B::Buf,
        ctx: Option<&B::Buf>,
        s: AttnSize,
        ad: Hook<'_, B>,
    ) -> Result<(B::Buf, AttentionSaved<B>)> {
        let kv = ctx.unwrap_or(&x);
        let q = self.to_q.forward_adapted(be, &x, s.b * s.lq, s.b, ad)?;
        let k = self.to_k.forward_adapted(be, kv, s.b * s.lk, s.b, ad)?;
        let v = self.to_v.forward_adapted(be, kv, s.b * s.lk, s.b, ad)?;
        let o = be.attention(&q, &k, &v, self.dims(s))?;
        let out = self.to_out.forward_adapted(be, &o, s.b * s.lq, s.b, ad)?;
        Ok((out, AttentionSaved { x, q, k, v, o }))
    }

    /// (dx, dctx): the gradients at x and, for cross-attention when `want_ctx`, at ctx.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        be: &B,
        sv: &AttentionSaved<B>,
        ctx: Option<&B::Buf>,
        dout: &B::Buf,
        s: AttnSize,
        ad: Hook<'_, B>,
        want_ctx: bool,
    ) -> Result<(B::Buf, Option<B::Buf>)> {
        let (rq, rk) = (s.b * s.lq, s.b * s.lk);
        let d_o = self.to_out.backward(be, &sv.o, dout, rq, s.b, ad)?;
        let (dq, dk, dv) = be.attention_backward(&sv.q, &sv.k, &sv.v, &d_o, self.dims(s))?;
        let mut dx = self.to_q.backward(be, &sv.x, &dq, rq, s.b, ad)?;
        match ctx {
            None => {
                let dxk = self.to_k.backward(be, &sv.x, &dk, rk, s.b, ad)?;
                add(be, &mut dx, &dxk)?;
                let dxv = self.to_v.backward(be, &sv.x, &dv, rk, s.b, ad)?;
                add(be, &mut dx, &dxv)?;
                Ok((dx, None))
            }
            Some(c) => {
                // The adapters on to_k/to_v train whether or not the context needs a gradient.
                let mut dc = self.to_k.backward(be, c, &dk, rk, s.b, ad)?;
                let dcv = self.to_v.backward(be, c, &dv, rk, s.b, ad)?;
                add(be, &mut dc, &dcv)?;
                Ok((dx, want_ctx.then_some(dc)))
            }
        }
    }
}

/// `[B, C, HW]` -> tokens `[B, HW, C]` or back, as the forward's transpose (its own inverse).
pub(crate) fn transpose_back<B: Backend>(
    be: &B,
    d: &B::Buf,
    dims: Dims,
    to_tokens: bool,
) -> Result<B::Buf> {
    transpose(be, d, dims.b, dims.c, dims.h * dims.w, to_tokens)
}
