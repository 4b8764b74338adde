//! safetensors files, memory-mapped. The header is validated by the `safetensors` crate
//! (offsets contiguous, in bounds, sizes matching dtype x shape, file length exact); every
//! error is reported with the file's path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::{DType, Shape};

/// One tensor's place in a file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Shape,
    /// Byte range inside the whole file (header included), validated to lie inside it.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    /// The float dtype hdb computes with, or an error naming the file and key.
    pub fn float_dtype(&self, path: &Path) -> Result<DType> {
        float_dtype(self.dtype).ok_or_else(|| Error::UnsupportedDtype {
            path: path.to_path_buf(),
            key: self.name.clone(),
            dtype: format!("{:?}", self.dtype),
            expected: "F32, F16, BF16",
        })
    }
}

/// Maps a safetensors dtype to hdb's float storage types.
pub fn float_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed safetensors file whose bytes stay mapped for as long as it lives.
pub struct SafetensorsFile {
    path: PathBuf,
    bytes: Bytes,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The header of a safetensors buffer, parsed and checked against the buffer's length.
pub struct Header {
    pub tensors: BTreeMap<String, TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

/// Parses and validates the header of `bytes` (the whole file). `path` is only used in errors.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let invalid = |reason: String| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "safetensors",
        reason,
    };
    if bytes.len() < 8 {
        return Err(invalid(format!(
            "file is {} bytes, too short for the 8-byte header length",
            bytes.len()
        )));
    }
    // JSON allows a name twice and the header parser keeps the last: refuse the file first,
    // so no reader can see a different tensor than the one another tool would.
    let claimed = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    let header = usize::try_from(claimed)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .and_then(|h| std::str::from_utf8(h).ok());
    if let Some(dup) = header.and_then(duplicate_key) {
        return Err(invalid(format!("the header names '{dup}' twice")));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let claimed = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        invalid(describe_error(&e, claimed, bytes.len()))
    })?;
    let data_start = 8 + header_len;
    let mut tensors = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        // read_metadata checked the offsets are contiguous and end at the file's end;
        // checked arithmetic keeps that true here even if it ever changes.
        let start = data_start.checked_add(s);
        let end = data_start.checked_add(e);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(invalid(format!("tensor '{name}': data offsets overflow")));
        };
        // A zero dimension makes an empty tensor of any other dimensions; no tool writes one
        // whose other dimensions could not be allocated, and readers multiply them with the
        // model's (rank x din, ...): refuse what would overflow.
        let nonzero: Vec<usize> = info.shape.iter().copied().filter(|&d| d != 0).collect();
        if crate::limits::product(&nonzero).is_none() {
            return Err(invalid(format!(
                "tensor '{name}': shape {:?} is larger than any tensor can be",
                info.shape
            )));
        }
        if start > end || end > bytes.len() {
            return Err(invalid(format!(
                "tensor '{name}': data [{start}, {end}) lies outside the file ({} bytes)",
                bytes.len()
            )));
        }
        let entry = TensorEntry {
            name: name.clone(),
            dtype: info.dtype,
            shape: Shape(info.shape.clone()),
            start,
            end,
        };
        tensors.insert(name, entry);
    }
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Header { tensors, metadata })
}

/// The first key that appears twice in the header's top-level object or in its
/// `__metadata__`, if any.
fn duplicate_key(header: &str) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::collections::HashSet;

    /// Visits an object's keys in order; `nested` also visits the `__metadata__` object.
    /// Called on a header that already parsed as safetensors, so its shape is known.
    struct Keys {
        nested: bool,
    }
    impl<'de> serde::de::DeserializeSeed<'de> for Keys {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = HashSet::new();
            let mut found = None;
            while let Some(k) = map.next_key::<String>()? {
                if self.nested && k == "__metadata__" {
                    // (an object of strings: the header already parsed as safetensors)
                    let inner = map.next_value_seed(Keys { nested: false })?;
                    found = found.or(inner.map(|d| format!("__metadata__.{d}")));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                if !seen.insert(k.clone()) {
                    found = found.or(Some(k));
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(header);
    serde::de::DeserializeSeed::deserialize(Keys { nested: true }, &mut de)
        .ok()
        .flatten()
}

fn describe_error(e: &safetensors::SafeTensorError, claimed: u64, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeaderLength => format!(
            "header claims {claimed} bytes but the file has only {file_len} (truncated?)"
        ),
        E::HeaderTooLarge => format!("header length {claimed} is larger than any valid header"),
        E::MetadataIncompleteBuffer => format!(
            "the tensors' data offsets do not match the file length {file_len} (truncated or padded?)"
        ),
        E::InvalidHeaderDeserialization(j) => format!("header is not valid JSON: {j}"),
        E::InvalidHeader(u) => format!("header is not UTF-8: {u}"),
        other => format!("{other}"),
    }
}

/// How a file's bytes are held once opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// Memory-mapped (the default): no copy, pages shared with the OS cache. The file must not
    /// change while it is held: truncating it makes the next read of a lost page a SIGBUS, and
    /// writing it in place changes what hdb reads.
    #[default]
    Mapped,
    /// Read into memory at open: changes to the file afterwards cannot reach hdb, at the cost
    /// of a private copy of its bytes.
    Copied,
}

impl SafetensorsFile {
    /// Opens `path` held as `storage` says, validating its header.
    pub fn open_with(path: &Path, storage: Storage) -> Result<Self> {
        match storage {
            Storage::Mapped => Self::open(path),
            Storage::Copied => Self::from_bytes(path, Bytes::Owned(super::read_file(path)?)),
        }
    }

    /// Opens and memory-maps `path`, validating its header.
    ///
    /// The mapping is read-only; as with any mmap, the file must not be truncated or rewritten
    /// by another process while hdb holds it ([`Storage::Mapped`]); [`Storage::Copied`] is the
    /// choice for files that may change.
    pub fn open(path: &Path) -> Result<Self> {
        let file = super::open_file(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            // mmap of an empty file fails with EINVAL; say what is really wrong.
            return Err(Error::InvalidFile {
                path: path.to_path_buf(),
                format: "safetensors",
                reason: format!("file is {len} bytes, too short for the 8-byte header length"),
            });
        }
        // SAFETY: the map is read-only and private to this object; see the doc comment for
        // the one caveat every mmap reader shares.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, Bytes::Mapped(mmap))
    }

    /// Parses a safetensors file held in memory. `name` stands for the path in errors.
    pub fn from_vec(name: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_bytes(name, Bytes::Owned(bytes))
    }

    fn from_bytes(path: &Path, bytes: Bytes) -> Result<Self> {
        let Header { tensors, metadata } = parse_header(path, bytes.as_slice())?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            bytes,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors by name, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.tensors.values()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The `__metadata__` string map of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn data(&self, entry: &TensorEntry) -> &[u8] {
        // Ranges were validated against this very buffer in `parse_header`.
        self.data_range(entry.start, entry.end)
    }

    /// Bytes `[start, end)` of the file; empty if out of range (ranges come from validated entries).
    pub fn data_range(&self, start: usize, end: usize) -> &[u8] {
        self.bytes.as_slice().get(start..end).unwrap_or(&[])
    }

    /// A tensor converted to f32, or an error naming the file and key.
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let entry = self.get(name).ok_or_else(|| Error::InvalidFile {
            path: self.path.clone(),
            format: "safetensors",
            reason: format!("no tensor named '{name}'"),
        })?;
        let dtype = entry.float_dtype(&self.path)?;
        let mut out = Vec::new();
        dtype.to_f32(self.data(entry), &mut out);
        Ok(out)
    }
}

/// Writes f32 tensors `(name, shape, values)` to a safetensors file, atomically (a temporary
/// file in the same folder renamed over `path`), so a failed write never leaves half a file.
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    write_f32_with_metadata(path, tensors, &[])
}

/// As [`write_f32`], with `__metadata__` string pairs.
pub fn write_f32_with_metadata(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: &[(String, String)],
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    for ((name, shape, values), data) in tensors.iter().zip(&bytes) {
        if shape.iter().product::<usize>() != values.len() {
            return Err(Error::Internal(format!(
                "tensor '{name}' has {} values for shape {shape:?}",
                values.len()
            )));
        }
        let view = safetensors::tensor::TensorView::new(StDtype::F32, shape.clone(), data)
            .map_err(|e| Error::Internal(format!("tensor '{name}': {e}")))?;
        views.push((name.to_string(), view));
    }
    let meta = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .cloned()
            .collect::<std::collections::HashMap<_, _>>()
    });
    let data = safetensors::serialize(views, meta).map_err(|e| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    // Errors name the file asked for, not the temporary one beside it.
    let folder = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "cannot write it: the folder {} does not exist",
                    folder.display()
                ),
            ),
        });
    }
    let tmp = path.with_extension("safetensors.tmp");
    let written = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A tensor of any numeric dtype as f32 (integers converted; used for inputs such as
/// timesteps that tools often store as i64).
pub fn read_as_f32(file: &SafetensorsFile, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let e = file.get(name).ok_or_else(|| Error::InvalidFile {
        path: file.path().to_path_buf(),
        format: "safetensors",
        reason: format!("no tensor named '{name}'"),
    })?;
    let b = file.data(e);
    let v: Vec<f32> = match e.dtype {
        StDtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        StDtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f32)
            .collect(),
        StDtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        _ => {
            let mut out = Vec::new();
            e.float_dtype(file.path())?.to_f32(b, &mut out);
            out
        }
    };
    Ok((e.shape.dims().to_vec(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    #[test]
    fn parses_a_valid_file() {
        let bytes = file_with_header(
            r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}}"#,
            10,
        );
        let f = SafetensorsFile::from_vec(Path::new("mem"), bytes).expect("valid");
        assert_eq!(f.len(), 2);
        assert_eq!(f.metadata().get("k").map(String::as_str), Some("v"));
        let a = f.get("a").expect("a");
        assert_eq!(f.data(a).len(), 8);
        assert_eq!(f.to_f32("a").expect("f32"), vec![0.0, 0.0]);
    }

    #[test]
    fn truncated_data_names_the_file() {
        let bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        let e = SafetensorsFile::from_vec(Path::new("x/model.safetensors"), bytes)
            .expect_err("truncated");
        let msg = e.to_string();
        assert!(msg.contains("x/model.safetensors"), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }

    #[test]
    fn header_longer_than_file_is_an_error() {
        let mut bytes = file_with_header(r#"{}"#, 0);
        bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
        let e = SafetensorsFile::from_vec(Path::new("h.safetensors"), bytes).expect_err("bad");
        assert!(e.to_string().contains("claims 1000 bytes"), "{e}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let bytes = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        );
        let e = SafetensorsFile::from_vec(Path::new("d.safetensors"), bytes).expect_err("dup");
        assert!(e.to_string().contains("names 'a' twice"), "{e}");
        let bytes = file_with_header(
            r#"{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        );
        let e = SafetensorsFile::from_vec(Path::new("d.safetensors"), bytes).expect_err("dup");
        assert!(e.to_string().contains("'__metadata__.k' twice"), "{e}");
    }

    #[test]
    fn unsupported_dtype_names_file_and_key() {
        let bytes = file_with_header(
            r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        );
        let f = SafetensorsFile::from_vec(Path::new("t.safetensors"), bytes).expect("valid");
        let e = f.to_f32("ids").expect_err("i64");
        let msg = e.to_string();
        assert!(
            msg.contains("t.safetensors") && msg.contains("'ids'"),
            "{msg}"
        );
    }
}
