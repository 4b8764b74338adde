//! diffusers' `UNet2DConditionModel` (SD 1.x and 2.x) on any [`Backend`]. On the CPU backend
//! (the default) weights are f32, borrowed from the mapped file when stored as f32, and compute
//! is f32. On the CUDA backend (`Unet<Cuda<T>>`, f32/f16/bf16) the same code runs on the GPU's
//! kernels and cuBLAS: the UNet of every session and pipeline on a CUDA runtime.

use crate::backend::{Activation, AdapterHook, AttnDims, Backend, Cpu};
use crate::error::{Error, Result};
use crate::io::keymap::Component;
use crate::model::adaptable::{Adaptable, LayerTable, UNET_PREFIX};
use crate::model::config::{BlockKind, UnetConfig};
pub use crate::model::layers::WeightSource;
use crate::model::layers::{
    add, find_weight, layer_table, transpose, Act, AdaptRef, Conv, GroupNorm, Hook, LayerNorm,
    Linear, Resnet,
};

pub(crate) struct Attention<B: Backend = Cpu> {
    pub(crate) to_q: Linear<B>,
    pub(crate) to_k: Linear<B>,
    pub(crate) to_v: Linear<B>,
    pub(crate) to_out: Linear<B>,
    pub(crate) heads: usize,
}

/// A linear layer with a bias at `path`, marked adaptable ([`crate::model::adaptable::adapter_key`]'s list).
fn adaptable_linear<B: Backend>(
    be: &B,
    src: &dyn WeightSource,
    path: &str,
    din: usize,
    dout: usize,
) -> Result<Linear<B>> {
    Ok(Linear::load(be, src, path, din, dout, true)?.adaptable_in(Component::Unet, path))
}

/// A convolution at `path` with the UNet's padding (k / 2), marked adaptable.
fn adaptable_conv<B: Backend>(
    be: &B,
    src: &dyn WeightSource,
    path: &str,
    (cin, cout): (usize, usize),
    k: usize,
    stride: usize,
) -> Result<Conv<B>> {
    Ok(Conv::load(be, src, path, cin, cout, k, stride)?.adaptable_in(Component::Unet, path))
}

/// A UNet resnet at `p`, its layers marked adaptable.
fn unet_resnet<B: Backend>(
    be: &B,
    src: &dyn WeightSource,
    p: &str,
    channels: (usize, usize),
    norm: (usize, f32),
    temb: Option<usize>,
) -> Result<Resnet<B>> {
    Ok(Resnet::load(be, src, p, channels, norm, temb)?.adaptable_in(Component::Unet, p))
}

impl<B: Backend> Attention<B> {
    fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        ctx_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        let proj = |name: &str, din: usize, bias: bool| -> Result<Linear<B>> {
            let path = format!("{p}.{name}");
            Ok(Linear::load(be, src, &path, din, c, bias)?.adaptable_in(Component::Unet, &path))
        };
        Ok(Attention {
            to_q: proj("to_q", c, false)?,
            to_k: proj("to_k", ctx_dim, false)?,
            to_v: proj("to_v", ctx_dim, false)?,
            to_out: proj("to_out.0", c, true)?,
            heads,
        })
    }

    /// x [B, lq, c], ctx [B, lk, ctx_dim] (None: self-attention) -> [B, lq, c]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        ctx: Option<&B::Buf>,
        b: usize,
        lq: usize,
        lk: usize,
        ad: Hook<'_, B>,
    ) -> Result<B::Buf> {
        let kv = ctx.unwrap_or(x);
        let q = self.to_q.forward_adapted(be, x, b * lq, b, ad)?;
        let k = self.to_k.forward_adapted(be, kv, b * lk, b, ad)?;
        let v = self.to_v.forward_adapted(be, kv, b * lk, b, ad)?;
        let c = self.to_q.dout;
        let o = {
            let d = AttnDims {
                batch: b,
                lq,
                lk,
                heads: self.heads,
                head_dim: c / self.heads,
                causal: false,
            };
            be.attention(&q, &k, &v, d)?
        };
        self.to_out.forward_adapted(be, &o, b * lq, b, ad)
    }
}

pub(crate) struct TransformerBlock<B: Backend = Cpu> {
    pub(crate) norm1: LayerNorm<B>,
    pub(crate) attn1: Attention<B>,
    pub(crate) norm2: LayerNorm<B>,
    pub(crate) attn2: Attention<B>,
    pub(crate) norm3: LayerNorm<B>,
    pub(crate) ff_proj: Linear<B>,
    pub(crate) ff_out: Linear<B>,
}

impl<B: Backend> TransformerBlock<B> {
    fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        heads: usize,
        ctx_dim: usize,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::load(be, src, &format!("{p}.norm1"), c)?,
            attn1: Attention::load(be, src, &format!("{p}.attn1"), c, c, heads)?,
            norm2: LayerNorm::load(be, src, &format!("{p}.norm2"), c)?,
            attn2: Attention::load(be, src, &format!("{p}.attn2"), c, ctx_dim, heads)?,
            norm3: LayerNorm::load(be, src, &format!("{p}.norm3"), c)?,
            ff_proj: adaptable_linear(be, src, &format!("{p}.ff.net.0.proj"), c, 8 * c)?,
            ff_out: adaptable_linear(be, src, &format!("{p}.ff.net.2"), 4 * c, c)?,
        })
    }

    /// x [B, t, c] in place; ctx [B, l, ctx_dim].
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        be: &B,
        x: &mut B::Buf,
        ctx: &B::Buf,
        b: usize,
        t: usize,
        l: usize,
        ad: Hook<'_, B>,
    ) -> Result<()> {
        let c = self.norm1.dim;
        let n = self.norm1.forward(be, x)?;
        let a = self.attn1.forward(be, &n, None, b, t, t, ad)?;
        add(be, x, &a)?;
        let n = self.norm2.forward(be, x)?;
        let a = self.attn2.forward(be, &n, Some(ctx), b, t, l, ad)?;
        add(be, x, &a)?;
        let n = self.norm3.forward(be, x)?;
        let f = self.ff_proj.forward_adapted(be, &n, b * t, b, ad)?;
        let g = be.geglu(&f, (b * t, 4 * c))?;
        let f = self.ff_out.forward_adapted(be, &g, b * t, b, ad)?;
        add(be, x, &f)
    }
}

pub(crate) enum Proj<B: Backend = Cpu> {
    Conv(Conv<B>),
    Linear(Linear<B>),
}

pub(crate) struct Transformer2d<B: Backend = Cpu> {
    pub(crate) norm: GroupNorm<B>,
    pub(crate) proj_in: Proj<B>,
    pub(crate) blocks: Vec<TransformerBlock<B>>,
    pub(crate) proj_out: Proj<B>,
}

impl<B: Backend> Transformer2d<B> {
    fn load(
        be: &B,
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        heads: usize,
        depth: usize,
        cfg: &UnetConfig,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj<B>> {
            let p = format!("{p}.{name}");
            Ok(if cfg.use_linear_projection {
                Proj::Linear(adaptable_linear(be, src, &p, c, c)?)
            } else {
                Proj::Conv(adaptable_conv(be, src, &p, (c, c), 1, 1)?)
            })
        };
        Ok(Transformer2d {
            norm: GroupNorm::load(be, src, &format!("{p}.norm"), c, cfg.norm_num_groups, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::load(
                        be,
                        src,
                        &format!("{p}.transformer_blocks.{i}"),
                        c,
                        heads,
                        cfg.cross_attention_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(
        &self,
        be: &B,
        x: &Act<B>,
        ctx: &B::Buf,
        l: usize,
        ad: Hook<'_, B>,
    ) -> Result<Act<B>> {
        let (b, c, hw) = (x.b, x.c, x.h * x.w);
        let h = self.norm.forward(be, x, false)?;
        let mut tokens = match &self.proj_in {
            Proj::Conv(conv) => {
                transpose(be, &conv.forward_adapted(be, &h, ad)?.data, b, c, hw, true)?
            }
            Proj::Linear(lin) => {
                let t = transpose(be, &h.data, b, c, hw, true)?;
                lin.forward_adapted(be, &t, b * hw, b, ad)?
            }
        };
        drop(h);
        for blk in &self.blocks {
            blk.forward(be, &mut tokens, ctx, b, hw, l, ad)?;
        }
        let mut out = match &self.proj_out {
            Proj::Conv(conv) => {
                conv.forward_adapted(be, &x.with(transpose(be, &tokens, b, c, hw, false)?), ad)?
            }
            Proj::Linear(lin) => x.with(transpose(
                be,
                &lin.forward_adapted(be, &tokens, b * hw, b, ad)?,
                b,
                c,
                hw,
                false,
            )?),
        };
        add(be, &mut out.data, &x.data)?;
        Ok(out)
    }
}

pub(crate) struct Block<B: Backend = Cpu> {
    pub(crate) resnets: Vec<Resnet<B>>,
    pub(crate) attentions: Vec<Transformer2d<B>>,
    /// Downsampler (stride-2 conv) or upsampler (nearest 2x then conv).
    pub(crate) resample: Option<Conv<B>>,
}

/// One UNet evaluation's inputs, exactly diffusers' `UNet2DConditionModel` arguments.
#[derive(Clone, Copy, Debug)]
pub struct UnetInput<'a> {
    /// [batch, in_channels, height, width]
    pub sample: &'a [f32],
    /// `[batch]`
    pub timesteps: &'a [f32],
    /// encoder_hidden_states [batch, context_len, cross_attention_dim]
    pub context: &'a [f32],
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub context_len: usize,
}

/// The UNet, ready to run on backend `B` (the CPU by default), which holds its weights.
pub struct Unet<B: Backend = Cpu> {
    pub config: UnetConfig,
    pub(crate) be: B,
    pub(crate) time_1: Linear<B>,
    pub(crate) time_2: Linear<B>,
    pub(crate) conv_in: Conv<B>,
    pub(crate) down: Vec<Block<B>>,
    pub(crate) mid: (Resnet<B>, Transformer2d<B>, Resnet<B>),
    pub(crate) up: Vec<Block<B>>,
    pub(crate) norm_out: GroupNorm<B>,
    pub(crate) conv_out: Conv<B>,
}

impl<B: Backend> Adaptable<B> for Unet<B> {
    fn key_prefix(&self) -> &'static str {
        UNET_PREFIX
    }

    fn projection(&self, key: &str) -> Option<(&B::Weight, usize, usize)> {
        find_weight(self.projections(), key)
    }

    fn adaptable_layers(&self) -> LayerTable {
        layer_table(self.projections())
    }
}

impl<B: Backend> std::fmt::Debug for Unet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unet")
            .field("backend", &self.be.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Unet<Cpu> {
    /// Builds the UNet of `config` from `src`, checking every tensor's presence and shape.
    pub fn load(config: UnetConfig, src: &dyn WeightSource) -> Result<Unet> {
        Unet::load_on(Cpu, config, src)
    }

    /// Loads the UNet of a model: config from `unet/config.json`, else inferred from shapes.
    pub fn from_model(model: &crate::Model) -> Result<Unet> {
        Unet::from_model_on(Cpu, model)
    }

    /// One evaluation -> [B, out, H, W]. Shapes are checked; errors name the argument.
    pub fn forward(&self, x: &UnetInput<'_>) -> Result<Vec<f32>> {
        self.forward_hooked(x, None)
    }
}

impl<B: Backend> Unet<B> {
    /// As [`Unet::from_model`], on backend `be`.
    pub fn from_model_on(be: B, model: &crate::Model) -> Result<Unet<B>> {
        let (weights, config) = model.component_config(
            crate::io::keymap::Component::Unet,
            UnetConfig::from_json,
            UnetConfig::infer,
        )?;
        Unet::load_on(be, config, weights)
    }

    /// The backend this UNet runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// As [`Unet::load`], on backend `be` (each weight is converted and uploaded once).
    pub fn load_on(be: B, config: UnetConfig, src: &dyn WeightSource) -> Result<Unet<B>> {
        let cfg = &config;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let down = (0..n)
            .map(|i| {
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let p = format!("down_blocks.{i}");
                let resnets = (0..cfg.layers_per_block)
                    .map(|j| {
                        unet_resnet(
                            &be,
                            src,
                            &format!("{p}.resnets.{j}"),
                            (if j == 0 { cin } else { ch[i] }, ch[i]),
                            (cfg.norm_num_groups, cfg.norm_eps),
                            Some(temb),
                        )
                    })
                    .collect::<Result<_>>()?;
                let attentions = match cfg.down_blocks[i] {
                    BlockKind::CrossAttn => (0..cfg.layers_per_block)
                        .map(|j| {
                            Transformer2d::load(
                                &be,
                                src,
                                &format!("{p}.attentions.{j}"),
                                ch[i],
                                cfg.heads[i],
                                cfg.transformer_layers[i],
                                cfg,
                            )
                        })
                        .collect::<Result<_>>()?,
                    BlockKind::Plain => Vec::new(),
                };
                let resample = if i + 1 < n {
                    Some(adaptable_conv(
                        &be,
                        src,
                        &format!("{p}.downsamplers.0.conv"),
                        (ch[i], ch[i]),
                        3,
                        2,
                    )?)
                } else {
                    None
                };
                Ok(Block {
                    resnets,
                    attentions,
                    resample,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let top = ch[n - 1];
        let mid = (
            unet_resnet(
                &be,
                src,
                "mid_block.resnets.0",
                (top, top),
                (cfg.norm_num_groups, cfg.norm_eps),
                Some(temb),
            )?,
            Transformer2d::load(
                &be,
                src,
                "mid_block.attentions.0",
                top,
                cfg.heads[n - 1],
                cfg.transformer_layers[n - 1],
                cfg,
            )?,
            unet_resnet(
                &be,
                src,
                "mid_block.resnets.1",
                (top, top),
                (cfg.norm_num_groups, cfg.norm_eps),
                Some(temb),
            )?,
        );
        // diffusers' up path: block i works at rev[i] channels; its resnets see the previous
        // block's output (first) and skips from the matching down block.
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let up = (0..n)
            .map(|i| {
                let prev = if i == 0 { rev[0] } else { rev[i - 1] };
                let out = rev[i];
                let input = rev[(i + 1).min(n - 1)];
                let p = format!("up_blocks.{i}");
                let resnets = (0..=cfg.layers_per_block)
                    .map(|j| {
                        let skip = if j == cfg.layers_per_block {
                            input
                        } else {
                            out
                        };
                        let res_in = if j == 0 { prev } else { out };
                        unet_resnet(
                            &be,
                            src,
                            &format!("{p}.resnets.{j}"),
                            (res_in + skip, out),
                            (cfg.norm_num_groups, cfg.norm_eps),
                            Some(temb),
                        )
                    })
                    .collect::<Result<_>>()?;
                let attentions = match cfg.up_blocks[i] {
                    BlockKind::CrossAttn => (0..=cfg.layers_per_block)
                        .map(|j| {
                            Transformer2d::load(
                                &be,
                                src,
                                &format!("{p}.attentions.{j}"),
                                out,
                                cfg.heads[n - 1 - i],
                                cfg.transformer_layers[n - 1 - i],
                                cfg,
                            )
                        })
                        .collect::<Result<_>>()?,
                    BlockKind::Plain => Vec::new(),
                };
                let resample = if i + 1 < n {
                    Some(adaptable_conv(
                        &be,
                        src,
                        &format!("{p}.upsamplers.0.conv"),
                        (out, out),
                        3,
                        1,
                    )?)
                } else {
                    None
                };
                Ok(Block {
                    resnets,
                    attentions,
                    resample,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Unet {
            time_1: adaptable_linear(&be, src, "time_embedding.linear_1", ch[0], temb)?,
            time_2: adaptable_linear(&be, src, "time_embedding.linear_2", temb, temb)?,
            conv_in: adaptable_conv(&be, src, "conv_in", (cfg.in_channels, ch[0]), 3, 1)?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(
                &be,
                src,
                "conv_norm_out",
                ch[0],
                cfg.norm_num_groups,
                cfg.norm_eps,
            )?,
            conv_out: adaptable_conv(&be, src, "conv_out", (ch[0], cfg.out_channels), 3, 1)?,
            config,
            be,
        })
    }

    /// Every adaptable layer ([`crate::model::adaptable::adapter_key`]'s list): linear layers
    /// and convolutions.
    fn projections(&self) -> Vec<AdaptRef<'_, B>> {
        let mut out = vec![
            AdaptRef::Linear(&self.time_1),
            AdaptRef::Linear(&self.time_2),
            AdaptRef::Conv(&self.conv_in),
            AdaptRef::Conv(&self.conv_out),
        ];
        for blk in self.down.iter().chain(&self.up) {
            out.extend(blk.resnets.iter().flat_map(|r| r.adaptable()));
            out.extend(blk.resample.iter().map(AdaptRef::Conv));
        }
        out.extend(self.mid.0.adaptable().chain(self.mid.2.adaptable()));
        let blocks = self
            .down
            .iter()
            .chain(&self.up)
            .flat_map(|b| &b.attentions)
            .chain(std::iter::once(&self.mid.1));
        for t in blocks {
            for p in [&t.proj_in, &t.proj_out] {
                out.push(match p {
                    Proj::Linear(l) => AdaptRef::Linear(l),
                    Proj::Conv(c) => AdaptRef::Conv(c),
                });
            }
            for blk in &t.blocks {
                for a in [&blk.attn1, &blk.attn2] {
                    let l = [&a.to_q, &a.to_k, &a.to_v, &a.to_out];
                    out.extend(l.map(AdaptRef::Linear));
                }
                out.extend([
                    AdaptRef::Linear(&blk.ff_proj),
                    AdaptRef::Linear(&blk.ff_out),
                ]);
            }
        }
        out
    }

    /// One evaluation with adapters `ad` (a session's set as this backend's hook).
    pub fn forward_adapted(&self, x: &UnetInput<'_>, ad: &dyn AdapterHook<B>) -> Result<Vec<f32>> {
        self.forward_hooked(x, Some(ad))
    }

    /// One evaluation with adapters on this backend (inputs and output f32 on the host).
    pub fn forward_hooked(&self, x: &UnetInput<'_>, ad: Hook<'_, B>) -> Result<Vec<f32>> {
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
        let cfg = &self.config;
        check_input(
            cfg,
            (sample.len(), timesteps.len(), context.len()),
            (b, h, w, l),
        )?;
        let be = &self.be;
        let c0 = cfg.block_out_channels[0];
        let temb = be.timestep_embedding(timesteps, c0, cfg.flip_sin_to_cos, cfg.freq_shift)?;
        let mut e = self.time_1.forward_adapted(be, &temb, b, b, ad)?;
        be.activate(&mut e, Activation::Silu)?;
        let mut emb = self.time_2.forward_adapted(be, &e, b, b, ad)?;
        be.activate(&mut emb, Activation::Silu)?; // every resnet applies SiLU first; do it once
        let context = be.upload(context)?;
        let x = Act {
            data: be.upload(sample)?,
            b,
            c: cfg.in_channels,
            h,
            w,
        };
        let mut x = self.conv_in.forward_adapted(be, &x, ad)?;
        // diffusers keeps conv_in's output and every down layer's output as skips.
        let mut skips: Vec<Act<B>> = vec![x.clone_act(be)?];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward_hooked(be, &x, Some(&emb), ad)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(be, &x, &context, l, ad)?;
                }
                skips.push(x.clone_act(be)?);
            }
            if let Some(ds) = &blk.resample {
                x = ds.forward_adapted(be, &x, ad)?;
                skips.push(x.clone_act(be)?);
            }
        }
        x = self.mid.0.forward_hooked(be, &x, Some(&emb), ad)?;
        x = self.mid.1.forward(be, &x, &context, l, ad)?;
        x = self.mid.2.forward_hooked(be, &x, Some(&emb), ad)?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Internal("UNet skip stack ran dry".into()))?;
                let cat = be.concat_channels(&x.data, &skip.data, (b, x.c, skip.c, x.h * x.w))?;
                x = r.forward_hooked(
                    be,
                    &Act {
                        data: cat,
                        c: x.c + skip.c,
                        ..x
                    },
                    Some(&emb),
                    ad,
                )?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(be, &x, &context, l, ad)?;
                }
            }
            if let Some(us) = &blk.resample {
                // diffusers passes the next skip's size to the upsampler when a latent side is
                // not a multiple of the downsampling (a stride-2 conv rounds up): nearest
                // interpolation to 2h - 1 is the 2x upsample without its last row.
                let (th, tw) = skips.last().map_or((2 * x.h, 2 * x.w), |s| (s.h, s.w));
                if th + 1 < 2 * x.h || th > 2 * x.h || tw + 1 < 2 * x.w || tw > 2 * x.w {
                    return Err(Error::Internal(format!(
                        "UNet: a {}x{} level cannot be upsampled to its skip's {th}x{tw}",
                        x.h, x.w
                    )));
                }
                let up = be.upsample_nearest2x(&x.data, (b * x.c, x.h, x.w))?;
                let up = if (th, tw) == (2 * x.h, 2 * x.w) {
                    up
                } else {
                    be.crop_top_left(&up, (b * x.c, 2 * x.h, 2 * x.w), (th, tw))?
                };
                x = us.forward_adapted(
                    be,
                    &Act {
                        data: up,
                        h: th,
                        w: tw,
                        ..x
                    },
                    ad,
                )?;
            }
        }
        let hn = self.norm_out.forward(be, &x, true)?;
        be.download(&self.conv_out.forward_adapted(be, &hn, ad)?.data)
    }
}

/// Checks one evaluation's shapes: the element counts of sample, timesteps and
/// encoder_hidden_states against (batch, height, width, context_len); errors name the argument
/// (shared by the CPU and CUDA UNets). Products saturate, so absurd sizes are errors too.
pub(crate) fn check_input(
    cfg: &UnetConfig,
    (sample, timesteps, context): (usize, usize, usize),
    (b, h, w, l): (usize, usize, usize, usize),
) -> Result<()> {
    let expect = |name: &'static str, got: usize, want: usize, shape: String| {
        if got != want {
            Err(Error::invalid_arg(
                name,
                format!("has {got} values, expected {shape} = {want}"),
            ))
        } else {
            Ok(())
        }
    };
    expect(
        "sample",
        sample,
        [b, cfg.in_channels, h, w]
            .iter()
            .fold(1, |p, &d| p.saturating_mul(d)),
        format!("[{b}, {}, {h}, {w}]", cfg.in_channels),
    )?;
    expect("timestep", timesteps, b, format!("[{b}]"))?;
    expect(
        "encoder_hidden_states",
        context,
        [b, l, cfg.cross_attention_dim]
            .iter()
            .fold(1, |p, &d| p.saturating_mul(d)),
        format!("[{b}, {l}, {}]", cfg.cross_attention_dim),
    )?;
    if b == 0 || h == 0 || w == 0 || l == 0 {
        return Err(Error::invalid_arg(
            "sample",
            "batch, height, width and context length must be positive",
        ));
    }
    // Activations are ~100x the sample: bound the sizes before a forward allocates them.
    crate::limits::check_range("batch", b, crate::limits::MAX_BATCH)?;
    if h.max(w) > crate::limits::MAX_LATENT_SIDE {
        return Err(Error::invalid_arg(
            "sample",
            format!(
                "height {h} and width {w}: at most {} latent pixels a side (hdb's documented limit)",
                crate::limits::MAX_LATENT_SIDE
            ),
        ));
    }
    // Any size works: like diffusers, the upsamplers take their skips' sizes where a
    // stride-2 downsampling rounded up.
    Ok(())
}
