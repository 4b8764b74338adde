//! The layers adapters may change: the one list of them, their keys, and the one trait a model
//! component implements so adapter sets can be built against it on any backend.
//!
//! An adaptable layer is named by its adapter key: the component's prefix (`unet.` or
//! `text_encoder.`) and the layer's canonical diffusers path, e.g.
//! `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. Two lists, both decided here
//! and nowhere else:
//! - identity layers: the attention projections (DESIGN.md section 1: 128 in SD 1.5's UNet, 48
//!   in its text encoder), over which LiDB files and the hypernetwork are defined
//!   ([`is_identity_layer`], [`layer_keys`]);
//! - adaptable layers: every linear and convolution layer of the UNet and the text encoder that
//!   LoRA and LoCon files adapt (the identity layers, feed-forward, `proj_in`/`proj_out`, time
//!   embedding, `time_emb_proj`, the text encoder's MLP; the resnets' convolutions and
//!   shortcuts, the down/upsamplers, `conv_in`/`conv_out`), [`adapter_key`].
//!
//! The models mark their layers with [`adapter_key`]; the weight-only table
//! ([`crate::Model::adaptable_layers`]) comes from the same function, with each layer's
//! [`LayerKind`] so a file's factors can be checked against it.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::io::keymap::Component;
use crate::model::config::{BlockKind, UnetConfig};
use crate::model::text_encoder::TextEncoderConfig;

/// The adapter key prefix of the UNet's layers.
pub const UNET_PREFIX: &str = "unet.";
/// The adapter key prefix of the text encoder's layers.
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

/// The attention modules of a UNet transformer block whose projections adapters change.
const UNET_ATTENTIONS: [&str; 2] = ["attn1", "attn2"];
/// The adaptable projections of each of those attention modules.
const UNET_PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// The module holding a text-encoder layer's adaptable projections.
const TEXT_ATTENTION: &str = "self_attn";
/// The adaptable projections of a text-encoder layer's self-attention.
const TEXT_PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// The adapter key prefix of component `c`'s layers (`None` for the VAE, which has none).
pub fn prefix(c: Component) -> Option<&'static str> {
    match c {
        Component::Unet => Some(UNET_PREFIX),
        Component::TextEncoder => Some(TEXT_ENCODER_PREFIX),
        Component::Vae => None,
    }
}

/// Whether the linear layer at `path` in component `c` is an attention projection (an identity
/// layer).
fn is_attention_projection(c: Component, path: &str) -> bool {
    let (modules, projections): (&[&str], &[&str]) = match c {
        Component::Unet => (&UNET_ATTENTIONS, &UNET_PROJECTIONS),
        Component::TextEncoder => (&[TEXT_ATTENTION], &TEXT_PROJECTIONS),
        Component::Vae => return false,
    };
    projections.iter().any(|p| {
        path.strip_suffix(p)
            .and_then(|s| s.strip_suffix('.'))
            .and_then(|parent| parent.rsplit('.').next())
            .is_some_and(|m| modules.contains(&m))
    })
}

/// The UNet's other linear layers LoRA files adapt, by the end of their path: kohya's default
/// network and PEFT's `target_modules` cover the transformer blocks' feed-forward layers,
/// `proj_in`/`proj_out` (linear in SD 2.x; 1x1 convolutions in SD 1.x, which are not linear
/// layers and so not named by the weight table), the resnets' time-embedding projections and
/// the time embedding itself.
const UNET_OTHER_LINEAR: [&str; 5] = [
    ".ff.net.0.proj",
    ".ff.net.2",
    ".proj_in",
    ".proj_out",
    ".time_emb_proj",
];
const UNET_TIME_EMBEDDING: [&str; 2] = ["time_embedding.linear_1", "time_embedding.linear_2"];
/// The text encoder's MLP layers.
const TEXT_OTHER_LINEAR: [&str; 2] = [".mlp.fc1", ".mlp.fc2"];
/// The UNet's convolutions LoCon files adapt, by the end of their path (with `proj_in` and
/// `proj_out` above, 1x1 convolutions in SD 1.x).
const UNET_CONVS: [&str; 4] = [".conv1", ".conv2", ".conv_shortcut", "samplers.0.conv"];

/// The adapter key of the linear or convolution layer at `path` (its canonical weight name
/// without `.weight`) in component `c`, when adapters may change it; `None` otherwise.
pub fn adapter_key(c: Component, path: &str) -> Option<String> {
    let other = match c {
        Component::Unet => {
            UNET_OTHER_LINEAR.iter().any(|s| path.ends_with(s))
                || UNET_TIME_EMBEDDING.contains(&path)
                || (path.contains("resnets.") || path.contains("samplers."))
                    && UNET_CONVS.iter().any(|s| path.ends_with(s))
                || path == "conv_in"
                || path == "conv_out"
        }
        Component::TextEncoder => TEXT_OTHER_LINEAR.iter().any(|s| path.ends_with(s)),
        Component::Vae => return None,
    };
    let prefix = prefix(c)?;
    (other || is_attention_projection(c, path)).then(|| format!("{prefix}{path}"))
}

/// Whether adapter key `key` names an identity layer (an attention projection): the layers
/// LiDB files and the hypernetwork are defined over.
pub fn is_identity_layer(key: &str) -> bool {
    if let Some(path) = key.strip_prefix(UNET_PREFIX) {
        is_attention_projection(Component::Unet, path)
    } else if let Some(path) = key.strip_prefix(TEXT_ENCODER_PREFIX) {
        is_attention_projection(Component::TextEncoder, path)
    } else {
        false
    }
}

/// The identity layers of a table of adaptable layers.
pub fn identity_layers(table: &LayerTable) -> LayerTable {
    let mut t = table.clone();
    t.retain(|k, _| is_identity_layer(k));
    t
}

/// How an adaptable layer computes, which decides the shape of a LoRA's factors for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `y = x W^T + b`, W `[dout, din]`: factors `down [r, din]`, `up [dout, r]`.
    Linear,
    /// A square convolution, W `[dout, in_channels, kernel, kernel]` (so `din` = in_channels x
    /// kernel^2): LoCon factors `down [r, in_channels, kernel, kernel]` (applied with the
    /// layer's stride and padding) and `up [dout, r, 1, 1]`.
    Conv {
        in_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    },
}

/// One adaptable layer: a `[dout, din]` weight of kind `kind`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub din: usize,
    pub dout: usize,
    pub kind: LayerKind,
}

impl LayerShape {
    /// A convolution `[dout, in_channels, kernel, kernel]`.
    pub fn conv(
        in_channels: usize,
        dout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        LayerShape {
            din: in_channels * kernel * kernel,
            dout,
            kind: LayerKind::Conv {
                in_channels,
                kernel,
                stride,
                padding,
            },
        }
    }

    /// The stride of the UNet convolution at `path` (its downsamplers halve the size).
    pub fn unet_conv_stride(path: &str) -> usize {
        if path.contains("downsamplers.") {
            2
        } else {
            1
        }
    }

    /// A linear layer `[dout, din]`.
    pub fn linear(din: usize, dout: usize) -> Self {
        LayerShape {
            din,
            dout,
            kind: LayerKind::Linear,
        }
    }
}

/// Adaptable layers by adapter key.
pub type LayerTable = BTreeMap<String, LayerShape>;

/// The adapter keys of a UNet of `cfg`, in model order: per transformer block of the down
/// blocks, the mid block, then the up blocks, `attn1` then `attn2`, each `to_q, to_k, to_v,
/// to_out.0`.
pub fn unet_layer_keys(cfg: &UnetConfig) -> Vec<String> {
    let n = cfg.block_out_channels.len();
    let mut transformers: Vec<(String, usize)> = Vec::new();
    for (i, kind) in cfg.down_blocks.iter().enumerate() {
        if *kind == BlockKind::CrossAttn {
            for j in 0..cfg.layers_per_block {
                let depth = cfg.transformer_layers.get(i).copied().unwrap_or(1);
                transformers.push((format!("down_blocks.{i}.attentions.{j}"), depth));
            }
        }
    }
    let last = cfg.transformer_layers.get(n.saturating_sub(1)).copied();
    transformers.push(("mid_block.attentions.0".into(), last.unwrap_or(1)));
    for (i, kind) in cfg.up_blocks.iter().enumerate() {
        if *kind == BlockKind::CrossAttn {
            for j in 0..=cfg.layers_per_block {
                let depth = n
                    .checked_sub(1 + i)
                    .and_then(|k| cfg.transformer_layers.get(k))
                    .copied()
                    .unwrap_or(1);
                transformers.push((format!("up_blocks.{i}.attentions.{j}"), depth));
            }
        }
    }
    let mut keys = Vec::new();
    for (t, depth) in transformers {
        for k in 0..depth {
            for attn in UNET_ATTENTIONS {
                for p in UNET_PROJECTIONS {
                    keys.push(format!(
                        "{UNET_PREFIX}{t}.transformer_blocks.{k}.{attn}.{p}"
                    ));
                }
            }
        }
    }
    keys
}

/// The path of text-encoder layer `i`'s projection `proj` (no prefix).
pub(crate) fn text_projection_path(i: usize, proj: &str) -> String {
    format!("text_model.encoder.layers.{i}.{TEXT_ATTENTION}.{proj}")
}

/// The adapter keys of a text encoder of `cfg`, in model order: per layer `q_proj, k_proj,
/// v_proj, out_proj`.
pub fn text_encoder_layer_keys(cfg: &TextEncoderConfig) -> Vec<String> {
    (0..cfg.num_hidden_layers)
        .flat_map(|i| {
            TEXT_PROJECTIONS
                .iter()
                .map(move |p| format!("{TEXT_ENCODER_PREFIX}{}", text_projection_path(i, p)))
        })
        .collect()
}

/// The adapter keys of a model of these configs in model order: the UNet's, then the text
/// encoder's. For SD 1.5's configs (the defaults) these are its 176 adaptable layers, the
/// hypernetwork's default token order.
pub fn layer_keys(unet: &UnetConfig, text_encoder: &TextEncoderConfig) -> Vec<String> {
    let mut keys = unet_layer_keys(unet);
    keys.extend(text_encoder_layer_keys(text_encoder));
    keys
}

/// A model component (the UNet, the text encoder) whose adaptable projections adapter sets
/// are built against, on backend `B`: in runtime mode a set needs only each projection's dims,
/// so a model on a GPU is a target without a host copy of its weights; merging reads the base
/// weights, on whichever backend holds them.
pub trait Adaptable<B: Backend>: Sync {
    /// The adapter key prefix of its layers ([`UNET_PREFIX`] or [`TEXT_ENCODER_PREFIX`]).
    fn key_prefix(&self) -> &'static str;
    /// The base weight `[dout, din]` of the projection with adapter key `key`, and
    /// `(dout, din)`.
    fn projection(&self, key: &str) -> Option<(&B::Weight, usize, usize)>;
    /// Every adaptable projection by adapter key.
    fn adaptable_layers(&self) -> LayerTable;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_keys_follow_the_one_list() {
        let unet = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0";
        assert_eq!(
            adapter_key(Component::Unet, unet).as_deref(),
            Some(&*format!("unet.{unet}"))
        );
        assert!(is_identity_layer(&format!("unet.{unet}")));
        for other in [
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
            "down_blocks.0.attentions.1.proj_in",
            "down_blocks.0.resnets.0.time_emb_proj",
            "time_embedding.linear_1",
            "down_blocks.0.resnets.0.conv1",
            "up_blocks.0.resnets.1.conv_shortcut",
            "down_blocks.1.downsamplers.0.conv",
            "conv_in",
        ] {
            let key = adapter_key(Component::Unet, other);
            assert_eq!(key.as_deref(), Some(&*format!("unet.{other}")), "{other}");
            assert!(!is_identity_layer(&format!("unet.{other}")), "{other}");
        }
        for not in [
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.1",
            "to_q",
            "down_blocks.0.resnets.0.norm1",
            "conv_norm_out",
            "time_embedding.linear_3",
        ] {
            assert_eq!(adapter_key(Component::Unet, not), None, "{not}");
        }
        let te = text_projection_path(11, "out_proj");
        assert_eq!(
            adapter_key(Component::TextEncoder, &te).as_deref(),
            Some(&*format!("text_encoder.{te}"))
        );
        let fc1 = "text_model.encoder.layers.0.mlp.fc1";
        assert_eq!(
            adapter_key(Component::TextEncoder, fc1).as_deref(),
            Some(&*format!("text_encoder.{fc1}"))
        );
        assert!(!is_identity_layer(&format!("text_encoder.{fc1}")));
        assert_eq!(
            adapter_key(Component::TextEncoder, "text_model.final_layer_norm"),
            None
        );
        assert_eq!(
            adapter_key(Component::Vae, "encoder.mid_block.attentions.0.to_q"),
            None
        );
    }

    #[test]
    fn sd15_has_128_unet_and_48_text_encoder_layers_in_model_order() {
        let keys = layer_keys(&UnetConfig::default(), &TextEncoderConfig::default());
        assert_eq!(keys.len(), 176);
        assert_eq!(
            keys[0],
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        // the mid block comes after the 6 down transformers (48 keys), before the up ones
        assert_eq!(
            keys[48],
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            keys[127],
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"
        );
        assert_eq!(
            keys[175],
            "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"
        );
        for k in &keys {
            let (c, path) = match k.strip_prefix(UNET_PREFIX) {
                Some(p) => (Component::Unet, p),
                None => (Component::TextEncoder, &k[TEXT_ENCODER_PREFIX.len()..]),
            };
            assert_eq!(adapter_key(c, path).as_ref(), Some(k), "{k}");
            assert!(is_identity_layer(k), "{k}");
        }
    }
}
