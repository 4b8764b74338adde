//! A frozen Stable Diffusion model: its components' weights under canonical diffusers names,
//! read from a diffusers folder or an LDM single-file checkpoint. Immutable once loaded; it
//! holds weights only (components built from them live where they run: `crate::placed`).

pub mod adaptable;
pub mod config;
pub mod grad;
pub(crate) mod layers;
pub mod random;
pub mod scheduler;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod unused;
pub mod vae;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::diffusers::{find_weights, read_json, weights_stem, Variant};
use crate::io::keymap::{self, Component, LdmLayout};
use crate::io::safetensors::SafetensorsFile;
use crate::tensor::{DType, Shape};
pub use adaptable::{Adaptable, LayerKind, LayerShape, LayerTable};
pub use weights::{Weight, WeightStore};

/// How the model was stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A diffusers folder (`model_index.json` and component sub-folders, or one component).
    Diffusers,
    /// One LDM checkpoint (`model.diffusion_model.*`, `cond_stage_model.*`, `first_stage_model.*`).
    LdmSingleFile,
}

/// The model family, detected from the UNet's structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// SD 1.x: convolutional `proj_in`/`proj_out` in the transformer blocks.
    Sd1,
    /// SD 2.x: linear `proj_in`/`proj_out`.
    Sd2,
    /// SDXL (added embeddings); recognised so it can be refused clearly.
    Sdxl,
    /// No UNet, or one hdb cannot classify.
    Unknown,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Sd1 => "SD 1.x",
            Architecture::Sd2 => "SD 2.x",
            Architecture::Sdxl => "SDXL",
            Architecture::Unknown => "unknown",
        }
    }
}

/// One component's weights and, for diffusers folders, its `config.json`.
#[derive(Debug)]
pub struct ComponentWeights {
    pub component: Component,
    /// `config.json` and where it was read from.
    pub config: Option<(PathBuf, serde_json::Value)>,
    pub weights: WeightStore,
}

/// Called after each file is read with (files done, files total, file path); returning
/// `false` cancels the load.
pub type LoadProgress<'a> = &'a mut dyn FnMut(usize, usize, &Path) -> bool;

/// Options for [`Model::load`].
#[derive(Default)]
pub struct LoadOptions<'a> {
    pub variant: Variant,
    /// Weight files memory-mapped (default) or copied into memory at load.
    pub storage: crate::io::safetensors::Storage,
    pub progress: Option<LoadProgress<'a>>,
    /// A tokenizer folder (or a diffusers folder with `tokenizer/`) to use instead of the
    /// model's own; without either, SD 1.x models use the built-in CLIP ViT-L/14 tokenizer.
    pub tokenizer: Option<PathBuf>,
}

/// A loaded, immutable model.
#[derive(Debug)]
pub struct Model {
    pub path: PathBuf,
    pub format: SourceFormat,
    pub components: BTreeMap<Component, ComponentWeights>,
    /// The tokenizer folder: the model's `tokenizer/`, or the one [`LoadOptions::tokenizer`]
    /// gave. `None`: the engine uses the built-in CLIP ViT-L/14 tokenizer (SD 1.x models).
    pub tokenizer: Option<PathBuf>,
    pub architecture: Architecture,
}

impl Model {
    /// Loads a diffusers folder, a single diffusers component folder (e.g. just `unet/`'s
    /// contents), or an LDM single-file `.safetensors` checkpoint.
    pub fn load(path: &Path, mut opts: LoadOptions<'_>) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let tokenizer = Self::given_tokenizer(&mut opts)?;
        let model = if meta.is_dir() {
            load_diffusers(path, opts)?
        } else {
            load_ldm(path, opts)?
        };
        Ok(Self::loaded(model, path, tokenizer))
    }

    /// Loads an LDM single-file `.safetensors` checkpoint held in memory (e.g. read from an
    /// Android APK's assets); `name` stands for its path in messages and in
    /// [`Model::base_name`]. `opts.variant` and `opts.storage` do not apply: the bytes are
    /// the model's own copy.
    pub fn load_single_file_bytes(
        name: &Path,
        bytes: Vec<u8>,
        mut opts: LoadOptions<'_>,
    ) -> Result<Model> {
        let tokenizer = Self::given_tokenizer(&mut opts)?;
        let file = Arc::new(SafetensorsFile::from_vec(name, bytes)?);
        let model = ldm_from_file(name, file, opts)?;
        Ok(Self::loaded(model, name, tokenizer))
    }

    /// The tokenizer folder `opts.tokenizer` names (taken out of `opts`), checked before the
    /// weights are read.
    fn given_tokenizer(opts: &mut LoadOptions<'_>) -> Result<Option<PathBuf>> {
        match opts.tokenizer.take() {
            Some(t) => Ok(Some(tokenizer::find_folder(&t).ok_or_else(|| {
                Error::not_a_model(
                    &t,
                    "the tokenizer given is neither a tokenizer folder (tokenizer.json or \
                     vocab.json + merges.txt) nor a diffusers folder with tokenizer/",
                )
            })?)),
            None => Ok(None),
        }
    }

    /// The steps after reading that every source shares; `tokenizer` overrides the model's.
    fn loaded(mut model: Model, path: &Path, tokenizer: Option<PathBuf>) -> Model {
        if tokenizer.is_some() {
            model.tokenizer = tokenizer;
        }
        model.architecture = detect_architecture(&model);
        unused::log_unused(&model);
        log::info!(
            "loaded {} ({}, {:?}): {}",
            path.display(),
            model.architecture.name(),
            model.format,
            model
                .components
                .values()
                .map(|c| format!("{} {} tensors", c.component.name(), c.weights.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        model
    }

    pub fn component(&self, c: Component) -> Option<&ComponentWeights> {
        self.components.get(&c)
    }

    /// A component's weights and config: parsed from its `config.json` (diffusers folders),
    /// else inferred from tensor shapes (LDM single files).
    pub fn component_config<C>(
        &self,
        c: Component,
        from_json: fn(&serde_json::Value, &Path) -> Result<C>,
        infer: fn(&WeightStore, &Path) -> Result<C>,
    ) -> Result<(&WeightStore, C)> {
        let cw = self.component(c).ok_or_else(|| {
            Error::invalid_model(&self.path, format!("the model has no {}", c.name()))
        })?;
        let config = match &cw.config {
            Some((path, json)) => from_json(json, path)?,
            None => infer(&cw.weights, &self.path)?,
        };
        Ok((&cw.weights, config))
    }

    /// The layers of this model that adapters may change, with their shapes, read from the
    /// weights alone (no component is built): every linear and convolution weight of the UNet
    /// and the text encoder that [`adaptable::adapter_key`] names (SD 1.5: 128 + 48 attention
    /// projections, the identity layers; 56 + 24 other linear layers; the UNet's convolutions).
    pub fn adaptable_layers(&self) -> LayerTable {
        let mut out = LayerTable::new();
        for c in [Component::Unet, Component::TextEncoder] {
            let Some(cw) = self.component(c) else {
                continue;
            };
            for (name, w) in cw.weights.iter() {
                let Some(path) = name.strip_suffix(".weight") else {
                    continue;
                };
                let Some(key) = adaptable::adapter_key(c, path) else {
                    continue;
                };
                match *w.shape.dims() {
                    [dout, din] => {
                        out.insert(key, LayerShape::linear(din, dout));
                    }
                    // (the UNet's convolutions pad by k / 2, as hdb runs them)
                    [dout, cin, k, kw] if k == kw => {
                        let stride = LayerShape::unet_conv_stride(path);
                        out.insert(key, LayerShape::conv(cin, dout, k, stride, k / 2));
                    }
                    _ => {}
                }
            }
        }
        out
    }

    /// What adapters made for this model record as their base: the file or folder name and the
    /// architecture, e.g. `stable-diffusion-v1-5 (SD 1.x)`.
    pub fn base_name(&self) -> String {
        let name = self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        format!("{name} ({})", self.architecture.name())
    }

    /// The UNet's cross-attention width (768 for SD 1.x), read from its weights.
    pub fn cross_attention_dim(&self) -> Option<usize> {
        let unet = self.component(Component::Unet)?;
        unet.weights
            .iter()
            .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
            .and_then(|(_, w)| w.shape.dims().get(1).copied())
    }
}

fn tick(opts: &mut LoadOptions<'_>, done: usize, total: usize, file: &Path) -> Result<()> {
    if let Some(cb) = opts.progress.as_mut() {
        if !cb(done, total, file) {
            return Err(Error::Cancelled);
        }
    }
    Ok(())
}

const COMPONENTS: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::Vae];

fn load_diffusers(dir: &Path, mut opts: LoadOptions<'_>) -> Result<Model> {
    // A pipeline folder has component sub-folders; a component folder has the files itself.
    let mut plan: Vec<(Component, PathBuf, Vec<PathBuf>)> = Vec::new();
    for c in COMPONENTS {
        let sub = dir.join(c.name());
        if let Some(files) = find_weights(&sub, weights_stem(c), opts.variant)? {
            plan.push((c, sub, files));
        }
    }
    if plan.is_empty() {
        let cfg = dir.join("config.json");
        if let Some(c) = standalone_component(&cfg) {
            if let Some(files) = find_weights(dir, weights_stem(c), opts.variant)? {
                plan.push((c, dir.to_path_buf(), files));
            }
        }
    }
    if plan.is_empty() {
        let reason = if dir.join("model_index.json").is_file() {
            "model_index.json is present but none of unet/, text_encoder/, vae/ holds safetensors weights"
        } else {
            "expected a diffusers folder (model_index.json with unet/, text_encoder/, vae/) or a component folder (config.json + safetensors weights)"
        };
        return Err(Error::not_a_model(dir, reason));
    }
    let total: usize = plan.iter().map(|(_, _, f)| f.len()).sum();
    let mut done = 0;
    let mut components = BTreeMap::new();
    for (c, sub, files) in plan {
        let cfg_path = sub.join("config.json");
        let config = if cfg_path.is_file() {
            Some((cfg_path.clone(), read_json(&cfg_path)?))
        } else {
            None
        };
        let mut store = WeightStore::default();
        for f in files {
            let file = Arc::new(SafetensorsFile::open_with(&f, opts.storage)?);
            let idx = store.add_file(file.clone());
            for e in file.tensors() {
                if is_skipped_buffer(e) {
                    continue;
                }
                store.insert(canonical_name(c, &e.name), idx, &e.name, e.shape.clone())?;
            }
            done += 1;
            tick(&mut opts, done, total, &f)?;
        }
        components.insert(
            c,
            ComponentWeights {
                component: c,
                config,
                weights: store,
            },
        );
    }
    let tok = dir.join("tokenizer");
    let tokenizer =
        (tok.join("vocab.json").is_file() || tok.join("tokenizer.json").is_file()).then_some(tok);
    Ok(Model {
        path: dir.to_path_buf(),
        format: SourceFormat::Diffusers,
        components,
        tokenizer,
        architecture: Architecture::Unknown,
    })
}

/// The canonical name of a tensor in a diffusers component file. transformers >= 5.6 saves
/// `CLIPTextModel` without its `text_model.` level (`embeddings.*`, `encoder.*`,
/// `final_layer_norm.*`); every SD 1.x release has it, so that spelling is canonical.
fn canonical_name(c: Component, name: &str) -> String {
    if c == Component::TextEncoder && !name.starts_with("text_model.") {
        format!("text_model.{name}")
    } else {
        name.to_string()
    }
}

/// Integer buffers (CLIP's `position_ids`) are not weights; they are skipped, not refused.
fn is_skipped_buffer(e: &crate::io::safetensors::TensorEntry) -> bool {
    weights::is_buffer(&e.name) && crate::io::safetensors::float_dtype(e.dtype).is_none()
}

/// Guesses which component a lone `config.json` describes, from its `_class_name`.
fn standalone_component(cfg: &Path) -> Option<Component> {
    let json = read_json(cfg).ok()?;
    let class = json.get("_class_name").and_then(|v| v.as_str());
    let arch = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .and_then(|a| a.first())
        .and_then(|v| v.as_str());
    match (class, arch) {
        (Some("UNet2DConditionModel"), _) => Some(Component::Unet),
        (Some("AutoencoderKL"), _) => Some(Component::Vae),
        (_, Some("CLIPTextModel")) => Some(Component::TextEncoder),
        _ => None,
    }
}

fn load_ldm(path: &Path, opts: LoadOptions<'_>) -> Result<Model> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let pickle_name = matches!(ext, "ckpt" | "pt" | "pth" | "bin");
    if pickle_name && crate::io::looks_like_pickle(path)? {
        return Err(Error::Unsupported(format!(
            "{}: pickle checkpoints are not read (they can run code); convert to safetensors",
            path.display()
        )));
    }
    let file = Arc::new(
        SafetensorsFile::open_with(path, opts.storage).map_err(|e| match e {
            Error::InvalidFile { reason, .. } if pickle_name => Error::not_a_model(
                path,
                format!("neither a PyTorch checkpoint nor a safetensors file ({reason})"),
            ),
            other => other,
        })?,
    );
    ldm_from_file(path, file, opts)
}

/// An LDM checkpoint's tensors under diffusers names, from its opened file.
fn ldm_from_file(
    path: &Path,
    file: Arc<SafetensorsFile>,
    mut opts: LoadOptions<'_>,
) -> Result<Model> {
    let has_unet = file
        .tensors()
        .any(|e| e.name.starts_with("model.diffusion_model."));
    if !has_unet {
        return Err(Error::not_a_model(
            path,
            "a safetensors file without 'model.diffusion_model.*' keys is not an LDM checkpoint",
        ));
    }
    let layout = LdmLayout::infer(file.tensors().map(|e| e.name.as_str()))
        .map_err(|r| Error::invalid_model(path, r))?;
    let mut stores: BTreeMap<Component, WeightStore> = BTreeMap::new();
    let mut skipped = 0usize;
    for e in file.tensors() {
        let Some(mapped) = keymap::ldm_to_diffusers(&e.name, &layout)
            .map_err(|r| Error::invalid_model(path, r))?
        else {
            skipped += 1;
            continue;
        };
        let mut shape = e.shape.clone();
        if mapped.squeeze_1x1 {
            let d = shape.dims();
            if d.len() == 4 && d[2] == 1 && d[3] == 1 {
                shape = Shape(d[..2].to_vec());
            }
        }
        let store = stores.entry(mapped.component).or_default();
        // Every LDM component reads the one file: add it once per store.
        let idx = match store.file_count() {
            0 => store.add_file(file.clone()),
            _ => 0,
        };
        store.insert(mapped.name, idx, &e.name, shape)?;
    }
    if skipped > 0 {
        log::debug!("{}: skipped {skipped} non-weight tensors", path.display());
    }
    tick(&mut opts, 1, 1, path)?;
    let components = stores
        .into_iter()
        .map(|(c, weights)| {
            let cw = ComponentWeights {
                component: c,
                config: None,
                weights,
            };
            (c, cw)
        })
        .collect();
    Ok(Model {
        path: path.to_path_buf(),
        format: SourceFormat::LdmSingleFile,
        components,
        tokenizer: None,
        architecture: Architecture::Unknown,
    })
}

fn detect_architecture(m: &Model) -> Architecture {
    let Some(unet) = m.component(Component::Unet) else {
        return Architecture::Unknown;
    };
    let w = &unet.weights;
    if w.iter().any(|(k, _)| k.starts_with("add_embedding.")) {
        return Architecture::Sdxl;
    }
    match w
        .iter()
        .find(|(k, _)| k.ends_with(".proj_in.weight"))
        .map(|(_, w)| w.shape.rank())
    {
        Some(4) => Architecture::Sd1,
        Some(2) => Architecture::Sd2,
        _ => Architecture::Unknown,
    }
}

/// A summary of one component, for `hdb info` and `hdb_model_info`.
#[derive(Clone, Debug, Default)]
pub struct ComponentSummary {
    pub tensors: usize,
    pub parameters: u64,
    pub dtypes: BTreeMap<DType, u64>,
}

impl ComponentWeights {
    pub fn summary(&self) -> ComponentSummary {
        ComponentSummary {
            tensors: self.weights.len(),
            parameters: self.weights.parameter_count(),
            dtypes: self.weights.dtype_counts(),
        }
    }

    /// The dtype holding most parameters.
    pub fn main_dtype(&self) -> Option<DType> {
        self.weights.main_dtype()
    }
}

impl Model {
    /// A JSON description: path, format, architecture, and per component its tensor count,
    /// parameter count and parameters per dtype.
    pub fn describe(&self) -> serde_json::Value {
        let mut comps = serde_json::Map::new();
        for (c, cw) in &self.components {
            let s = cw.summary();
            let dtypes: serde_json::Map<String, serde_json::Value> = s
                .dtypes
                .iter()
                .map(|(d, n)| (d.name().to_string(), (*n).into()))
                .collect();
            comps.insert(
                c.name().to_string(),
                serde_json::json!({
                    "tensors": s.tensors,
                    "parameters": s.parameters,
                    "dtypes": dtypes,
                    "has_config": cw.config.is_some(),
                }),
            );
        }
        serde_json::json!({
            "path": self.path.display().to_string(),
            "format": match self.format {
                SourceFormat::Diffusers => "diffusers",
                SourceFormat::LdmSingleFile => "ldm-single-file",
            },
            "architecture": self.architecture.name(),
            "cross_attention_dim": self.cross_attention_dim(),
            "tokenizer": self.tokenizer.as_ref().map(|p| p.display().to_string()),
            "components": comps,
            "unused_tensors": unused::describe(self),
        })
    }
}
