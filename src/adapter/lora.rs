//! Standard LoRA files: import kohya (`lora_unet_*`, `lora_te_*`, `.alpha` per layer, rank when
//! missing) and PEFT/diffusers files (`unet.*.lora_A.weight` / `lora_B`, optionally `.alpha`;
//! diffusers' older attention-processor form `*.processor.to_q_lora.down.weight`, and
//! `*.lora_linear_layer.down.weight`) of any rank, on every adaptable layer; export an adapter in
//! kohya or PEFT form. Keys that match no adaptable layer are an error listing them, never
//! dropped silently.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Adapter, AdapterSource, LayerShape, LoraLayer};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32_with_metadata, SafetensorsFile};
use crate::model::LayerKind;

/// The two file layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
}

/// kohya's name for canonical key K: `unet.a.b` -> `lora_unet_a_b`, `text_encoder.x` -> `lora_te_x`.
pub(crate) fn kohya_name(k: &str) -> String {
    let k = k
        .strip_prefix("text_encoder.")
        .map(|r| format!("te.{r}"))
        .unwrap_or_else(|| k.to_string());
    format!("lora_{}", k.replace('.', "_"))
}

/// Detects a LoRA file's layout from its keys.
pub fn detect(f: &SafetensorsFile) -> Option<LoraFormat> {
    if f.tensors().any(|e| e.name.ends_with(".lora_down.weight")) {
        Some(LoraFormat::Kohya)
    } else if f.tensors().any(|e| {
        let n = &e.name;
        n.contains(".lora_A.")
            || n.ends_with("_lora.down.weight")
            || n.contains(".lora_linear_layer.down.")
    }) {
        Some(LoraFormat::Peft)
    } else {
        None
    }
}

pub(crate) fn summarize(keys: &[String]) -> String {
    let first: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    format!(
        "{} key(s) match no adaptable layer of this model, e.g. {}",
        keys.len(),
        first.join(", ")
    )
}

/// One layer of a LoRA file, as the file declares it (before any model is consulted).
#[derive(Clone, Debug, PartialEq)]
pub struct FileLayer {
    /// The layer's name in the file, without the factor suffix (kohya `lora_unet_...`, or the
    /// canonical PEFT key).
    pub stem: String,
    /// Rows of the down factor, which must equal the columns of the up factor.
    pub rank: usize,
    /// `[din]` of the down factor `[rank, din]`.
    pub din: usize,
    /// `[dout]` of the up factor `[dout, rank]`.
    pub dout: usize,
    /// kohya's `.alpha`, a single value, if present.
    pub alpha: Option<f32>,
    /// Convolution factors (LoCon: down `[rank, din, kh, kw]`, up `[dout, rank, 1, 1]`): the
    /// down factor's kernel `(kh, kw)`; `None` for matrices.
    pub kernel: Option<(usize, usize)>,
    /// DoRA: the tensor of the layer's magnitudes (peft `lora_magnitude_vector`, one per
    /// output; LyCORIS `dora_scale`, per output or per input channel), if present.
    pub magnitude_name: Option<String>,
    /// LyCORIS' CP-decomposed (Tucker) convolution: the core `lora_mid [rank, rank, kh, kw]`
    /// between a 1x1 down and a 1x1 up factor, if present.
    pub mid_name: Option<String>,
    down_name: String,
    up_name: String,
}

/// The factor a tensor name is: 0 down, 1 up, 2 alpha, 3 DoRA magnitude, 4 Tucker core; with
/// its layer stem.
fn classify(format: LoraFormat, n: &str) -> Option<(String, u8)> {
    match format {
        LoraFormat::Kohya => [
            (".lora_down.weight", 0),
            (".lora_up.weight", 1),
            (".alpha", 2),
            (".dora_scale", 3),
            (".lora_mid.weight", 4),
        ]
        .into_iter()
        .find_map(|(suffix, which)| Some((n.strip_suffix(suffix)?.to_string(), which))),
        LoraFormat::Peft => {
            if let Some(s) = n.strip_suffix(".alpha") {
                return Some((normalize_peft(s), 2));
            }
            // DoRA's magnitudes (peft: `.lora_magnitude_vector[.default][.weight]`).
            let m = n.strip_suffix(".weight").unwrap_or(n);
            let m = m.strip_suffix(".default").unwrap_or(m);
            if let Some(s) = m.strip_suffix(".lora_magnitude_vector") {
                return Some((normalize_peft(s), 3));
            }
            // PEFT state dicts may carry the adapter name: `.lora_A.default.weight`.
            let base = n.strip_suffix(".weight").unwrap_or(n);
            let base = base.strip_suffix(".default").unwrap_or(base);
            // (suffix, factor, whether only the processor form ends so)
            for (suffix, which, processor) in [
                (".lora_A", 0, false),
                (".lora_B", 1, false),
                (".lora_linear_layer.down", 0, false),
                (".lora_linear_layer.up", 1, false),
                (".down", 0, true),
                (".up", 1, true),
            ] {
                if let Some(s) = base.strip_suffix(suffix) {
                    let stem = if processor {
                        processor_form(s)?
                    } else {
                        s.to_string()
                    };
                    return Some((normalize_peft(&stem), which));
                }
            }
            None
        }
    }
}

/// The structure of a LoRA file, read without a model ([`read_layers`]).
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub format: LoraFormat,
    /// Layers with both factors, checked against each other.
    pub layers: Vec<FileLayer>,
    /// Layers with only one factor: (stem, the tensor names present).
    pub partial: Vec<(String, Vec<String>)>,
    /// Tensors that are no LoRA factor at all.
    pub other: Vec<String>,
}

/// Reads the structure of a LoRA file without a model: its layout and, per layer, factors of
/// consistent shapes (`down [rank, din]`, `up [dout, rank]`, both 2-D and of the same rank,
/// 1..=[`crate::limits::MAX_RANK`]) and an optional single-valued alpha. Shapes are checked,
/// not element counts: an up factor declared `[rank, out]` is the wrong layout even when its
/// element count fits. Layers missing a factor and tensors that are no factor are returned
/// apart, for the caller to judge against a model.
pub fn read_layers(f: &SafetensorsFile) -> Result<LoraFile> {
    let path = f.path();
    let bad = |reason: String| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "LoRA",
        reason,
    };
    let format = detect(f).ok_or_else(|| {
        bad("neither kohya (*.lora_down.weight) nor PEFT (*.lora_A.weight) keys".into())
    })?;
    // stem -> [down, up, alpha, DoRA magnitude, Tucker core] entries
    let mut parts: BTreeMap<String, [Option<&crate::io::safetensors::TensorEntry>; 5]> =
        BTreeMap::new();
    let mut other = Vec::new();
    for e in f.tensors() {
        match classify(format, &e.name) {
            Some((stem, which)) => parts.entry(stem).or_default()[which as usize] = Some(e),
            None => other.push(e.name.clone()),
        }
    }
    let mut layers = Vec::with_capacity(parts.len());
    let mut partial = Vec::new();
    for (stem, [down, up, alpha, magnitude, mid]) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            let names = [down, up, alpha, magnitude, mid].into_iter().flatten();
            partial.push((stem, names.map(|e| e.name.clone()).collect()));
            continue;
        };
        let (rank, din, dout, up_rank, kernel) = match (down.shape.dims(), up.shape.dims(), mid) {
            (&[rank, din], &[dout, up_rank], None) => (rank, din, dout, up_rank, None),
            (&[rank, din, kh, kw], &[dout, up_rank, 1, 1], None) => {
                (rank, din, dout, up_rank, Some((kh, kw)))
            }
            // Tucker: the kernel is the core's.
            (&[rank, din, 1, 1], &[dout, up_rank, 1, 1], Some(m)) => match m.shape.dims() {
                &[r1, r2, kh, kw] if r1 == rank && r2 == rank => {
                    (rank, din, dout, up_rank, Some((kh, kw)))
                }
                _ => {
                    return Err(bad(format!(
                        "layer '{stem}': Tucker core '{}' is {}, not [{rank}, {rank}, kh, kw] \
                         for the rank of '{}'",
                        m.name, m.shape, down.name
                    )))
                }
            },
            _ => {
                return Err(bad(format!(
                    "layer '{stem}': factors '{}' {} and '{}' {} must both be matrices \
                     ([rank, in] and [out, rank]) or convolution factors ([rank, in, kh, kw] \
                     and [out, rank, 1, 1]; with a Tucker core lora_mid, [rank, in, 1, 1])",
                    down.name, down.shape, up.name, up.shape
                )))
            }
        };
        if up_rank != rank {
            return Err(bad(format!(
                "layer '{stem}': down '{}' is {} ([rank, in]) but up '{}' is {}, not [out, {rank}]",
                down.name, down.shape, up.name, up.shape
            )));
        }
        if rank == 0 || rank > crate::limits::MAX_RANK {
            return Err(bad(format!(
                "layer '{stem}' has rank {rank}; 1..={} allowed (hdb's documented limit)",
                crate::limits::MAX_RANK
            )));
        }
        let alpha = match alpha {
            None => None,
            Some(a) => {
                let v = f.to_f32(&a.name)?;
                match v.as_slice() {
                    [x] if x.is_finite() => Some(*x),
                    [x] => return Err(bad(format!("'{}' is {x}, not a finite number", a.name))),
                    _ => {
                        return Err(bad(format!(
                            "'{}' has shape {} ({} values); alpha is one number",
                            a.name,
                            a.shape,
                            v.len()
                        )))
                    }
                }
            }
        };
        layers.push(FileLayer {
            stem,
            rank,
            din,
            dout,
            alpha,
            kernel,
            magnitude_name: magnitude.map(|e| e.name.clone()),
            mid_name: mid.map(|e| e.name.clone()),
            down_name: down.name.clone(),
            up_name: up.name.clone(),
        });
    }
    Ok(LoraFile {
        format,
        layers,
        partial,
        other,
    })
}

/// One layer of a LoRA file as stored: its factors, raw (no alpha folded in), with their
/// tensor names and shapes in the file (the training path writes gradients under them).
#[derive(Clone, Debug)]
pub struct NamedLayer {
    /// The canonical adapter key.
    pub key: String,
    pub rank: usize,
    pub down_name: String,
    pub down_shape: Vec<usize>,
    /// `[rank, in]` values.
    pub down: Vec<f32>,
    pub up_name: String,
    pub up_shape: Vec<usize>,
    /// `[out, rank]` values.
    pub up: Vec<f32>,
    pub alpha: Option<f32>,
    /// The kernel of a convolution layer (`None`: linear).
    pub conv_kernel: Option<usize>,
    /// DoRA: the layer's magnitudes and how they apply.
    pub dora: Option<super::Dora>,
    /// Whether `down` was folded from a Tucker core (`lora_mid`) and a 1x1 down factor: it is
    /// then not the file's `down_name` tensor.
    pub tucker: bool,
}

/// Reads a LoRA file's layers as stored, matched against a model's adaptable layers: every
/// layer must name an adaptable layer and have exactly its `[dout, din]`; keys that match no
/// layer are an error listing them.
pub fn read_named(
    f: &SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
) -> Result<(LoraFormat, Vec<NamedLayer>)> {
    read_named_opts(f, table, false)
}

/// As [`read_named`]; with `allow_unmatched`, tensors that match no adaptable layer are skipped
/// (listed in the log at warning level) instead of refused.
pub fn read_named_opts(
    f: &SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
    allow_unmatched: bool,
) -> Result<(LoraFormat, Vec<NamedLayer>)> {
    let path = f.path();
    let LoraFile {
        format,
        layers: file_layers,
        partial,
        other: mut unmatched,
    } = read_layers(f)?;
    // name in the file (without the factor suffix) -> canonical key
    let lookup: BTreeMap<String, &String> = match format {
        LoraFormat::Kohya => table.keys().map(|k| (kohya_name(k), k)).collect(),
        LoraFormat::Peft => table.keys().map(|k| (k.clone(), k)).collect(),
    };
    for (stem, names) in partial {
        match lookup.get(&stem) {
            Some(k) => {
                return Err(Error::AdapterMismatch(format!(
                    "{}: layer '{k}' lacks its down or up factor (has only {})",
                    path.display(),
                    names.join(", ")
                )))
            }
            None => unmatched.extend(names),
        }
    }
    let mut known = Vec::with_capacity(file_layers.len());
    for l in file_layers {
        match lookup.get(&l.stem) {
            Some(k) => known.push((*k, l)),
            None => unmatched.extend([l.down_name, l.up_name]),
        }
    }
    if !unmatched.is_empty() && allow_unmatched {
        unmatched.sort();
        log::warn!(
            "{}: skipped as asked (allow unmatched): {}: {}",
            path.display(),
            summarize(&unmatched),
            unmatched.join(", ")
        );
    } else if !unmatched.is_empty() {
        unmatched.sort();
        return Err(Error::AdapterMismatch(format!(
            "{}: {}",
            path.display(),
            summarize(&unmatched)
        )));
    }
    let mut layers = Vec::with_capacity(known.len());
    for (k, l) in known {
        let s = &table[k];
        // The factors' input width: a convolution's in channels, a linear layer's din.
        let (want_in, conv_kernel) = match (s.kind, l.kernel) {
            (LayerKind::Linear, None) => (s.din, None),
            (LayerKind::Linear, Some((kh, kw))) => {
                return Err(Error::AdapterMismatch(format!(
                    "{}: layer '{k}' is a linear layer, but '{}' is a {kh}x{kw} convolution \
                     factor {} (LoCon)",
                    path.display(),
                    l.down_name,
                    f.get(&l.down_name)
                        .map_or_else(String::new, |e| e.shape.to_string()),
                )));
            }
            (
                LayerKind::Conv {
                    in_channels,
                    kernel,
                    ..
                },
                file,
            ) => {
                // Matrices fit a 1x1 convolution (SD 2.x-style files for SD 1.x's proj_in).
                let (kh, kw) = file.unwrap_or((1, 1));
                if (kh, kw) != (kernel, kernel) {
                    return Err(Error::AdapterMismatch(format!(
                        "{}: layer '{k}' is a {kernel}x{kernel} convolution, but its down factor \
                         '{}' has a {kh}x{kw} kernel",
                        path.display(),
                        l.down_name
                    )));
                }
                (in_channels, Some(kernel))
            }
        };
        if (l.dout, l.din) != (s.dout, want_in) {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer '{k}': factors '{}' [{}, {}] and '{}' [{}, {}] do not fit the model's \
                 [{}, {}] weight",
                path.display(),
                l.down_name,
                l.rank,
                l.din,
                l.up_name,
                l.dout,
                l.rank,
                s.dout,
                want_in
            )));
        }
        let down_shape = match l.kernel {
            Some((kh, kw)) => vec![l.rank, l.din, kh, kw],
            None => vec![l.rank, l.din],
        };
        let mut down = f.to_f32(&l.down_name)?;
        if let Some(mid) = &l.mid_name {
            let (kh, kw) = l.kernel.unwrap_or((1, 1));
            down = fold_tucker(&f.to_f32(mid)?, &down, l.rank, l.din, kh * kw);
        }
        let dora = match &l.magnitude_name {
            None => None,
            Some(n) => Some(read_dora(f, n, format, k, l.dout, want_in)?),
        };
        layers.push(NamedLayer {
            key: k.clone(),
            rank: l.rank,
            down,
            up: f.to_f32(&l.up_name)?,
            up_shape: if l.kernel.is_some() {
                vec![l.dout, l.rank, 1, 1]
            } else {
                vec![l.dout, l.rank]
            },
            down_shape,
            conv_kernel,
            dora,
            tucker: l.mid_name.is_some(),
            down_name: l.down_name,
            up_name: l.up_name,
            alpha: l.alpha,
        });
    }
    Ok((format, layers))
}

/// LyCORIS' Tucker convolution as plain LoCon factors: `down [r, in, kk]` with
/// `down[m, j, s] = sum_n mid[m, n, s] down1[n, j]` (`mid [r, r, kk]`, `down1 [r, in]`), so
/// `up . down` is LyCORIS' `einsum("m n ..., i m, n j -> i j ...", mid, up, down1)`.
pub(super) fn fold_tucker(mid: &[f32], down1: &[f32], r: usize, din: usize, kk: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * din * kk];
    for m in 0..r {
        for n in 0..r {
            let core = &mid[(m * r + n) * kk..(m * r + n + 1) * kk];
            for (j, &d) in down1[n * din..(n + 1) * din].iter().enumerate() {
                let o = &mut out[(m * din + j) * kk..(m * din + j + 1) * kk];
                o.iter_mut().zip(core).for_each(|(o, &c)| *o += c * d);
            }
        }
    }
    out
}

/// A layer's DoRA magnitudes `name`: peft's `lora_magnitude_vector` (`[out]`, or `[1, out, 1,
/// 1]` for a convolution), or LyCORIS' `dora_scale`, `[out, 1(, 1, 1)]` (norms per output) or
/// `[1, in(, 1, 1)]` (per input channel); finite and non-negative.
pub(crate) fn read_dora(
    f: &SafetensorsFile,
    name: &str,
    format: LoraFormat,
    key: &str,
    dout: usize,
    in_channels: usize,
) -> Result<super::Dora> {
    let path = f.path();
    let dims = f
        .get(name)
        .map(|e| e.shape.dims().to_vec())
        .unwrap_or_default();
    let v = f.to_f32(name)?;
    let ones = |d: &[usize]| d.iter().all(|&x| x == 1);
    let (on_out, style, want) = match format {
        LoraFormat::Peft => (true, super::DoraStyle::Peft, dout),
        LoraFormat::Kohya => match dims.as_slice() {
            [o, rest @ ..] if *o == dout && !rest.is_empty() && ones(rest) => {
                (true, super::DoraStyle::Lycoris, dout)
            }
            [1, i, rest @ ..] if *i == in_channels && ones(rest) => {
                (false, super::DoraStyle::Lycoris, in_channels)
            }
            _ => {
                return Err(Error::AdapterMismatch(format!(
                    "{}: layer '{key}': DoRA scale '{name}' has shape {dims:?}; expected \
                     [{dout}, 1, ...] (per output) or [1, {in_channels}, ...] (per input channel)",
                    path.display()
                )))
            }
        },
    };
    if v.len() != want || v.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err(Error::AdapterMismatch(format!(
            "{}: layer '{key}': DoRA magnitude '{name}' must hold {want} finite, non-negative \
             values (has {})",
            path.display(),
            v.len()
        )));
    }
    Ok(super::Dora {
        magnitude: v,
        on_out,
        style,
    })
}

/// Imports a LoRA file against a model's adaptable layers ([`read_named`]), alpha / rank
/// folded into the up factor.
pub fn import(f: &SafetensorsFile, table: &BTreeMap<String, LayerShape>) -> Result<Adapter> {
    import_opts(f, table, false)
}

/// As [`import`]; with `allow_unmatched`, keys that match no adaptable layer are skipped and
/// logged ([`read_named_opts`]).
pub fn import_opts(
    f: &SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
    allow_unmatched: bool,
) -> Result<Adapter> {
    let path = f.path();
    let (_, named) = read_named_opts(f, table, allow_unmatched)?;
    let mut layers = BTreeMap::new();
    let mut magnitudes = BTreeMap::new();
    for n in named {
        if let Some(d) = n.dora {
            magnitudes.insert(n.key.clone(), d);
        }
        let scale = n.alpha.map_or(1.0, |a| a / n.rank as f32);
        let up = n.up.iter().map(|x| x * scale).collect();
        layers.insert(
            n.key,
            LoraLayer {
                rank: n.rank,
                down: n.down,
                up,
                conv_kernel: n.conv_kernel,
            },
        );
    }
    let source = if magnitudes.is_empty() {
        AdapterSource::Lora
    } else {
        if let Some(k) = layers.keys().find(|k| !magnitudes.contains_key(*k)) {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer '{k}' has no DoRA magnitude while others do",
                path.display()
            )));
        }
        AdapterSource::Dora {
            layout: "DoRA",
            magnitudes,
        }
    };
    let adapter = Adapter { layers, source };
    adapter.validate(table).map_err(|e| match e {
        Error::AdapterMismatch(m) => Error::AdapterMismatch(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok(adapter)
}

/// The module a LoRA of diffusers' older attention-processor form adapts:
/// `<attention>.processor.to_q_lora` -> `<attention>.to_q` (`to_out_lora` -> `to_out.0`).
fn processor_form(stem: &str) -> Option<String> {
    let (attn, proc) = stem.split_once(".processor.")?;
    let proj = match proc {
        "to_q_lora" => "to_q",
        "to_k_lora" => "to_k",
        "to_v_lora" => "to_v",
        "to_out_lora" => "to_out.0",
        _ => return None,
    };
    Some(format!("{attn}.{proj}"))
}

/// The canonical key of a PEFT/diffusers layer name: transformers >= 5.6 saves CLIP flat (no
/// `text_model.`), canonical keys have it; names without a component prefix (UNet-only state
/// dicts, the older processor form) are the UNet's.
pub(crate) fn normalize_peft(s: &str) -> String {
    match s.strip_prefix("text_encoder.") {
        Some(r) if !r.starts_with("text_model.") => format!("text_encoder.text_model.{r}"),
        Some(_) => s.to_string(),
        None if s.starts_with("unet.") => s.to_string(),
        None => format!("unet.{s}"),
    }
}

/// Writes an adapter as a standard LoRA file. Alpha and scales are already folded into `up`,
/// so PEFT needs `lora_alpha = r`; kohya files get one `.alpha` for every layer (see below).
pub fn export(adapter: &Adapter, format: LoraFormat, path: &Path) -> Result<()> {
    let magnitudes =
        match (&adapter.source, format) {
            (AdapterSource::Dora { magnitudes, .. }, LoraFormat::Peft)
                if magnitudes
                    .values()
                    .all(|d| d.on_out && d.style == super::DoraStyle::Peft) =>
            {
                Some(magnitudes)
            }
            (AdapterSource::Dora { .. }, _) => return Err(Error::Unsupported(
                "a DoRA adapter is written as PEFT (lora_magnitude_vector) only, and only when \
                 it came as one (LyCORIS dora_scale rescales differently)"
                    .into(),
            )),
            _ => None,
        };
    let mut names = Vec::new();
    for (k, l) in &adapter.layers {
        let (d, u) = match format {
            LoraFormat::Kohya => {
                let n = kohya_name(k);
                (
                    format!("{n}.lora_down.weight"),
                    format!("{n}.lora_up.weight"),
                )
            }
            LoraFormat::Peft => (format!("{k}.lora_A.weight"), format!("{k}.lora_B.weight")),
        };
        names.push((d, u, format!("{}.alpha", kohya_name(k)), l));
    }
    // Kohya: one alpha for every layer, the most common rank A (the smallest of a tie), and a
    // layer of rank r stores `up * r / A`, so `A / r * up' . down` is the update. With the
    // alphas all equal, a reader that keys some of them wrongly still scales right (diffusers
    // 0.42.1 drops attention layers' alphas for its default, which is then A).
    let common = {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        names
            .iter()
            .for_each(|(_, _, _, l)| *counts.entry(l.rank).or_default() += 1);
        // (max_by_key keeps the last maximum: iterate ranks from the largest down)
        counts
            .iter()
            .rev()
            .max_by_key(|(_, c)| **c)
            .map_or(1, |(r, _)| *r)
    };
    let alpha = [common as f32];
    let ups: Vec<std::borrow::Cow<'_, [f32]>> = names
        .iter()
        .map(|(_, _, _, l)| {
            if format == LoraFormat::Kohya && l.rank != common {
                let f = l.rank as f64 / common as f64;
                std::borrow::Cow::Owned(l.up.iter().map(|&x| (f64::from(x) * f) as f32).collect())
            } else {
                std::borrow::Cow::Borrowed(l.up.as_slice())
            }
        })
        .collect();
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = Vec::new();
    for ((d, u, a, l), up) in names.iter().zip(&ups) {
        let din = l.down.len() / l.rank;
        let dout = l.up.len() / l.rank;
        // Convolutions as LoCon stores them: down [r, in, k, k], up [out, r, 1, 1].
        let (down_shape, up_shape) = match l.conv_kernel {
            Some(k) => (
                vec![l.rank, din / (k * k).max(1), k, k],
                vec![dout, l.rank, 1, 1],
            ),
            None => (vec![l.rank, din], vec![dout, l.rank]),
        };
        tensors.push((d.as_str(), down_shape, &l.down));
        tensors.push((u.as_str(), up_shape, up));
        if format == LoraFormat::Kohya {
            tensors.push((a.as_str(), vec![], &alpha));
        }
    }
    let magnitude_names: Vec<(String, &Vec<f32>)> = magnitudes
        .into_iter()
        .flatten()
        .map(|(k, d)| (format!("{k}.lora_magnitude_vector"), &d.magnitude))
        .collect();
    for (n, m) in &magnitude_names {
        // peft's shapes: [out] for a linear layer, [1, out, 1, 1] for a convolution.
        let key = n.trim_end_matches(".lora_magnitude_vector");
        let conv = adapter
            .layers
            .get(key)
            .is_some_and(|l| l.conv_kernel.is_some());
        let shape = if conv {
            vec![1, m.len(), 1, 1]
        } else {
            vec![m.len()]
        };
        tensors.push((n.as_str(), shape, m));
    }
    let meta = vec![("generator".to_string(), format!("hdb {}", crate::VERSION))];
    write_f32_with_metadata(path, &tensors, &meta)
}
