//! `hdb info`: what a model folder, model file, hypernetwork or safetensors file holds.

use std::path::Path;

use hdb::io::safetensors::SafetensorsFile;
use hdb::model::Model;

use crate::{hypernet_cmd, load_model};

pub fn info(path: &Path, list_tensors: bool, json: bool) -> hdb::Result<()> {
    let model = load_model(path);
    // A safetensors file that is not a model is still worth describing.
    let not_a_model = matches!(model, Err(hdb::Error::NotAModel { .. }));
    if not_a_model && path.is_file() {
        if hypernet_cmd::info(path, json)? {
            return Ok(());
        }
        return info_safetensors(path, json);
    }
    let model = model?;
    if json {
        let mut d = model.describe();
        if list_tensors {
            d["tensors"] = tensor_listing(&model);
        }
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        return Ok(());
    }
    println!("model:         {}", model.path.display());
    println!("format:        {:?}", model.format);
    println!("architecture:  {}", model.architecture.name());
    if let Some(d) = model.cross_attention_dim() {
        println!("cross-attn:    {d}");
    }
    match &model.tokenizer {
        Some(t) => println!("tokenizer:     {}", t.display()),
        None => println!("tokenizer:     none (SD 1.x: the built-in CLIP ViT-L/14 one)"),
    }
    println!();
    println!(
        "{:<14} {:>8} {:>14}  dtypes",
        "component", "tensors", "parameters"
    );
    for (c, cw) in &model.components {
        let s = cw.summary();
        let dtypes: Vec<String> = s
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} {}", human(*n)))
            .collect();
        println!(
            "{:<14} {:>8} {:>14}  {}",
            c.name(),
            s.tensors,
            human(s.parameters),
            dtypes.join(", ")
        );
    }
    let unused = hdb::model::unused::unused_tensors(&model);
    if !unused.tensors.is_empty() {
        println!();
        println!(
            "unused:        {} tensor(s) read by no component (ignored):",
            unused.tensors.len()
        );
        for k in &unused.tensors {
            println!("  {k}");
        }
    }
    for (c, why) in &unused.unchecked {
        println!("unchecked:     {} (cannot be built here: {why})", c.name());
    }
    if list_tensors {
        for (c, cw) in &model.components {
            for (name, w) in cw.weights.iter() {
                println!("{}.{name}  {}  {}", c.name(), w.dtype, w.shape);
            }
        }
    }
    Ok(())
}

fn tensor_listing(model: &Model) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (c, cw) in &model.components {
        for (name, w) in cw.weights.iter() {
            out.insert(
                format!("{}.{name}", c.name()),
                serde_json::json!({"dtype": w.dtype.name(), "shape": w.shape.dims(), "source_key": w.source_key}),
            );
        }
    }
    out.into()
}

fn info_safetensors(path: &Path, json: bool) -> hdb::Result<()> {
    let f = SafetensorsFile::open(path)?;
    let params: u64 = f
        .tensors()
        .map(|e| e.shape.numel().unwrap_or(0) as u64)
        .sum();
    if json {
        let tensors: serde_json::Map<String, serde_json::Value> = f
            .tensors()
            .map(|e| {
                let v =
                    serde_json::json!({"dtype": format!("{:?}", e.dtype), "shape": e.shape.dims()});
                (e.name.clone(), v)
            })
            .collect();
        let d = serde_json::json!({
            "path": path.display().to_string(),
            "format": "safetensors",
            "metadata": f.metadata(),
            "parameters": params,
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        return Ok(());
    }
    println!("safetensors:   {} (not a model)", path.display());
    println!("tensors:       {}  ({} elements)", f.len(), human(params));
    for (k, v) in f.metadata() {
        let v = if v.len() > 120 {
            format!("{}...", v.chars().take(120).collect::<String>())
        } else {
            v.clone()
        };
        println!("metadata:      {k} = {v}");
    }
    for e in f.tensors() {
        println!("{}  {:?}  {}", e.name, e.dtype, e.shape);
    }
    Ok(())
}

/// 1234567 -> "1.23M".
fn human(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}
