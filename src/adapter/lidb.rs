//! LiDB adapter files (DESIGN.md section 4). Metadata `format=hdb-lidb`, `version`, `rank`,
//! `a`, `b`, `basis_seed`, `alpha`, optional `base`, and:
//! - version 1: per adapted layer K, `K.lidb_down` = D_train [r, a] and `K.lidb_up` = U_train
//!   [b, r];
//! - version 2 (what hdb writes): the same factors packed as `lidb_down` [L, r, a] and
//!   `lidb_up` [L, b, r], layer l being the l-th key of the metadata `layers`: the keys in
//!   sorted order, one per line, each written as `N:suffix` where N is the number of leading
//!   characters it shares with the key before it (front coding). Version 1's 352 tensor names
//!   cost an SD 1.5 adapter a 47 KB header, more than its 105.6 KB of f32 weights allow under
//!   the ~110 KB goal; version 2's header is about 2 KB.

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

/// Per layer key: (D_train [r, a], U_train [b, r]).
pub type LidbLayers = BTreeMap<String, (Vec<f32>, Vec<f32>)>;

/// A LiDB adapter as stored: the trained factors only.
#[derive(Clone, Debug, PartialEq)]
pub struct Lidb {
    pub meta: LidbMeta,
    /// K -> (D_train [r, a], U_train [b, r]).
    pub layers: LidbLayers,
}

/// (layer key, basis_seed, a, b, in, out)
type BasisId = (String, u64, usize, usize, usize, usize);

/// Bases by `BasisId`, shared by every identity loaded for a model.
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
    /// Reads a LiDB v1 or v2 file already parsed as safetensors. Errors name the file and the
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
        let version = field("version")?;
        if version != "1" && version != "2" {
            return Err(Error::Unsupported(format!(
                "{}: LiDB version {version} (hdb reads versions 1 and 2)",
                path.display(),
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
        if m.rank > crate::limits::MAX_RANK {
            return Err(bad(format!(
                "metadata 'rank' is {}; hdb's limit is {} (LiDB uses 1-16)",
                m.rank,
                crate::limits::MAX_RANK
            )));
        }
        if version == "2" {
            let keys = decode_layer_keys(field("layers")?)
                .map_err(|r| bad(format!("metadata 'layers': {r}")))?;
            let layers = read_packed(f, &m, &keys, &bad)?;
            return Ok(Lidb { meta: m, layers });
        }
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

    /// Writes the file (atomically) in format version 2.
    pub fn save(&self, path: &Path) -> Result<()> {
        let m = &self.meta;
        let keys: Vec<&str> = self.layers.keys().map(String::as_str).collect();
        let mut meta = vec![
            ("format".to_string(), "hdb-lidb".to_string()),
            ("version".into(), "2".into()),
            ("rank".into(), m.rank.to_string()),
            ("a".into(), m.a.to_string()),
            ("b".into(), m.b.to_string()),
            ("basis_seed".into(), m.basis_seed.to_string()),
            ("alpha".into(), format!("{:?}", m.alpha)),
            ("layers".into(), encode_layer_keys(&keys)),
        ];
        if let Some(base) = &m.base {
            meta.push(("base".into(), base.clone()));
        }
        let (nd, nu) = (m.rank * m.a, m.b * m.rank);
        let mut down = Vec::with_capacity(keys.len() * nd);
        let mut up = Vec::with_capacity(keys.len() * nu);
        for (k, (d, u)) in &self.layers {
            if d.len() != nd || u.len() != nu {
                return Err(Error::Internal(format!(
                    "LiDB layer '{k}': {} / {} values, expected {nd} / {nu}",
                    d.len(),
                    u.len()
                )));
            }
            down.extend_from_slice(d);
            up.extend_from_slice(u);
        }
        let l = keys.len();
        let tensors = [
            ("lidb_down", vec![l, m.rank, m.a], down.as_slice()),
            ("lidb_up", vec![l, m.b, m.rank], up.as_slice()),
        ];
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
                if !crate::model::adaptable::is_identity_layer(k) {
                    return Err(Error::AdapterMismatch(format!(
                        "layer '{k}' is not an attention projection: LiDB identities are \
                         defined over the attention projections only (DESIGN.md section 1)"
                    )));
                }
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
                Ok((
                    k.clone(),
                    LoraLayer {
                        rank: r,
                        down,
                        up,
                        conv_kernel: None,
                    },
                ))
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

/// Front-codes sorted layer keys for LiDB v2's `layers`: one line per key, `N:suffix`, N the
/// characters shared with the previous key.
fn encode_layer_keys(keys: &[&str]) -> String {
    let mut out = String::new();
    let mut prev: &str = "";
    for (i, k) in keys.iter().enumerate() {
        let shared = prev
            .chars()
            .zip(k.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let suffix: String = k.chars().skip(shared).collect();
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{shared}:{suffix}"));
        prev = k;
    }
    out
}

/// Decodes [`encode_layer_keys`]; the keys must come out non-empty, sorted and distinct.
fn decode_layer_keys(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut keys: Vec<String> = Vec::new();
    for (i, line) in s.split('\n').enumerate() {
        let (n, suffix) = line
            .split_once(':')
            .ok_or_else(|| format!("line {} has no 'N:' prefix", i + 1))?;
        let n: usize = n
            .parse()
            .map_err(|_| format!("line {}: '{n}' is not a count", i + 1))?;
        let prev = keys.last().map(String::as_str).unwrap_or("");
        if n > prev.chars().count() {
            return Err(format!(
                "line {} shares {n} characters with a {}-character key",
                i + 1,
                prev.chars().count()
            ));
        }
        let key: String = prev.chars().take(n).chain(suffix.chars()).collect();
        if key.is_empty() {
            return Err(format!("line {} gives an empty key", i + 1));
        }
        if keys.last().is_some_and(|p| p.as_str() >= key.as_str()) {
            return Err(format!(
                "key '{key}' (line {}) is not after the one before it",
                i + 1
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// LiDB v2's packed `lidb_down` [L, r, a] and `lidb_up` [L, b, r], split per layer key.
fn read_packed(
    f: &SafetensorsFile,
    m: &LidbMeta,
    keys: &[String],
    bad: &dyn Fn(String) -> Error,
) -> Result<LidbLayers> {
    let l = keys.len();
    for e in f.tensors() {
        let want = match e.name.as_str() {
            "lidb_down" => [l, m.rank, m.a],
            "lidb_up" => [l, m.b, m.rank],
            other => {
                return Err(bad(format!(
                    "unexpected tensor '{other}' (version 2 holds lidb_down and lidb_up)"
                )))
            }
        };
        if e.shape.dims() != want {
            return Err(bad(format!(
                "tensor '{}' has shape {}, expected {want:?} ({l} layers in 'layers')",
                e.name, e.shape
            )));
        }
    }
    let get = |name: &str| -> Result<Vec<f32>> {
        if !f.tensors().any(|e| e.name == name) {
            return Err(bad(format!("no tensor '{name}'")));
        }
        let v = f.to_f32(name)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::AdapterMismatch(format!(
                "{}: tensor '{name}' holds NaN or Inf (layer '{}')",
                f.path().display(),
                keys[i * l / v.len().max(1)]
            )));
        }
        Ok(v)
    };
    let (down, up) = (get("lidb_down")?, get("lidb_up")?);
    let (nd, nu) = (m.rank * m.a, m.b * m.rank);
    Ok(keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.clone(),
                (
                    down[i * nd..(i + 1) * nd].to_vec(),
                    up[i * nu..(i + 1) * nu].to_vec(),
                ),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_keys_round_trip_front_coded() {
        let keys = [
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
            "text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
            "ünet.é", // characters, not bytes, are counted
        ];
        let s = encode_layer_keys(&keys);
        assert!(s.starts_with("0:text_encoder."), "{s}");
        assert!(s.contains("\n51:out_proj\n0:unet."), "{s}");
        assert_eq!(decode_layer_keys(&s).expect("decode"), keys);
    }

    #[test]
    fn bad_layer_lists_are_errors_naming_the_line() {
        let cases = [
            ("0:a\nb", "line 2 has no 'N:' prefix"),
            ("0:a\nx:b", "line 2: 'x' is not a count"),
            (
                "0:ab\n3:c",
                "line 2 shares 3 characters with a 2-character key",
            ),
            (
                "0:b\n0:a",
                "key 'a' (line 2) is not after the one before it",
            ),
            ("0:a\n1:", "key 'a' (line 2) is not after the one before it"),
            ("0:", "line 1 gives an empty key"),
        ];
        for (text, want) in cases {
            let e = decode_layer_keys(text).expect_err(text);
            assert_eq!(e, want, "{text:?}");
        }
    }
}
