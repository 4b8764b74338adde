//! diffusers' `AutoencoderKL` configuration (`vae/config.json`), with SD 1.5's as `Default`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::WeightStore;

/// diffusers' `AutoencoderKL` configuration. `Default` is SD 1.5's `vae/config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Image channels into the encoder (3).
    pub in_channels: usize,
    /// Image channels out of the decoder (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Channels of each encoder block; the decoder uses them reversed.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (the pipeline's job, not `decode`'s).
    pub scaling_factor: f32,
    /// Subtracted before scaling when set (none of SD 1.x/2.x; again the pipeline's job).
    pub shift_factor: Option<f32>,
    /// A 1x1 convolution on the encoder's moments.
    pub use_quant_conv: bool,
    /// A 1x1 convolution on the latents before the decoder.
    pub use_post_quant_conv: bool,
    /// Self-attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// Most encoder blocks accepted (SD has 4; the downscale factor is 2^(blocks - 1)).
const MAX_BLOCKS: usize = 12;

impl VaeConfig {
    /// Reads a diffusers `AutoencoderKL` config. Keys it lacks take diffusers' own defaults
    /// (what `from_pretrained` would build), not SD 1.5's. Settings that change the computation
    /// in ways hdb does not implement are refused; `force_upcast` and `sample_size` (tiling)
    /// do not matter here and are ignored.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "VAE config",
            reason,
        };
        let unsupported =
            |what: String| Error::Unsupported(format!("{}: VAE config: {what}", path.display()));
        if !v.is_object() {
            return Err(invalid("expected a JSON object".into()));
        }
        let present = |k: &str| v.get(k).filter(|x| !x.is_null());
        let uint = |k: &str, def: usize| -> Result<usize> {
            match present(k) {
                None => Ok(def),
                Some(x) => x
                    .as_u64()
                    .filter(|&x| x > 0)
                    .map(|x| x as usize)
                    .ok_or_else(|| invalid(format!("'{k}' must be a positive integer"))),
            }
        };
        let boolean = |k: &str, def: bool| -> Result<bool> {
            match present(k) {
                None => Ok(def),
                Some(x) => x
                    .as_bool()
                    .ok_or_else(|| invalid(format!("'{k}' must be true or false"))),
            }
        };
        let float = |k: &str| -> Result<Option<f32>> {
            match present(k) {
                None => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(|x| Some(x as f32))
                    .ok_or_else(|| invalid(format!("'{k}' must be a finite number"))),
            }
        };
        if let Some(class) = present("_class_name") {
            if class.as_str() != Some("AutoencoderKL") {
                return Err(unsupported(format!(
                    "_class_name {class} (only AutoencoderKL is implemented)"
                )));
            }
        }
        if let Some(act) = present("act_fn") {
            if act.as_str() != Some("silu") {
                return Err(unsupported(format!("act_fn {act} (only \"silu\")")));
            }
        }
        for k in ["latents_mean", "latents_std"] {
            if present(k).is_some() {
                return Err(unsupported(format!(
                    "'{k}' (per-channel latent normalisation, used by SDXL-family pipelines)"
                )));
            }
        }
        // diffusers' AutoencoderKL defaults.
        let block_out_channels = match present("block_out_channels") {
            None => vec![64],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| x.as_u64().filter(|&x| x > 0).map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    invalid("'block_out_channels' must be a list of positive integers".into())
                })?,
            Some(_) => {
                return Err(invalid(
                    "'block_out_channels' must be a non-empty list of positive integers".into(),
                ))
            }
        };
        let n = block_out_channels.len();
        for (k, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            let types: Vec<Value> = match present(k) {
                None => vec![Value::from(want)],
                Some(Value::Array(a)) => a.clone(),
                Some(_) => return Err(invalid(format!("'{k}' must be a list of block names"))),
            };
            if types.len() != n {
                return Err(invalid(format!(
                    "'{k}' has {} entries but block_out_channels has {n}",
                    types.len()
                )));
            }
            if let Some(t) = types.iter().find(|t| t.as_str() != Some(want)) {
                return Err(unsupported(format!("{k} entry {t} (only \"{want}\")")));
            }
        }
        let cfg = VaeConfig {
            in_channels: uint("in_channels", 3)?,
            out_channels: uint("out_channels", 3)?,
            latent_channels: uint("latent_channels", 4)?,
            block_out_channels,
            layers_per_block: uint("layers_per_block", 1)?,
            norm_num_groups: uint("norm_num_groups", 32)?,
            scaling_factor: float("scaling_factor")?.unwrap_or(0.18215),
            shift_factor: float("shift_factor")?,
            use_quant_conv: boolean("use_quant_conv", true)?,
            use_post_quant_conv: boolean("use_post_quant_conv", true)?,
            mid_block_add_attention: boolean("mid_block_add_attention", true)?,
        };
        cfg.validate().map_err(invalid)?;
        Ok(cfg)
    }

    /// Infers the configuration of an LDM single file's VAE from its tensor shapes. The one
    /// thing shapes cannot tell, the number of norm groups, is SD's 32; a VAE whose channels
    /// are not multiples of 32 is refused (use [`VaeConfig::infer_with_groups`] when the group
    /// count is known). The scaling factor is SD 1.x/2.x's 0.18215.
    pub fn infer(w: &WeightStore, path: &Path) -> Result<Self> {
        let cfg = Self::infer_with_groups(w, path, 1)?;
        if let Some(c) = cfg.block_out_channels.iter().find(|&&c| c % 32 != 0) {
            return Err(Error::invalid_model(
                path,
                format!(
                    "cannot infer the VAE's norm_num_groups from its shapes: block_out_channels \
                     {:?} has {c}, not a multiple of 32 (every SD release's value); load it from \
                     a diffusers folder with its config.json",
                    cfg.block_out_channels
                ),
            ));
        }
        Ok(VaeConfig {
            norm_num_groups: 32,
            ..cfg
        })
    }

    /// As [`VaeConfig::infer`], with the norm group count given.
    pub fn infer_with_groups(w: &WeightStore, path: &Path, norm_num_groups: usize) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            w.get(name).map(|x| x.shape.dims().to_vec()).ok_or_else(|| {
                Error::invalid_model(
                    path,
                    format!("cannot infer the VAE config: missing tensor '{name}'"),
                )
            })
        };
        let dim = |name: &str, i: usize| -> Result<usize> {
            shape(name)?.get(i).copied().ok_or_else(|| {
                Error::invalid_model(
                    path,
                    format!("tensor '{name}' has fewer than {} dims", i + 1),
                )
            })
        };
        let has = |name: &str| w.get(name).is_some();
        let mut block_out_channels = Vec::new();
        while let Some(x) = w.get(&format!(
            "encoder.down_blocks.{}.resnets.0.conv1.weight",
            block_out_channels.len()
        )) {
            block_out_channels.push(x.shape.dims().first().copied().unwrap_or(0));
        }
        if block_out_channels.is_empty() {
            return Err(Error::invalid_model(
                path,
                "cannot infer the VAE config: no 'encoder.down_blocks.0.resnets.0.conv1.weight'",
            ));
        }
        let mut layers_per_block = 0;
        while has(&format!(
            "encoder.down_blocks.0.resnets.{layers_per_block}.conv1.weight"
        )) {
            layers_per_block += 1;
        }
        let attn = |coder: &str| has(&format!("{coder}.mid_block.attentions.0.group_norm.weight"));
        let mid_block_add_attention = attn("encoder");
        if attn("decoder") != mid_block_add_attention {
            return Err(Error::invalid_model(
                path,
                "the VAE's encoder and decoder disagree on having a mid-block attention",
            ));
        }
        let cfg = VaeConfig {
            in_channels: dim("encoder.conv_in.weight", 1)?,
            out_channels: dim("decoder.conv_out.weight", 0)?,
            latent_channels: dim("decoder.conv_in.weight", 1)?,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            use_quant_conv: has("quant_conv.weight"),
            use_post_quant_conv: has("post_quant_conv.weight"),
            mid_block_add_attention,
            ..VaeConfig::default()
        };
        cfg.validate()
            .map_err(|r| Error::invalid_model(path, format!("inferred VAE config: {r}")))?;
        Ok(cfg)
    }

    /// The image size over the latent size: 2^(blocks - 1) (8 for SD).
    pub fn downscale(&self) -> usize {
        1usize
            << self
                .block_out_channels
                .len()
                .clamp(1, MAX_BLOCKS)
                .saturating_sub(1)
    }

    /// Checks that the decoder's largest activations for `batch` images of `height` x `width`
    /// pixels could be allocated on the host now: its last block holds about four live
    /// `[batch, block_out_channels[0], height, width]` f32 buffers. An image size the machine
    /// cannot hold is then [`crate::Error::OutOfMemory`], not an abort halfway through.
    pub fn check_decode_memory(
        &self,
        batch: usize,
        height: usize,
        width: usize,
    ) -> crate::Result<()> {
        let c0 = self.block_out_channels.first().copied().unwrap_or(1);
        let bytes = crate::limits::product(&[batch, c0, height, width, 4, 4]);
        crate::limits::probe(
            bytes.unwrap_or(usize::MAX),
            &format!("the VAE decoder's activations for {batch} image(s) of {width}x{height}"),
        )
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || n > MAX_BLOCKS {
            return Err(format!(
                "block_out_channels has {n} entries; 1 to {MAX_BLOCKS} are supported"
            ));
        }
        for (k, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return Err(format!("{k} must be positive"));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_sd15() {
        let json: Value = serde_json::json!({
            "_class_name": "AutoencoderKL", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": true
        });
        let cfg = VaeConfig::from_json(&json, Path::new("vae/config.json")).unwrap();
        assert_eq!(cfg, VaeConfig::default());
        assert_eq!(cfg.downscale(), 8);
    }

    #[test]
    fn config_refusals_name_the_setting() {
        let base = serde_json::json!({
            "block_out_channels": [4, 8], "norm_num_groups": 2,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]
        });
        let p = Path::new("vae/config.json");
        assert!(VaeConfig::from_json(&base, p).is_ok());
        for (k, v, needle) in [
            ("act_fn", serde_json::json!("gelu"), "act_fn"),
            (
                "_class_name",
                serde_json::json!("AutoencoderTiny"),
                "_class_name",
            ),
            (
                "latents_mean",
                serde_json::json!([0.0, 0.0, 0.0, 0.0]),
                "latents_mean",
            ),
            (
                "down_block_types",
                serde_json::json!(["DownEncoderBlock2D"]),
                "down_block_types",
            ),
            (
                "up_block_types",
                serde_json::json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
                "up_block_types",
            ),
            ("norm_num_groups", serde_json::json!(3), "norm_num_groups"),
            (
                "block_out_channels",
                serde_json::json!([]),
                "block_out_channels",
            ),
            ("layers_per_block", serde_json::json!(0), "layers_per_block"),
            ("use_quant_conv", serde_json::json!("no"), "use_quant_conv"),
        ] {
            let mut j = base.clone();
            j[k] = v;
            let e = VaeConfig::from_json(&j, p).unwrap_err().to_string();
            assert!(e.contains(needle), "{k}: {e}");
        }
    }
}
