//! The diffusers folder layout: which weight files make up a component, with `fp16`
//! variants and sharded checkpoints (`*.safetensors.index.json`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::keymap::Component;

/// Which weight files to prefer when a folder has both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// The plain files if present, else the `fp16` variant.
    #[default]
    Auto,
    /// Only the plain (usually f32) files.
    Full,
    /// Only the `fp16` variant files.
    Fp16,
}

/// The weight-file stem diffusers uses for a component.
pub fn weights_stem(c: Component) -> &'static str {
    match c {
        Component::Unet | Component::Vae => "diffusion_pytorch_model",
        Component::TextEncoder => "model",
    }
}

/// Finds the safetensors files of one component folder (`unet/`, `vae/`, `text_encoder/`).
/// Returns `Ok(None)` when the folder has no weights at all.
pub fn find_weights(dir: &Path, stem: &str, variant: Variant) -> Result<Option<Vec<PathBuf>>> {
    let full = [(
        format!("{stem}.safetensors"),
        format!("{stem}.safetensors.index.json"),
    )];
    let fp16 = [(
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors.index.fp16.json"),
    )];
    let order: Vec<&(String, String)> = match variant {
        Variant::Auto => full.iter().chain(fp16.iter()).collect(),
        Variant::Full => full.iter().collect(),
        Variant::Fp16 => fp16.iter().collect(),
    };
    for (single, index) in order {
        let single = dir.join(single);
        if single.is_file() {
            return Ok(Some(vec![single]));
        }
        let index = dir.join(index);
        if index.is_file() {
            return read_shard_index(&index).map(Some);
        }
    }
    let bin = dir.join(format!("{stem}.bin"));
    if bin.is_file() {
        if !super::looks_like_pickle(&bin)? {
            return Err(Error::InvalidFile {
                path: bin,
                format: "weights",
                reason: "named like PyTorch weights but not a PyTorch checkpoint; hdb reads \
                         safetensors weights"
                    .into(),
            });
        }
        return Err(Error::Unsupported(format!(
            "{}: pickle weights are not read (they can run code); convert them to safetensors",
            bin.display()
        )));
    }
    Ok(None)
}

/// The shard files named by a `*.safetensors.index*.json` weight map, in name order.
fn read_shard_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = super::read_text(index)?;
    let invalid = |reason: String| Error::InvalidFile {
        path: index.to_path_buf(),
        format: "safetensors index",
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no 'weight_map' object".into()))?;
    let mut files = BTreeSet::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| invalid(format!("weight_map['{key}'] is not a string")))?;
        // A shard name is a plain file name next to the index; refuse paths that escape it.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(invalid(format!(
                "weight_map['{key}'] = '{file}' is not a file name"
            )));
        }
        files.insert(file.to_string());
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads and parses a JSON config file, naming the file on error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = super::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "JSON",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_full_then_fp16_and_reads_shards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert!(find_weights(d, "model", Variant::Auto)
            .expect("ok")
            .is_none());
        std::fs::write(d.join("model.fp16.safetensors"), b"x").expect("write");
        let f = find_weights(d, "model", Variant::Auto)
            .expect("ok")
            .expect("some");
        assert!(f[0].ends_with("model.fp16.safetensors"));
        assert!(find_weights(d, "model", Variant::Full)
            .expect("ok")
            .is_none());
        std::fs::write(
            d.join("model.safetensors.index.json"),
            br#"{"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00001-of-00002.safetensors"}}"#,
        )
        .expect("write");
        let f = find_weights(d, "model", Variant::Auto)
            .expect("ok")
            .expect("some");
        assert_eq!(f.len(), 2);
        assert!(f[0].ends_with("model-00001-of-00002.safetensors"));
    }

    #[test]
    fn shard_index_may_not_escape_its_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(&idx, br#"{"weight_map":{"a":"../../etc/passwd"}}"#).expect("write");
        let e = find_weights(dir.path(), "model", Variant::Full).expect_err("escape");
        assert!(e.to_string().contains("not a file name"), "{e}");
    }
}
