//! Tensors of a model's weight files that no component reads. They are not an error (real
//! checkpoints carry EMA copies, training buffers and heads hdb has no use for), but they are
//! never dropped without a word: [`Model::load`] logs them and `hdb info` /
//! `hdb_model_describe` list them. Missing tensors and wrong shapes stay errors.
//!
//! Which tensors a component reads is found by building it once over a [`WeightSource`] that
//! records each name it is asked for and returns an empty weight: the builders only check
//! shapes and hand weights to the backend, so this dry build costs no weight memory.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::layers::WeightSource;
use super::text_encoder::{TextEncoder, TextEncoderConfig};
use super::unet::Unet;
use super::vae::{Vae, VaeConfig};
use super::{Model, WeightStore};
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::io::keymap::Component;
use crate::io::F32Weight;
use crate::model::config::UnetConfig;

/// Records the names a component asks for, checking each against the store's shapes.
struct Recorder<'a> {
    store: &'a WeightStore,
    asked: Mutex<BTreeSet<String>>,
}

impl WeightSource for Recorder<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<F32Weight> {
        let w = self
            .store
            .get(name)
            .ok_or_else(|| Error::Internal(format!("missing tensor '{name}'")))?;
        if w.shape.dims() != shape {
            return Err(Error::Internal(format!(
                "tensor '{name}' has another shape"
            )));
        }
        if let Ok(mut a) = self.asked.lock() {
            a.insert(name.to_string());
        }
        Ok(F32Weight::Owned(Vec::new()))
    }
}

/// LDM keys that are known not to be weights (EMA copies, the VAE's training loss, CLIP's
/// position ids, the DDPM schedule buffers at the top level): skipped without a listing.
fn known_non_weight(key: &str) -> bool {
    key.starts_with("model_ema.")
        || key.starts_with("first_stage_model.loss.")
        || key.ends_with("position_ids")
        || !key.contains('.')
}

/// What [`unused_tensors`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Unused {
    /// The source keys (as the files spell them) of tensors no component reads, sorted.
    pub tensors: Vec<String>,
    /// Components that could not be built (a missing tensor, a config that cannot be inferred),
    /// with the reason; their tensors are not judged. Loading them reports the same error.
    pub unchecked: Vec<(Component, String)>,
}

/// Builds `c` over `src` (weights empty), with its config from the model.
fn dry_build(model: &Model, c: Component, src: &dyn WeightSource) -> Result<()> {
    match c {
        Component::Unet => {
            let (_, cfg) = model.component_config(c, UnetConfig::from_json, UnetConfig::infer)?;
            Unet::load_on(Cpu, cfg, src).map(drop)
        }
        Component::TextEncoder => {
            let (_, cfg) = model.component_config(
                c,
                TextEncoderConfig::from_json,
                TextEncoderConfig::infer,
            )?;
            TextEncoder::load_on(Cpu, cfg, src).map(drop)
        }
        Component::Vae => {
            let (_, cfg) = model.component_config(c, VaeConfig::from_json, VaeConfig::infer)?;
            Vae::load_on(Cpu, cfg, src).map(drop)
        }
    }
}

/// Every tensor in the model's files that no component reads (integer buffers such as CLIP's
/// position ids, and an LDM file's known non-weights, aside).
pub fn unused_tensors(model: &Model) -> Unused {
    let mut read: BTreeSet<&str> = BTreeSet::new();
    let mut not_judged: BTreeSet<&str> = BTreeSet::new();
    let mut all: BTreeSet<String> = BTreeSet::new();
    let mut unchecked = Vec::new();
    for (c, cw) in &model.components {
        let rec = Recorder {
            store: &cw.weights,
            asked: Mutex::new(BTreeSet::new()),
        };
        match dry_build(model, *c, &rec) {
            Ok(()) => {
                let asked = rec.asked.into_inner().unwrap_or_default();
                let used = cw.weights.iter().filter(|(n, _)| asked.contains(*n));
                read.extend(used.map(|(_, w)| w.source_key.as_str()));
            }
            Err(e) => {
                unchecked.push((*c, e.to_string()));
                not_judged.extend(cw.weights.iter().map(|(_, w)| w.source_key.as_str()));
            }
        }
        for f in cw.weights.files() {
            all.extend(f.tensors().map(|e| e.name.clone()));
        }
    }
    let ldm = model.format == super::SourceFormat::LdmSingleFile;
    let tensors = all
        .into_iter()
        .filter(|k| !read.contains(k.as_str()) && !not_judged.contains(k.as_str()))
        .filter(|k| !super::weights::is_buffer(k))
        .filter(|k| !(ldm && known_non_weight(k)))
        .collect();
    Unused { tensors, unchecked }
}

/// The unused tensors as `hdb_model_describe` reports them: `{"tensors": [...],
/// "unchecked": {component: reason}}`.
pub fn describe(model: &Model) -> serde_json::Value {
    let u = unused_tensors(model);
    let unchecked: serde_json::Map<String, serde_json::Value> = u
        .unchecked
        .into_iter()
        .map(|(c, why)| (c.name().to_string(), why.into()))
        .collect();
    serde_json::json!({"tensors": u.tensors, "unchecked": unchecked})
}

/// Logs the unused tensors of a freshly loaded model (a warning naming a few of them).
pub fn log_unused(model: &Model) {
    let u = unused_tensors(model);
    if !u.tensors.is_empty() {
        let v = &u.tensors;
        let shown: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
        log::warn!(
            "{}: {} tensor(s) in the weight files are read by no component and ignored: {}{}",
            model.path.display(),
            v.len(),
            shown.join(", "),
            if v.len() > shown.len() { ", ..." } else { "" }
        );
    }
    for (c, why) in &u.unchecked {
        log::debug!(
            "{}: the {} was not checked for unused tensors: {why}",
            model.path.display(),
            c.name()
        );
    }
}
