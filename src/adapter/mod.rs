//! Adapters: LiDB identities ([`lidb`], versions 1 and 2) and their basis ([`basis`]), standard
//! LoRA and LoCon files ([`lora`]), LyCORIS LoHa and LoKr files ([`lycoris`], merge mode only),
//! stacking several into one ([`stack`]), and applying them to a model ([`apply`], [`set`]).
//! Every adapter is held in its effective form: per adapted layer, `dW = up . down`, alpha and
//! scale folded into `up`.

pub mod apply;
pub mod basis;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod lidb;
pub mod lora;
pub mod lycoris;
pub mod set;

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::adaptable::TEXT_ENCODER_PREFIX;
pub use crate::model::{LayerShape, LayerTable};

/// Whether any adapter of `set` changes a text-encoder layer.
pub fn touches_text_encoder(set: &[(&Adapter, f32)]) -> bool {
    set.iter()
        .any(|(a, _)| a.layers.keys().any(|k| k.starts_with(TEXT_ENCODER_PREFIX)))
}

/// One layer's low-rank update `dW = up . down`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLayer {
    pub rank: usize,
    /// [rank, din]
    pub down: Vec<f32>,
    /// [dout, rank], with alpha (and any LoRA scale) folded in.
    pub up: Vec<f32>,
    /// For a convolution layer, its kernel k: `down` is then `[rank, din / k^2, k, k]` and
    /// `up` `[dout, rank, 1, 1]` (how files store them); `None` for a linear layer.
    pub conv_kernel: Option<usize>,
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
    /// A layout whose updates are full matrices (LoHa, LoKr: [`lycoris`]), named here: merge
    /// mode only.
    MergeOnly(&'static str),
    /// DoRA (merge mode only): a LoRA with peft's `lora_magnitude_vector` or LyCORIS'
    /// `dora_scale`, or a LoHa/LoKr with `dora_scale` (`layout` names which); per layer, the
    /// magnitudes [`Dora`] rescales `W + dW` to, which depends on the base weight.
    Dora {
        layout: &'static str,
        magnitudes: BTreeMap<String, Dora>,
    },
}

/// How a DoRA layer's scale acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoraStyle {
    /// peft: `W' = m / |W + s dW| * (W + s dW)`, the norm per output row.
    Peft,
    /// LyCORIS: `W' = (W + dW) * (s (m / (|W + dW| + eps) - 1) + 1)`, the norm per output row
    /// or per input channel; the adapter's scale `s` interpolates the rescale, not `dW`.
    Lycoris,
}

/// One DoRA layer's magnitudes.
#[derive(Clone, Debug, PartialEq)]
pub struct Dora {
    /// One per output row (`on_out`), else one per input channel.
    pub magnitude: Vec<f32>,
    /// Norms per output row (peft; LyCORIS' `wd_on_out`, its default), else per input channel
    /// (the column, or for a convolution the `[out, kh, kw]` slab of that channel).
    pub on_out: bool,
    pub style: DoraStyle,
}

/// An adapter validated against one model: effective factors for a subset of its layers.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub layers: BTreeMap<String, LoraLayer>,
    pub source: AdapterSource,
}

impl Adapter {
    /// Checks every layer against the model's adaptable layers (names, shapes, finite values).
    pub fn validate(&self, table: &LayerTable) -> Result<()> {
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
pub fn load(f: &crate::io::safetensors::SafetensorsFile, table: &LayerTable) -> Result<Adapter> {
    load_cached(f, table, &lidb::BasisCache::default())
}

/// How adapter files are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// LoRA files: skip keys that match no adaptable layer of the model (they are logged at
    /// warning level) instead of refusing the file. The layers that do match must still fit.
    pub allow_unmatched: bool,
}

/// As [`load`], with LiDB bases from a model's cache.
pub fn load_cached(
    f: &crate::io::safetensors::SafetensorsFile,
    table: &LayerTable,
    cache: &lidb::BasisCache,
) -> Result<Adapter> {
    load_with(f, table, cache, LoadOptions::default())
}

/// As [`load_cached`], with options.
pub fn load_with(
    f: &crate::io::safetensors::SafetensorsFile,
    table: &LayerTable,
    cache: &lidb::BasisCache,
    opts: LoadOptions,
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
    } else if lycoris::is_lycoris(f) {
        lycoris::import(f, table, opts.allow_unmatched).map_err(with_path)
    } else {
        lora::import_opts(f, table, opts.allow_unmatched).map_err(with_path)
    }
}

/// One adapter that applies `parts` (each with its scale) at once: per layer, their factors
/// side by side (ranks add, each scale folded into its `up` columns), so `dW = sum scale_i up_i
/// down_i` in either apply mode. A set of such adapters gives per-sample identities a shared
/// style in runtime mode: `[id1 + style, id2 + style]` with one index per sample.
pub fn stack(parts: &[(&Adapter, f32)]) -> Result<Adapter> {
    let mut layers: BTreeMap<String, LoraLayer> = BTreeMap::new();
    let mut merge_only = None;
    for (i, (a, scale)) in parts.iter().enumerate() {
        match a.source {
            // DoRA normalizes each adapter's own W + dW: no sum of updates is the same.
            AdapterSource::Dora { .. } => {
                return Err(Error::Unsupported(format!(
                    "adapter #{i} is a DoRA adapter, which does not stack; give it to the set \
                     on its own"
                )))
            }
            AdapterSource::MergeOnly(l) => merge_only = Some(l),
            _ => {}
        }
        if !scale.is_finite() {
            return Err(Error::invalid_arg(
                "scales",
                format!("scale #{i} is {scale}"),
            ));
        }
        for (k, l) in &a.layers {
            let (din, dout) = match l.rank {
                0 => (0, 0),
                r => (l.down.len() / r, l.up.len() / r),
            };
            if !l.fits(dout, din) {
                return Err(Error::AdapterMismatch(format!(
                    "layer '{k}' of adapter #{i}: factors of rank {} with {} and {} values",
                    l.rank,
                    l.down.len(),
                    l.up.len()
                )));
            }
            let up = l.up.iter().map(|x| x * scale);
            let Some(e) = layers.get_mut(k) else {
                layers.insert(
                    k.clone(),
                    LoraLayer {
                        rank: l.rank,
                        down: l.down.clone(),
                        up: up.collect(),
                        conv_kernel: l.conv_kernel,
                    },
                );
                continue;
            };
            let rank = e.rank + l.rank;
            if !e.fits(dout, din)
                || e.conv_kernel != l.conv_kernel
                || rank > crate::limits::MAX_RANK
            {
                return Err(Error::AdapterMismatch(format!(
                    "layer '{k}': adapter #{i} does not stack with the ones before it (a \
                     different layer shape or kind, or ranks adding up to {rank}, above {})",
                    crate::limits::MAX_RANK
                )));
            }
            e.down.extend_from_slice(&l.down);
            // up is [dout, rank] row-major: each row gets this adapter's columns appended.
            let up: Vec<f32> = up.collect();
            let mut merged = Vec::with_capacity(dout * rank);
            for (old, new) in e.up.chunks(e.rank).zip(up.chunks(l.rank)) {
                merged.extend_from_slice(old);
                merged.extend_from_slice(new);
            }
            e.up = merged;
            e.rank = rank;
        }
    }
    if layers.is_empty() {
        return Err(Error::AdapterMismatch(
            "the adapters to stack have no layers".into(),
        ));
    }
    Ok(Adapter {
        layers,
        // (a merge-only part keeps the stack merge-only)
        source: merge_only.map_or(AdapterSource::Lora, AdapterSource::MergeOnly),
    })
}

impl Adapter {
    /// Saves in the form it came in: LiDB adapters as LiDB v2, imported LoRAs as PEFT files.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        match &self.source {
            AdapterSource::Lidb(l) => l.save(path),
            // (a merge-only layout's updates are exact as full-rank factors)
            AdapterSource::Lora | AdapterSource::MergeOnly(_) | AdapterSource::Dora { .. } => {
                lora::export(self, lora::LoraFormat::Peft, path)
            }
        }
    }
}
