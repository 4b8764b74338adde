//! Building blocks shared by the model components: weight-backed linear, convolution and
//! norm layers over the CPU ops, and NCHW activations.

use crate::adapter::apply::AdapterCtx;
use crate::backend::cpu as ops;
use crate::backend::profile::scope;
use crate::error::Result;
use crate::model::weights::F32Weight;
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

pub(crate) struct Linear {
    pub(crate) w: F32Weight,
    pub(crate) b: Option<F32Weight>,
    pub(crate) din: usize,
    pub(crate) dout: usize,
    /// The adapter key (`unet.<path>`) of an adaptable projection.
    pub(crate) key: Option<String>,
}

impl Linear {
    pub(crate) fn load(
        src: &dyn WeightSource,
        p: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            w: src.get(&format!("{p}.weight"), &[dout, din])?,
            b: if bias {
                Some(src.get(&format!("{p}.bias"), &[dout])?)
            } else {
                None
            },
            din,
            dout,
            key: None,
        })
    }

    /// Marks a projection adapters may change, under its adapter key (e.g. `unet.<path>`).
    pub(crate) fn adaptable(mut self, key: String) -> Self {
        self.key = Some(key);
        self
    }

    /// As `forward`, with the session's adapters: `rows` are `batch` equal runs of samples.
    pub(crate) fn forward_adapted(
        &self,
        x: &[f32],
        rows: usize,
        batch: usize,
        ad: Option<&AdapterCtx<'_>>,
    ) -> Vec<f32> {
        let (Some(ad), Some(key)) = (ad, &self.key) else {
            return self.forward(x, rows);
        };
        let _p = scope("linear");
        let mut y = vec![0.0; rows * self.dout];
        let w = ad.weight(key).unwrap_or(&self.w);
        ops::linear(&mut y, x, w, self.b.as_deref(), rows, self.din, self.dout);
        ad.add_runtime(key, &mut y, x, batch, self.din, self.dout);
        y
    }

    /// x [rows, din] -> [rows, dout]
    pub(crate) fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let _p = scope("linear");
        let mut y = vec![0.0; rows * self.dout];
        ops::linear(
            &mut y,
            x,
            &self.w,
            self.b.as_deref(),
            rows,
            self.din,
            self.dout,
        );
        y
    }
}

pub(crate) struct Conv {
    pub(crate) w: F32Weight,
    pub(crate) b: F32Weight,
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
}

impl Conv {
    pub(crate) fn load(
        src: &dyn WeightSource,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Conv {
            w: src.get(&format!("{p}.weight"), &[cout, cin, k, k])?,
            b: src.get(&format!("{p}.bias"), &[cout])?,
            cin,
            cout,
            k,
            stride,
        })
    }

    pub(crate) fn forward(&self, x: &Act) -> Act {
        let p = ops::Conv2d {
            batch: x.b,
            c_in: self.cin,
            h: x.h,
            w: x.w,
            c_out: self.cout,
            kernel: self.k,
            stride: self.stride,
            padding: self.k / 2,
        };
        let (h, w) = p.out_hw();
        let _p = scope(match (self.k, self.stride) {
            (1, _) => "conv 1x1",
            (_, 1) => "conv 3x3",
            _ => "conv 3x3 stride 2",
        });
        let mut y = vec![0.0; x.b * self.cout * h * w];
        ops::conv2d(&mut y, &x.data, &self.w, Some(&self.b), &p);
        Act {
            data: y,
            b: x.b,
            c: self.cout,
            h,
            w,
        }
    }
}

pub(crate) struct GroupNorm {
    pub(crate) gamma: F32Weight,
    pub(crate) beta: F32Weight,
    pub(crate) groups: usize,
    pub(crate) eps: f32,
}

impl GroupNorm {
    pub(crate) fn load(
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        groups: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(GroupNorm {
            gamma: src.get(&format!("{p}.weight"), &[c])?,
            beta: src.get(&format!("{p}.bias"), &[c])?,
            groups,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Act, silu: bool) -> Act {
        let _p = scope("group norm");
        let mut y = vec![0.0; x.data.len()];
        ops::group_norm(
            &mut y,
            &x.data,
            &self.gamma,
            &self.beta,
            x.b,
            x.c,
            x.h * x.w,
            self.groups,
            self.eps,
            silu,
        );
        Act { data: y, ..*x }
    }
}

pub(crate) struct LayerNorm {
    pub(crate) gamma: F32Weight,
    pub(crate) beta: F32Weight,
    pub(crate) dim: usize,
    pub(crate) eps: f32,
}

impl LayerNorm {
    /// torch's default eps, 1e-5.
    pub(crate) fn load(src: &dyn WeightSource, p: &str, dim: usize) -> Result<Self> {
        Self::load_eps(src, p, dim, 1e-5)
    }

    pub(crate) fn load_eps(src: &dyn WeightSource, p: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            gamma: src.get(&format!("{p}.weight"), &[dim])?,
            beta: src.get(&format!("{p}.bias"), &[dim])?,
            dim,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &[f32]) -> Vec<f32> {
        let _p = scope("layer norm");
        let mut y = vec![0.0; x.len()];
        ops::layer_norm(
            &mut y,
            x,
            &self.gamma,
            &self.beta,
            x.len() / self.dim,
            self.dim,
            self.eps,
        );
        y
    }
}

/// An NCHW activation.
pub struct Act {
    pub data: Vec<f32>,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Act {
    pub(crate) fn clone_act(&self) -> Act {
        let _p = scope("copies");
        Act {
            data: self.data.clone(),
            ..*self
        }
    }
}

/// y += x
pub(crate) fn add(y: &mut [f32], x: &[f32]) {
    let _p = scope("add");
    ops::add_inplace(y, x);
}

/// [B, C, HW] -> [B, HW, C] (`to_tokens`) or back.
pub(crate) fn transpose(x: &[f32], b: usize, c: usize, hw: usize, to_tokens: bool) -> Vec<f32> {
    let _p = scope("copies");
    let mut y = vec![0.0; x.len()];
    if to_tokens {
        ops::nchw_to_nhwc(&mut y, x, b, c, hw);
    } else {
        ops::nhwc_to_nchw(&mut y, x, b, c, hw);
    }
    y
}

/// diffusers' `ResnetBlock2D`: `x + conv2(silu(gn2(conv1(silu(gn1(x))) + t)))`, where `t` is the
/// projected time embedding (UNet) or absent (VAE); a 1x1 `conv_shortcut` when channels change.
pub(crate) struct Resnet {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv,
    pub(crate) time_emb_proj: Option<Linear>,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv,
    pub(crate) shortcut: Option<Conv>,
}

impl Resnet {
    /// `temb`: the time-embedding width, for resnets that take one.
    pub(crate) fn load(
        src: &dyn WeightSource,
        p: &str,
        (cin, cout): (usize, usize),
        (groups, eps): (usize, f32),
        temb: Option<usize>,
    ) -> Result<Self> {
        Ok(Resnet {
            norm1: GroupNorm::load(src, &format!("{p}.norm1"), cin, groups, eps)?,
            conv1: Conv::load(src, &format!("{p}.conv1"), cin, cout, 3, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::load(src, &format!("{p}.time_emb_proj"), t, cout, true))
                .transpose()?,
            norm2: GroupNorm::load(src, &format!("{p}.norm2"), cout, groups, eps)?,
            conv2: Conv::load(src, &format!("{p}.conv2"), cout, cout, 3, 1)?,
            shortcut: if cin != cout {
                Some(Conv::load(
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

    /// `emb_silu`: SiLU(time embedding) [B, temb] for resnets that take one.
    pub(crate) fn forward(&self, x: &Act, emb_silu: Option<&[f32]>) -> Act {
        // Assignments, not shadowing: each intermediate is freed as soon as it is used (at
        // 512x512 one VAE activation is 128 MB or more).
        let mut h = self.norm1.forward(x, true);
        h = self.conv1.forward(&h);
        if let (Some(proj), Some(e)) = (&self.time_emb_proj, emb_silu) {
            let t = proj.forward(e, x.b);
            let _p = scope("add");
            ops::add_channel_bias(&mut h.data, &t, h.b, h.c, h.h * h.w);
        }
        h = self.norm2.forward(&h, true);
        h = self.conv2.forward(&h);
        match &self.shortcut {
            Some(s) => {
                let sc = s.forward(x);
                add(&mut h.data, &sc.data);
            }
            None => add(&mut h.data, &x.data),
        }
        h
    }
}

/// The adapter keys and shapes of the adaptable projections among `layers`.
pub(crate) fn layer_table<'a>(
    layers: impl IntoIterator<Item = &'a Linear>,
) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
    layers
        .into_iter()
        .filter_map(|l| {
            Some((
                l.key.clone()?,
                crate::adapter::LayerShape {
                    din: l.din,
                    dout: l.dout,
                },
            ))
        })
        .collect()
}

/// The base weight `[dout, din]` and dims of the projection with adapter key `key`.
pub(crate) fn find_projection<'a>(
    layers: impl IntoIterator<Item = &'a Linear>,
    key: &str,
) -> Option<(&'a [f32], usize, usize)> {
    layers
        .into_iter()
        .find(|l| l.key.as_deref() == Some(key))
        .map(|l| (&l.w[..], l.dout, l.din))
}
