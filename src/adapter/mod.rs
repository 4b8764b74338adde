//! Identity adapters: LiDB files ([`lidb`], versions 1 and 2), their basis ([`basis`]), standard LoRA files
//! ([`lora`]), and applying them to a model ([`apply`]). Every adapter is held in its effective
//! form: per adapted layer, `dW = up . down`, alpha and scale folded into `up`.

pub mod apply;
pub mod basis;
pub mod lidb;
pub mod lora;

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::keymap::Component;
use crate::model::Model;

/// The adapter key prefix of the text encoder's layers (the UNet's is `unet.`).
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

/// Whether any adapter of `set` changes a text-encoder layer.
pub fn touches_text_encoder(set: &[(&Adapter, f32)]) -> bool {
    set.iter()
        .any(|(a, _)| a.layers.keys().any(|k| k.starts_with(TEXT_ENCODER_PREFIX)))
}

/// One adaptable layer of a model: a linear `[dout, din]` weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub din: usize,
    pub dout: usize,
}

/// The layers of a model that adapters may change, by canonical key: `unet.<path>` for the
/// UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0` of `attn1` and `attn2`)
/// and `text_encoder.<path>` for the text encoder's (`q_proj`, `k_proj`, `v_proj`,
/// `out_proj`). SD 1.5 has 128 + 48.
pub fn adaptable_layers(model: &Model) -> BTreeMap<String, LayerShape> {
    let mut out = BTreeMap::new();
    for (c, suffixes) in [
        (
            Component::Unet,
            &[
                ".to_q.weight",
                ".to_k.weight",
                ".to_v.weight",
                ".to_out.0.weight",
            ][..],
        ),
        (
            Component::TextEncoder,
            &[
                ".q_proj.weight",
                ".k_proj.weight",
                ".v_proj.weight",
                ".out_proj.weight",
            ][..],
        ),
    ] {
        let Some(cw) = model.component(c) else {
            continue;
        };
        for (name, w) in cw.weights.iter() {
            let is_attn = match c {
                Component::Unet => name.contains(".attn1.") || name.contains(".attn2."),
                _ => name.contains(".self_attn."),
            };
            if let (true, Some(stem), [dout, din]) = (
                is_attn,
                suffixes
                    .iter()
                    .find_map(|s| name.strip_suffix(s).map(|p| (p, s))),
                w.shape.dims(),
            ) {
                let (path, suffix) = stem;
                let proj = suffix.trim_start_matches('.').trim_end_matches(".weight");
                out.insert(
                    format!("{}.{path}.{proj}", c.name()),
                    LayerShape {
                        din: *din,
                        dout: *dout,
                    },
                );
            }
        }
    }
    out
}

/// One layer's low-rank update `dW = up . down`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    pub rank: usize,
    /// [rank, din]
    pub down: Vec<f32>,
    /// [dout, rank], with alpha (and any LoRA scale) folded in.
    pub up: Vec<f32>,
}

impl LoraLayer {
    /// Whether the factors are exactly `down [rank, din]` and `up [dout, rank]` of a non-zero
    /// rank. The products are checked: a rank read from a file (2^62, say) must not wrap to a
    /// size that matches empty factors.
    pub fn fits(&self, dout: usize, din: usize) -> bool {
        self.rank > 0
            && self.rank.checked_mul(din) == Some(self.down.len())
            && dout.checked_mul(self.rank) == Some(self.up.len())
    }
}

/// Where an adapter came from, so it can be saved in the same form.
#[derive(Clone, Debug)]
pub enum AdapterSource {
    Lidb(lidb::Lidb),
    Lora,
}

/// An adapter validated against one model: effective factors for a subset of its layers.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub layers: BTreeMap<String, LoraLayer>,
    pub source: AdapterSource,
}

impl Adapter {
    /// Checks every layer against the model's adaptable layers (names, shapes, finite values).
    pub fn validate(&self, table: &BTreeMap<String, LayerShape>) -> Result<()> {
        if self.layers.is_empty() {
            return Err(Error::AdapterMismatch("the adapter has no layers".into()));
        }
        for (k, l) in &self.layers {
            let s = table.get(k).ok_or_else(|| {
                Error::AdapterMismatch(format!(
                    "layer '{k}' is not an adaptable layer of this model"
                ))
            })?;
            if !l.fits(s.dout, s.din) {
                return Err(Error::AdapterMismatch(format!(
                    "layer '{k}': factors of rank {} with {} and {} values do not fit the model's [{}, {}] weight",
                    l.rank,
                    l.down.len(),
                    l.up.len(),
                    s.dout,
                    s.din
                )));
            }
            if l.down.iter().chain(&l.up).any(|x| !x.is_finite()) {
                return Err(Error::AdapterMismatch(format!(
                    "layer '{k}' holds NaN or Inf values"
                )));
            }
        }
        Ok(())
    }
}

/// Reads an adapter file of any supported kind (LiDB v1 or v2, kohya or PEFT LoRA) and validates it
/// against a model's adaptable layers.
pub fn load(
    f: &crate::io::safetensors::SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
) -> Result<Adapter> {
    load_cached(f, table, &lidb::BasisCache::default())
}

/// As [`load`], with LiDB bases from a model's cache.
pub fn load_cached(
    f: &crate::io::safetensors::SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
    cache: &lidb::BasisCache,
) -> Result<Adapter> {
    let with_path = |e: Error| match e {
        Error::AdapterMismatch(m) if !m.contains(&f.path().display().to_string()) => {
            Error::AdapterMismatch(format!("{}: {m}", f.path().display()))
        }
        other => other,
    };
    if lidb::is_lidb(f) {
        lidb::Lidb::from_safetensors(f)?
            .compose_cached(table, cache)
            .map_err(with_path)
    } else {
        lora::import(f, table).map_err(with_path)
    }
}

impl Adapter {
    /// Saves in the form it came in: LiDB adapters as LiDB v2, imported LoRAs as PEFT files.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        match &self.source {
            AdapterSource::Lidb(l) => l.save(path),
            AdapterSource::Lora => lora::export(self, lora::LoraFormat::Peft, path),
        }
    }
}
