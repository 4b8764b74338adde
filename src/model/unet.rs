//! diffusers' `UNet2DConditionModel` (SD 1.x and 2.x) on the CPU backend: weights as f32
//! (borrowed from the mapped file when stored as f32), compute in f32.

use crate::adapter::apply::AdapterCtx;
use crate::backend::cpu as ops;
use crate::backend::profile::scope;
use crate::error::{Error, Result};
use crate::model::config::{BlockKind, UnetConfig};
pub use crate::model::layers::WeightSource;
use crate::model::layers::{
    add, find_projection, layer_table, transpose, Act, Conv, GroupNorm, LayerNorm, Linear, Resnet,
};

pub(crate) struct Attention {
    pub(crate) to_q: Linear,
    pub(crate) to_k: Linear,
    pub(crate) to_v: Linear,
    pub(crate) to_out: Linear,
    pub(crate) heads: usize,
}

impl Attention {
    fn load(
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        ctx_dim: usize,
        heads: usize,
    ) -> Result<Self> {
        Ok(Attention {
            to_q: Linear::load(src, &format!("{p}.to_q"), c, c, false)?
                .adaptable(format!("unet.{p}.to_q")),
            to_k: Linear::load(src, &format!("{p}.to_k"), ctx_dim, c, false)?
                .adaptable(format!("unet.{p}.to_k")),
            to_v: Linear::load(src, &format!("{p}.to_v"), ctx_dim, c, false)?
                .adaptable(format!("unet.{p}.to_v")),
            to_out: Linear::load(src, &format!("{p}.to_out.0"), c, c, true)?
                .adaptable(format!("unet.{p}.to_out.0")),
            heads,
        })
    }

    /// x [B, lq, c], ctx [B, lk, ctx_dim] -> [B, lq, c]
    fn forward(
        &self,
        x: &[f32],
        ctx: &[f32],
        b: usize,
        lq: usize,
        lk: usize,
        ad: Option<&AdapterCtx<'_>>,
    ) -> Vec<f32> {
        let q = self.to_q.forward_adapted(x, b * lq, b, ad);
        let k = self.to_k.forward_adapted(ctx, b * lk, b, ad);
        let v = self.to_v.forward_adapted(ctx, b * lk, b, ad);
        let c = self.to_q.dout;
        let mut o = vec![0.0; b * lq * c];
        {
            let same = std::ptr::eq(x.as_ptr(), ctx.as_ptr());
            let _p = scope(if same {
                "attention (self)"
            } else {
                "attention (cross)"
            });
            ops::attention(&mut o, &q, &k, &v, b, lq, lk, self.heads, c / self.heads);
        }
        self.to_out.forward_adapted(&o, b * lq, b, ad)
    }
}

pub(crate) struct TransformerBlock {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn1: Attention,
    pub(crate) norm2: LayerNorm,
    pub(crate) attn2: Attention,
    pub(crate) norm3: LayerNorm,
    pub(crate) ff_proj: Linear,
    pub(crate) ff_out: Linear,
}

impl TransformerBlock {
    fn load(
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        heads: usize,
        ctx_dim: usize,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: LayerNorm::load(src, &format!("{p}.norm1"), c)?,
            attn1: Attention::load(src, &format!("{p}.attn1"), c, c, heads)?,
            norm2: LayerNorm::load(src, &format!("{p}.norm2"), c)?,
            attn2: Attention::load(src, &format!("{p}.attn2"), c, ctx_dim, heads)?,
            norm3: LayerNorm::load(src, &format!("{p}.norm3"), c)?,
            ff_proj: Linear::load(src, &format!("{p}.ff.net.0.proj"), c, 8 * c, true)?,
            ff_out: Linear::load(src, &format!("{p}.ff.net.2"), 4 * c, c, true)?,
        })
    }

    /// x [B, t, c] in place; ctx [B, l, ctx_dim].
    fn forward(
        &self,
        x: &mut [f32],
        ctx: &[f32],
        b: usize,
        t: usize,
        l: usize,
        ad: Option<&AdapterCtx<'_>>,
    ) {
        let c = self.norm1.dim;
        let n = self.norm1.forward(x);
        let a = self.attn1.forward(&n, &n, b, t, t, ad);
        add(x, &a);
        let n = self.norm2.forward(x);
        let a = self.attn2.forward(&n, ctx, b, t, l, ad);
        add(x, &a);
        let n = self.norm3.forward(x);
        let f = self.ff_proj.forward(&n, b * t);
        let mut g = vec![0.0; b * t * 4 * c];
        {
            let _p = scope("geglu");
            ops::geglu(&mut g, &f, b * t, 4 * c);
        }
        let f = self.ff_out.forward(&g, b * t);
        add(x, &f);
    }
}

pub(crate) enum Proj {
    Conv(Conv),
    Linear(Linear),
}

pub(crate) struct Transformer2d {
    pub(crate) norm: GroupNorm,
    pub(crate) proj_in: Proj,
    pub(crate) blocks: Vec<TransformerBlock>,
    pub(crate) proj_out: Proj,
}

impl Transformer2d {
    fn load(
        src: &dyn WeightSource,
        p: &str,
        c: usize,
        heads: usize,
        depth: usize,
        cfg: &UnetConfig,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            let p = format!("{p}.{name}");
            Ok(if cfg.use_linear_projection {
                Proj::Linear(Linear::load(src, &p, c, c, true)?)
            } else {
                Proj::Conv(Conv::load(src, &p, c, c, 1, 1)?)
            })
        };
        Ok(Transformer2d {
            norm: GroupNorm::load(src, &format!("{p}.norm"), c, cfg.norm_num_groups, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::load(
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

    fn forward(&self, x: &Act, ctx: &[f32], l: usize, ad: Option<&AdapterCtx<'_>>) -> Act {
        let (b, c, hw) = (x.b, x.c, x.h * x.w);
        let h = self.norm.forward(x, false);
        let mut tokens = match &self.proj_in {
            Proj::Conv(conv) => transpose(&conv.forward(&h).data, b, c, hw, true),
            Proj::Linear(lin) => lin.forward(&transpose(&h.data, b, c, hw, true), b * hw),
        };
        for blk in &self.blocks {
            blk.forward(&mut tokens, ctx, b, hw, l, ad);
        }
        let mut out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&Act {
                data: transpose(&tokens, b, c, hw, false),
                ..*x
            }),
            Proj::Linear(lin) => Act {
                data: transpose(&lin.forward(&tokens, b * hw), b, c, hw, false),
                ..*x
            },
        };
        add(&mut out.data, &x.data);
        out
    }
}

pub(crate) struct Block {
    pub(crate) resnets: Vec<Resnet>,
    pub(crate) attentions: Vec<Transformer2d>,
    /// Downsampler (stride-2 conv) or upsampler (nearest 2x then conv).
    pub(crate) resample: Option<Conv>,
}

/// One UNet evaluation's inputs, exactly diffusers' `UNet2DConditionModel` arguments.
#[derive(Clone, Copy, Debug)]
pub struct UnetInput<'a> {
    /// [batch, in_channels, height, width]
    pub sample: &'a [f32],
    /// [batch]
    pub timesteps: &'a [f32],
    /// encoder_hidden_states [batch, context_len, cross_attention_dim]
    pub context: &'a [f32],
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub context_len: usize,
}

/// The UNet, ready to run.
pub struct Unet {
    pub config: UnetConfig,
    pub(crate) time_1: Linear,
    pub(crate) time_2: Linear,
    pub(crate) conv_in: Conv,
    pub(crate) down: Vec<Block>,
    pub(crate) mid: (Resnet, Transformer2d, Resnet),
    pub(crate) up: Vec<Block>,
    pub(crate) norm_out: GroupNorm,
    pub(crate) conv_out: Conv,
}

impl crate::adapter::apply::Adaptable for Unet {
    fn key_prefix(&self) -> &'static str {
        "unet."
    }

    fn projection(&self, key: &str) -> Option<(&[f32], usize, usize)> {
        Unet::projection(self, key)
    }
}

impl std::fmt::Debug for Unet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unet")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Unet {
    /// Builds the UNet of `config` from `src`, checking every tensor's presence and shape.
    pub fn load(config: UnetConfig, src: &dyn WeightSource) -> Result<Unet> {
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
                        Resnet::load(
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
                    Some(Conv::load(
                        src,
                        &format!("{p}.downsamplers.0.conv"),
                        ch[i],
                        ch[i],
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
            Resnet::load(
                src,
                "mid_block.resnets.0",
                (top, top),
                (cfg.norm_num_groups, cfg.norm_eps),
                Some(temb),
            )?,
            Transformer2d::load(
                src,
                "mid_block.attentions.0",
                top,
                cfg.heads[n - 1],
                cfg.transformer_layers[n - 1],
                cfg,
            )?,
            Resnet::load(
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
                        Resnet::load(
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
                    Some(Conv::load(
                        src,
                        &format!("{p}.upsamplers.0.conv"),
                        out,
                        out,
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
            time_1: Linear::load(src, "time_embedding.linear_1", ch[0], temb, true)?,
            time_2: Linear::load(src, "time_embedding.linear_2", temb, temb, true)?,
            conv_in: Conv::load(src, "conv_in", cfg.in_channels, ch[0], 3, 1)?,
            down,
            mid,
            up,
            norm_out: GroupNorm::load(
                src,
                "conv_norm_out",
                ch[0],
                cfg.norm_num_groups,
                cfg.norm_eps,
            )?,
            conv_out: Conv::load(src, "conv_out", ch[0], cfg.out_channels, 3, 1)?,
            config,
        })
    }

    /// Loads the UNet of a model: config from `unet/config.json`, else inferred from shapes.
    pub fn from_model(model: &crate::Model) -> Result<Unet> {
        let (weights, config) = model.component_config(
            crate::io::keymap::Component::Unet,
            UnetConfig::from_json,
            UnetConfig::infer,
        )?;
        Unet::load(config, weights)
    }

    /// One evaluation -> [B, out, H, W]. Shapes are checked; errors name the argument.
    pub fn forward(&self, x: &UnetInput<'_>) -> Result<Vec<f32>> {
        self.forward_with(x, None)
    }

    /// The base weight [dout, din] of adaptable projection `key` (`unet.<path>`).
    pub fn projection(&self, key: &str) -> Option<(&[f32], usize, usize)> {
        find_projection(self.projections(), key)
    }

    /// The adaptable projections of this UNet by adapter key (`unet.<path>`).
    pub fn adaptable_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        layer_table(self.projections())
    }

    fn projections(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        let blocks = self
            .down
            .iter()
            .chain(&self.up)
            .flat_map(|b| &b.attentions)
            .chain(std::iter::once(&self.mid.1));
        for t in blocks {
            for blk in &t.blocks {
                for a in [&blk.attn1, &blk.attn2] {
                    out.extend([&a.to_q, &a.to_k, &a.to_v, &a.to_out]);
                }
            }
        }
        out
    }

    /// One evaluation with a session's adapters.
    pub fn forward_with(&self, x: &UnetInput<'_>, ad: Option<&AdapterCtx<'_>>) -> Result<Vec<f32>> {
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
        let c0 = cfg.block_out_channels[0];
        let mut temb = vec![0.0; b * c0];
        ops::timestep_embedding(
            &mut temb,
            timesteps,
            c0,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
            10000.0,
        );
        let mut e = self.time_1.forward(&temb, b);
        ops::silu_inplace(&mut e);
        let mut emb = self.time_2.forward(&e, b);
        ops::silu_inplace(&mut emb); // every resnet applies SiLU first; do it once
        let x = Act {
            data: sample.to_vec(),
            b,
            c: cfg.in_channels,
            h,
            w,
        };
        let mut x = self.conv_in.forward(&x);
        // diffusers keeps conv_in's output and every down layer's output as skips.
        let mut skips: Vec<Act> = vec![x.clone_act()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&emb));
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, l, ad);
                }
                skips.push(x.clone_act());
            }
            if let Some(ds) = &blk.resample {
                x = ds.forward(&x);
                skips.push(x.clone_act());
            }
        }
        x = self.mid.0.forward(&x, Some(&emb));
        x = self.mid.1.forward(&x, context, l, ad);
        x = self.mid.2.forward(&x, Some(&emb));
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Internal("UNet skip stack ran dry".into()))?;
                let mut cat = vec![0.0; (x.c + skip.c) * b * x.h * x.w];
                {
                    let _p = scope("copies");
                    ops::concat_channels(&mut cat, &x.data, &skip.data, b, x.c, skip.c, x.h * x.w);
                }
                x = r.forward(
                    &Act {
                        data: cat,
                        c: x.c + skip.c,
                        ..x
                    },
                    Some(&emb),
                );
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, l, ad);
                }
            }
            if let Some(us) = &blk.resample {
                let mut up = vec![0.0; x.data.len() * 4];
                {
                    let _p = scope("copies");
                    ops::upsample_nearest2x(&mut up, &x.data, b * x.c, x.h, x.w);
                }
                x = us.forward(&Act {
                    data: up,
                    h: 2 * x.h,
                    w: 2 * x.w,
                    ..x
                });
            }
        }
        let hn = self.norm_out.forward(&x, true);
        Ok(self.conv_out.forward(&hn).data)
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
    let factor = 1usize << (cfg.block_out_channels.len() - 1);
    if h % factor != 0 || w % factor != 0 {
        return Err(Error::invalid_arg(
            "sample",
            format!("height {h} and width {w} must be multiples of {factor} for this UNet"),
        ));
    }
    Ok(())
}
