//! The UNet's configuration: from diffusers' `unet/config.json`, or inferred from tensor
//! shapes for LDM single files. `Default` is SD 1.5.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::WeightStore;

/// A down or up block's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets, each followed by a transformer.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnetConfig {
    /// Latent channels in (4 for SD).
    pub in_channels: usize,
    /// Latent channels out (4 for SD).
    pub out_channels: usize,
    /// Channels of each down block; up blocks use them reversed.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    /// Attention heads per down block (SD 1.x: 8 everywhere). diffusers' legacy
    /// `attention_head_dim` field means this for SD 1.x/2.x configs.
    pub heads: Vec<usize>,
    /// Transformer blocks per attention, per down block (1 for SD).
    pub transformer_layers: Vec<usize>,
    /// Width of the text encoder's hidden states (768 for SD 1.x).
    pub cross_attention_dim: usize,
    /// SD 2.x: linear `proj_in`/`proj_out` instead of 1x1 convolutions.
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    /// Epsilon of the resnets' and the output group norms.
    pub norm_eps: f32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
}

impl Default for UnetConfig {
    fn default() -> Self {
        use BlockKind::*;
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            down_blocks: vec![CrossAttn, CrossAttn, CrossAttn, Plain],
            up_blocks: vec![Plain, CrossAttn, CrossAttn, CrossAttn],
            heads: vec![8; 4],
            transformer_layers: vec![1; 4],
            cross_attention_dim: 768,
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
        }
    }
}

fn per_block(v: Option<&Value>, n: usize, field: &str, path: &Path) -> Result<Option<Vec<usize>>> {
    let bad = || Error::InvalidFile {
        path: path.to_path_buf(),
        format: "UNet config",
        reason: format!("'{field}' must be a positive integer or a list of {n} of them"),
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(x)) => {
            let x = x.as_u64().filter(|&x| x > 0).ok_or_else(bad)? as usize;
            Ok(Some(vec![x; n]))
        }
        Some(Value::Array(a)) if a.len() == n => a
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        _ => Err(bad()),
    }
}

impl UnetConfig {
    /// Reads a diffusers `UNet2DConditionModel` config, refusing features hdb does not
    /// implement rather than computing something else.
    pub fn from_json(json: &Value, path: &Path) -> Result<UnetConfig> {
        let invalid = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "UNet config",
            reason,
        };
        let d = UnetConfig::default();
        let uint = |k: &str, def: usize| -> Result<usize> {
            match json.get(k) {
                None | Some(Value::Null) => Ok(def),
                Some(v) => v
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| invalid(format!("'{k}' must be an unsigned integer"))),
            }
        };
        let float = |k: &str, def: f32| -> Result<f32> {
            match json.get(k) {
                None | Some(Value::Null) => Ok(def),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| invalid(format!("'{k}' must be a number"))),
            }
        };
        let boolean = |k: &str, def: bool| -> Result<bool> {
            match json.get(k) {
                None | Some(Value::Null) => Ok(def),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| invalid(format!("'{k}' must be true or false"))),
            }
        };
        // Settings that change the computation in ways hdb does not implement.
        for (k, ok) in [
            ("class_embed_type", Value::Null),
            ("addition_embed_type", Value::Null),
            ("encoder_hid_dim", Value::Null),
            ("time_embedding_type", Value::from("positional")),
            ("resnet_time_scale_shift", Value::from("default")),
            ("attention_type", Value::from("default")),
            ("mid_block_type", Value::from("UNetMidBlock2DCrossAttn")),
            ("only_cross_attention", Value::from(false)),
            ("dual_cross_attention", Value::from(false)),
            ("center_input_sample", Value::from(false)),
            ("conv_in_kernel", Value::from(3)),
            ("conv_out_kernel", Value::from(3)),
            ("act_fn", Value::from("silu")),
            ("num_class_embeds", Value::Null),
            ("time_cond_proj_dim", Value::Null),
            ("mid_block_only_cross_attention", Value::Null),
        ] {
            if let Some(v) = json.get(k) {
                let same = v == &ok || (ok == false && v.is_null());
                let list_of_false = ok == false
                    && v.as_array()
                        .is_some_and(|a| a.iter().all(|x| x == &Value::from(false)));
                if !same && !list_of_false {
                    return Err(Error::Unsupported(format!(
                        "{}: UNet config '{k}' = {v} (hdb supports {ok})",
                        path.display()
                    )));
                }
            }
        }
        for (k, ok) in [
            ("resnet_out_scale_factor", 1.0),
            ("mid_block_scale_factor", 1.0),
        ] {
            if float(k, 1.0)? != ok {
                return Err(Error::Unsupported(format!(
                    "{}: UNet config '{k}' must be {ok}",
                    path.display()
                )));
            }
        }
        let kinds = |k: &str, down: bool| -> Result<Option<Vec<BlockKind>>> {
            let Some(v) = json.get(k) else {
                return Ok(None);
            };
            let a = v
                .as_array()
                .ok_or_else(|| invalid(format!("'{k}' must be a list")))?;
            a.iter()
                .map(|x| match (x.as_str(), down) {
                    (Some("CrossAttnDownBlock2D"), true) | (Some("CrossAttnUpBlock2D"), false) => {
                        Ok(BlockKind::CrossAttn)
                    }
                    (Some("DownBlock2D"), true) | (Some("UpBlock2D"), false) => {
                        Ok(BlockKind::Plain)
                    }
                    _ => Err(Error::Unsupported(format!(
                        "{}: '{k}' entry {x} is not supported",
                        path.display()
                    ))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        };
        let block_out_channels = match json.get("block_out_channels") {
            None => d.block_out_channels.clone(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .filter(|a| !a.is_empty() && a.iter().all(|&c| c > 0))
                .ok_or_else(|| {
                    invalid(
                        "'block_out_channels' must be a non-empty list of positive integers".into(),
                    )
                })?,
        };
        let n = block_out_channels.len();
        let down_blocks = kinds("down_block_types", true)?.unwrap_or(d.down_blocks.clone());
        let up_blocks = kinds("up_block_types", false)?.unwrap_or(d.up_blocks.clone());
        if down_blocks.len() != n || up_blocks.len() != n {
            return Err(invalid(format!(
                "{n} block_out_channels but {} down and {} up block types",
                down_blocks.len(),
                up_blocks.len()
            )));
        }
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (legacy name).
        let heads = match per_block(
            json.get("num_attention_heads"),
            n,
            "num_attention_heads",
            path,
        )? {
            Some(h) => h,
            None => per_block(
                json.get("attention_head_dim"),
                n,
                "attention_head_dim",
                path,
            )?
            .unwrap_or(vec![8; n]),
        };
        let transformer_layers = per_block(
            json.get("transformer_layers_per_block"),
            n,
            "transformer_layers_per_block",
            path,
        )?
        .unwrap_or(vec![1; n]);
        let layers_per_block = match json.get("layers_per_block") {
            Some(Value::Array(_)) => {
                return Err(Error::Unsupported(format!(
                    "{}: per-block 'layers_per_block' lists",
                    path.display()
                )))
            }
            _ => uint("layers_per_block", d.layers_per_block)?,
        };
        let cross_attention_dim = match json.get("cross_attention_dim") {
            Some(Value::Array(_)) => {
                return Err(Error::Unsupported(format!(
                    "{}: per-block 'cross_attention_dim' lists",
                    path.display()
                )))
            }
            _ => uint("cross_attention_dim", d.cross_attention_dim)?,
        };
        let cfg = UnetConfig {
            in_channels: uint("in_channels", d.in_channels)?,
            out_channels: uint("out_channels", d.out_channels)?,
            block_out_channels,
            layers_per_block,
            down_blocks,
            up_blocks,
            heads,
            transformer_layers,
            cross_attention_dim,
            use_linear_projection: boolean("use_linear_projection", false)?,
            norm_num_groups: uint("norm_num_groups", d.norm_num_groups)?,
            norm_eps: float("norm_eps", d.norm_eps)?,
            flip_sin_to_cos: boolean("flip_sin_to_cos", true)?,
            freq_shift: float("freq_shift", 0.0)?,
        };
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// Infers the configuration of an LDM single file's UNet from its tensor shapes. What the
    /// weights cannot tell is taken from the SD release the structure matches: 32 norm groups;
    /// SD 1.x (convolutional projections) has 8 heads, SD 2.x (linear) 64-wide heads.
    pub fn infer(w: &WeightStore, path: &Path) -> Result<UnetConfig> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            w.get(name).map(|x| x.shape.dims().to_vec()).ok_or_else(|| {
                Error::invalid_model(
                    path,
                    format!("cannot infer the UNet config: missing tensor '{name}'"),
                )
            })
        };
        let conv_in = shape("conv_in.weight")?;
        let conv_out = shape("conv_out.weight")?;
        let mut block_out_channels = Vec::new();
        while let Some(x) = w.get(&format!(
            "down_blocks.{}.resnets.0.conv1.weight",
            block_out_channels.len()
        )) {
            block_out_channels.push(x.shape.dims().first().copied().unwrap_or(0));
        }
        let n = block_out_channels.len();
        if n == 0 {
            return Err(Error::invalid_model(
                path,
                "cannot infer the UNet config: no 'down_blocks.0.resnets.0.conv1.weight'",
            ));
        }
        let mut layers_per_block = 0;
        while w
            .get(&format!(
                "down_blocks.0.resnets.{layers_per_block}.conv1.weight"
            ))
            .is_some()
        {
            layers_per_block += 1;
        }
        let attn = |prefix: &str| {
            w.get(&format!("{prefix}.attentions.0.proj_in.weight"))
                .is_some()
        };
        let down_blocks: Vec<BlockKind> = (0..n)
            .map(|i| {
                if attn(&format!("down_blocks.{i}")) {
                    BlockKind::CrossAttn
                } else {
                    BlockKind::Plain
                }
            })
            .collect();
        let up_blocks: Vec<BlockKind> = (0..n)
            .map(|i| {
                if attn(&format!("up_blocks.{i}")) {
                    BlockKind::CrossAttn
                } else {
                    BlockKind::Plain
                }
            })
            .collect();
        let proj = shape("mid_block.attentions.0.proj_in.weight")?;
        let use_linear_projection = proj.len() == 2;
        let cross = shape("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")?;
        let heads = block_out_channels
            .iter()
            .map(|&c| {
                if use_linear_projection {
                    (c / 64).max(1)
                } else {
                    8
                }
            })
            .collect();
        let transformer_layers = (0..n)
            .map(|i| {
                let b = if down_blocks[i] == BlockKind::CrossAttn {
                    format!("down_blocks.{i}")
                } else {
                    "mid_block".into()
                };
                let mut k = 0;
                while w
                    .get(&format!(
                        "{b}.attentions.0.transformer_blocks.{k}.norm1.weight"
                    ))
                    .is_some()
                {
                    k += 1;
                }
                k.max(1)
            })
            .collect();
        let cfg = UnetConfig {
            in_channels: conv_in.get(1).copied().unwrap_or(0),
            out_channels: conv_out.first().copied().unwrap_or(0),
            block_out_channels,
            layers_per_block,
            down_blocks,
            up_blocks,
            heads,
            transformer_layers,
            cross_attention_dim: cross.get(1).copied().unwrap_or(0),
            use_linear_projection,
            ..UnetConfig::default()
        };
        cfg.validate()
            .map_err(|r| Error::invalid_model(path, format!("inferred UNet config: {r}")))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.in_channels == 0 || self.out_channels == 0 || self.layers_per_block == 0 {
            return Err("in_channels, out_channels and layers_per_block must be positive".into());
        }
        if self.norm_num_groups == 0 {
            return Err("norm_num_groups must be positive".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            if c % self.heads[i] != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of its {} heads",
                    self.heads[i]
                ));
            }
        }
        if !self.block_out_channels[0].is_multiple_of(2) {
            return Err("block_out_channels[0] (the timestep embedding width) must be even".into());
        }
        Ok(())
    }

    /// Multiply-accumulate count x2 of one forward at latent `h x w`, batch `b`, `l` context
    /// tokens: the analytic FLOPs used by benchmarks (convolutions, linears, attention
    /// products; norms and activations are ignored as they are < 1%).
    pub fn flops(&self, b: usize, h: usize, w: usize, l: usize) -> f64 {
        let mut f = 0.0f64;
        let conv = |ci: usize, co: usize, k: usize, hw: usize| 2.0 * (ci * co * k * k * hw) as f64;
        let c0 = self.block_out_channels[0];
        let emb = 4 * c0;
        f += 2.0 * (c0 * emb + emb * emb) as f64;
        f += conv(self.in_channels, c0, 3, h * w);
        let resnet = |ci: usize, co: usize, hw: usize| {
            conv(ci, co, 3, hw)
                + conv(co, co, 3, hw)
                + 2.0 * (emb * co) as f64
                + if ci != co { conv(ci, co, 1, hw) } else { 0.0 }
        };
        let transformer = |c: usize, hw: usize, depth: usize| {
            let t = hw as f64;
            let lin = |i: usize, o: usize, n: f64| 2.0 * n * (i * o) as f64;
            let per_block = lin(c, c, t) * 4.0 + 4.0 * t * t * c as f64 // self-attention
                + lin(c, c, t) * 2.0 + lin(self.cross_attention_dim, c, l as f64) * 2.0 + 4.0 * t * l as f64 * c as f64 // cross
                + lin(c, 8 * c, t) + lin(4 * c, c, t); // GEGLU feed-forward
            2.0 * lin(c, c, t) + depth as f64 * per_block
        };
        let (mut hh, mut ww) = (h, w);
        let mut skips = vec![c0];
        let mut ch = c0;
        let n = self.block_out_channels.len();
        for i in 0..n {
            let co = self.block_out_channels[i];
            for _ in 0..self.layers_per_block {
                f += resnet(ch, co, hh * ww);
                ch = co;
                if self.down_blocks[i] == BlockKind::CrossAttn {
                    f += transformer(co, hh * ww, self.transformer_layers[i]);
                }
                skips.push(ch);
            }
            if i + 1 < n {
                let (h2, w2) = (hh.div_ceil(2), ww.div_ceil(2));
                f += conv(ch, ch, 3, h2 * w2);
                hh = h2;
                ww = w2;
                skips.push(ch);
            }
        }
        f += 2.0 * resnet(ch, ch, hh * ww)
            + transformer(ch, hh * ww, self.transformer_layers[n - 1]);
        for i in 0..n {
            let co = self.block_out_channels[n - 1 - i];
            for _ in 0..=self.layers_per_block {
                let skip = skips.pop().unwrap_or(0);
                f += resnet(ch + skip, co, hh * ww);
                ch = co;
                if self.up_blocks[i] == BlockKind::CrossAttn {
                    f += transformer(co, hh * ww, self.transformer_layers[n - 1 - i]);
                }
            }
            if i + 1 < n {
                hh *= 2;
                ww *= 2;
                f += conv(ch, ch, 3, hh * ww);
            }
        }
        f += conv(ch, self.out_channels, 3, h * w);
        b as f64 * f
    }
}
