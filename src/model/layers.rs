//! Building blocks shared by the model components: weight-backed linear, convolution and
//! norm layers and NCHW activations, generic over the [`Backend`] they run on (the CPU
//! backend by default).

use crate::backend::Conv2d;
use crate::backend::{AdapterHook, Backend, Cpu, NormDims};
use crate::error::Result;
use crate::io::F32Weight;
use crate::model::WeightStore;

/// Where the UNet's weights come from: a loaded model, or (benchmarks) random values.
pub trait WeightSource {
    /// The f32 values of `name`, which must have shape `shape`; errors name the key.
    fn get(&self, name: &str, shape: &[usize]) -> Result<F32Weight>;
}

impl WeightSource for WeightStore {
    fn get(&self, name: &str, shape: &[usize]) -> Result<F32Weight> {
        self.f32(name, shape)
    }
}

/// An adapter hook on backend `B` (a session's adapters as the model's projections see them).
pub(crate) type Hook<'a, B> = Option<&'a dyn AdapterHook<B>>;

pub(crate) struct Linear<B: Backend = Cpu> {
    pub(crate) w: B::Weight,
    pub(crate) b: Option<B::Weight>,
    pub(crate) din: usize,
    pub(crate) dout: usize,
    /// The adapter key (`unet.<path>`) of an adaptable projection.
    pub(crate) key: Option<String>,
}

impl<B: Backend> Linear<B> {
    pub(crate) fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            w: be.weight(src.get(&format!("{p}.weight"), &[dout, din])?)?,
            b: if bias {
                Some(be.weight(src.get(&format!("{p}.bias"), &[dout])?)?)
            } else {
                None
            },
            din,
            dout,
            key: None,
        })
    }

    /// Marks this layer, at `path` in component `c`, as adaptable when the one list of
    /// adaptable layers ([`crate::model::adaptable::adapter_key`]) names it.
    pub(crate) fn adaptable_in(mut self, c: crate::io::keymap::Component, path: &str) -> Self {
        self.key = crate::model::adaptable::adapter_key(c, path);
        self
    }

    /// As `forward`, with the session's adapters: `rows` are `batch` equal runs of samples.
    pub(crate) fn forward_adapted(
        &self,
        be: &B,
        x: &B::Buf,
        rows: usize,
        batch: usize,
        ad: Hook<'_, B>,
    ) -> Result<B::Buf> {
        let (Some(ad), Some(key)) = (ad, &self.key) else {
            return self.forward(be, x, rows);
        };
        let w = ad.weight(key).unwrap_or(&self.w);
        let mut y = be.linear(x, w, self.b.as_ref(), (rows, self.din, self.dout))?;
        ad.add(be, key, &mut y, x, batch, self.din, self.dout)?;
        Ok(y)
    }

    /// x [rows, din] -> [rows, dout]
    pub(crate) fn forward(&self, be: &B, x: &B::Buf, rows: usize) -> Result<B::Buf> {
        be.linear(x, &self.w, self.b.as_ref(), (rows, self.din, self.dout))
    }
}

pub(crate) struct Conv<B: Backend = Cpu> {
    pub(crate) w: B::Weight,
    pub(crate) b: B::Weight,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    /// The adapter key (`unet.<path>`) of an adaptable convolution.
    pub(crate) key: Option<String>,
}

impl<B: Backend> Conv<B> {
    pub(crate) fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Conv {
            w: be.weight(src.get(&format!("{p}.weight"), &[cout, cin, k, k])?)?,
            b: be.weight(src.get(&format!("{p}.bias"), &[cout])?)?,
            cin,
            cout,
            k,
            stride,
            key: None,
        })
    }

    /// Marks this convolution, at `path` in component `c`, as adaptable when the one list of
    /// adaptable layers ([`crate::model::adaptable::adapter_key`]) names it.
    pub(crate) fn adaptable_in(mut self, c: crate::io::keymap::Component, path: &str) -> Self {
        self.key = crate::model::adaptable::adapter_key(c, path);
        self
    }

    pub(crate) fn forward(&self, be: &B, x: &Act<B>) -> Result<Act<B>> {
        self.forward_padded(be, x, self.k / 2)
    }

    /// As `forward`, with the session's adapters (merged weight, or the low-rank path added).
    pub(crate) fn forward_adapted(&self, be: &B, x: &Act<B>, ad: Hook<'_, B>) -> Result<Act<B>> {
        let (Some(ad), Some(key)) = (ad, &self.key) else {
            return self.forward(be, x);
        };
        let p = self.dims(x, self.k / 2);
        let w = ad.weight(key).unwrap_or(&self.w);
        let (h, wd) = p.out_hw();
        let mut y = be.conv2d(&x.data, w, Some(&self.b), &p)?;
        ad.add_conv(be, key, &mut y, &x.data, &p)?;
        Ok(Act {
            data: y,
            b: x.b,
            c: self.cout,
            h,
            w: wd,
        })
    }

    fn dims(&self, x: &Act<B>, padding: usize) -> Conv2d {
        Conv2d {
            batch: x.b,
            c_in: self.cin,
            h: x.h,
            w: x.w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding,
        }
    }

    /// With `padding` zeros on every side instead of the usual k / 2.
    pub(crate) fn forward_padded(&self, be: &B, x: &Act<B>, padding: usize) -> Result<Act<B>> {
        let p = Conv2d {
            batch: x.b,
            c_in: self.cin,
            h: x.h,
            w: x.w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding,
        };
        let (h, w) = p.out_hw();
        Ok(Act {
            data: be.conv2d(&x.data, &self.w, Some(&self.b), &p)?,
            b: x.b,
            c: self.cout,
            h,
            w,
        })
    }
}

pub(crate) struct GroupNorm<B: Backend = Cpu> {
    pub(crate) gamma: B::Weight,
    pub(crate) beta: B::Weight,
    pub(crate) groups: usize,
    pub(crate) eps: f32,
}

impl<B: Backend> GroupNorm<B> {
    pub(crate) fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        groups: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(GroupNorm {
            gamma: be.weight(src.get(&format!("{p}.weight"), &[c])?)?,
            beta: be.weight(src.get(&format!("{p}.bias"), &[c])?)?,
            groups,
            eps,
        })
    }

    pub(crate) fn forward(&self, be: &B, x: &Act<B>, silu: bool) -> Result<Act<B>> {
        let d = NormDims {
            batch: x.b,
            channels: x.c,
            hw: x.h * x.w,
            groups: self.groups,
            eps: self.eps,
        };
        Ok(Act {
            data: be.group_norm(&x.data, &self.gamma, &self.beta, d, silu)?,
            ..*x
        })
    }
}

pub(crate) struct LayerNorm<B: Backend = Cpu> {
    pub(crate) gamma: B::Weight,
    pub(crate) beta: B::Weight,
    pub(crate) dim: usize,
    pub(crate) eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    /// torch's default eps, 1e-5.
    pub(crate) fn load(be: &B, src: &dyn WeightSource, p: &str, dim: usize) -> Result<Self> {
        Self::load_eps(be, src, p, dim, 1e-5)
    }

    pub(crate) fn load_eps(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        dim: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(LayerNorm {
            gamma: be.weight(src.get(&format!("{p}.weight"), &[dim])?)?,
            beta: be.weight(src.get(&format!("{p}.bias"), &[dim])?)?,
            dim,
            eps,
        })
    }

    /// x [rows, dim]
    pub(crate) fn forward(&self, be: &B, x: &B::Buf) -> Result<B::Buf> {
        let rows = be.len(x) / self.dim.max(1);
        be.layer_norm(x, &self.gamma, &self.beta, (rows, self.dim), self.eps)
    }
}

/// An NCHW activation on backend `B`.
pub struct Act<B: Backend = Cpu> {
    pub data: B::Buf,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl<B: Backend> Act<B> {
    pub(crate) fn clone_act(&self, be: &B) -> Result<Act<B>> {
        Ok(Act {
            data: be.copy(&self.data)?,
            ..*self
        })
    }

    /// The same dims with other data.
    pub(crate) fn with(&self, data: B::Buf) -> Act<B> {
        Act { data, ..*self }
    }
}

/// y += x
pub(crate) fn add<B: Backend>(be: &B, y: &mut B::Buf, x: &B::Buf) -> Result<()> {
    be.add_inplace(y, x)
}

/// [B, C, HW] -> [B, HW, C] (`to_tokens`) or back.
pub(crate) fn transpose<B: Backend>(
    be: &B,
    x: &B::Buf,
    b: usize,
    c: usize,
    hw: usize,
    to_tokens: bool,
) -> Result<B::Buf> {
    be.transpose(x, (b, c, hw), to_tokens)
}

/// diffusers' `ResnetBlock2D`: `x + conv2(silu(gn2(conv1(silu(gn1(x))) + t)))`, where `t` is the
/// projected time embedding (UNet) or absent (VAE); a 1x1 `conv_shortcut` when channels change.
pub(crate) struct Resnet<B: Backend = Cpu> {
    pub(crate) norm1: GroupNorm<B>,
    pub(crate) conv1: Conv<B>,
    pub(crate) time_emb_proj: Option<Linear<B>>,
    pub(crate) norm2: GroupNorm<B>,
    pub(crate) conv2: Conv<B>,
    pub(crate) shortcut: Option<Conv<B>>,
}

impl<B: Backend> Resnet<B> {
    /// `temb`: the time-embedding width, for resnets that take one.
    pub(crate) fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        (cin, cout): (usize, usize),
        (groups, eps): (usize, f32),
        temb: Option<usize>,
    ) -> Result<Self> {
        Ok(Resnet {
            norm1: GroupNorm::load(be, src, &format!("{p}.norm1"), cin, groups, eps)?,
            conv1: Conv::load(be, src, &format!("{p}.conv1"), cin, cout, 3, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::load(be, src, &format!("{p}.time_emb_proj"), t, cout, true))
                .transpose()?,
            norm2: GroupNorm::load(be, src, &format!("{p}.norm2"), cout, groups, eps)?,
            conv2: Conv::load(be, src, &format!("{p}.conv2"), cout, cout, 3, 1)?,
            shortcut: if cin != cout {
                Some(Conv::load(
                    be,
                    src,
                    &format!("{p}.conv_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    /// Marks this resnet's layers (at `p` in component `c`) adaptable where the one list of
    /// adaptable layers names them (the UNet's; the VAE's resnets are not adapted).
    pub(crate) fn adaptable_in(mut self, c: crate::io::keymap::Component, p: &str) -> Self {
        self.conv1 = self.conv1.adaptable_in(c, &format!("{p}.conv1"));
        self.conv2 = self.conv2.adaptable_in(c, &format!("{p}.conv2"));
        self.shortcut = self
            .shortcut
            .map(|s| s.adaptable_in(c, &format!("{p}.conv_shortcut")));
        self.time_emb_proj = self
            .time_emb_proj
            .map(|l| l.adaptable_in(c, &format!("{p}.time_emb_proj")));
        self
    }

    /// The adaptable layers among this resnet's.
    pub(crate) fn adaptable(&self) -> impl Iterator<Item = AdaptRef<'_, B>> {
        let convs = [Some(&self.conv1), Some(&self.conv2), self.shortcut.as_ref()];
        convs
            .into_iter()
            .flatten()
            .map(AdaptRef::Conv)
            .chain(self.time_emb_proj.iter().map(AdaptRef::Linear))
    }

    /// `emb_silu`: SiLU(time embedding) [B, temb] for resnets that take one.
    pub(crate) fn forward(&self, be: &B, x: &Act<B>, emb_silu: Option<&B::Buf>) -> Result<Act<B>> {
        self.forward_hooked(be, x, emb_silu, None)
    }

    /// As `forward`, with the session's adapters on its adaptable layers.
    pub(crate) fn forward_hooked(
        &self,
        be: &B,
        x: &Act<B>,
        emb_silu: Option<&B::Buf>,
        ad: Hook<'_, B>,
    ) -> Result<Act<B>> {
        // Assignments, not shadowing: each intermediate is freed as soon as it is used (at
        // 512x512 one VAE activation is 128 MB or more).
        let mut h = self.norm1.forward(be, x, true)?;
        h = self.conv1.forward_adapted(be, &h, ad)?;
        if let (Some(proj), Some(e)) = (&self.time_emb_proj, emb_silu) {
            let t = proj.forward_adapted(be, e, x.b, x.b, ad)?;
            be.add_channel_bias(&mut h.data, &t, (h.b, h.c, h.h * h.w))?;
        }
        h = self.norm2.forward(be, &h, true)?;
        h = self.conv2.forward_adapted(be, &h, ad)?;
        match &self.shortcut {
            Some(s) => {
                let sc = s.forward_adapted(be, x, ad)?;
                add(be, &mut h.data, &sc.data)?;
            }
            None => add(be, &mut h.data, &x.data)?,
        }
        Ok(h)
    }
}

/// One adaptable layer of a model component: a linear layer or a convolution.
pub(crate) enum AdaptRef<'a, B: Backend> {
    Linear(&'a Linear<B>),
    Conv(&'a Conv<B>),
}

impl<'a, B: Backend> AdaptRef<'a, B> {
    fn key(&self) -> Option<&'a str> {
        match self {
            AdaptRef::Linear(l) => l.key.as_deref(),
            AdaptRef::Conv(c) => c.key.as_deref(),
        }
    }

    fn shape(&self) -> crate::model::LayerShape {
        match self {
            AdaptRef::Linear(l) => crate::model::LayerShape::linear(l.din, l.dout),
            AdaptRef::Conv(c) => {
                crate::model::LayerShape::conv(c.cin, c.cout, c.k, c.stride, c.k / 2)
            }
        }
    }

    /// The weight, `[dout, din]` with a convolution's `[in, k, k]` as its `din`.
    fn weight(&self) -> &'a B::Weight {
        match self {
            AdaptRef::Linear(l) => &l.w,
            AdaptRef::Conv(c) => &c.w,
        }
    }
}

/// The adapter keys and shapes of the adaptable layers among `layers`.
pub(crate) fn layer_table<'a, B: Backend + 'a>(
    layers: impl IntoIterator<Item = AdaptRef<'a, B>>,
) -> crate::model::LayerTable {
    layers
        .into_iter()
        .filter_map(|l| Some((l.key()?.to_string(), l.shape())))
        .collect()
}

/// The weight `[dout, din]` and (dout, din) of the layer with adapter key `key` among `layers`
/// ([`crate::model::Adaptable::projection`]).
pub(crate) fn find_weight<'a, B: Backend + 'a>(
    layers: impl IntoIterator<Item = AdaptRef<'a, B>>,
    key: &str,
) -> Option<(&'a B::Weight, usize, usize)> {
    layers.into_iter().find(|l| l.key() == Some(key)).map(|l| {
        let s = l.shape();
        (l.weight(), s.dout, s.din)
    })
}
