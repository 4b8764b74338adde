//! The hypernetwork's image encoder on any [`Backend`]: timm's `VisionTransformer` as CLIP uses
//! it (class token, learned positions, `norm_pre`, pre-norm blocks with qkv bias and exact
//! GELU, final `norm`). The output is timm's `forward_features`: every token, class token
//! included, after the final norm. Weights use timm's state-dict names under `encoder.`.

use crate::backend::{Activation, AttnDims, Backend};
use crate::error::Result;
use crate::io::F32Weight;
use crate::model::layers::{add, LayerNorm, Linear, WeightSource};

/// The encoder's shape (the `encoder` object of the hypernetwork config).
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    /// Input side in pixels (224 for CLIP ViT-H/14).
    pub img_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Token width (1280).
    pub width: usize,
    /// Transformer blocks (32).
    pub depth: usize,
    /// Attention heads per block (16).
    pub heads: usize,
    /// MLP hidden width over `width` (4.0); the hidden width is `int(width * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// A LayerNorm (`norm_pre`) after the embeddings, as CLIP; timm then has no patch bias.
    pub pre_norm: bool,
    /// A learned class token in front of the patch tokens.
    pub class_token: bool,
    /// Epsilon of every LayerNorm (1e-5 for CLIP encoders).
    pub layer_norm_eps: f32,
    /// Per-channel mean subtracted after scaling to [0, 1] (OpenAI CLIP's by default).
    pub image_mean: [f32; 3],
    /// Per-channel divisor after the mean.
    pub image_std: [f32; 3],
}

/// OpenAI CLIP's image mean and std (timm's and open_clip's for CLIP towers), as the decimals
/// a config JSON holds: read as f64, then rounded to f32, exactly as a config is.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for EncoderConfig {
    /// CLIP ViT-H/14 at 224 px (timm `vit_huge_patch14_clip_224`, open_clip `ViT-H-14`).
    fn default() -> Self {
        EncoderConfig {
            img_size: 224,
            patch_size: 14,
            width: 1280,
            depth: 32,
            heads: 16,
            mlp_ratio: 4.0,
            pre_norm: true,
            class_token: true,
            layer_norm_eps: 1e-5,
            image_mean: OPENAI_CLIP_MEAN.map(|v| v as f32),
            image_std: OPENAI_CLIP_STD.map(|v| v as f32),
        }
    }
}

impl EncoderConfig {
    /// Patches per side (timm's patch embedding is a stride-`patch_size` conv: leftover pixels
    /// at the right and bottom are unused).
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Tokens out of the encoder: patches, plus the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + usize::from(self.class_token)
    }

    /// The MLP's hidden width, `int(width * mlp_ratio)` as timm computes it.
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }

    /// Every `encoder.*` tensor and its shape, in timm's names.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (w, p, hidden) = (self.width, self.patch_size, self.mlp_hidden());
        let mut s: Vec<(String, Vec<usize>)> = Vec::new();
        if self.class_token {
            s.push(("encoder.cls_token".into(), vec![1, 1, w]));
        }
        s.push(("encoder.pos_embed".into(), vec![1, self.tokens(), w]));
        s.push(("encoder.patch_embed.proj.weight".into(), vec![w, 3, p, p]));
        if self.pre_norm {
            norm_shapes(&mut s, "encoder.norm_pre", w);
        } else {
            s.push(("encoder.patch_embed.proj.bias".into(), vec![w]));
        }
        for i in 0..self.depth {
            let b = format!("encoder.blocks.{i}");
            norm_shapes(&mut s, &format!("{b}.norm1"), w);
            linear_shapes(&mut s, &format!("{b}.attn.qkv"), w, 3 * w);
            linear_shapes(&mut s, &format!("{b}.attn.proj"), w, w);
            norm_shapes(&mut s, &format!("{b}.norm2"), w);
            linear_shapes(&mut s, &format!("{b}.mlp.fc1"), w, hidden);
            linear_shapes(&mut s, &format!("{b}.mlp.fc2"), hidden, w);
        }
        norm_shapes(&mut s, "encoder.norm", w);
        s
    }
}

/// `{k}.weight` and `{k}.bias` of a LayerNorm over `n`.
pub(crate) fn norm_shapes(s: &mut Vec<(String, Vec<usize>)>, k: &str, n: usize) {
    s.push((format!("{k}.weight"), vec![n]));
    s.push((format!("{k}.bias"), vec![n]));
}

/// `{k}.weight` [o, i] and `{k}.bias` [o] of a Linear.
pub(crate) fn linear_shapes(s: &mut Vec<(String, Vec<usize>)>, k: &str, i: usize, o: usize) {
    s.push((format!("{k}.weight"), vec![o, i]));
    s.push((format!("{k}.bias"), vec![o]));
}

struct Block<B: Backend> {
    norm1: LayerNorm<B>,
    /// timm's fused `attn.qkv` [3 w, w], split into q, k and v at load.
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    proj: Linear<B>,
    norm2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

pub(crate) struct Vit<B: Backend> {
    cfg: EncoderConfig,
    /// The patch conv's weight [width, 3, p, p], read as a linear [width, 3 p p].
    patch: Linear<B>,
    /// [1, width]
    cls_token: Option<B::Buf>,
    /// [tokens, width]
    pos_embed: B::Buf,
    norm_pre: Option<LayerNorm<B>>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
}

/// Part `.0` of `.1` equal row blocks.
#[derive(Clone, Copy)]
pub(crate) struct Part(pub usize, pub usize);

/// Rows `part` of a weight whose rows split into equal blocks (a fused qkv weight or bias).
pub(crate) fn split_rows(w: &[f32], part: Part) -> F32Weight {
    let n = w.len() / part.1.max(1);
    F32Weight::Owned(w[part.0 * n..(part.0 + 1) * n].to_vec())
}

impl<B: Backend> Vit<B> {
    pub(crate) fn load(be: &B, src: &dyn WeightSource, cfg: &EncoderConfig) -> Result<Self> {
        let (w, p, eps) = (cfg.width, cfg.patch_size, cfg.layer_norm_eps);
        let ln = |k: &str| LayerNorm::load_eps(be, src, k, w, eps);
        let patch = Linear {
            w: be.weight(src.get("encoder.patch_embed.proj.weight", &[w, 3, p, p])?)?,
            b: if cfg.pre_norm {
                None
            } else {
                Some(be.weight(src.get("encoder.patch_embed.proj.bias", &[w])?)?)
            },
            din: 3 * p * p,
            dout: w,
            key: None,
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let b = format!("encoder.blocks.{i}");
                let qkv_w = src.get(&format!("{b}.attn.qkv.weight"), &[3 * w, w])?;
                let qkv_b = src.get(&format!("{b}.attn.qkv.bias"), &[3 * w])?;
                let part = |i: usize| -> Result<Linear<B>> {
                    Ok(Linear {
                        w: be.weight(split_rows(&qkv_w, Part(i, 3)))?,
                        b: Some(be.weight(split_rows(&qkv_b, Part(i, 3)))?),
                        din: w,
                        dout: w,
                        key: None,
                    })
                };
                let hidden = cfg.mlp_hidden();
                Ok(Block {
                    norm1: ln(&format!("{b}.norm1"))?,
                    q: part(0)?,
                    k: part(1)?,
                    v: part(2)?,
                    proj: Linear::load(be, src, &format!("{b}.attn.proj"), w, w, true)?,
                    norm2: ln(&format!("{b}.norm2"))?,
                    fc1: Linear::load(be, src, &format!("{b}.mlp.fc1"), w, hidden, true)?,
                    fc2: Linear::load(be, src, &format!("{b}.mlp.fc2"), hidden, w, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Vit {
            patch,
            cls_token: if cfg.class_token {
                Some(be.upload(&src.get("encoder.cls_token", &[1, 1, w])?)?)
            } else {
                None
            },
            pos_embed: be.upload(&src.get("encoder.pos_embed", &[1, cfg.tokens(), w])?)?,
            norm_pre: if cfg.pre_norm {
                Some(ln("encoder.norm_pre")?)
            } else {
                None
            },
            blocks,
            norm: ln("encoder.norm")?,
            cfg: cfg.clone(),
        })
    }

    /// image [3, img_size, img_size] -> tokens [tokens, width] (the caller checks the length).
    pub(crate) fn forward(&self, be: &B, image: &[f32]) -> Result<B::Buf> {
        let cfg = &self.cfg;
        let (w, n, g2) = (cfg.width, cfg.tokens(), cfg.grid() * cfg.grid());
        let patches = self
            .patch
            .forward(be, &be.upload(&unfold(image, cfg))?, g2)?;
        let mut x = match &self.cls_token {
            // Tokens are rows: [1 + g2, w] is the channel concat of [1, 1, w] and [1, g2, w].
            Some(cls) => be.concat_channels(cls, &patches, (1, 1, g2, w))?,
            None => patches,
        };
        add(be, &mut x, &self.pos_embed)?;
        if let Some(norm) = &self.norm_pre {
            x = norm.forward(be, &x)?;
        }
        let dims = AttnDims {
            batch: 1,
            lq: n,
            lk: n,
            heads: cfg.heads,
            head_dim: w / cfg.heads,
            causal: false,
        };
        for b in &self.blocks {
            let h = b.norm1.forward(be, &x)?;
            let (q, k, v) = (
                b.q.forward(be, &h, n)?,
                b.k.forward(be, &h, n)?,
                b.v.forward(be, &h, n)?,
            );
            drop(h);
            let a = be.attention(&q, &k, &v, dims)?;
            add(be, &mut x, &b.proj.forward(be, &a, n)?)?;
            let h = b.norm2.forward(be, &x)?;
            let mut f = b.fc1.forward(be, &h, n)?;
            be.activate(&mut f, Activation::Gelu)?;
            add(be, &mut x, &b.fc2.forward(be, &f, n)?)?;
        }
        self.norm.forward(be, &x)
    }
}

/// [3, S, S] -> [grid * grid, 3 p p]: row (gy, gx) holds patch (gy, gx) in the conv weight's
/// (channel, ky, kx) order, so the patch conv is one linear.
fn unfold(image: &[f32], cfg: &EncoderConfig) -> Vec<f32> {
    let (s, p, g) = (cfg.img_size, cfg.patch_size, cfg.grid());
    let mut out = Vec::with_capacity(g * g * 3 * p * p);
    for gy in 0..g {
        for gx in 0..g {
            for c in 0..3 {
                for ky in 0..p {
                    let row = (c * s + gy * p + ky) * s + gx * p;
                    out.extend_from_slice(&image[row..row + p]);
                }
            }
        }
    }
    out
}
