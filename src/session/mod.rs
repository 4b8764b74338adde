//! The library's session API, what the C API, the CLI and the demo call:
//!
//! - [`Engine`]: a model on a runtime. It owns the model's weights, the runtime, the model's
//!   components placed on the runtime's device ([`Placement`]), the tokenizer and scheduler
//!   config, and the LiDB basis cache. Immutable once made; shared by every session (an
//!   `hdb_model` is one).
//! - [`Session`]: one thread's state on an engine: its active adapter set, built for the
//!   placed UNet and text encoder, and per-sample adapter indices. UNet evaluations
//!   ([`Session::unet`]), predictions ([`Session::predict`]) and generations
//!   (`Session::generate`, in `crate::pipeline`) run with them.
//!
//! Everything device-specific is generic code over the placement's backend ([`Sets<B>`]); the
//! enum [`Placement`] is matched once per call.

use std::sync::Arc;

use crate::adapter::apply::{validate_per_sample, ApplyMode};
use crate::adapter::lidb::BasisCache;
use crate::adapter::set::AdapterSet;
use crate::adapter::Adapter;
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::io::diffusers::read_json;
use crate::io::safetensors::SafetensorsFile;
use crate::model::adaptable::LayerTable;
use crate::model::config::UnetConfig;
use crate::model::layers::WeightSource;
use crate::model::scheduler::SchedulerConfig;
use crate::model::text_encoder::{TextEncoder, TextEncoderConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{Unet, UnetInput};
use crate::model::vae::VaeConfig;
use crate::model::{Architecture, Model};
use crate::placed::{Lazy, Place, Placed, PlacedHypernet};
use crate::progress::{Cancel, Progress};
use crate::runtime::Runtime;

/// Where an engine's model runs: its components on the CPU or on the runtime's GPU.
#[derive(Debug)]
pub enum Placement {
    Cpu(Arc<Placed<Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<Placed<crate::placed::CudaHalf>>),
}

/// `$body` with `$p` bound to the placed model, whichever backend it is on.
macro_rules! on_placement {
    ($e:expr, $p:ident => $body:expr) => {
        match $e {
            Placement::Cpu($p) => $body,
            #[cfg(feature = "cuda")]
            Placement::Cuda($p) => $body,
        }
    };
}

// After the macros, so the training methods can use them.
mod finetune;

/// A small model built in-process (the demo's random-weight model): configs, weights,
/// tokenizer and scheduler.
pub struct BuiltModel<'a> {
    pub unet: UnetConfig,
    pub text_encoder: TextEncoderConfig,
    pub vae: VaeConfig,
    pub weights: &'a (dyn WeightSource + Sync),
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
}

/// A model on a runtime.
pub struct Engine {
    runtime: Arc<Runtime>,
    model: Option<Arc<Model>>,
    placement: Placement,
    tokenizer: Lazy<ClipTokenizer>,
    scheduler: Lazy<SchedulerConfig>,
    /// LiDB bases, computed once per layer for every identity loaded on this model.
    bases: BasisCache,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("placement", &self.placement)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// `model` on `runtime`: its components will run on the runtime's device, each built there
    /// on first use.
    pub fn new(runtime: Arc<Runtime>, model: Model) -> Engine {
        let model = Arc::new(model);
        #[cfg(feature = "cuda")]
        let placement = match runtime.cuda() {
            Some(dev) => {
                let be = crate::placed::CudaHalf::new(dev.clone());
                Placement::Cuda(Arc::new(Placed::new(be, model.clone())))
            }
            None => Placement::Cpu(Arc::new(Placed::new(Cpu, model.clone()))),
        };
        #[cfg(not(feature = "cuda"))]
        let placement = Placement::Cpu(Arc::new(Placed::new(Cpu, model.clone())));
        Engine {
            runtime,
            model: Some(model),
            placement,
            tokenizer: Lazy::default(),
            scheduler: Lazy::default(),
            bases: BasisCache::default(),
        }
    }

    /// A model built from `parts` on `runtime`'s device, now.
    pub fn from_parts(runtime: Arc<Runtime>, parts: BuiltModel<'_>) -> Result<Engine> {
        let configs = (parts.unet, parts.text_encoder, parts.vae);
        let src = parts.weights;
        #[cfg(feature = "cuda")]
        if let Some(dev) = runtime.cuda() {
            let be = crate::placed::CudaHalf::new(dev.clone());
            let placed = Placed::from_source(be, configs.clone(), src)?;
            return Ok(Engine::with_parts(
                runtime,
                Placement::Cuda(Arc::new(placed)),
                parts.tokenizer,
                parts.scheduler,
            ));
        }
        let placed = runtime.install(|| Placed::from_source(Cpu, configs, src))?;
        Ok(Engine::with_parts(
            runtime,
            Placement::Cpu(Arc::new(placed)),
            parts.tokenizer,
            parts.scheduler,
        ))
    }

    fn with_parts(
        runtime: Arc<Runtime>,
        placement: Placement,
        tokenizer: ClipTokenizer,
        scheduler: SchedulerConfig,
    ) -> Engine {
        Engine {
            runtime,
            model: None,
            placement,
            tokenizer: Lazy::ready(tokenizer),
            scheduler: Lazy::ready(scheduler),
            bases: BasisCache::default(),
        }
    }

    /// The loaded model's weights (`None` for a model built from parts).
    pub fn model(&self) -> Option<&Model> {
        self.model.as_deref()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Where the model's components run, for logs: `cpu f32`, `cuda:0 (...) f16`.
    pub fn describe(&self) -> String {
        on_placement!(&self.placement, p => p.describe())
    }

    /// The layers adapters may change, by adapter key.
    pub fn adaptable_layers(&self) -> LayerTable {
        on_placement!(&self.placement, p => p.adaptable_layers())
    }

    /// The UNet's config (building the UNet on first use).
    pub fn unet_config(&self) -> Result<UnetConfig> {
        on_placement!(&self.placement, p => Ok(p.unet()?.config.clone()))
    }

    /// The VAE's config (building the VAE on first use).
    pub fn vae_config(&self) -> Result<VaeConfig> {
        on_placement!(&self.placement, p => Ok(p.vae()?.config.clone()))
    }

    /// The CLIP tokenizer, made on first use: the model's tokenizer folder (its `tokenizer/`,
    /// or the one given at load), else, for SD 1.x models, the built-in CLIP ViT-L/14
    /// tokenizer all of them use (LDM single files carry none).
    pub fn tokenizer(&self) -> Result<Arc<ClipTokenizer>> {
        self.tokenizer.get_or_try("the tokenizer", || {
            let m = self
                .model
                .as_ref()
                .ok_or_else(|| Error::Internal("a built model was given no tokenizer".into()))?;
            if let Some(tok) = &m.tokenizer {
                return ClipTokenizer::from_folder(tok);
            }
            match m.architecture {
                Architecture::Sd1 | Architecture::Unknown => {
                    log::info!(
                        "{}: no tokenizer folder; using the built-in CLIP ViT-L/14 tokenizer (SD 1.x)",
                        m.path.display()
                    );
                    ClipTokenizer::clip_vit_l14()
                }
                // SD 2.x's OpenCLIP tokenizer pads with "!", not <|endoftext|>: the built-in
                // one would condition it on different ids.
                a => Err(Error::invalid_model(
                    &m.path,
                    format!(
                        "the model has no tokenizer folder and the built-in one is SD 1.x's, not \
                         {}'s; give a tokenizer folder (hdb --tokenizer PATH, \
                         hdb_model_params.tokenizer)",
                        a.name()
                    ),
                )),
            }
        })
    }

    /// The noise schedule: `scheduler/scheduler_config.json` when the model has one, else SD
    /// 1.5's.
    pub fn scheduler(&self) -> Result<Arc<SchedulerConfig>> {
        self.scheduler.get_or_try("the scheduler config", || {
            let path = self
                .model
                .as_ref()
                .map(|m| m.path.join("scheduler/scheduler_config.json"))
                .filter(|p| p.is_file());
            match path {
                Some(p) => SchedulerConfig::from_json(&read_json(&p)?, &p),
                None => Ok(SchedulerConfig::default()),
            }
        })
    }

    /// Reads an adapter file of any supported kind for this model (LiDB bases from the
    /// engine's cache), in the runtime's threads.
    pub fn load_adapter(&self, f: &SafetensorsFile) -> Result<Adapter> {
        self.load_adapter_with(f, Default::default())
    }

    /// As [`Engine::load_adapter`], with options (LoRA keys that match no layer skipped).
    pub fn load_adapter_with(
        &self,
        f: &SafetensorsFile,
        opts: crate::adapter::LoadOptions,
    ) -> Result<Adapter> {
        let table = self.adaptable_layers();
        self.runtime
            .install(|| crate::adapter::load_with(f, &table, &self.bases, opts))
    }

    /// One identity for this model from a face image (RGB8, `stride` bytes a row) by
    /// `hypernet`: preprocessed, predicted in `iterations` (the file's default when `None`),
    /// composed with this model's bases.
    pub fn predict(
        &self,
        hypernet: &PlacedHypernet,
        face: (&[u8], usize, usize, usize),
        iterations: Option<usize>,
        progress: Option<Progress<'_>>,
    ) -> Result<Adapter> {
        let (rgb, w, h, stride) = face;
        let table = self.adaptable_layers();
        hypernet.check_layers(&table)?;
        let image = hypernet.preprocess(rgb, w, h, stride)?;
        let theta = self
            .runtime
            .install(|| hypernet.predict(&image, iterations, progress))?;
        let mut lidb = hypernet.to_lidb(&theta)?;
        lidb.meta.base = Some(match &self.model {
            Some(m) => m.base_name(),
            None => "a model built in-process (random weights)".into(),
        });
        self.runtime
            .install(|| lidb.compose_cached(&table, &self.bases))
    }
}

/// A session's adapter sets on one placement: the placed model and a set for each component
/// the active adapters change.
pub struct Sets<B: Place> {
    pub(crate) placed: Arc<Placed<B>>,
    pub(crate) unet: Option<AdapterSet<B, Unet<B>>>,
    pub(crate) text_encoder: Option<AdapterSet<B, TextEncoder<B>>>,
}

impl<B: Place> Sets<B> {
    fn new(placed: Arc<Placed<B>>) -> Self {
        Sets {
            placed,
            unet: None,
            text_encoder: None,
        }
    }

    /// Builds `set` for the UNet and (when it changes text-encoder layers) the text encoder;
    /// replaces the current sets only when both were built.
    fn set_adapters(&mut self, set: &[(&Adapter, f32)], mode: ApplyMode) -> Result<()> {
        if set.is_empty() {
            self.unet = None;
            self.text_encoder = None;
            return Ok(());
        }
        let unet = self.placed.unet()?;
        let te = if crate::adapter::touches_text_encoder(set) {
            let te = self.placed.text_encoder()?;
            AdapterSet::build(te.backend(), &*te, set, mode, self.text_encoder.as_mut())?
        } else {
            None
        };
        let u = AdapterSet::build(unet.backend(), &*unet, set, mode, self.unet.as_mut())?;
        self.unet = u;
        self.text_encoder = te;
        Ok(())
    }

    /// One UNet evaluation with the session's UNet set.
    pub(crate) fn unet(&self, x: &UnetInput<'_>, per_sample: Option<&[i32]>) -> Result<Vec<f32>> {
        let unet = self.placed.unet()?;
        match &self.unet {
            Some(s) => s.with_hook(per_sample, |h| unet.forward_adapted(x, h)),
            None => unet.forward_hooked(x, None),
        }
    }

    /// The text encoder on `ids` [batch, len] with the session's text-encoder set.
    pub(crate) fn encode_text(
        &self,
        ids: &[u32],
        batch: usize,
        per_sample: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        let te = self.placed.text_encoder()?;
        match &self.text_encoder {
            Some(s) => s.with_hook(per_sample, |h| te.forward_adapted(ids, batch, h)),
            None => te.forward_hooked(ids, batch, None),
        }
    }

    /// The VAE decoder: `latents` [b, C, h, w] (already divided by the scaling factor) ->
    /// images [b, 3, h f, w f] in [-1, 1].
    pub(crate) fn decode(&self, latents: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        self.placed.vae()?.decode(latents, b, h, w)
    }
}

/// A session's sets on the engine's placement (the same variant as the engine's).
pub(crate) enum On {
    Cpu(Sets<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Sets<crate::placed::CudaHalf>>),
}

/// `$body` with `$s` bound to the session's sets, whichever backend they are on.
macro_rules! on_sets {
    ($e:expr, $s:ident => $body:expr) => {
        match $e {
            On::Cpu($s) => $body,
            #[cfg(feature = "cuda")]
            On::Cuda($s) => $body,
        }
    };
}
pub(crate) use on_sets;

/// One thread's state on an engine. Not shared between threads at once (`&mut` to change it).
pub struct Session {
    engine: Arc<Engine>,
    pub(crate) on: On,
    /// The active set's mode and size, for per-sample indices (`None`: no adapters).
    active: Option<(ApplyMode, usize)>,
    /// Runtime mode: an adapter index per batch sample for the next calls.
    per_sample: Option<Vec<i32>>,
    /// Cancels the call in flight from another thread ([`Session::canceller`]).
    cancel: Arc<Cancel>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("active", &self.active)
            .field("per_sample", &self.per_sample)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session with no adapters on `engine`.
    pub fn new(engine: Arc<Engine>) -> Session {
        let on = match &engine.placement {
            Placement::Cpu(p) => On::Cpu(Sets::new(p.clone())),
            #[cfg(feature = "cuda")]
            Placement::Cuda(p) => On::Cuda(Box::new(Sets::new(p.clone()))),
        };
        Session {
            engine,
            on,
            active: None,
            per_sample: None,
            cancel: Arc::default(),
        }
    }

    /// The session's cancel flag, for another thread: [`Cancel::cancel`] stops the UNet
    /// evaluation or generation in flight with `Error::Cancelled` (a generation between its
    /// phases and steps), and does nothing when none runs.
    pub fn canceller(&self) -> Arc<Cancel> {
        self.cancel.clone()
    }

    /// The flag of this session's calls, for `pipeline`.
    pub(crate) fn cancel_flag(&self) -> &Cancel {
        &self.cancel
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The per-sample adapter indices set by [`Session::set_sample_adapters`].
    pub fn per_sample(&self) -> Option<&[i32]> {
        self.per_sample.as_deref()
    }

    /// Makes `set` (each adapter with its scale) the active set, applied in `mode`; an empty
    /// set removes all adapters (the pristine base weights run again). The UNet's and the
    /// text encoder's sets are built on the engine's device: merge mode writes the session's
    /// own merged copies of the adapted weights (the model's are never changed), runtime mode
    /// keeps the factors. On failure the previous set stays active. Clears per-sample
    /// indices.
    pub fn set_adapters(&mut self, set: &[(&Adapter, f32)], mode: ApplyMode) -> Result<()> {
        let rt = self.engine.runtime.clone();
        on_sets!(&mut self.on, s => rt.install(|| s.set_adapters(set, mode)))?;
        self.active = (!set.is_empty()).then_some((mode, set.len()));
        self.per_sample = None;
        Ok(())
    }

    /// Runtime mode: gives each sample of the next calls its own adapter, an index into the
    /// active set (-1 = none); the next calls' batch must equal `indices.len()`. `None`
    /// returns to applying the whole set to every sample.
    pub fn set_sample_adapters(&mut self, indices: Option<Vec<i32>>) -> Result<()> {
        let Some(idx) = indices else {
            self.per_sample = None;
            return Ok(());
        };
        let (mode, count) = self.active.ok_or_else(|| {
            Error::invalid_arg(
                "indices",
                "the session has no adapters; call hdb_session_set_adapters first",
            )
        })?;
        validate_per_sample(mode, count, Some(&idx), idx.len())?;
        self.per_sample = Some(idx);
        Ok(())
    }

    /// Checks the session's per-sample indices against a batch of `batch` samples.
    pub(crate) fn check_batch(&self, per_sample: Option<&[i32]>, batch: usize) -> Result<()> {
        match (self.active, per_sample) {
            (Some((mode, count)), idx) => validate_per_sample(mode, count, idx, batch),
            (None, Some(_)) => Err(Error::invalid_arg(
                "adapter_index",
                "per-sample adapters were given but the session has no adapters",
            )),
            (None, None) => Ok(()),
        }
    }

    /// One UNet evaluation, exactly diffusers' `UNet2DConditionModel(sample, timestep,
    /// encoder_hidden_states).sample`, with the session's adapters (and per-sample indices),
    /// on the engine's device (inputs and output f32 on the host).
    pub fn unet(&self, x: &UnetInput<'_>) -> Result<Vec<f32>> {
        let _running = self.cancel.begin();
        let per_sample = self.per_sample.as_deref();
        self.check_batch(per_sample, x.batch)?;
        let rt = &self.engine.runtime;
        // One evaluation is one phase: a request during the first call's build stops it here.
        let y = on_sets!(&self.on, s => rt.install(|| s.unet(x, per_sample)))?;
        self.cancel.check()?;
        Ok(y)
    }

    /// As [`Engine::predict`].
    pub fn predict(
        &self,
        hypernet: &PlacedHypernet,
        face: (&[u8], usize, usize, usize),
        iterations: Option<usize>,
        progress: Option<Progress<'_>>,
    ) -> Result<Adapter> {
        self.engine.predict(hypernet, face, iterations, progress)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn engines_are_shared_and_sessions_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<super::Engine>();
        send::<super::Session>();
    }
}
