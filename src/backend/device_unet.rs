//! The models on a runtime's accelerator, as the library's normal paths use them (sessions,
//! the pipeline, the CLI): [`DeviceUnet`] evaluates the UNet, [`DeviceAdapters`] is a
//! session's adapter set there, [`DeviceTextVae`] runs the text encoder and the VAE (the same
//! generic model code as on the CPU, on the CUDA backend), [`RuntimeHypernet`] predicts
//! identities (on the CPU or the GPU). The tokenizer stays on the CPU. Inputs and outputs are f32 on the host, as on the CPU.
//!
//! Every type exists in every build, so callers need no `cfg`: without the `cuda` feature they
//! have no values (their constructors always give `None`).

#[cfg(feature = "cuda")]
use std::sync::Arc;

use crate::adapter::apply::ApplyMode;
use crate::adapter::Adapter;
#[cfg(feature = "cuda")]
use crate::backend::cuda::{Cuda, CudaLayerAdapters};
use crate::backend::Backend;
use crate::error::Result;
use crate::model::config::UnetConfig;
#[cfg(feature = "cuda")]
use crate::model::unet::Unet;
use crate::model::unet::UnetInput;
use crate::model::Model;
use crate::runtime::Runtime;

/// A model's UNet on a runtime's device (CUDA: the generic model code on `Cuda<f16>`, f32
/// accumulation), shared by every session of the model on that runtime.
#[derive(Clone, Debug)]
pub enum DeviceUnet {
    #[cfg(feature = "cuda")]
    Cuda { unet: crate::model::CudaUnetF16 },
}

/// A session's adapter set on a device model: the fused LiDB/LoRA kernels keyed by layer (see
/// `backend::cuda::layer_adapters`), built for one model, which the variant names.
#[derive(Debug)]
pub enum DeviceAdapters {
    /// Built by [`DeviceUnet::adapters`].
    #[cfg(feature = "cuda")]
    Unet(CudaLayerAdapters<half::f16>),
    /// Built by [`DeviceTextVae::text_adapters`].
    #[cfg(feature = "cuda")]
    TextEncoder(CudaLayerAdapters<half::f16>),
}

impl DeviceUnet {
    /// The UNet of `model` on `rt`'s device, built on the first call (the model caches it per
    /// device); `None` when the runtime runs on the CPU.
    pub fn for_runtime(rt: &Runtime, model: &Model) -> Result<Option<DeviceUnet>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let unet = model.cuda_unet(dev)?;
            return Ok(Some(DeviceUnet::Cuda { unet }));
        }
        let _ = (rt, model);
        Ok(None)
    }

    /// A UNet of `config` from `src` on `rt`'s device, for a pipeline built without a
    /// [`Model`] (the demo's built-in one); `None` when the runtime runs on the CPU. Not
    /// cached: each call uploads.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn load(
        rt: &Runtime,
        config: UnetConfig,
        src: &dyn crate::model::unet::WeightSource,
    ) -> Result<Option<DeviceUnet>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let be = Cuda::<half::f16>::new(dev.clone());
            let unet = Arc::new(Unet::load_on(be, config, src)?);
            return Ok(Some(DeviceUnet::Cuda { unet }));
        }
        Ok(None)
    }

    /// Where it runs, for logs: `cuda:0 (NVIDIA H100 80GB HBM3), fp16`.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet } => {
                let dev = unet.backend().dev();
                format!("cuda:{} ({}), fp16", dev.ordinal(), dev.name())
            }
        }
    }

    pub fn config(&self) -> &UnetConfig {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet } => &unet.config,
        }
    }

    /// A session's set on this UNet: `set` (each adapter with its scale) resolved against
    /// this UNet's own projections (dims only: no host copy of the weights is needed) and
    /// built on the device in `mode`. An empty set gives an empty set (the shared weights run
    /// unchanged).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn adapters(&self, set: &[(&Adapter, f32)], mode: ApplyMode) -> Result<DeviceAdapters> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet } => {
                let u: &Unet<Cuda<half::f16>> = unet;
                let resolved = crate::adapter::apply::Applied::new(set, ApplyMode::Runtime, u)?;
                let a = CudaLayerAdapters::new(u.backend(), u, &resolved, mode)?;
                log::debug!(
                    "{} adapter(s) on {} in {mode:?} mode",
                    a.count(),
                    self.describe()
                );
                Ok(DeviceAdapters::Unet(a))
            }
        }
    }

    /// The adaptable projections by adapter key (`unet.<path>`) and their dims.
    pub fn adaptable_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet } => unet.adaptable_layers(),
        }
    }

    /// One evaluation, as [`crate::model::unet::Unet::forward_with`]: f32 inputs and output
    /// on the host, the same shape and adapter-index errors. `per_sample` is only read with
    /// `ad`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn forward(
        &self,
        x: &UnetInput<'_>,
        ad: Option<&DeviceAdapters>,
        per_sample: Option<&[i32]>,
    ) -> Result<Vec<f32>> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet } => match ad {
                None => unet.forward_hooked(x, None),
                Some(DeviceAdapters::Unet(a)) => {
                    let hook = a.with_samples(per_sample)?;
                    unet.forward_hooked(x, Some(&hook))
                }
                Some(DeviceAdapters::TextEncoder(_)) => Err(crate::Error::invalid_arg(
                    "adapters",
                    "the UNet was given the text encoder's set (DeviceTextVae::text_adapters), \
                     not its own (DeviceUnet::adapters)",
                )),
            },
        }
    }
}

impl DeviceAdapters {
    pub fn mode(&self) -> ApplyMode {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceAdapters::Unet(ref a) | DeviceAdapters::TextEncoder(ref a) => a.mode(),
        }
    }

    /// Adapters in the set.
    pub fn count(&self) -> usize {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceAdapters::Unet(ref a) | DeviceAdapters::TextEncoder(ref a) => a.count(),
        }
    }

    /// Checks per-sample indices against a batch, as [`crate::adapter::apply::AdapterCtx`].
    pub fn validate(&self, per_sample: Option<&[i32]>, batch: usize) -> Result<()> {
        crate::adapter::apply::validate_per_sample(self.mode(), self.count(), per_sample, batch)
    }
}

/// A model's text encoder and VAE on a runtime's device (CUDA: fp16 weights, f32
/// accumulation), shared by every pipeline of the model on that device.
#[derive(Clone, Debug)]
pub enum DeviceTextVae {
    #[cfg(feature = "cuda")]
    Cuda {
        text_encoder: Arc<crate::model::text_encoder::TextEncoder<Cuda<half::f16>>>,
        vae: Arc<crate::model::vae::Vae<Cuda<half::f16>>>,
    },
}

impl DeviceTextVae {
    /// The text encoder and VAE of `model` on `rt`'s device, uploaded on the first call (the
    /// model caches them per device); `None` when the runtime runs on the CPU.
    pub fn for_runtime(rt: &Runtime, model: &Model) -> Result<Option<DeviceTextVae>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            return model.cuda_text_vae(dev).map(Some);
        }
        let _ = (rt, model);
        Ok(None)
    }

    /// A text encoder and VAE of the given configs from `src` on `rt`'s device, for a
    /// pipeline built without a [`Model`] (the demo's built-in one); `None` when the runtime
    /// runs on the CPU. Not cached: each call uploads.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn load(
        rt: &Runtime,
        te: crate::model::text_encoder::TextEncoderConfig,
        vae: crate::model::vae::VaeConfig,
        src: &dyn crate::model::unet::WeightSource,
    ) -> Result<Option<DeviceTextVae>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let be = Cuda::<half::f16>::new(dev.clone());
            return Ok(Some(DeviceTextVae::Cuda {
                text_encoder: Arc::new(crate::model::text_encoder::TextEncoder::load_on(
                    be.clone(),
                    te,
                    src,
                )?),
                vae: Arc::new(crate::model::vae::Vae::load_on(be, vae, src)?),
            }));
        }
        Ok(None)
    }

    /// A session's adapter set on the text encoder, built once when the set changes (the
    /// fused kernels of `backend::cuda::CudaLayerAdapters`: merge mode writes the set's own
    /// merged copies of the projections it changes from the pristine base, runtime mode
    /// uploads the factors). Only `text_encoder.` layers count; `None` when the set has none. Resolved
    /// against the device model's own projections: no host copy of its weights is needed.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn text_adapters(
        &self,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
    ) -> Result<Option<DeviceAdapters>> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda {
                ref text_encoder, ..
            } => {
                let te: &crate::model::text_encoder::TextEncoder<Cuda<half::f16>> = text_encoder;
                let resolved = crate::adapter::apply::Applied::new(set, ApplyMode::Runtime, te)?;
                if resolved.layers.is_empty() {
                    return Ok(None);
                }
                let a = CudaLayerAdapters::new(te.backend(), te, &resolved, mode)?;
                Ok(Some(DeviceAdapters::TextEncoder(a)))
            }
        }
    }

    /// As [`crate::model::text_encoder::TextEncoder::forward`], with the session's text
    /// encoder set: `ad` built by [`DeviceTextVae::text_adapters`] (`per_sample` as for the
    /// UNet), or `host` (compatibility: a set resolved against the CPU text encoder, uploaded
    /// for this call through the generic adapter hook). Giving both is an error.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn encode_text(
        &self,
        ids: &[u32],
        batch: usize,
        ad: Option<&DeviceAdapters>,
        per_sample: Option<&[i32]>,
        host: Option<&crate::adapter::apply::AdapterCtx<'_>>,
    ) -> Result<Vec<f32>> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda {
                ref text_encoder, ..
            } => match (ad, host.filter(|a| !a.applied.layers.is_empty())) {
                (Some(_), Some(_)) => Err(crate::Error::invalid_arg(
                    "adapters",
                    "the text encoder was given both a device set and a host set",
                )),
                (Some(DeviceAdapters::TextEncoder(a)), None) => {
                    let hook = a.with_samples(per_sample)?;
                    text_encoder.forward_hooked(ids, batch, Some(&hook))
                }
                (Some(DeviceAdapters::Unet(_)), None) => Err(crate::Error::invalid_arg(
                    "adapters",
                    "the text encoder was given the UNet's set (DeviceUnet::adapters), not its \
                     own (DeviceTextVae::text_adapters)",
                )),
                (None, Some(a)) => {
                    let hook = crate::backend::cuda::CudaKeyAdapters::new(
                        text_encoder.backend(),
                        a.applied,
                        a.per_sample,
                    )?;
                    text_encoder.forward_hooked(ids, batch, Some(&hook))
                }
                (None, None) => text_encoder.forward_hooked(ids, batch, None),
            },
        }
    }

    /// The text encoder's adaptable projections by adapter key.
    pub fn text_encoder_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda {
                ref text_encoder, ..
            } => text_encoder.adaptable_layers(),
        }
    }

    /// The text encoder's config.
    pub fn text_encoder_config(&self) -> &crate::model::text_encoder::TextEncoderConfig {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda {
                ref text_encoder, ..
            } => &text_encoder.config,
        }
    }

    /// The VAE's config.
    pub fn vae_config(&self) -> &crate::model::vae::VaeConfig {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda { ref vae, .. } => &vae.config,
        }
    }

    /// As [`crate::model::vae::Vae::decode`].
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn decode(&self, latents: &[f32], b: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda { ref vae, .. } => vae.decode(latents, b, h, w),
        }
    }

    /// Where they run, for logs.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceTextVae::Cuda { ref vae, .. } => vae.backend().describe(),
        }
    }
}

/// A hypernetwork on a runtime's device: the CPU, or a GPU (CUDA: f32 storage and compute, so
/// a prediction matches the CPU's to rounding: theta becomes adapter weights). Only the
/// device's copy of the weights is built.
#[derive(Debug)]
pub enum RuntimeHypernet {
    Cpu(Box<crate::hypernet::Hypernet>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::hypernet::Hypernet<Cuda<f32>>>),
}

/// `$body` with `$n` bound to the network, whichever backend it is on.
macro_rules! on_net {
    ($self:expr, $n:ident => $body:expr) => {
        match $self {
            RuntimeHypernet::Cpu($n) => $body,
            #[cfg(feature = "cuda")]
            RuntimeHypernet::Cuda($n) => $body,
        }
    };
}

impl RuntimeHypernet {
    /// The hypernetwork file at `path` on `rt`'s device.
    pub fn load(rt: &Runtime, path: &std::path::Path) -> Result<RuntimeHypernet> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let net = crate::hypernet::Hypernet::load_on(Cuda::<f32>::new(dev.clone()), path)?;
            return Ok(RuntimeHypernet::Cuda(Box::new(net)));
        }
        rt.install(|| crate::hypernet::Hypernet::load(path))
            .map(|n| RuntimeHypernet::Cpu(Box::new(n)))
    }

    /// A hypernetwork of `config` from `src` (random weights in benchmarks and the demo) on
    /// `rt`'s device.
    pub fn from_source(
        rt: &Runtime,
        config: crate::hypernet::HypernetConfig,
        src: &(dyn crate::model::unet::WeightSource + Sync),
    ) -> Result<RuntimeHypernet> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let be = Cuda::<f32>::new(dev.clone());
            let net = crate::hypernet::Hypernet::from_source_on(be, config, src)?;
            return Ok(RuntimeHypernet::Cuda(Box::new(net)));
        }
        rt.install(|| crate::hypernet::Hypernet::from_source(config, src))
            .map(|n| RuntimeHypernet::Cpu(Box::new(n)))
    }

    pub fn config(&self) -> &crate::hypernet::HypernetConfig {
        on_net!(self, n => &n.config)
    }

    /// As [`crate::hypernet::Hypernet::preprocess`].
    pub fn preprocess(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Vec<f32>> {
        on_net!(self, n => n.preprocess(rgb, width, height, stride))
    }

    /// As [`crate::hypernet::Hypernet::predict`] (run it in the runtime's `install` for the
    /// CPU's threads).
    pub fn predict(
        &self,
        image: &[f32],
        iterations: Option<usize>,
        progress: Option<crate::progress::Progress<'_>>,
    ) -> Result<Vec<f32>> {
        on_net!(self, n => n.predict(image, iterations, progress))
    }

    /// As [`crate::hypernet::Hypernet::to_lidb`].
    pub fn to_lidb(&self, theta: &[f32]) -> Result<crate::adapter::lidb::Lidb> {
        on_net!(self, n => n.to_lidb(theta))
    }

    /// As [`crate::hypernet::Hypernet::check_layers`].
    pub fn check_layers(
        &self,
        table: &std::collections::BTreeMap<String, crate::adapter::LayerShape>,
    ) -> Result<()> {
        on_net!(self, n => n.check_layers(table))
    }

    /// Where it runs, for logs: `cpu f32`, `cuda:0 f32`.
    pub fn describe(&self) -> String {
        on_net!(self, n => n.backend().describe())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shared_objects_may_cross_threads() {
        // Models and runtimes are shared by every thread of a host (the C API's contract);
        // a session, with its device adapters, may move between threads.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Model>();
        send_sync::<crate::Runtime>();
        send_sync::<super::DeviceUnet>();
        send_sync::<super::DeviceAdapters>();
        send_sync::<super::DeviceTextVae>();
        send_sync::<super::RuntimeHypernet>();
        send_sync::<crate::pipeline::Pipeline>();
    }
}
