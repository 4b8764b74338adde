//! diffusers' `AutoencoderKL` (the SD 1.x/2.x VAE) on any [`Backend`]: the decoder (latents
//! -> image) and the encoder (image -> diagonal Gaussian: mean and log-variance).
//!
//! The structure is diffusers' `Encoder`/`Decoder` of `models/autoencoders/vae.py`: resnets
//! without a time embedding (GroupNorm eps 1e-6, SiLU), `DownEncoderBlock2D`s whose downsampler
//! pads the bottom and right by one zero before a stride-2 3x3 convolution without padding,
//! `UpDecoderBlock2D`s (nearest 2x, then a 3x3 convolution), and a mid block whose attention
//! has one head as wide as the channels.

use crate::backend::{AttnDims, Backend, Cpu};
use crate::error::{Error, Result};
use crate::model::layers::{add, transpose, Act, Conv, GroupNorm, Linear, Resnet, WeightSource};

mod config;
pub use config::VaeConfig;

/// The VAE's epsilon, in every resnet, the attention's norm and the output norms.
const EPS: f32 = 1e-6;

/// A linear layer under its current diffusers name, or the name diffusers < 0.14 saved
/// (`query`, `key`, `value`, `proj_attn`), which diffusers still converts on load. Errors
/// report the current name.
fn linear_or_legacy<B: Backend>(
    be: &B,
    src: &dyn WeightSource,
    p: &str,
    (name, legacy): (&str, &str),
    c: usize,
) -> Result<Linear<B>> {
    Linear::load(be, src, &format!("{p}.{name}"), c, c, true)
        .or_else(|e| Linear::load(be, src, &format!("{p}.{legacy}"), c, c, true).map_err(|_| e))
}

/// The mid block's `Attention`: one head of width C over the H x W positions, with its own
/// GroupNorm in front and the input added back.
struct MidAttention<B: Backend> {
    norm: GroupNorm<B>,
    to_q: Linear<B>,
    to_k: Linear<B>,
    to_v: Linear<B>,
    to_out: Linear<B>,
}

impl<B: Backend> MidAttention<B> {
    fn load(be: &B, src: &dyn WeightSource, p: &str, c: usize, g: usize) -> Result<Self> {
        Ok(MidAttention {
            norm: GroupNorm::load(be, src, &format!("{p}.group_norm"), c, g, EPS)?,
            to_q: linear_or_legacy(be, src, p, ("to_q", "query"), c)?,
            to_k: linear_or_legacy(be, src, p, ("to_k", "key"), c)?,
            to_v: linear_or_legacy(be, src, p, ("to_v", "value"), c)?,
            to_out: linear_or_legacy(be, src, p, ("to_out.0", "proj_attn"), c)?,
        })
    }

    fn forward(&self, be: &B, x: Act<B>) -> Result<Act<B>> {
        let (b, c, hw) = (x.b, x.c, x.h * x.w);
        let n = self.norm.forward(be, &x, false)?;
        let tokens = transpose(be, &n.data, b, c, hw, true)?;
        drop(n);
        let q = self.to_q.forward(be, &tokens, b * hw)?;
        let k = self.to_k.forward(be, &tokens, b * hw)?;
        let v = self.to_v.forward(be, &tokens, b * hw)?;
        drop(tokens);
        let o = {
            let d = AttnDims {
                batch: b,
                lq: hw,
                lk: hw,
                heads: 1,
                head_dim: c,
                causal: false,
            };
            be.attention(&q, &k, &v, d)?
        };
        drop((q, k, v));
        let proj = self.to_out.forward(be, &o, b * hw)?;
        drop(o);
        let mut y = transpose(be, &proj, b, c, hw, false)?;
        drop(proj);
        add(be, &mut y, &x.data)?;
        Ok(x.with(y))
    }
}

/// `UNetMidBlock2D`: resnet, (attention), resnet.
struct Mid<B: Backend> {
    res0: Resnet<B>,
    attn: Option<MidAttention<B>>,
    res1: Resnet<B>,
}

impl<B: Backend> Mid<B> {
    fn load(be: &B, src: &dyn WeightSource, p: &str, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Mid {
            res0: Resnet::load(be, src, &format!("{p}.resnets.0"), (c, c), (g, EPS), None)?,
            attn: if cfg.mid_block_add_attention {
                Some(MidAttention::load(
                    be,
                    src,
                    &format!("{p}.attentions.0"),
                    c,
                    g,
                )?)
            } else {
                None
            },
            res1: Resnet::load(be, src, &format!("{p}.resnets.1"), (c, c), (g, EPS), None)?,
        })
    }

    fn forward(&self, be: &B, x: Act<B>) -> Result<Act<B>> {
        let mut x = self.res0.forward(be, &x, None)?;
        if let Some(a) = &self.attn {
            x = a.forward(be, x)?;
        }
        self.res1.forward(be, &x, None)
    }
}

/// `Downsample2D` with padding 0: zero-pad the bottom row and right column, then a stride-2
/// 3x3 convolution without padding.
fn downsample<B: Backend>(be: &B, conv: &Conv<B>, x: &Act<B>) -> Result<Act<B>> {
    let padded = be.pad_bottom_right(&x.data, (x.b * x.c, x.h, x.w))?;
    let padded = Act {
        data: padded,
        h: x.h + 1,
        w: x.w + 1,
        ..*x
    };
    conv.forward_padded(be, &padded, 0)
}

/// `Upsample2D`: nearest 2x, then a 3x3 convolution.
fn upsample<B: Backend>(be: &B, conv: &Conv<B>, x: Act<B>) -> Result<Act<B>> {
    let up = be.upsample_nearest2x(&x.data, (x.b * x.c, x.h, x.w))?;
    let up = Act {
        data: up,
        b: x.b,
        c: x.c,
        h: 2 * x.h,
        w: 2 * x.w,
    };
    drop(x);
    conv.forward(be, &up)
}

struct Block<B: Backend> {
    resnets: Vec<Resnet<B>>,
    /// The encoder's downsampler or the decoder's upsampler convolution.
    resample: Option<Conv<B>>,
}

struct Encoder<B: Backend> {
    conv_in: Conv<B>,
    down: Vec<Block<B>>,
    mid: Mid<B>,
    norm_out: GroupNorm<B>,
    conv_out: Conv<B>,
}

impl<B: Backend> Encoder<B> {
    fn load(be: &B, src: &dyn WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (n, g) = (ch.len(), cfg.norm_num_groups);
        let down = (0..n)
            .map(|i| {
                let p = format!("encoder.down_blocks.{i}");
                let cin = if i == 0 { ch[0] } else { ch[i - 1] };
                let resnets = (0..cfg.layers_per_block)
                    .map(|j| {
                        let r_in = if j == 0 { cin } else { ch[i] };
                        Resnet::load(
                            be,
                            src,
                            &format!("{p}.resnets.{j}"),
                            (r_in, ch[i]),
                            (g, EPS),
                            None,
                        )
                    })
                    .collect::<Result<_>>()?;
                let resample = if i + 1 < n {
                    let p = format!("{p}.downsamplers.0.conv");
                    Some(Conv::load(be, src, &p, ch[i], ch[i], 3, 2)?)
                } else {
                    None
                };
                Ok(Block { resnets, resample })
            })
            .collect::<Result<_>>()?;
        let top = ch[n - 1];
        let latent2 = 2 * cfg.latent_channels;
        Ok(Encoder {
            conv_in: Conv::load(be, src, "encoder.conv_in", cfg.in_channels, ch[0], 3, 1)?,
            down,
            mid: Mid::load(be, src, "encoder.mid_block", top, cfg)?,
            norm_out: GroupNorm::load(be, src, "encoder.conv_norm_out", top, g, EPS)?,
            conv_out: Conv::load(be, src, "encoder.conv_out", top, latent2, 3, 1)?,
        })
    }

    /// image [B, in, H, W] -> moments [B, 2 latent, H/f, W/f]
    fn forward(&self, be: &B, x: Act<B>) -> Result<Act<B>> {
        let mut x = self.conv_in.forward(be, &x)?;
        for blk in &self.down {
            for r in &blk.resnets {
                x = r.forward(be, &x, None)?;
            }
            if let Some(conv) = &blk.resample {
                x = downsample(be, conv, &x)?;
            }
        }
        x = self.mid.forward(be, x)?;
        let h = self.norm_out.forward(be, &x, true)?;
        drop(x);
        self.conv_out.forward(be, &h)
    }
}

struct Decoder<B: Backend> {
    conv_in: Conv<B>,
    mid: Mid<B>,
    up: Vec<Block<B>>,
    norm_out: GroupNorm<B>,
    conv_out: Conv<B>,
}

impl<B: Backend> Decoder<B> {
    fn load(be: &B, src: &dyn WeightSource, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (n, g) = (rev.len(), cfg.norm_num_groups);
        let up = (0..n)
            .map(|i| {
                let p = format!("decoder.up_blocks.{i}");
                let prev = if i == 0 { rev[0] } else { rev[i - 1] };
                let resnets = (0..=cfg.layers_per_block)
                    .map(|j| {
                        let r_in = if j == 0 { prev } else { rev[i] };
                        Resnet::load(
                            be,
                            src,
                            &format!("{p}.resnets.{j}"),
                            (r_in, rev[i]),
                            (g, EPS),
                            None,
                        )
                    })
                    .collect::<Result<_>>()?;
                let resample = if i + 1 < n {
                    let p = format!("{p}.upsamplers.0.conv");
                    Some(Conv::load(be, src, &p, rev[i], rev[i], 3, 1)?)
                } else {
                    None
                };
                Ok(Block { resnets, resample })
            })
            .collect::<Result<_>>()?;
        let c0 = rev[n - 1];
        let latent = cfg.latent_channels;
        Ok(Decoder {
            conv_in: Conv::load(be, src, "decoder.conv_in", latent, rev[0], 3, 1)?,
            mid: Mid::load(be, src, "decoder.mid_block", rev[0], cfg)?,
            up,
            norm_out: GroupNorm::load(be, src, "decoder.conv_norm_out", c0, g, EPS)?,
            conv_out: Conv::load(be, src, "decoder.conv_out", c0, cfg.out_channels, 3, 1)?,
        })
    }

    /// z [B, latent, h, w] -> image [B, out, h f, w f]
    fn forward(&self, be: &B, z: &Act<B>) -> Result<Act<B>> {
        let mut x = self.conv_in.forward(be, z)?;
        x = self.mid.forward(be, x)?;
        for blk in &self.up {
            for r in &blk.resnets {
                x = r.forward(be, &x, None)?;
            }
            if let Some(conv) = &blk.resample {
                x = upsample(be, conv, x)?;
            }
        }
        let h = self.norm_out.forward(be, &x, true)?;
        drop(x);
        self.conv_out.forward(be, &h)
    }
}

/// The VAE, ready to run on backend `B` (the CPU by default).
pub struct Vae<B: Backend = Cpu> {
    pub config: VaeConfig,
    be: B,
    encoder: Encoder<B>,
    decoder: Decoder<B>,
    quant_conv: Option<Conv<B>>,
    post_quant_conv: Option<Conv<B>>,
}

impl<B: Backend> std::fmt::Debug for Vae<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("backend", &self.be.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `b * c * h * w` without overflow, or an error naming `name`.
fn volume(name: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid_arg(name, format!("size {dims:?} overflows")))
}

fn check_len(name: &'static str, got: usize, dims: [usize; 4]) -> Result<()> {
    let want = volume(name, &dims)?;
    if got != want {
        return Err(Error::invalid_arg(
            name,
            format!(
                "has {got} values, expected [{}, {}, {}, {}] = {want}",
                dims[0], dims[1], dims[2], dims[3]
            ),
        ));
    }
    Ok(())
}

impl Vae<Cpu> {
    /// Builds the VAE of `config` from `src`, checking every tensor's presence and shape.
    pub fn load(config: VaeConfig, src: &dyn WeightSource) -> Result<Vae> {
        Vae::load_on(Cpu, config, src)
    }

    /// Loads the VAE of a model: config from `vae/config.json`, else inferred from shapes
    /// (LDM single files; see [`VaeConfig::infer`]).
    pub fn from_model(model: &crate::Model) -> Result<Vae> {
        Vae::from_model_on(Cpu, model)
    }

    /// A draw from the encoder's distribution with the caller's standard-normal `noise`:
    /// mean + exp(logvar / 2) * noise, what diffusers' `latent_dist.sample()` computes (the
    /// pipeline then multiplies by `scaling_factor`). All three have the same length.
    pub fn sample(mean: &[f32], logvar: &[f32], noise: &[f32]) -> Result<Vec<f32>> {
        if logvar.len() != mean.len() {
            return Err(Error::invalid_arg(
                "logvar",
                format!("has {} values, mean has {}", logvar.len(), mean.len()),
            ));
        }
        if noise.len() != mean.len() {
            return Err(Error::invalid_arg(
                "noise",
                format!("has {} values, mean has {}", noise.len(), mean.len()),
            ));
        }
        Ok(mean
            .iter()
            .zip(logvar)
            .zip(noise)
            .map(|((&m, &lv), &n)| m + (0.5 * lv).exp() * n)
            .collect())
    }
}

impl<B: Backend> Vae<B> {
    /// As [`Vae::load`], on backend `be`.
    pub fn load_on(be: B, config: VaeConfig, src: &dyn WeightSource) -> Result<Vae<B>> {
        config
            .validate()
            .map_err(|r| Error::invalid_arg("config", r))?;
        let l = config.latent_channels;
        Ok(Vae {
            encoder: Encoder::load(&be, src, &config)?,
            decoder: Decoder::load(&be, src, &config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv::load(&be, src, "quant_conv", 2 * l, 2 * l, 1, 1)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv::load(&be, src, "post_quant_conv", l, l, 1, 1)?)
            } else {
                None
            },
            config,
            be,
        })
    }

    /// As [`Vae::from_model`], on backend `be`.
    pub fn from_model_on(be: B, model: &crate::Model) -> Result<Vae<B>> {
        let (weights, config) = model.component_config(
            crate::io::keymap::Component::Vae,
            VaeConfig::from_json,
            VaeConfig::infer,
        )?;
        Vae::load_on(be, config, weights)
    }

    /// The backend this VAE runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// latents [B, latent_channels, h, w] (already divided by scaling_factor, as diffusers'
    /// decode() expects) -> image [B, out_channels, h*f, w*f] in about [-1, 1].
    pub fn decode(&self, latents: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let f = cfg.downscale();
        check_len("latents", latents.len(), [b, cfg.latent_channels, h, w])?;
        if b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid_arg(
                "latents",
                "batch, height and width must be positive",
            ));
        }
        // The largest activation: the last up block's channels at full size.
        let (c0, top) = (cfg.block_out_channels[0], cfg.block_out_channels.len() - 1);
        volume("latents", &[b, c0.max(cfg.out_channels), h, w, f, f])?;
        volume("latents", &[b, cfg.block_out_channels[top], h, w, 4])?;
        let be = &self.be;
        let z = Act {
            data: be.upload(latents)?,
            b,
            c: cfg.latent_channels,
            h,
            w,
        };
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(be, &z)?,
            None => z,
        };
        be.download(&self.decoder.forward(be, &z)?.data)
    }

    /// image [B, in_channels, H, W] in [-1, 1] -> (mean, logvar) each [B, latent_channels,
    /// H/f, W/f] (logvar clamped to [-30, 20] as diffusers does).
    pub fn encode(
        &self,
        image: &[f32],
        b: usize,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.config;
        let f = cfg.downscale();
        check_len("image", image.len(), [b, cfg.in_channels, h, w])?;
        if b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid_arg(
                "image",
                "batch, height and width must be positive",
            ));
        }
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(Error::invalid_arg(
                "image",
                format!("height {h} and width {w} must be multiples of {f} for this VAE"),
            ));
        }
        let widest = cfg.block_out_channels.iter().copied().max().unwrap_or(1);
        volume("image", &[b, widest, h + 1, w + 1])?;
        let be = &self.be;
        let x = Act {
            data: be.upload(image)?,
            b,
            c: cfg.in_channels,
            h,
            w,
        };
        let m = self.encoder.forward(be, x)?;
        let m = match &self.quant_conv {
            Some(c) => c.forward(be, &m)?,
            None => m,
        };
        let (l, hw) = (cfg.latent_channels, m.h * m.w);
        let moments = be.download(&m.data)?;
        let mut mean = Vec::with_capacity(b * l * hw);
        let mut logvar = Vec::with_capacity(b * l * hw);
        for s in moments.chunks_exact(2 * l * hw) {
            let (mu, lv) = s.split_at(l * hw);
            mean.extend_from_slice(mu);
            logvar.extend(lv.iter().map(|&v| v.clamp(-30.0, 20.0)));
        }
        Ok((mean, logvar))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::RandomWeights;

    fn small() -> VaeConfig {
        VaeConfig {
            block_out_channels: vec![4, 8],
            layers_per_block: 1,
            norm_num_groups: 2,
            ..VaeConfig::default()
        }
    }

    #[test]
    fn bad_sizes_are_invalid_arguments() {
        let vae = Vae::load(small(), &RandomWeights { seed: 1 }).unwrap();
        assert_eq!(vae.config.downscale(), 2);
        let is_arg = |r: Result<()>, name: &str| match r {
            Err(Error::InvalidArgument { name: n, reason }) => {
                assert_eq!(n, name, "{reason}");
                reason
            }
            other => panic!("expected InvalidArgument({name}), got {other:?}"),
        };
        let r = is_arg(vae.decode(&[0.0; 10], 1, 2, 2).map(|_| ()), "latents");
        assert!(r.contains("[1, 4, 2, 2]"), "{r}");
        is_arg(vae.decode(&[], 0, 2, 2).map(|_| ()), "latents");
        is_arg(vae.decode(&[], 1, usize::MAX, 4).map(|_| ()), "latents");
        let r = is_arg(vae.encode(&[0.0; 3 * 5 * 4], 1, 5, 4).map(|_| ()), "image");
        assert!(r.contains("multiples of 2"), "{r}");
        is_arg(vae.encode(&[0.0; 7], 1, 4, 4).map(|_| ()), "image");
        is_arg(
            Vae::sample(&[0.0; 4], &[0.0; 3], &[0.0; 4]).map(|_| ()),
            "logvar",
        );
        is_arg(
            Vae::sample(&[0.0; 4], &[0.0; 4], &[0.0; 5]).map(|_| ()),
            "noise",
        );
        // Round trip shapes.
        let img = vae.decode(&[0.5; 2 * 4 * 3 * 5], 2, 3, 5).unwrap();
        assert_eq!(img.len(), 2 * 3 * 6 * 10);
        let (m, l) = vae.encode(&img, 2, 6, 10).unwrap();
        assert_eq!((m.len(), l.len()), (2 * 4 * 3 * 5, 2 * 4 * 3 * 5));
        assert!(m.iter().chain(&l).all(|v| v.is_finite()));
    }

    #[test]
    fn missing_optional_parts_are_not_loaded() {
        let cfg = VaeConfig {
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: false,
            ..small()
        };
        let vae = Vae::load(cfg, &RandomWeights { seed: 1 }).unwrap();
        assert!(vae.quant_conv.is_none() && vae.post_quant_conv.is_none());
        assert!(vae.encoder.mid.attn.is_none() && vae.decoder.mid.attn.is_none());
    }
}
