//! The weights of one component under canonical diffusers names, wherever they were read from
//! (a diffusers folder, shards, or an LDM single file), kept memory-mapped and in their dtype.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::F32Weight;
use crate::tensor::{DType, Shape};

/// One weight: where its bytes are and what they mean.
#[derive(Clone, Debug)]
pub struct Weight {
    file: usize,
    /// The key in the source file (differs from the canonical name for LDM files).
    pub source_key: String,
    pub dtype: DType,
    /// The canonical (diffusers) shape; may differ from the file's by squeezed 1x1 dims.
    pub shape: Shape,
    start: usize,
    end: usize,
}

/// Canonical name -> weight, for one component.
#[derive(Debug, Default)]
pub struct WeightStore {
    files: Vec<Arc<SafetensorsFile>>,
    weights: BTreeMap<String, Weight>,
}

/// Buffers that are not weights and may carry integer dtypes (transformers' CLIP position ids).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
}

impl WeightStore {
    /// Adds a file and returns its index for [`WeightStore::insert`].
    pub fn add_file(&mut self, file: Arc<SafetensorsFile>) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    /// Registers tensor `source_key` of file `file` under `name` with the canonical `shape`
    /// (same element count as in the file). Errors name the file and key.
    pub fn insert(
        &mut self,
        name: String,
        file: usize,
        source_key: &str,
        shape: Shape,
    ) -> Result<()> {
        let f = self
            .files
            .get(file)
            .ok_or_else(|| Error::Internal(format!("no file #{file} in weight store")))?;
        let entry = f
            .get(source_key)
            .ok_or_else(|| Error::invalid_model(f.path(), format!("no tensor '{source_key}'")))?;
        let dtype = entry.float_dtype(f.path())?;
        if shape.numel() != entry.shape.numel() {
            return Err(Error::invalid_model(
                f.path(),
                format!(
                    "tensor '{source_key}' has shape {} which cannot be viewed as {shape}",
                    entry.shape
                ),
            ));
        }
        if let Some(prev) = self.weights.get(&name) {
            let prev_file = self
                .files
                .get(prev.file)
                .map(|f| f.path().display().to_string());
            return Err(Error::invalid_model(
                f.path(),
                format!(
                    "tensor '{source_key}' maps to '{name}', which '{}' in {} already provides",
                    prev.source_key,
                    prev_file.unwrap_or_default()
                ),
            ));
        }
        let w = Weight {
            file,
            source_key: source_key.to_string(),
            dtype,
            shape,
            start: entry.start,
            end: entry.end,
        };
        self.weights.insert(name, w);
        Ok(())
    }

    /// The files the weights come from.
    pub fn files(&self) -> impl Iterator<Item = &Arc<SafetensorsFile>> {
        self.files.iter()
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Weight> {
        self.weights.get(name)
    }

    /// Weights in canonical-name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Weight)> {
        self.weights.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The file a weight came from.
    fn file_of(&self, w: &Weight) -> Option<&Path> {
        self.files.get(w.file).map(|f| f.path())
    }

    /// Raw little-endian bytes of a weight.
    pub fn bytes(&self, w: &Weight) -> &[u8] {
        self.files
            .get(w.file)
            .map(|f| f.data_range(w.start, w.end))
            .unwrap_or(&[])
    }

    /// A weight as f32 values, or an error naming the missing key.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let w = self.get(name).ok_or_else(|| {
            let path = self
                .files
                .first()
                .map(|f| f.path())
                .unwrap_or(Path::new("?"));
            Error::invalid_model(path, format!("missing tensor '{name}'"))
        })?;
        let mut out = Vec::new();
        w.dtype.to_f32(self.bytes(w), &mut out);
        Ok(out)
    }

    /// The f32 values of weight `name`, checked against the `expected` shape (given in the
    /// canonical layout). Errors name the key, the file and both shapes.
    pub fn f32(&self, name: &str, expected: &[usize]) -> Result<F32Weight> {
        let path = self
            .files
            .first()
            .map(|f| f.path())
            .unwrap_or(Path::new("?"));
        let w = self.get(name).ok_or_else(|| {
            Error::invalid_model(
                path,
                format!(
                    "missing tensor '{name}' (expected shape {})",
                    Shape(expected.to_vec())
                ),
            )
        })?;
        let path = self.file_of(w).unwrap_or(path);
        if w.shape.dims() != expected {
            return Err(Error::invalid_model(
                path,
                format!(
                    "tensor '{name}' has shape {}, expected {}",
                    w.shape,
                    Shape(expected.to_vec())
                ),
            ));
        }
        let bytes = self.bytes(w);
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
        if w.dtype == DType::F32 && aligned {
            if let Some(file) = self.files.get(w.file) {
                return Ok(F32Weight::Mapped {
                    file: file.clone(),
                    start: w.start,
                    len: bytes.len() / 4,
                });
            }
        }
        let mut v = Vec::new();
        w.dtype.to_f32(bytes, &mut v);
        Ok(F32Weight::Owned(v))
    }

    /// Total number of parameters.
    pub fn parameter_count(&self) -> u64 {
        self.weights
            .values()
            .map(|w| w.shape.numel().unwrap_or(0) as u64)
            .sum()
    }

    /// Parameter count per storage dtype.
    pub fn dtype_counts(&self) -> BTreeMap<DType, u64> {
        let mut m = BTreeMap::new();
        for w in self.weights.values() {
            *m.entry(w.dtype).or_insert(0) += w.shape.numel().unwrap_or(0) as u64;
        }
        m
    }

    /// The dtype holding most parameters (`None` for an empty store).
    pub fn main_dtype(&self) -> Option<DType> {
        self.dtype_counts()
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(d, _)| d)
    }
}
