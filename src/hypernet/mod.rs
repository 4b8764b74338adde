//! The HyperDreamBooth hypernetwork (DESIGN.md section 4, hypernetwork v1): one face image ->
//! the LiDB weights of every adapted layer.
//!
//! A ViT ([`vit`]) turns the preprocessed image ([`preprocess()`]) into tokens, projected to
//! `d_model` (`feature_proj`). One query token per adapted layer holds that layer's current
//! weights, embedded (`weight_embed`), plus a learned position (`layer_pos`); a transformer
//! decoder ([`decoder`]) attends over them and the image tokens, and per-layer linear heads give
//! a weight residual. From `theta_0 = 0`, each of `iterations` steps adds
//! `heads(decoder(weight_embed(theta) + layer_pos, feature_proj(image_tokens)))`. Row l of theta
//! is layer l's LiDB factors `[D_train [r, a] row-major, U_train [b, r] row-major]`.
//!
//! The PyTorch reference (timm's VisionTransformer, torch's TransformerDecoderLayer) is
//! `tools/hypernet_ref.py`; tests/hypernet.rs compares every stage with it.

pub mod decoder;
pub mod preprocess;
pub mod vit;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{json, Value};

pub use preprocess::preprocess;
pub use vit::EncoderConfig;

use crate::adapter::lidb::{Lidb, LidbMeta};
use crate::adapter::LayerShape;
use crate::backend::cpu as ops;
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::F32Weight;
use crate::model::layers::{Linear, WeightSource};
use crate::model::WeightStore;
use crate::progress::Progress;

/// The `format` of a hypernetwork config.
pub const FORMAT: &str = "hdb-hypernet";
/// The format version hdb reads and writes.
pub const VERSION: u64 = 1;

/// A hypernetwork's config: the JSON under the metadata key `config` of a v1 file.
#[derive(Clone, Debug, PartialEq)]
pub struct HypernetConfig {
    pub encoder: EncoderConfig,
    /// Decoder width (1024).
    pub d_model: usize,
    /// Decoder attention heads (8).
    pub heads: usize,
    /// Decoder layers (4).
    pub layers: usize,
    /// LiDB rank r (1).
    pub rank: usize,
    /// LiDB down-basis size a (100).
    pub a: usize,
    /// LiDB up-basis size b (50).
    pub b: usize,
    /// The LiDB basis seed of the adapters it predicts.
    pub basis_seed: u64,
    /// The LiDB alpha of the adapters it predicts.
    pub alpha: f32,
    /// Refinement iterations when the caller does not say (4).
    pub iterations: usize,
    /// The adapted layers, one query token each, in token order (canonical adapter keys).
    pub layer_keys: Vec<String>,
}

impl Default for HypernetConfig {
    /// The default: CLIP ViT-H/14 at 224 px, d_model 1024, 8 heads, 4 decoder layers, SD 1.5's
    /// 176 adapted layers ([`sd15_layer_keys`]), r 1, a 100, b 50, 4 iterations.
    fn default() -> Self {
        HypernetConfig {
            encoder: EncoderConfig::default(),
            d_model: 1024,
            heads: 8,
            layers: 4,
            rank: 1,
            a: 100,
            b: 50,
            basis_seed: 0x4844_4221,
            alpha: 1.0,
            iterations: 4,
            layer_keys: sd15_layer_keys(),
        }
    }
}

/// SD 1.5's 176 adaptable layers in model order ([`crate::model::adaptable::layer_keys`] of
/// SD 1.5's configs): the hypernetwork's default token order.
pub fn sd15_layer_keys() -> Vec<String> {
    crate::model::adaptable::layer_keys(
        &crate::model::config::UnetConfig::default(),
        &crate::model::text_encoder::TextEncoderConfig::default(),
    )
}

use crate::limits::{
    MAX_DECODER_LAYERS, MAX_ENCODER_DEPTH, MAX_HYPERNET_DIM as MAX_DIM, MAX_ITERATIONS,
    MAX_LAYER_KEYS, MAX_RANK,
};

impl HypernetConfig {
    /// Reads the config JSON of a v1 file. `path` names the file in errors; a missing field is
    /// an error naming it (e.g. `encoder.width`).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "hypernetwork",
            reason,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("config is not JSON: {e}")))?;
        let cfg = parse(&v).map_err(|e| match e {
            ParseError::Version(v) => Error::Unsupported(format!(
                "{}: hypernetwork format version {v} (hdb reads version {VERSION})",
                path.display()
            )),
            ParseError::Bad(reason) => bad(reason),
        })?;
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// The config as the JSON a v1 file stores.
    pub fn to_json(&self) -> Value {
        let e = &self.encoder;
        json!({
            "format": FORMAT,
            "version": VERSION,
            "encoder": {
                "img_size": e.img_size, "patch_size": e.patch_size, "width": e.width,
                "depth": e.depth, "heads": e.heads, "mlp_ratio": e.mlp_ratio,
                "pre_norm": e.pre_norm, "class_token": e.class_token,
                "layer_norm_eps": json_f32(e.layer_norm_eps),
                "image_mean": e.image_mean.map(json_f32), "image_std": e.image_std.map(json_f32),
            },
            "d_model": self.d_model, "heads": self.heads, "layers": self.layers,
            "rank": self.rank, "a": self.a, "b": self.b, "basis_seed": self.basis_seed,
            "alpha": json_f32(self.alpha), "iterations": self.iterations,
            "layer_keys": self.layer_keys,
        })
    }

    /// The encoder's input side in pixels.
    pub fn img_size(&self) -> usize {
        self.encoder.img_size
    }

    /// Values per layer token: `(a + b) * rank`.
    pub fn token_dim(&self) -> usize {
        (self.a + self.b) * self.rank
    }

    /// Every tensor of a v1 file with this config, and its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, t, n) = (self.d_model, self.token_dim(), self.layer_keys.len());
        let mut s = self.encoder.tensor_shapes();
        vit::linear_shapes(&mut s, "feature_proj", self.encoder.width, d);
        vit::linear_shapes(&mut s, "weight_embed", t, d);
        s.push(("layer_pos".into(), vec![n, d]));
        s.extend(decoder::tensor_shapes(d, self.layers));
        s.push(("heads.weight".into(), vec![n, t, d]));
        s.push(("heads.bias".into(), vec![n, t]));
        s
    }

    /// Total number of parameters.
    pub fn parameter_count(&self) -> u64 {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let e = &self.encoder;
        // Counts that set the work (blocks, layers, iterations) have limits of their own,
        // far above real networks and far below what a small file could make take minutes.
        for (name, v, max) in [
            ("encoder.img_size", e.img_size, MAX_DIM),
            ("encoder.patch_size", e.patch_size, MAX_DIM),
            ("encoder.width", e.width, MAX_DIM),
            ("encoder.depth", e.depth, MAX_ENCODER_DEPTH),
            ("encoder.heads", e.heads, MAX_DIM),
            ("d_model", self.d_model, MAX_DIM),
            ("heads", self.heads, MAX_DIM),
            ("layers", self.layers, MAX_DECODER_LAYERS),
            ("rank", self.rank, MAX_RANK),
            ("a", self.a, MAX_DIM),
            ("b", self.b, MAX_DIM),
            ("iterations", self.iterations, MAX_ITERATIONS),
        ] {
            if v == 0 || v > max {
                return Err(format!(
                    "config '{name}' is {v}; 1..={max} allowed (hdb's documented limit)"
                ));
            }
        }
        if e.tokens() > MAX_DIM {
            return Err(format!(
                "config 'encoder.img_size' {} with 'encoder.patch_size' {} gives {} image tokens; at most {MAX_DIM}",
                e.img_size,
                e.patch_size,
                e.tokens()
            ));
        }
        if e.patch_size > e.img_size {
            return Err(format!(
                "config 'encoder.patch_size' {} is larger than 'encoder.img_size' {}",
                e.patch_size, e.img_size
            ));
        }
        if !e.width.is_multiple_of(e.heads) {
            return Err(format!(
                "config 'encoder.width' {} is not a multiple of 'encoder.heads' {}",
                e.width, e.heads
            ));
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return Err(format!(
                "config 'd_model' {} is not a multiple of 'heads' {}",
                self.d_model, self.heads
            ));
        }
        let hidden = e.width as f64 * e.mlp_ratio;
        if !(hidden >= 1.0 && hidden <= MAX_DIM as f64) {
            return Err(format!(
                "config 'encoder.mlp_ratio' {} gives an MLP width of {hidden}",
                e.mlp_ratio
            ));
        }
        if !(e.layer_norm_eps > 0.0 && e.layer_norm_eps.is_finite()) {
            return Err("config 'encoder.layer_norm_eps' must be a positive number".into());
        }
        if e.image_std.iter().any(|s| *s == 0.0 || !s.is_finite())
            || e.image_mean.iter().any(|m| !m.is_finite())
        {
            return Err(
                "config 'encoder.image_mean' and 'encoder.image_std' must be finite, std non-zero"
                    .into(),
            );
        }
        if !self.alpha.is_finite() {
            return Err("config 'alpha' must be a finite number".into());
        }
        if self.layer_keys.is_empty() || self.layer_keys.len() > MAX_LAYER_KEYS {
            return Err(format!(
                "config 'layer_keys' lists {} layers; 1..={MAX_LAYER_KEYS} allowed",
                self.layer_keys.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(k) = self.layer_keys.iter().find(|k| !seen.insert(k.as_str())) {
            return Err(format!("config 'layer_keys' lists '{k}' twice"));
        }
        Ok(())
    }
}

/// An f32 as the shortest decimal that reads back to it (1e-5, not 9.999999747378752e-6).
fn json_f32(v: f32) -> Value {
    json!(v.to_string().parse::<f64>().unwrap_or(v as f64))
}

enum ParseError {
    Version(String),
    Bad(String),
}

/// The config JSON -> HypernetConfig; a missing or mistyped field is named.
fn parse(v: &Value) -> std::result::Result<HypernetConfig, ParseError> {
    let bad = |s: String| ParseError::Bad(s);
    let field = |obj: &Value, prefix: &str, k: &str| -> std::result::Result<Value, ParseError> {
        obj.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("config has no field '{prefix}{k}'")))
    };
    let uint = |obj: &Value, prefix: &str, k: &str| -> std::result::Result<usize, ParseError> {
        field(obj, prefix, k)?
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                bad(format!(
                    "config '{prefix}{k}' must be a non-negative integer"
                ))
            })
    };
    let num = |obj: &Value, prefix: &str, k: &str| -> std::result::Result<f64, ParseError> {
        field(obj, prefix, k)?
            .as_f64()
            .ok_or_else(|| bad(format!("config '{prefix}{k}' must be a number")))
    };
    let boolean = |obj: &Value, prefix: &str, k: &str| -> std::result::Result<bool, ParseError> {
        field(obj, prefix, k)?
            .as_bool()
            .ok_or_else(|| bad(format!("config '{prefix}{k}' must be true or false")))
    };
    let triple = |obj: &Value, k: &str| -> std::result::Result<[f32; 3], ParseError> {
        let f = field(obj, "encoder.", k)?;
        let v: Vec<f32> = f
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default();
        <[f32; 3]>::try_from(v)
            .map_err(|_| bad(format!("config 'encoder.{k}' must be a list of 3 numbers")))
    };
    if !v.is_object() {
        return Err(bad("config is not a JSON object".into()));
    }
    let format = field(v, "", "format")?;
    if format.as_str() != Some(FORMAT) {
        return Err(bad(format!(
            "config 'format' is {format}, expected \"{FORMAT}\""
        )));
    }
    let version = field(v, "", "version")?;
    if version.as_u64() != Some(VERSION) {
        return Err(ParseError::Version(version.to_string()));
    }
    let e = field(v, "", "encoder")?;
    if !e.is_object() {
        return Err(bad("config 'encoder' must be an object".into()));
    }
    let encoder = EncoderConfig {
        img_size: uint(&e, "encoder.", "img_size")?,
        patch_size: uint(&e, "encoder.", "patch_size")?,
        width: uint(&e, "encoder.", "width")?,
        depth: uint(&e, "encoder.", "depth")?,
        heads: uint(&e, "encoder.", "heads")?,
        mlp_ratio: num(&e, "encoder.", "mlp_ratio")?,
        pre_norm: boolean(&e, "encoder.", "pre_norm")?,
        class_token: boolean(&e, "encoder.", "class_token")?,
        layer_norm_eps: num(&e, "encoder.", "layer_norm_eps")? as f32,
        image_mean: triple(&e, "image_mean")?,
        image_std: triple(&e, "image_std")?,
    };
    // basis_seed is a u64: a JSON integer, or (for JSON readers limited to 2^53) a decimal string.
    let seed = field(v, "", "basis_seed")?;
    let basis_seed = seed
        .as_u64()
        .or_else(|| seed.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| bad("config 'basis_seed' must be an unsigned 64-bit integer".into()))?;
    let keys = field(v, "", "layer_keys")?;
    let layer_keys = keys
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|k| k.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| bad("config 'layer_keys' must be a list of strings".into()))?;
    Ok(HypernetConfig {
        encoder,
        d_model: uint(v, "", "d_model")?,
        heads: uint(v, "", "heads")?,
        layers: uint(v, "", "layers")?,
        rank: uint(v, "", "rank")?,
        a: uint(v, "", "a")?,
        b: uint(v, "", "b")?,
        basis_seed,
        alpha: num(v, "", "alpha")? as f32,
        iterations: uint(v, "", "iterations")?,
        layer_keys,
    })
}

/// Is this safetensors file a hypernetwork (a `config` metadata JSON of format hdb-hypernet)?
pub fn is_hypernet(f: &SafetensorsFile) -> bool {
    f.metadata()
        .get("config")
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .is_some_and(|v| v.get("format").and_then(Value::as_str) == Some(FORMAT))
}

/// What one prediction computed, stage by stage (for tests and diagnostics).
#[derive(Clone, Debug)]
pub struct Trace {
    /// The encoder's tokens [tokens, width] (after its final norm).
    pub image_tokens: Vec<f32>,
    /// Per iteration, the decoder output after `decoder.norm` [L, d_model].
    pub decoded: Vec<Vec<f32>>,
    /// Per iteration, theta after it [L, token_dim].
    pub thetas: Vec<Vec<f32>>,
}

/// A loaded hypernetwork on backend `B` (the CPU by default). Immutable; `predict` may run
/// from several threads at once. The per-layer output heads run on the host: they are L small
/// matrix-vector products per iteration.
pub struct Hypernet<B: Backend = Cpu> {
    pub config: HypernetConfig,
    be: B,
    encoder: vit::Vit<B>,
    feature_proj: Linear<B>,
    weight_embed: Linear<B>,
    /// [L, d_model]
    layer_pos: B::Buf,
    decoder: decoder::Decoder<B>,
    /// [L, token_dim, d_model]
    heads_w: F32Weight,
    /// [L, token_dim]
    heads_b: F32Weight,
}

impl<B: Backend> std::fmt::Debug for Hypernet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypernet")
            .field("backend", &self.be.describe())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Hypernet<Cpu> {
    /// Reads a hypernetwork v1 file (f32, f16 or bf16 tensors; memory-mapped, f32 used in
    /// place). Errors name the file and the field or tensor at fault; a tensor the format does
    /// not have is an error too.
    pub fn load(path: &Path) -> Result<Hypernet> {
        Hypernet::load_on(Cpu, path)
    }

    /// Builds the network from any weight source (a file's [`WeightStore`], or random weights
    /// for benchmarks), checking every tensor's shape.
    pub fn from_source(config: HypernetConfig, src: &dyn WeightSource) -> Result<Hypernet> {
        Hypernet::from_source_on(Cpu, config, src)
    }
}

/// A hypernetwork v1 file's config and its tensors (memory-mapped, not converted), each checked
/// against the config: what [`Hypernet::load_on`] builds from. Errors name the file and the
/// field or tensor at fault.
pub fn read(path: &Path) -> Result<(HypernetConfig, WeightStore)> {
    let f = Arc::new(SafetensorsFile::open(path)?);
    let text = f
        .metadata()
        .get("config")
        .ok_or_else(|| Error::InvalidFile {
            path: path.to_path_buf(),
            format: "hypernetwork",
            reason: "no 'config' in the safetensors metadata".into(),
        })?;
    let config = HypernetConfig::from_json(text, path)?;
    let shapes = config.tensor_shapes();
    let expected: BTreeMap<&str, &[usize]> = shapes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut store = WeightStore::default();
    let file = store.add_file(f.clone());
    for e in f.tensors() {
        if !expected.contains_key(e.name.as_str()) {
            return Err(Error::invalid_model(
                path,
                format!("unexpected tensor '{}' for this config", e.name),
            ));
        }
        store.insert(e.name.clone(), file, &e.name, e.shape.clone())?;
    }
    // The config against the tensors present, before anything is built: a config that
    // claims more than the file holds fails here, at once.
    // (In the order the network is built, so the first problem named is the first a
    // build would meet.)
    let missing: Vec<&(String, Vec<usize>)> = shapes
        .iter()
        .filter(|(k, _)| store.get(k).is_none())
        .collect();
    if let Some((first, shape)) = missing.first() {
        return Err(Error::invalid_model(
            path,
            format!(
                "the config needs {} tensor(s) the file lacks, e.g. '{first}' (shape {shape:?})",
                missing.len(),
            ),
        ));
    }
    for (k, shape) in &shapes {
        if let Some(w) = store.get(k).filter(|w| w.shape.dims() != shape.as_slice()) {
            return Err(Error::invalid_model(
                path,
                format!(
                    "tensor '{k}' has shape {}, the config needs {shape:?}",
                    w.shape
                ),
            ));
        }
    }
    Ok((config, store))
}

impl<B: Backend> Hypernet<B> {
    /// As [`Hypernet::load`], on backend `be`.
    pub fn load_on(be: B, path: &Path) -> Result<Hypernet<B>> {
        let (config, store) = read(path)?;
        Hypernet::from_source_on(be, config, &store)
    }

    /// As [`Hypernet::from_source`], on backend `be`.
    pub fn from_source_on(
        be: B,
        config: HypernetConfig,
        src: &dyn WeightSource,
    ) -> Result<Hypernet<B>> {
        let (d, t, n) = (config.d_model, config.token_dim(), config.layer_keys.len());
        let width = config.encoder.width;
        Ok(Hypernet {
            encoder: vit::Vit::load(&be, src, &config.encoder)?,
            feature_proj: Linear::load(&be, src, "feature_proj", width, d, true)?,
            weight_embed: Linear::load(&be, src, "weight_embed", t, d, true)?,
            layer_pos: be.upload(&src.get("layer_pos", &[n, d])?)?,
            decoder: decoder::Decoder::load(&be, src, d, config.heads, config.layers)?,
            heads_w: src.get("heads.weight", &[n, t, d])?,
            heads_b: src.get("heads.bias", &[n, t])?,
            config,
            be,
        })
    }

    /// The backend this network runs on.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// An RGB8 image (rows `stride` bytes apart) -> the network's input [3, S, S], with the
    /// config's size, mean and std (see [`preprocess()`]).
    pub fn preprocess(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Vec<f32>> {
        let e = &self.config.encoder;
        preprocess::preprocess(
            rgb,
            width,
            height,
            stride,
            e.img_size,
            e.image_mean,
            e.image_std,
        )
    }

    /// image [3, S, S] (preprocessed) -> theta [L, token_dim] after `iterations` refinement
    /// steps (the config's when `None`). `progress(done, total)` is called after each step;
    /// returning false cancels (`Error::Cancelled`).
    pub fn predict(
        &self,
        image: &[f32],
        iterations: Option<usize>,
        progress: Option<Progress<'_>>,
    ) -> Result<Vec<f32>> {
        let mut t = self.run(image, iterations, progress, false)?;
        Ok(t.thetas.pop().unwrap_or_default())
    }

    /// As [`Hypernet::predict`], keeping every stage: image tokens, each iteration's decoder
    /// output and theta.
    pub fn predict_trace(
        &self,
        image: &[f32],
        iterations: Option<usize>,
        progress: Option<Progress<'_>>,
    ) -> Result<Trace> {
        self.run(image, iterations, progress, true)
    }

    fn run(
        &self,
        image: &[f32],
        iterations: Option<usize>,
        mut progress: Option<Progress<'_>>,
        keep: bool,
    ) -> Result<Trace> {
        let cfg = &self.config;
        let s = cfg.img_size();
        if image.len() != 3 * s * s {
            return Err(Error::invalid_arg(
                "image",
                format!("{} values; the network takes [3, {s}, {s}]", image.len()),
            ));
        }
        let steps = iterations.unwrap_or(cfg.iterations);
        crate::limits::check_range("iterations", steps, MAX_ITERATIONS)?;
        let (n, l, t) = (cfg.encoder.tokens(), cfg.layer_keys.len(), cfg.token_dim());
        let be = &self.be;
        let tokens = self.encoder.forward(be, image)?;
        let memory = self.feature_proj.forward(be, &tokens, n)?;
        let kv = self.decoder.memory_kv(be, &memory, n)?;
        drop(memory);
        let mut theta = vec![0f32; l * t];
        let mut trace = Trace {
            image_tokens: if keep {
                be.download(&tokens)?
            } else {
                Vec::new()
            },
            decoded: Vec::new(),
            thetas: Vec::new(),
        };
        drop(tokens);
        for step in 0..steps {
            let mut tgt = self.weight_embed.forward(be, &be.upload(&theta)?, l)?;
            crate::model::layers::add(be, &mut tgt, &self.layer_pos)?;
            let h = be.download(&self.decoder.forward(be, tgt, l, &kv)?)?;
            self.add_heads(&mut theta, &h);
            if keep {
                trace.decoded.push(h);
                trace.thetas.push(theta.clone());
            }
            if let Some(cb) = progress.as_mut() {
                if !cb(step + 1, steps) {
                    return Err(Error::Cancelled);
                }
            }
        }
        if !keep {
            trace.thetas.push(theta);
        }
        Ok(trace)
    }

    /// theta[l] += heads.weight[l] · h[l] + heads.bias[l] for every layer token l.
    fn add_heads(&self, theta: &mut [f32], h: &[f32]) {
        let (d, t) = (self.config.d_model, self.config.token_dim());
        theta
            .par_chunks_mut(t)
            .zip(h.par_chunks(d))
            .zip(
                self.heads_w
                    .par_chunks(t * d)
                    .zip(self.heads_b.par_chunks(t)),
            )
            .for_each(|((theta, h), (w, b))| {
                let mut y = vec![0f32; t];
                ops::linear(&mut y, h, w, Some(b), 1, d, t);
                theta.iter_mut().zip(&y).for_each(|(o, v)| *o += v);
            });
    }

    /// theta [L, token_dim] -> the LiDB adapter it stands for: `layer_keys[l]` gets
    /// D_train = theta[l][..r a] as [r, a] and U_train = theta[l][r a..] as [b, r]; rank, a, b,
    /// basis seed and alpha from the config.
    pub fn to_lidb(&self, theta: &[f32]) -> Result<Lidb> {
        let c = &self.config;
        let t = c.token_dim();
        if theta.len() != c.layer_keys.len() * t {
            return Err(Error::invalid_arg(
                "theta",
                format!(
                    "{} values; this network predicts [{}, {t}]",
                    theta.len(),
                    c.layer_keys.len()
                ),
            ));
        }
        let ra = c.rank * c.a;
        let layers = c
            .layer_keys
            .iter()
            .zip(theta.chunks_exact(t))
            .map(|(k, row)| (k.clone(), (row[..ra].to_vec(), row[ra..].to_vec())))
            .collect();
        Ok(Lidb {
            meta: LidbMeta {
                rank: c.rank,
                a: c.a,
                b: c.b,
                basis_seed: c.basis_seed,
                alpha: c.alpha,
                base: None,
            },
            layers,
        })
    }

    /// Checks that every layer the network predicts is an adaptable layer of the model (by its
    /// table, e.g. [`crate::Model::adaptable_layers`]) wide enough for the basis (a <= in,
    /// b <= out). `AdapterMismatch` names the first layers at fault and how many there are.
    pub fn check_layers(&self, table: &BTreeMap<String, LayerShape>) -> Result<()> {
        let c = &self.config;
        let missing: Vec<&String> = c
            .layer_keys
            .iter()
            .filter(|k| !table.contains_key(k.as_str()))
            .collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(3).map(|k| k.as_str()).collect();
            return Err(Error::AdapterMismatch(format!(
                "the hypernetwork predicts {} layer(s) this model does not have: {}{}",
                missing.len(),
                shown.join(", "),
                if missing.len() > 3 { ", ..." } else { "" }
            )));
        }
        for k in &c.layer_keys {
            if let Some(s) = table.get(k).filter(|s| c.a > s.din || c.b > s.dout) {
                return Err(Error::AdapterMismatch(format!(
                    "layer '{k}' is [{}, {}], too small for a LiDB basis of a {} and b {}",
                    s.dout, s.din, c.a, c.b
                )));
            }
        }
        Ok(())
    }
}
