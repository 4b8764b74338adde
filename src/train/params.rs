//! An adapter's trainable tensors, in the layout of the file they came from, and the maps
//! between them and the effective factors the model applies (`dW = up . down`, scale folded
//! into `up`):
//!
//! - LiDB (v1, v2): per layer `D_train` `[r, a]` and `U_train` `[b, r]`; effective
//!   `down = D_train . D_aux` `[r, in]`, `up = alpha U_aux . U_train` `[out, r]` (the bases are
//!   fixed). Gradients: `dD_train = d_down . D_aux^T`, `dU_train = alpha U_aux^T . d_up`.
//! - kohya / PEFT LoRA: per layer `down` `[r, in]`, `up` `[out, r]`, scale `alpha / r` (1
//!   without alpha); effective `down`, `scale up`. Gradients: `d_down`, `scale d_up`.
//!
//! Gradients are written back under the file's own tensor names and shapes
//! ([`Trainable::write_gradients`]), which is the contract of `hdb finetune grad`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::adapter::basis::Basis;
use crate::adapter::lidb::{is_lidb, BasisCache, Lidb, LidbMeta};
use crate::adapter::lora::{self, LoraFormat};
use crate::adapter::{Adapter, AdapterSource, LoraLayer};
use crate::backend::cpu::{matmul, matmul_at};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_f32_with_metadata, SafetensorsFile};
use crate::model::adaptable::is_identity_layer;
use crate::model::LayerTable;

/// Where an adapter's tensors live in its file.
#[derive(Clone, Debug)]
pub enum Layout {
    /// LiDB version 1 (`K.lidb_down`, `K.lidb_up`) or 2 (packed `lidb_down`, `lidb_up`), with
    /// the file's metadata (written back unchanged with the gradients).
    Lidb {
        meta: LidbMeta,
        version: u32,
        file_metadata: BTreeMap<String, String>,
    },
    /// A standard LoRA file, its tensors named per layer.
    Lora { format: LoraFormat },
}

/// A tensor's name and shape in its file.
pub type TensorName = (String, Vec<usize>);

/// One layer's trainable tensors.
#[derive(Clone, Debug)]
pub struct TrainLayer {
    /// The canonical adapter key (`unet.<path>`, `text_encoder.<path>`).
    pub key: String,
    pub din: usize,
    pub dout: usize,
    pub rank: usize,
    /// The file's down tensor: LiDB `D_train` `[r, a]`, LoRA `down` `[r, in]`.
    pub down: Vec<f32>,
    /// The file's up tensor: LiDB `U_train` `[b, r]`, LoRA `up` `[out, r]`.
    pub up: Vec<f32>,
    /// LoRA: the tensors' names and shapes in the file (down, up).
    pub names: Option<(TensorName, TensorName)>,
    /// The scale between the file's `up` and the effective one (LiDB alpha, LoRA alpha / r).
    pub scale: f32,
    /// LiDB: the layer's fixed bases.
    pub basis: Option<Arc<Basis>>,
}

/// The effective factors of one layer: `down` `[r, in]`, `up` `[out, r]` (scale folded in).
#[derive(Clone, Debug, PartialEq)]
pub struct Effective {
    pub rank: usize,
    pub down: Vec<f32>,
    pub up: Vec<f32>,
}

/// One layer's gradients in the file's layout (same shapes as `down` and `up`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGrad {
    pub down: Vec<f32>,
    pub up: Vec<f32>,
}

/// An adapter being trained.
#[derive(Clone, Debug)]
pub struct Trainable {
    pub layout: Layout,
    /// By adapter key, sorted (a LiDB v2 file's order).
    pub layers: Vec<TrainLayer>,
}

impl TrainLayer {
    /// The effective factors the model applies.
    pub fn effective(&self) -> Effective {
        let r = self.rank;
        match &self.basis {
            Some(bs) => {
                let a = self.down.len() / r.max(1);
                let b = self.up.len() / r.max(1);
                // down = D_train [r, a] . D_aux [a, in]
                let mut down = vec![0f32; r * self.din];
                matmul(
                    &mut down, &self.down, &bs.d_aux, r, a, self.din, false, false,
                );
                // up = alpha U_aux [out, b] . U_train [b, r]
                let mut up = vec![0f32; self.dout * r];
                matmul(&mut up, &bs.u_aux, &self.up, self.dout, b, r, false, false);
                up.iter_mut().for_each(|x| *x *= self.scale);
                Effective { rank: r, down, up }
            }
            None => Effective {
                rank: r,
                down: self.down.clone(),
                up: self.up.iter().map(|x| x * self.scale).collect(),
            },
        }
    }

    /// The gradients of the file's tensors from those of the effective factors.
    pub fn chain(&self, d_down: &[f32], d_up: &[f32]) -> LayerGrad {
        let r = self.rank;
        match &self.basis {
            Some(bs) => {
                let a = self.down.len() / r.max(1);
                let b = self.up.len() / r.max(1);
                // dD_train [r, a] = d_down [r, in] . D_aux^T ([a, in] read transposed)
                let mut down = vec![0f32; r * a];
                matmul(&mut down, d_down, &bs.d_aux, r, self.din, a, true, false);
                // dU_train [b, r] = alpha U_aux^T [b, out] . d_up [out, r]
                let mut up = vec![0f32; b * r];
                matmul_at(&mut up, &bs.u_aux, d_up, b, self.dout, r, false);
                up.iter_mut().for_each(|x| *x *= self.scale);
                LayerGrad { down, up }
            }
            None => LayerGrad {
                down: d_down.to_vec(),
                up: d_up.iter().map(|x| x * self.scale).collect(),
            },
        }
    }
}

impl Trainable {
    /// The trainable tensors of the adapter file `f` (LiDB v1/v2, kohya or PEFT LoRA), checked
    /// against a model's adaptable layers (`table`); LiDB bases come from `bases`.
    pub fn from_file(f: &SafetensorsFile, table: &LayerTable, bases: &BasisCache) -> Result<Self> {
        let shape = |k: &str| {
            table.get(k).ok_or_else(|| {
                Error::AdapterMismatch(format!(
                    "{}: layer '{k}' is not an adaptable layer of this model",
                    f.path().display()
                ))
            })
        };
        if is_lidb(f) {
            // (composing refuses layers other than the attention projections)
            let lidb = Lidb::from_safetensors(f)?;
            // Composing checks every layer against the model (names, sizes for the basis).
            lidb.compose_cached(table, bases)?;
            let version = f
                .metadata()
                .get("version")
                .and_then(|v| v.parse().ok())
                .unwrap_or(2);
            let m = &lidb.meta;
            let mut layers = Vec::with_capacity(lidb.layers.len());
            for (key, (d, u)) in &lidb.layers {
                let s = shape(key)?;
                layers.push(TrainLayer {
                    key: key.clone(),
                    din: s.din,
                    dout: s.dout,
                    rank: m.rank,
                    down: d.clone(),
                    up: u.clone(),
                    names: None,
                    scale: m.alpha,
                    basis: Some(bases.get(key, m.basis_seed, m.a, m.b, s.din, s.dout)?),
                });
            }
            return Ok(Trainable {
                layout: Layout::Lidb {
                    meta: lidb.meta.clone(),
                    version,
                    file_metadata: f.metadata().clone(),
                },
                layers,
            });
        }
        let (format, named) = lora::read_named(f, table)?;
        // (DoRA magnitudes and Tucker cores have no gradient here)
        if let Some(n) = named.iter().find(|n| n.dora.is_some() || n.tucker) {
            return Err(Error::Unsupported(format!(
                "{}: layer '{}' is a DoRA or Tucker (lora_mid) layer, which applies in merge \
                 mode but cannot be finetuned",
                f.path().display(),
                n.key
            )));
        }
        if let Some(n) = named.iter().find(|n| !is_identity_layer(&n.key)) {
            return Err(untrainable(&format!("{}", f.path().display()), &n.key));
        }
        let layers = named
            .into_iter()
            .map(|n| {
                let s = shape(&n.key)?;
                let fits = n.down.len() == n.rank * s.din && n.up.len() == s.dout * n.rank;
                if !fits || n.down.iter().chain(&n.up).any(|x| !x.is_finite()) {
                    return Err(Error::AdapterMismatch(format!(
                        "{}: layer '{}': rank {} factors {:?} and {:?} do not fit the model's \
                         [{}, {}] weight, or hold NaN/Inf",
                        f.path().display(),
                        n.key,
                        n.rank,
                        n.down_shape,
                        n.up_shape,
                        s.dout,
                        s.din
                    )));
                }
                Ok(TrainLayer {
                    din: s.din,
                    dout: s.dout,
                    rank: n.rank,
                    scale: n.alpha.map_or(1.0, |a| a / n.rank as f32),
                    down: n.down,
                    up: n.up,
                    names: Some(((n.down_name, n.down_shape), (n.up_name, n.up_shape))),
                    basis: None,
                    key: n.key,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Trainable {
            layout: Layout::Lora { format },
            layers,
        })
    }

    /// The adapter these tensors make now (what a session applies, or [`Adapter::save`]
    /// writes: LiDB as LiDB v2, a LoRA as PEFT).
    pub fn to_adapter(&self) -> Adapter {
        let layers: BTreeMap<String, LoraLayer> = self
            .layers
            .iter()
            .map(|l| {
                let e = l.effective();
                (
                    l.key.clone(),
                    LoraLayer {
                        rank: e.rank,
                        down: e.down,
                        up: e.up,
                        // (training adapts the attention projections only)
                        conv_kernel: None,
                    },
                )
            })
            .collect();
        let source = match &self.layout {
            Layout::Lidb { meta, .. } => AdapterSource::Lidb(Lidb {
                meta: meta.clone(),
                layers: self
                    .layers
                    .iter()
                    .map(|l| (l.key.clone(), (l.down.clone(), l.up.clone())))
                    .collect(),
            }),
            Layout::Lora { .. } => AdapterSource::Lora,
        };
        Adapter { layers, source }
    }

    /// Writes `loss` and the gradients `grads` (one per layer, in `self.layers`' order) under
    /// the file's own tensor names and shapes, f32: a LiDB v2 adapter's as packed `lidb_down`
    /// `[L, r, a]` and `lidb_up` `[L, b, r]` with the same metadata (so its `layers` order),
    /// a v1 adapter's and a LoRA's per layer.
    pub fn write_gradients(&self, path: &Path, loss: f32, grads: &[LayerGrad]) -> Result<()> {
        if grads.len() != self.layers.len() {
            return Err(Error::Internal(format!(
                "{} gradients for {} layers",
                grads.len(),
                self.layers.len()
            )));
        }
        let loss = [loss];
        let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut meta = vec![(
            "generator".to_string(),
            format!("hdb {} finetune grad", crate::VERSION),
        )];
        match &self.layout {
            Layout::Lidb {
                meta: m,
                version: 2,
                file_metadata,
            } => {
                let n = self.layers.len();
                let down: Vec<f32> = grads.iter().flat_map(|g| g.down.iter().copied()).collect();
                let up: Vec<f32> = grads.iter().flat_map(|g| g.up.iter().copied()).collect();
                owned.push(("lidb_down".into(), vec![n, m.rank, m.a], down));
                owned.push(("lidb_up".into(), vec![n, m.b, m.rank], up));
                meta = file_metadata.clone().into_iter().collect();
            }
            Layout::Lidb { meta: m, .. } => {
                for (l, g) in self.layers.iter().zip(grads) {
                    owned.push((
                        format!("{}.lidb_down", l.key),
                        vec![m.rank, m.a],
                        g.down.clone(),
                    ));
                    owned.push((
                        format!("{}.lidb_up", l.key),
                        vec![m.b, m.rank],
                        g.up.clone(),
                    ));
                }
            }
            Layout::Lora { .. } => {
                for (l, g) in self.layers.iter().zip(grads) {
                    let ((dn, ds), (un, us)) = l.names.clone().ok_or_else(|| {
                        Error::Internal(format!("LoRA layer '{}' without its tensor names", l.key))
                    })?;
                    owned.push((dn, ds, g.down.clone()));
                    owned.push((un, us, g.up.clone()));
                }
            }
        }
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![("loss", vec![], &loss[..])];
        tensors.extend(
            owned
                .iter()
                .map(|(n, s, v)| (n.as_str(), s.clone(), v.as_slice())),
        );
        write_f32_with_metadata(path, &tensors, &meta)
    }
}

/// The error for an adapter that adapts layer `key`, which is no attention projection: the
/// gradient path hooks only those (src/model/grad), so training it would silently train a
/// subset of the adapter. `what` names the adapter.
pub(crate) fn untrainable(what: &str, key: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: layer '{key}' is not an attention projection; hdb trains adapters on the \
         attention projections only (LoRAs that also adapt feed-forward, projection, \
         time-embedding or MLP layers apply, but cannot be finetuned)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain rule of a LiDB layer against finite differences of `effective`: for a scalar
    /// loss L = <G_down, down> + <G_up, up>, dL/dD_train and dL/dU_train.
    #[test]
    fn lidb_chain_rule_matches_finite_differences() {
        let (din, dout, a, b, r) = (12, 10, 5, 4, 2);
        let bs = Arc::new(
            crate::adapter::basis::basis("unet.x.to_q", 7, a, b, din, dout).expect("basis"),
        );
        let mut rng = crate::rng::SplitMix64(3);
        let mut rand = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
        let layer = TrainLayer {
            key: "unet.x.to_q".into(),
            din,
            dout,
            rank: r,
            down: rand(r * a),
            up: rand(b * r),
            names: None,
            scale: 0.7,
            basis: Some(bs),
        };
        let (gd, gu) = (rand(r * din), rand(dout * r));
        let loss = |l: &TrainLayer| {
            let e = l.effective();
            let dot = |x: &[f32], y: &[f32]| {
                x.iter()
                    .zip(y)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
            };
            dot(&e.down, &gd) + dot(&e.up, &gu)
        };
        let g = layer.chain(&gd, &gu);
        let h = 1e-2f32;
        for (which, n) in [(0, r * a), (1, b * r)] {
            for i in 0..n {
                let mut p = layer.clone();
                let mut m = layer.clone();
                let (pv, mv) = if which == 0 {
                    (&mut p.down[i], &mut m.down[i])
                } else {
                    (&mut p.up[i], &mut m.up[i])
                };
                *pv += h;
                *mv -= h;
                let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
                let an = if which == 0 { g.down[i] } else { g.up[i] } as f64;
                assert!(
                    (fd - an).abs() < 1e-3 * (1.0 + fd.abs()),
                    "tensor {which} [{i}]: fd {fd} vs {an}"
                );
            }
        }
    }
}
