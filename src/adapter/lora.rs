//! Standard LoRA files: import kohya (`lora_unet_*`, `lora_te_*`, `.alpha`) and PEFT/diffusers
//! (`unet.*.lora_A.weight` / `lora_B`) files of any rank; export an adapter in either form.
//! Keys that match no adaptable layer are an error listing them, never dropped silently.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Adapter, AdapterSource, LayerShape, LoraLayer};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32_with_metadata, SafetensorsFile};

/// The two file layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
}

/// kohya's name for canonical key K: `unet.a.b` -> `lora_unet_a_b`, `text_encoder.x` -> `lora_te_x`.
pub fn kohya_name(k: &str) -> String {
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
    } else if f.tensors().any(|e| e.name.contains(".lora_A.")) {
        Some(LoraFormat::Peft)
    } else {
        None
    }
}

fn summarize(keys: &[String]) -> String {
    let first: Vec<&str> = keys.iter().take(5).map(String::as_str).collect();
    format!(
        "{} key(s) match no adaptable layer of this model, e.g. {}",
        keys.len(),
        first.join(", ")
    )
}

/// One layer's pieces as found in a file.
#[derive(Default)]
struct Parts {
    down: Option<Vec<f32>>,
    up: Option<Vec<f32>>,
    alpha: Option<f32>,
    down_shape: Vec<usize>,
}

/// Imports a LoRA file against a model's adaptable layers.
pub fn import(f: &SafetensorsFile, table: &BTreeMap<String, LayerShape>) -> Result<Adapter> {
    let path = f.path();
    let format = detect(f).ok_or_else(|| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "LoRA",
        reason: "neither kohya (*.lora_down.weight) nor PEFT (*.lora_A.weight) keys".into(),
    })?;
    // name in the file (without the factor suffix) -> canonical key
    let lookup: BTreeMap<String, &String> = match format {
        LoraFormat::Kohya => table.keys().map(|k| (kohya_name(k), k)).collect(),
        LoraFormat::Peft => table.keys().map(|k| (k.clone(), k)).collect(),
    };
    let mut parts: BTreeMap<&String, Parts> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for e in f.tensors() {
        let n = e.name.as_str();
        let (stem, which) = match format {
            LoraFormat::Kohya => {
                if let Some(s) = n.strip_suffix(".lora_down.weight") {
                    (s.to_string(), 0)
                } else if let Some(s) = n.strip_suffix(".lora_up.weight") {
                    (s.to_string(), 1)
                } else if let Some(s) = n.strip_suffix(".alpha") {
                    (s.to_string(), 2)
                } else {
                    unmatched.push(e.name.clone());
                    continue;
                }
            }
            LoraFormat::Peft => {
                // PEFT state dicts may carry the adapter name: `.lora_A.default.weight`.
                let base = n.strip_suffix(".weight").unwrap_or(n);
                let base = base.strip_suffix(".default").unwrap_or(base);
                if let Some(s) = base.strip_suffix(".lora_A") {
                    (normalize_peft(s), 0)
                } else if let Some(s) = base.strip_suffix(".lora_B") {
                    (normalize_peft(s), 1)
                } else {
                    unmatched.push(e.name.clone());
                    continue;
                }
            }
        };
        let Some(k) = lookup.get(&stem) else {
            unmatched.push(e.name.clone());
            continue;
        };
        let values = f.to_f32(n)?;
        let slot = parts.entry(k).or_default();
        match which {
            0 => {
                slot.down_shape = e.shape.dims().to_vec();
                slot.down = Some(values)
            }
            1 => slot.up = Some(values),
            _ => slot.alpha = values.first().copied(),
        }
    }
    if !unmatched.is_empty() {
        return Err(Error::AdapterMismatch(format!(
            "{}: {}",
            path.display(),
            summarize(&unmatched)
        )));
    }
    let mut layers = BTreeMap::new();
    for (
        k,
        Parts {
            down,
            up,
            alpha,
            down_shape,
        },
    ) in parts
    {
        let (Some(down), Some(mut up)) = (down, up) else {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer '{k}' lacks its down or up factor",
                path.display()
            )));
        };
        let rank = down_shape.first().copied().unwrap_or(0);
        if rank == 0 || rank > crate::limits::MAX_RANK {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer '{k}' has rank {rank}; 1..={} allowed (hdb's documented limit)",
                path.display(),
                crate::limits::MAX_RANK
            )));
        }
        let scale = alpha.map_or(1.0, |a| a / rank as f32);
        up.iter_mut().for_each(|x| *x *= scale);
        layers.insert(k.clone(), LoraLayer { rank, down, up });
    }
    let adapter = Adapter {
        layers,
        source: AdapterSource::Lora,
    };
    adapter.validate(table).map_err(|e| match e {
        Error::AdapterMismatch(m) => Error::AdapterMismatch(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok(adapter)
}

/// transformers >= 5.6 saves CLIP flat (no `text_model.`); canonical keys have it.
fn normalize_peft(s: &str) -> String {
    match s.strip_prefix("text_encoder.") {
        Some(r) if !r.starts_with("text_model.") => format!("text_encoder.text_model.{r}"),
        _ => s.to_string(),
    }
}

/// Writes an adapter as a standard LoRA file. Alpha and scales are already folded into `up`,
/// so kohya's `.alpha` is the rank (scale 1) and PEFT needs `lora_alpha = r`.
pub fn export(adapter: &Adapter, format: LoraFormat, path: &Path) -> Result<()> {
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
    let alphas: Vec<[f32; 1]> = names.iter().map(|(_, _, _, l)| [l.rank as f32]).collect();
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = Vec::new();
    for ((d, u, a, l), alpha) in names.iter().zip(&alphas) {
        let din = l.down.len() / l.rank;
        let dout = l.up.len() / l.rank;
        tensors.push((d.as_str(), vec![l.rank, din], &l.down));
        tensors.push((u.as_str(), vec![dout, l.rank], &l.up));
        if format == LoraFormat::Kohya {
            tensors.push((a.as_str(), vec![], alpha));
        }
    }
    let meta = vec![("generator".to_string(), format!("hdb {}", crate::VERSION))];
    write_f32_with_metadata(path, &tensors, &meta)
}
