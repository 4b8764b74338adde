//! LiDB adapter v1 files (DESIGN.md section 4): per adapted layer K, `K.lidb_down` = D_train
//! [r, a] and `K.lidb_up` = U_train [b, r]; metadata `format=hdb-lidb`, `version=1`, `rank`,
//! `a`, `b`, `basis_seed`, `alpha`, optional `base`.

use std::collections::BTreeMap;
use std::path::Path;

use super::basis::{basis, Basis};
use super::{Adapter, AdapterSource, LayerShape, LoraLayer};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32_with_metadata, SafetensorsFile};

#[derive(Clone, Debug, PartialEq)]
pub struct LidbMeta {
    pub rank: usize,
    pub a: usize,
    pub b: usize,
    pub basis_seed: u64,
    pub alpha: f32,
    /// Informational: the base model it was made for (e.g. "sd15").
    pub base: Option<String>,
}

/// A LiDB adapter as stored: the trained factors only.
#[derive(Clone, Debug, PartialEq)]
pub struct Lidb {
    pub meta: LidbMeta,
    /// K -> (D_train [r, a], U_train [b, r]).
    pub layers: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

/// (layer key, basis_seed, a, b, in, out)
type BasisId = (String, u64, usize, usize, usize, usize);

/// Bases by [`BasisId`], shared by every identity loaded for a model.
#[derive(Default)]
pub struct BasisCache {
    map: std::sync::Mutex<std::collections::HashMap<BasisId, std::sync::Arc<Basis>>>,
}

impl std::fmt::Debug for BasisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasisCache")
    }
}

impl BasisCache {
    /// The basis of one layer, computed on first use.
    pub fn get(
        &self,
        key: &str,
        seed: u64,
        a: usize,
        b: usize,
        din: usize,
        dout: usize,
    ) -> Result<std::sync::Arc<Basis>> {
        let id = (key.to_string(), seed, a, b, din, dout);
        if let Some(bs) = self.map.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(bs);
        }
        let bs = std::sync::Arc::new(basis(key, seed, a, b, din, dout)?);
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, bs.clone());
        }
        Ok(bs)
    }
}

/// Is this safetensors file a LiDB adapter (by its metadata)?
pub fn is_lidb(f: &SafetensorsFile) -> bool {
    f.metadata().get("format").map(String::as_str) == Some("hdb-lidb")
}

impl Lidb {
    /// Reads a LiDB v1 file already parsed as safetensors. Errors name the file and the
    /// field or tensor at fault.
    pub fn from_safetensors(f: &SafetensorsFile) -> Result<Lidb> {
        let path = f.path();
        let bad = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "LiDB adapter",
            reason,
        };
        let meta = f.metadata();
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata has no '{k}'")))
        };
        if field("format")? != "hdb-lidb" {
            return Err(bad("metadata 'format' is not 'hdb-lidb'".into()));
        }
        if field("version")? != "1" {
            return Err(Error::Unsupported(format!(
                "{}: LiDB version {} (hdb reads version 1)",
                path.display(),
                field("version")?
            )));
        }
        let uint = |k: &str| -> Result<usize> {
            field(k)?
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| bad(format!("metadata '{k}' must be a positive integer")))
        };
        let m = LidbMeta {
            rank: uint("rank")?,
            a: uint("a")?,
            b: uint("b")?,
            basis_seed: field("basis_seed")?.parse::<u64>().map_err(|_| {
                bad("metadata 'basis_seed' must be an unsigned 64-bit integer".into())
            })?,
            alpha: field("alpha")?
                .parse::<f32>()
                .ok()
                .filter(|a| a.is_finite())
                .ok_or_else(|| bad("metadata 'alpha' must be a finite number".into()))?,
            base: meta.get("base").cloned(),
        };
        let mut layers = BTreeMap::new();
        for e in f.tensors() {
            let (key, is_down) = if let Some(k) = e.name.strip_suffix(".lidb_down") {
                (k, true)
            } else if let Some(k) = e.name.strip_suffix(".lidb_up") {
                (k, false)
            } else {
                return Err(bad(format!(
                    "unexpected tensor '{}' (only K.lidb_down and K.lidb_up)",
                    e.name
                )));
            };
            let want = if is_down {
                [m.rank, m.a]
            } else {
                [m.b, m.rank]
            };
            if e.shape.dims() != want {
                return Err(bad(format!(
                    "tensor '{}' has shape {}, expected {want:?}",
                    e.name, e.shape
                )));
            }
            let values = f.to_f32(&e.name)?;
            if values.iter().any(|x| !x.is_finite()) {
                return Err(Error::AdapterMismatch(format!(
                    "{}: tensor '{}' holds NaN or Inf",
                    path.display(),
                    e.name
                )));
            }
            let slot = layers
                .entry(key.to_string())
                .or_insert((Vec::new(), Vec::new()));
            if is_down {
                slot.0 = values
            } else {
                slot.1 = values
            }
        }
        if let Some((k, _)) = layers
            .iter()
            .find(|(_, (d, u))| d.is_empty() || u.is_empty())
        {
            return Err(bad(format!(
                "layer '{k}' needs both '{k}.lidb_down' and '{k}.lidb_up'"
            )));
        }
        if layers.is_empty() {
            return Err(bad("no layers".into()));
        }
        Ok(Lidb { meta: m, layers })
    }

    pub fn load(path: &Path) -> Result<Lidb> {
        Lidb::from_safetensors(&SafetensorsFile::open(path)?)
    }

    /// Writes the file (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let m = &self.meta;
        let mut meta = vec![
            ("format".to_string(), "hdb-lidb".to_string()),
            ("version".into(), "1".into()),
            ("rank".into(), m.rank.to_string()),
            ("a".into(), m.a.to_string()),
            ("b".into(), m.b.to_string()),
            ("basis_seed".into(), m.basis_seed.to_string()),
            ("alpha".into(), format!("{:?}", m.alpha)),
        ];
        if let Some(base) = &m.base {
            meta.push(("base".into(), base.clone()));
        }
        let names: Vec<(String, String)> = self
            .layers
            .keys()
            .map(|k| (format!("{k}.lidb_down"), format!("{k}.lidb_up")))
            .collect();
        let mut tensors = Vec::new();
        for ((k, (d, u)), (dn, un)) in self.layers.iter().zip(&names) {
            let _ = k;
            tensors.push((dn.as_str(), vec![m.rank, m.a], d.as_slice()));
            tensors.push((un.as_str(), vec![m.b, m.rank], u.as_slice()));
        }
        write_f32_with_metadata(path, &tensors, &meta)
    }

    /// Composes the effective factors against a model's layer table:
    /// `down = D_train . D_aux` [r, in], `up = alpha * U_aux . U_train` [out, r].
    /// A layer the model lacks, or one too small for (a, b), is `AdapterMismatch`.
    pub fn compose(&self, table: &BTreeMap<String, LayerShape>) -> Result<Adapter> {
        self.compose_cached(table, &BasisCache::default())
    }

    /// As [`Lidb::compose`], taking each layer's basis from `cache` (made once per model,
    /// it makes every later identity with the same seed, a and b cheap to load). Layers are
    /// composed in parallel on the current rayon pool.
    pub fn compose_cached(
        &self,
        table: &BTreeMap<String, LayerShape>,
        cache: &BasisCache,
    ) -> Result<Adapter> {
        use rayon::prelude::*;
        let m = &self.meta;
        let (r, a, b) = (m.rank, m.a, m.b);
        let composed = self
            .layers
            .par_iter()
            .map(|(k, (d_train, u_train))| {
                let s = table.get(k).ok_or_else(|| {
                    Error::AdapterMismatch(format!(
                        "layer '{k}' is not an adaptable layer of this model"
                    ))
                })?;
                let bs = cache.get(k, m.basis_seed, a, b, s.din, s.dout)?;
                let mut down = vec![0f32; r * s.din];
                for i in 0..r {
                    for j in 0..a {
                        let c = d_train[i * a + j];
                        let row = &bs.d_aux[j * s.din..(j + 1) * s.din];
                        down[i * s.din..(i + 1) * s.din]
                            .iter_mut()
                            .zip(row)
                            .for_each(|(o, x)| *o += c * x);
                    }
                }
                let mut up = vec![0f32; s.dout * r];
                for o in 0..s.dout {
                    for i in 0..r {
                        let dot: f32 = (0..b)
                            .map(|j| bs.u_aux[o * b + j] * u_train[j * r + i])
                            .sum();
                        up[o * r + i] = m.alpha * dot;
                    }
                }
                Ok((k.clone(), LoraLayer { rank: r, down, up }))
            })
            .collect::<Result<Vec<_>>>()?;
        let layers: BTreeMap<String, LoraLayer> = composed.into_iter().collect();
        let adapter = Adapter {
            layers,
            source: AdapterSource::Lidb(self.clone()),
        };
        adapter.validate(table)?;
        Ok(adapter)
    }
}
