//! diffusers' `UNet2DConditionModel` (SD 1.x and 2.x) on the CUDA backend, op for op the CPU
//! UNet of [`crate::model::unet`]: the same resnets, transformers, resampling and skips, with
//! weights uploaded once from the CPU model and converted to the storage type `T` (f32, f16 or
//! bf16; the kernels accumulate in f32).
//!
//! Differences from the CPU walk that do not change the math: self-attention computes q, k and
//! v with one GEMM over the stacked `[3C, C]` weight, cross-attention k and v with one over the
//! stacked `[2C, ctx_dim]` weight, and attention reads them through row strides; skip
//! activations are kept, not copied (in the down path the current activation is always the top
//! of the skip stack).
//!
//! Identity adapters ([`super::adapters`]) are applied as the CPU UNet applies them: in merge
//! mode a session's merged copies of the adapted weight buffers replace the shared ones in the
//! GEMMs (the uploaded weights are never written, so they are the pristine base); in runtime
//! mode `lora_bgmv` adds each adapted projection's low-rank update to its GEMM's output, reading
//! the stacked q/k/v (or k/v) output through a column offset and row stride.
//!
//! TODO(perf): every intermediate is a fresh `dev.alloc` allocation per call (stream-ordered
//! and freed on drop, not zeroed: every op writes its whole output); a per-resolution buffer
//! pool would drop the allocations.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::CudaSlice;

use super::adapters::{Active, CudaAdapterCtx};
use super::device::CudaDevice;
use super::ops::{self, At, AttnKernel, AttnShape, BlasElem, Conv2d};
use crate::error::{Error, Result};
use crate::model::config::UnetConfig;
use crate::model::layers as cpu;
use crate::model::unet::{self as cpu_unet, Unet, UnetInput};

/// An NCHW activation on the device.
struct Act<T> {
    data: CudaSlice<T>,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl<T> Act<T> {
    fn hw(&self) -> usize {
        self.h * self.w
    }

    fn len(&self) -> usize {
        self.b * self.c * self.hw()
    }
}

/// One forward call's device, and its im2col scratch (one buffer, sized up front for the
/// largest convolution of the call).
struct Run<'a, T> {
    dev: &'a CudaDevice,
    scratch: CudaSlice<T>,
}

impl<T: BlasElem> Run<'_, T> {
    /// The scratch, at least `n` elements (grows only if the up-front sizing missed a conv).
    fn scratch(&mut self, n: usize) -> Result<&mut CudaSlice<T>> {
        if self.scratch.len() < n {
            log::debug!("cuda unet: growing the im2col scratch to {n} elements");
            self.scratch = self.dev.alloc(n)?;
        }
        Ok(&mut self.scratch)
    }
}

fn upload<T: BlasElem>(dev: &CudaDevice, w: &[f32]) -> Result<CudaSlice<T>> {
    dev.upload_f32(w)
}

fn shape_err(what: &str, detail: String) -> Error {
    Error::Internal(format!("cuda unet: {what}: {detail}"))
}

/// PyTorch's Linear: weight [dout, din] (+ bias [dout]).
pub(super) struct Linear<T> {
    w: CudaSlice<T>,
    b: Option<CudaSlice<T>>,
    din: usize,
    dout: usize,
}

impl<T: BlasElem> Linear<T> {
    fn upload(dev: &CudaDevice, l: &cpu::Linear) -> Result<Self> {
        Self::stacked(dev, &[l])
    }

    /// The layers' weights stacked along the output dim (one GEMM computes them all): weight
    /// [sum dout, din], bias the concatenated biases where every layer has one.
    fn stacked(dev: &CudaDevice, parts: &[&cpu::Linear]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| shape_err("linear", "no layers to stack".into()))?;
        let din = first.din;
        let mut w = Vec::new();
        let mut b = Vec::new();
        let with_bias = first.b.is_some();
        for p in parts {
            if p.din != din || p.b.is_some() != with_bias || p.w.len() != p.din * p.dout {
                return Err(shape_err(
                    "stacking linear layers",
                    format!(
                        "[{}, {}] (bias: {}) does not stack with din {din} (bias: {with_bias})",
                        p.dout,
                        p.din,
                        p.b.is_some()
                    ),
                ));
            }
            w.extend_from_slice(&p.w);
            if let Some(pb) = &p.b {
                b.extend_from_slice(pb);
            }
        }
        let dout = parts.iter().map(|p| p.dout).sum();
        Ok(Linear {
            w: upload(dev, &w)?,
            b: if with_bias {
                Some(upload(dev, &b)?)
            } else {
                None
            },
            din,
            dout,
        })
    }

    /// x [rows, din] -> [rows, dout]
    fn forward(&self, dev: &CudaDevice, x: &CudaSlice<T>, rows: usize) -> Result<CudaSlice<T>> {
        self.forward_w(dev, x, rows, &self.w)
    }

    /// As `forward` with weight `w` (a merged copy of this layer's weight) in place of its own.
    fn forward_w(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        rows: usize,
        w: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        let y = dev.alloc(rows * self.dout)?;
        ops::linear(
            dev,
            At::from(&y),
            self.dout,
            At::from(x),
            w,
            self.b.as_ref(),
            (rows, self.din, self.dout),
        )?;
        Ok(y)
    }

    pub(super) fn weight(&self) -> &CudaSlice<T> {
        &self.w
    }
}

/// A square 2-D convolution with bias, padding k / 2.
struct Conv<T> {
    w: CudaSlice<T>,
    b: CudaSlice<T>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
}

impl<T: BlasElem> Conv<T> {
    fn upload(dev: &CudaDevice, c: &cpu::Conv) -> Result<Self> {
        Ok(Conv {
            w: upload(dev, &c.w)?,
            b: upload(dev, &c.b)?,
            cin: c.cin,
            cout: c.cout,
            k: c.k,
            stride: c.stride,
        })
    }

    fn shape(&self, batch: usize, h: usize, w: usize) -> Conv2d {
        Conv2d {
            batch,
            c_in: self.cin,
            h,
            w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding: self.k / 2,
        }
    }

    /// The im2col scratch one sample at h x w needs.
    fn scratch(&self, h: usize, w: usize) -> usize {
        ops::conv2d_scratch(&self.shape(1, h, w))
    }

    fn forward(&self, run: &mut Run<'_, T>, x: &Act<T>) -> Result<Act<T>> {
        self.forward_raw(run, &x.data, (x.b, x.c, x.h, x.w))
    }

    /// x [b, c, h, w] -> [b, cout, h', w']
    fn forward_raw(
        &self,
        run: &mut Run<'_, T>,
        x: &CudaSlice<T>,
        (b, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Act<T>> {
        if c != self.cin {
            return Err(shape_err(
                "conv2d",
                format!("{c} input channels, the weight takes {}", self.cin),
            ));
        }
        let p = self.shape(b, h, w);
        let (oh, ow) = p.out_hw();
        let dev = run.dev;
        let mut y = dev.alloc(b * self.cout * oh * ow)?;
        let scratch = run.scratch(ops::conv2d_scratch(&p))?;
        ops::conv2d(dev, &mut y, x, &self.w, Some(&self.b), &p, scratch)?;
        Ok(Act {
            data: y,
            b,
            c: self.cout,
            h: oh,
            w: ow,
        })
    }
}

struct GroupNorm<T> {
    gamma: CudaSlice<T>,
    beta: CudaSlice<T>,
    groups: usize,
    eps: f32,
}

impl<T: BlasElem> GroupNorm<T> {
    fn upload(dev: &CudaDevice, g: &cpu::GroupNorm) -> Result<Self> {
        Ok(GroupNorm {
            gamma: upload(dev, &g.gamma)?,
            beta: upload(dev, &g.beta)?,
            groups: g.groups,
            eps: g.eps,
        })
    }

    /// y = gn(x) (+ SiLU); y may be x.
    fn apply(&self, dev: &CudaDevice, y: &CudaSlice<T>, x: &Act<T>, silu: bool) -> Result<()> {
        ops::group_norm(
            dev,
            y,
            &x.data,
            &self.gamma,
            &self.beta,
            (x.b, x.c, x.hw()),
            self.groups,
            self.eps,
            silu,
        )
    }

    fn forward(&self, dev: &CudaDevice, x: &Act<T>, silu: bool) -> Result<Act<T>> {
        let y = dev.alloc(x.len())?;
        self.apply(dev, &y, x, silu)?;
        Ok(Act { data: y, ..*x })
    }
}

struct LayerNorm<T> {
    gamma: CudaSlice<T>,
    beta: CudaSlice<T>,
    dim: usize,
    eps: f32,
}

impl<T: BlasElem> LayerNorm<T> {
    fn upload(dev: &CudaDevice, l: &cpu::LayerNorm) -> Result<Self> {
        Ok(LayerNorm {
            gamma: upload(dev, &l.gamma)?,
            beta: upload(dev, &l.beta)?,
            dim: l.dim,
            eps: l.eps,
        })
    }

    /// x [rows, dim] -> layer_norm(x)
    fn forward(&self, dev: &CudaDevice, x: &CudaSlice<T>, rows: usize) -> Result<CudaSlice<T>> {
        let y = dev.alloc(rows * self.dim)?;
        ops::layer_norm(
            dev,
            &y,
            x,
            &self.gamma,
            &self.beta,
            rows,
            self.dim,
            self.eps,
        )?;
        Ok(y)
    }
}

/// diffusers' `ResnetBlock2D` (see [`cpu::Resnet`]).
struct Resnet<T> {
    norm1: GroupNorm<T>,
    conv1: Conv<T>,
    time_emb_proj: Option<Linear<T>>,
    norm2: GroupNorm<T>,
    conv2: Conv<T>,
    shortcut: Option<Conv<T>>,
}

impl<T: BlasElem> Resnet<T> {
    fn upload(dev: &CudaDevice, r: &cpu::Resnet) -> Result<Self> {
        Ok(Resnet {
            norm1: GroupNorm::upload(dev, &r.norm1)?,
            conv1: Conv::upload(dev, &r.conv1)?,
            time_emb_proj: r
                .time_emb_proj
                .as_ref()
                .map(|l| Linear::upload(dev, l))
                .transpose()?,
            norm2: GroupNorm::upload(dev, &r.norm2)?,
            conv2: Conv::upload(dev, &r.conv2)?,
            shortcut: r
                .shortcut
                .as_ref()
                .map(|c| Conv::upload(dev, c))
                .transpose()?,
        })
    }

    fn convs(&self) -> impl Iterator<Item = &Conv<T>> {
        [&self.conv1, &self.conv2]
            .into_iter()
            .chain(self.shortcut.as_ref())
    }

    /// `emb_silu`: SiLU(time embedding) [B, temb].
    fn forward(
        &self,
        run: &mut Run<'_, T>,
        x: &Act<T>,
        emb_silu: Option<&CudaSlice<T>>,
    ) -> Result<Act<T>> {
        let dev = run.dev;
        let mut h = self.norm1.forward(dev, x, true)?;
        h = self.conv1.forward(run, &h)?;
        if let (Some(proj), Some(e)) = (&self.time_emb_proj, emb_silu) {
            let t = proj.forward(dev, e, x.b)?;
            let shape = (h.b, h.c, h.hw());
            ops::add_channel_bias(dev, &mut h.data, &t, shape)?;
        }
        self.norm2.apply(dev, &h.data, &h, true)?;
        let mut out = self.conv2.forward(run, &h)?;
        drop(h);
        let n = out.len();
        match &self.shortcut {
            Some(s) => {
                let sc = s.forward(run, x)?;
                ops::add_inplace(dev, &mut out.data, &sc.data, n)?;
            }
            None => {
                if x.len() != n {
                    return Err(shape_err(
                        "resnet residual",
                        format!("input of {} values, output of {n}", x.len()),
                    ));
                }
                ops::add_inplace(dev, &mut out.data, &x.data, n)?;
            }
        }
        Ok(out)
    }
}

/// One adaptable projection of an attention layer (diffusers' to_q, to_k, to_v, to_out.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Q = 0,
    K = 1,
    V = 2,
    Out = 3,
}

impl Slot {
    pub(super) const ALL: [Slot; 4] = [Slot::Q, Slot::K, Slot::V, Slot::Out];
}

/// The weight buffers of an attention layer: cross-attention's own to_q, the stacked projection
/// (self-attention: q/k/v; cross-attention: k/v), and to_out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Buf {
    Q = 0,
    Proj = 1,
    Out = 2,
}

/// Where an adaptable projection's weight lives: rows `row..row + dout` of buffer `buf`, whose
/// rows are `din` wide (so elements `row * din..`); in the buffer's GEMM output, columns
/// `row..row + dout`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Place {
    pub(super) buf: Buf,
    pub(super) row: usize,
    pub(super) din: usize,
    pub(super) dout: usize,
}

/// Multi-head attention: self-attention with one stacked q/k/v projection, cross-attention
/// with a q projection and one stacked k/v projection.
pub(super) struct Attention<T> {
    /// Cross-attention only: to_q.
    q: Option<Linear<T>>,
    /// Self-attention: [to_q; to_k; to_v] [3C, C]. Cross: [to_k; to_v] [2C, ctx_dim].
    proj: Linear<T>,
    to_out: Linear<T>,
    heads: usize,
    c: usize,
    /// This layer's index in [`CudaUnet::attentions`] order (set by [`CudaUnet::upload`]).
    id: usize,
    /// The adapter keys (`unet.<path>.to_q`, ...) of the projections, by [`Slot`].
    keys: [Option<String>; 4],
}

impl<T: BlasElem> Attention<T> {
    fn upload(dev: &CudaDevice, a: &cpu_unet::Attention, cross: bool) -> Result<Self> {
        let c = a.to_q.dout;
        if a.heads == 0 || c % a.heads != 0 {
            return Err(Error::Unsupported(format!(
                "attention with {c} channels over {} heads",
                a.heads
            )));
        }
        if a.to_k.dout != c || a.to_v.dout != c || a.to_out.din != c {
            return Err(shape_err(
                "attention",
                format!(
                    "to_q/to_k/to_v/to_out widths {}/{}/{}/{} disagree",
                    c, a.to_k.dout, a.to_v.dout, a.to_out.din
                ),
            ));
        }
        let (q, proj) = if cross {
            (
                Some(Linear::upload(dev, &a.to_q)?),
                Linear::stacked(dev, &[&a.to_k, &a.to_v])?,
            )
        } else {
            (None, Linear::stacked(dev, &[&a.to_q, &a.to_k, &a.to_v])?)
        };
        Ok(Attention {
            q,
            proj,
            to_out: Linear::upload(dev, &a.to_out)?,
            heads: a.heads,
            c,
            id: 0,
            keys: [&a.to_q, &a.to_k, &a.to_v, &a.to_out].map(|l| l.key.clone()),
        })
    }

    /// Where the weight of projection `slot` lives.
    pub(super) fn place(&self, slot: Slot) -> Place {
        let c = self.c;
        let ctx = self.proj.din;
        let cross = self.q.is_some();
        let (buf, row, din) = match (slot, cross) {
            (Slot::Q, false) => (Buf::Proj, 0, c),
            (Slot::K, false) => (Buf::Proj, c, c),
            (Slot::V, false) => (Buf::Proj, 2 * c, c),
            (Slot::Q, true) => (Buf::Q, 0, c),
            (Slot::K, true) => (Buf::Proj, 0, ctx),
            (Slot::V, true) => (Buf::Proj, c, ctx),
            (Slot::Out, _) => (Buf::Out, 0, c),
        };
        Place {
            buf,
            row,
            din,
            dout: c,
        }
    }

    /// The weight [rows, din] of buffer `buf` (None: cross-attention's to_q in self-attention).
    pub(super) fn buffer(&self, buf: Buf) -> Option<&Linear<T>> {
        match buf {
            Buf::Q => self.q.as_ref(),
            Buf::Proj => Some(&self.proj),
            Buf::Out => Some(&self.to_out),
        }
    }

    /// The weight buffer `buf` (its layer `lin`) runs with: the session's merged copy, if any.
    fn weight<'s>(
        &self,
        buf: Buf,
        lin: &'s Linear<T>,
        ad: Option<&Active<'s, T>>,
    ) -> &'s CudaSlice<T> {
        ad.and_then(|a| a.merged(self.id, buf)).unwrap_or(&lin.w)
    }

    /// x [B, lq, c]; `ctx` [B, lk, ctx_dim] with lk for cross-attention, None for
    /// self-attention -> [B, lq, c]. `ad`: the session's adapters (merged weights replace the
    /// shared ones; runtime LoRA updates follow each adapted projection's GEMM).
    fn forward(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        ctx: Option<(&CudaSlice<T>, usize)>,
        (b, lq): (usize, usize),
        ad: Option<&Active<'_, T>>,
    ) -> Result<CudaSlice<T>> {
        let c = self.c;
        // y [rows, ld_y] (from column place.row on) += LoRA_slot(x [rows, din]).
        let lora = |slot: Slot, y: At<'_, T>, ld_y: usize, x: &CudaSlice<T>, rows: usize| match ad {
            Some(a) => a.add(dev, self.id, slot, self.place(slot), y, ld_y, x, rows, b),
            None => Ok(()),
        };
        let head_dim = c / self.heads;
        let o = dev.alloc(b * lq * c)?;
        let shape = |lk: usize, ld_kv: usize, ld_q: usize| AttnShape {
            batch: b,
            heads: self.heads,
            lq,
            lk,
            head_dim,
            ld_q,
            ld_k: ld_kv,
            ld_v: ld_kv,
            ld_o: c,
        };
        match (&self.q, ctx) {
            (None, None) => {
                let qkv =
                    self.proj
                        .forward_w(dev, x, b * lq, self.weight(Buf::Proj, &self.proj, ad))?;
                for slot in [Slot::Q, Slot::K, Slot::V] {
                    let at = At::new(&qkv, self.place(slot).row);
                    lora(slot, at, 3 * c, x, b * lq)?;
                }
                ops::attention(
                    dev,
                    At::from(&o),
                    At::new(&qkv, 0),
                    At::new(&qkv, c),
                    At::new(&qkv, 2 * c),
                    shape(lq, 3 * c, 3 * c),
                    AttnKernel::Auto,
                )?;
            }
            (Some(to_q), Some((ctx, lk))) => {
                let q = to_q.forward_w(dev, x, b * lq, self.weight(Buf::Q, to_q, ad))?;
                lora(Slot::Q, At::from(&q), c, x, b * lq)?;
                let kv = self.proj.forward_w(
                    dev,
                    ctx,
                    b * lk,
                    self.weight(Buf::Proj, &self.proj, ad),
                )?;
                for slot in [Slot::K, Slot::V] {
                    let at = At::new(&kv, self.place(slot).row);
                    lora(slot, at, 2 * c, ctx, b * lk)?;
                }
                ops::attention(
                    dev,
                    At::from(&o),
                    At::from(&q),
                    At::new(&kv, 0),
                    At::new(&kv, c),
                    shape(lk, 2 * c, c),
                    AttnKernel::Auto,
                )?;
            }
            _ => {
                return Err(shape_err(
                    "attention",
                    "self/cross attention called with the other's arguments".into(),
                ))
            }
        }
        let y = self
            .to_out
            .forward_w(dev, &o, b * lq, self.weight(Buf::Out, &self.to_out, ad))?;
        lora(Slot::Out, At::from(&y), c, &o, b * lq)?;
        Ok(y)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward,
/// each after a layer norm and added back.
struct TransformerBlock<T> {
    norm1: LayerNorm<T>,
    attn1: Attention<T>,
    norm2: LayerNorm<T>,
    attn2: Attention<T>,
    norm3: LayerNorm<T>,
    ff_proj: Linear<T>,
    ff_out: Linear<T>,
}

impl<T: BlasElem> TransformerBlock<T> {
    fn upload(dev: &CudaDevice, t: &cpu_unet::TransformerBlock) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::upload(dev, &t.norm1)?,
            attn1: Attention::upload(dev, &t.attn1, false)?,
            norm2: LayerNorm::upload(dev, &t.norm2)?,
            attn2: Attention::upload(dev, &t.attn2, true)?,
            norm3: LayerNorm::upload(dev, &t.norm3)?,
            ff_proj: Linear::upload(dev, &t.ff_proj)?,
            ff_out: Linear::upload(dev, &t.ff_out)?,
        })
    }

    /// x [B, t, c] in place; ctx [B, l, ctx_dim].
    fn forward(
        &self,
        dev: &CudaDevice,
        x: &mut CudaSlice<T>,
        ctx: &CudaSlice<T>,
        (b, t, l): (usize, usize, usize),
        ad: Option<&Active<'_, T>>,
    ) -> Result<()> {
        let rows = b * t;
        let n_x = rows * self.norm1.dim;
        let n = self.norm1.forward(dev, x, rows)?;
        let a = self.attn1.forward(dev, &n, None, (b, t), ad)?;
        ops::add_inplace(dev, x, &a, n_x)?;
        let n = self.norm2.forward(dev, x, rows)?;
        let a = self.attn2.forward(dev, &n, Some((ctx, l)), (b, t), ad)?;
        ops::add_inplace(dev, x, &a, n_x)?;
        let n = self.norm3.forward(dev, x, rows)?;
        let f = self.ff_proj.forward(dev, &n, rows)?;
        let d = self.ff_proj.dout / 2;
        let mut g = dev.alloc(rows * d)?;
        ops::geglu(dev, &mut g, &f, rows, d)?;
        drop(f);
        let f = self.ff_out.forward(dev, &g, rows)?;
        ops::add_inplace(dev, x, &f, n_x)
    }
}

enum Proj<T> {
    Conv(Conv<T>),
    Linear(Linear<T>),
}

impl<T: BlasElem> Proj<T> {
    fn upload(dev: &CudaDevice, p: &cpu_unet::Proj) -> Result<Self> {
        Ok(match p {
            cpu_unet::Proj::Conv(c) => Proj::Conv(Conv::upload(dev, c)?),
            cpu_unet::Proj::Linear(l) => Proj::Linear(Linear::upload(dev, l)?),
        })
    }
}

/// diffusers' `Transformer2DModel`: group norm, proj_in, transformer blocks over the
/// [B, hw, c] tokens, proj_out, plus the input.
struct Transformer2d<T> {
    norm: GroupNorm<T>,
    proj_in: Proj<T>,
    blocks: Vec<TransformerBlock<T>>,
    proj_out: Proj<T>,
}

impl<T: BlasElem> Transformer2d<T> {
    fn upload(dev: &CudaDevice, t: &cpu_unet::Transformer2d) -> Result<Self> {
        Ok(Transformer2d {
            norm: GroupNorm::upload(dev, &t.norm)?,
            proj_in: Proj::upload(dev, &t.proj_in)?,
            blocks: t
                .blocks
                .iter()
                .map(|b| TransformerBlock::upload(dev, b))
                .collect::<Result<_>>()?,
            proj_out: Proj::upload(dev, &t.proj_out)?,
        })
    }

    fn convs(&self) -> impl Iterator<Item = &Conv<T>> {
        [&self.proj_in, &self.proj_out]
            .into_iter()
            .filter_map(|p| match p {
                Proj::Conv(c) => Some(c),
                Proj::Linear(_) => None,
            })
    }

    fn forward(
        &self,
        run: &mut Run<'_, T>,
        x: &Act<T>,
        ctx: &CudaSlice<T>,
        l: usize,
        ad: Option<&Active<'_, T>>,
    ) -> Result<Act<T>> {
        let dev = run.dev;
        let (b, c, hw) = (x.b, x.c, x.hw());
        let h = self.norm.forward(dev, x, false)?;
        let mut tokens = dev.alloc(b * hw * c)?;
        match &self.proj_in {
            Proj::Conv(conv) => {
                let p = conv.forward(run, &h)?;
                ops::transpose(dev, &mut tokens, &p.data, b, c, hw)?;
            }
            Proj::Linear(lin) => {
                ops::transpose(dev, &mut tokens, &h.data, b, c, hw)?;
                tokens = lin.forward(dev, &tokens, b * hw)?;
            }
        }
        drop(h);
        for blk in &self.blocks {
            blk.forward(dev, &mut tokens, ctx, (b, hw, l), ad)?;
        }
        let mut nchw = dev.alloc(b * c * hw)?;
        let mut out = match &self.proj_out {
            Proj::Conv(conv) => {
                ops::transpose(dev, &mut nchw, &tokens, b, hw, c)?;
                conv.forward(run, &Act { data: nchw, ..*x })?
            }
            Proj::Linear(lin) => {
                let t = lin.forward(dev, &tokens, b * hw)?;
                ops::transpose(dev, &mut nchw, &t, b, hw, c)?;
                Act { data: nchw, ..*x }
            }
        };
        let n = out.len();
        ops::add_inplace(dev, &mut out.data, &x.data, n)?;
        Ok(out)
    }
}

struct Block<T> {
    resnets: Vec<Resnet<T>>,
    attentions: Vec<Transformer2d<T>>,
    resample: Option<Conv<T>>,
}

impl<T: BlasElem> Block<T> {
    fn upload(dev: &CudaDevice, b: &cpu_unet::Block) -> Result<Self> {
        Ok(Block {
            resnets: b
                .resnets
                .iter()
                .map(|r| Resnet::upload(dev, r))
                .collect::<Result<_>>()?,
            attentions: b
                .attentions
                .iter()
                .map(|t| Transformer2d::upload(dev, t))
                .collect::<Result<_>>()?,
            resample: b
                .resample
                .as_ref()
                .map(|c| Conv::upload(dev, c))
                .transpose()?,
        })
    }

    /// The resnets' and transformers' convolutions (not the resampler's).
    fn convs(&self) -> impl Iterator<Item = &Conv<T>> {
        self.resnets
            .iter()
            .flat_map(Resnet::convs)
            .chain(self.attentions.iter().flat_map(Transformer2d::convs))
    }
}

/// The UNet on a CUDA device, weights stored as `T`.
pub struct CudaUnet<T: BlasElem> {
    config: UnetConfig,
    time_1: Linear<T>,
    time_2: Linear<T>,
    conv_in: Conv<T>,
    down: Vec<Block<T>>,
    mid: (Resnet<T>, Transformer2d<T>, Resnet<T>),
    up: Vec<Block<T>>,
    norm_out: GroupNorm<T>,
    conv_out: Conv<T>,
    /// Unique per upload, so adapters built for one UNet are refused by another.
    uid: u64,
    /// Adapter key (`unet.<path>.to_q`, ...) -> (attention id, projection).
    adaptable: BTreeMap<String, (usize, Slot)>,
}

/// Source of [`CudaUnet::uid`].
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

impl<T: BlasElem> std::fmt::Debug for CudaUnet<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaUnet")
            .field("dtype", &T::SUFFIX)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: BlasElem> CudaUnet<T> {
    /// Uploads every weight of the CPU `unet`, converted to `T`.
    pub fn upload(dev: &CudaDevice, unet: &Unet) -> Result<Self> {
        let n = unet.config.block_out_channels.len();
        if n == 0 || unet.down.len() != n || unet.up.len() != n {
            return Err(shape_err(
                "upload",
                format!(
                    "{} block widths, {} down and {} up blocks",
                    n,
                    unet.down.len(),
                    unet.up.len()
                ),
            ));
        }
        let mut u = CudaUnet {
            config: unet.config.clone(),
            time_1: Linear::upload(dev, &unet.time_1)?,
            time_2: Linear::upload(dev, &unet.time_2)?,
            conv_in: Conv::upload(dev, &unet.conv_in)?,
            down: unet
                .down
                .iter()
                .map(|b| Block::upload(dev, b))
                .collect::<Result<_>>()?,
            mid: (
                Resnet::upload(dev, &unet.mid.0)?,
                Transformer2d::upload(dev, &unet.mid.1)?,
                Resnet::upload(dev, &unet.mid.2)?,
            ),
            up: unet
                .up
                .iter()
                .map(|b| Block::upload(dev, b))
                .collect::<Result<_>>()?,
            norm_out: GroupNorm::upload(dev, &unet.norm_out)?,
            conv_out: Conv::upload(dev, &unet.conv_out)?,
            uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
            adaptable: BTreeMap::new(),
        };
        // Number the attention layers and index their adapter keys.
        let mut adaptable = BTreeMap::new();
        let transformers = u
            .down
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(std::iter::once(&mut u.mid.1))
            .chain(u.up.iter_mut().flat_map(|b| b.attentions.iter_mut()));
        let mut id = 0;
        for t in transformers {
            for blk in &mut t.blocks {
                for a in [&mut blk.attn1, &mut blk.attn2] {
                    a.id = id;
                    for (slot, key) in Slot::ALL.iter().zip(&a.keys) {
                        if let Some(k) = key {
                            adaptable.insert(k.clone(), (id, *slot));
                        }
                    }
                    id += 1;
                }
            }
        }
        u.adaptable = adaptable;
        Ok(u)
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    pub(super) fn uid(&self) -> u64 {
        self.uid
    }

    /// Every attention layer, in id order (down blocks, mid block, up blocks; per transformer
    /// block attn1 then attn2).
    pub(super) fn attentions(&self) -> Vec<&Attention<T>> {
        self.down
            .iter()
            .flat_map(|b| &b.attentions)
            .chain(std::iter::once(&self.mid.1))
            .chain(self.up.iter().flat_map(|b| &b.attentions))
            .flat_map(|t| &t.blocks)
            .flat_map(|blk| [&blk.attn1, &blk.attn2])
            .collect()
    }

    /// Every adapter key (`unet.<path>.to_q`, ...) of the UNet's projections.
    pub(super) fn adapter_keys(&self) -> impl Iterator<Item = &str> {
        self.adaptable.keys().map(String::as_str)
    }

    /// The attention layer and projection of adapter key `key` (`unet.<path>.to_q`, ...).
    pub(super) fn adapter_slot(&self, key: &str) -> Option<(usize, Slot)> {
        self.adaptable.get(key).copied()
    }

    /// One evaluation; inputs on the host in f32 as [`UnetInput`]; returns the f32 output
    /// [batch, out_channels, height, width] on the host. Shapes are checked as
    /// [`Unet::forward_with`] checks them, with the same errors.
    pub fn forward(&self, dev: &CudaDevice, x: &UnetInput<'_>) -> Result<Vec<f32>> {
        self.forward_with(dev, x, None)
    }

    /// As [`CudaUnet::forward`], with a session's adapters (built for this UNet by
    /// [`super::adapters::CudaAdapters`]) and, in runtime mode, an adapter index per sample.
    /// Adapter and shape errors are the CPU's ([`Unet::forward_with`]).
    pub fn forward_with(
        &self,
        dev: &CudaDevice,
        x: &UnetInput<'_>,
        ad: Option<CudaAdapterCtx<'_, T>>,
    ) -> Result<Vec<f32>> {
        if let Some(ad) = ad {
            ad.validate(x.batch)?;
        }
        let UnetInput {
            sample,
            timesteps,
            context,
            batch: b,
            height: h,
            width: w,
            context_len: l,
        } = *x;
        cpu_unet::check_input(
            &self.config,
            (sample.len(), timesteps.len(), context.len()),
            (b, h, w, l),
        )?;
        let s = dev.upload_f32::<T>(sample)?;
        let c = dev.upload_f32::<T>(context)?;
        let out = self.forward_device_with(dev, &s, timesteps, &c, (b, h, w, l), ad)?;
        dev.download_f32(&out, b * self.config.out_channels * h * w)
    }

    /// As [`CudaUnet::forward`] with device-resident sample [batch, in_channels, h, w] and
    /// context [batch, context_len, cross_attention_dim] (each exactly that long) and
    /// timesteps `[batch]` on the host; returns the device output
    /// `[batch, out_channels, h, w]`.
    /// Queues the work and returns without waiting for it.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_device(
        &self,
        dev: &CudaDevice,
        sample: &CudaSlice<T>,
        timesteps: &[f32],
        context: &CudaSlice<T>,
        batch: usize,
        h: usize,
        w: usize,
        context_len: usize,
    ) -> Result<CudaSlice<T>> {
        self.forward_device_with(
            dev,
            sample,
            timesteps,
            context,
            (batch, h, w, context_len),
            None,
        )
    }

    /// As [`CudaUnet::forward_device`] (dims: batch, height, width, context_len), with a
    /// session's adapters as in [`CudaUnet::forward_with`].
    pub fn forward_device_with(
        &self,
        dev: &CudaDevice,
        sample: &CudaSlice<T>,
        timesteps: &[f32],
        context: &CudaSlice<T>,
        (b, h, w, l): (usize, usize, usize, usize),
        ad: Option<CudaAdapterCtx<'_, T>>,
    ) -> Result<CudaSlice<T>> {
        dev.bind_to_thread()?;
        let active = ad.map(|a| Active::new(dev, self, a, b)).transpose()?;
        let ad = active.as_ref();
        let cfg = &self.config;
        cpu_unet::check_input(
            cfg,
            (sample.len(), timesteps.len(), context.len()),
            (b, h, w, l),
        )?;
        let mut run = Run {
            dev,
            scratch: dev.alloc(self.scratch_len(h, w))?,
        };

        // Time embedding; every resnet applies SiLU to it first, so that is done once.
        let c0 = cfg.block_out_channels[0];
        let t = dev.upload(timesteps)?;
        let mut temb = dev.alloc::<T>(b * c0)?;
        ops::timestep_embedding(
            dev,
            &mut temb,
            &t,
            b,
            c0,
            (cfg.flip_sin_to_cos, cfg.freq_shift, 10000.0),
        )?;
        let mut e = self.time_1.forward(dev, &temb, b)?;
        ops::silu_inplace(dev, &mut e, b * self.time_1.dout)?;
        let mut emb = self.time_2.forward(dev, &e, b)?;
        ops::silu_inplace(dev, &mut emb, b * self.time_2.dout)?;
        drop((temb, e));

        // diffusers keeps conv_in's output and every down layer's output as skips; the current
        // activation of the down path is always the last skip.
        let x0 = self
            .conv_in
            .forward_raw(&mut run, sample, (b, cfg.in_channels, h, w))?;
        let mut skips: Vec<Act<T>> = vec![x0];
        let top = |s: &[Act<T>]| -> Result<usize> {
            s.len()
                .checked_sub(1)
                .ok_or_else(|| Error::Internal("UNet skip stack ran dry".into()))
        };
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                let i = top(&skips)?;
                let mut y = r.forward(&mut run, &skips[i], Some(&emb))?;
                if let Some(a) = blk.attentions.get(j) {
                    y = a.forward(&mut run, &y, context, l, ad)?;
                }
                skips.push(y);
            }
            if let Some(ds) = &blk.resample {
                let i = top(&skips)?;
                let y = ds.forward(&mut run, &skips[i])?;
                skips.push(y);
            }
        }
        let i = top(&skips)?;
        let mut x = self.mid.0.forward(&mut run, &skips[i], Some(&emb))?;
        x = self.mid.1.forward(&mut run, &x, context, l, ad)?;
        x = self.mid.2.forward(&mut run, &x, Some(&emb))?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Internal("UNet skip stack ran dry".into()))?;
                if (skip.b, skip.h, skip.w) != (x.b, x.h, x.w) {
                    return Err(shape_err(
                        "skip connection",
                        format!(
                            "skip [{}, {}, {}, {}] vs activation [{}, {}, {}, {}]",
                            skip.b, skip.c, skip.h, skip.w, x.b, x.c, x.h, x.w
                        ),
                    ));
                }
                let mut data = dev.alloc(x.b * (x.c + skip.c) * x.hw())?;
                ops::concat_channels(
                    dev,
                    &mut data,
                    &x.data,
                    &skip.data,
                    (x.b, x.c, skip.c, x.hw()),
                )?;
                let cat = Act {
                    data,
                    c: x.c + skip.c,
                    ..x
                };
                drop(skip);
                x = r.forward(&mut run, &cat, Some(&emb))?;
                drop(cat);
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&mut run, &x, context, l, ad)?;
                }
            }
            if let Some(us) = &blk.resample {
                let mut up = dev.alloc(x.len() * 4)?;
                ops::upsample_nearest2x(dev, &mut up, &x.data, x.b * x.c, x.h, x.w)?;
                let upsampled = Act {
                    data: up,
                    h: 2 * x.h,
                    w: 2 * x.w,
                    ..x
                };
                x = us.forward(&mut run, &upsampled)?;
            }
        }
        let hn = self.norm_out.forward(dev, &x, true)?;
        drop(x);
        Ok(self.conv_out.forward(&mut run, &hn)?.data)
    }

    /// The im2col scratch (elements) of the largest convolution of an h x w evaluation: im2col
    /// runs one sample at a time, so the batch does not enter.
    fn scratch_len(&self, h: usize, w: usize) -> usize {
        let n = self.down.len();
        let at = |level: usize| (h >> level, w >> level);
        let mut convs: Vec<(&Conv<T>, (usize, usize))> =
            vec![(&self.conv_in, at(0)), (&self.conv_out, at(0))];
        for (i, blk) in self.down.iter().enumerate() {
            convs.extend(blk.convs().map(|c| (c, at(i))));
            convs.extend(blk.resample.iter().map(|c| (c, at(i))));
        }
        let mid = at(n.saturating_sub(1));
        convs.extend(
            self.mid
                .0
                .convs()
                .chain(self.mid.1.convs())
                .chain(self.mid.2.convs())
                .map(|c| (c, mid)),
        );
        for (i, blk) in self.up.iter().enumerate() {
            let level = n.saturating_sub(1 + i);
            convs.extend(blk.convs().map(|c| (c, at(level))));
            // The upsampler's conv runs after the 2x upsampling.
            convs.extend(
                blk.resample
                    .iter()
                    .map(|c| (c, at(level.saturating_sub(1)))),
            );
        }
        convs
            .into_iter()
            .map(|(c, (h, w))| c.scratch(h, w))
            .max()
            .unwrap_or(0)
    }
}
