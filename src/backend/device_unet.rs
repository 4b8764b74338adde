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
use crate::backend::cuda::{
    adapters::{CudaAdapterCtx, CudaAdapters},
    Cuda, CudaDevice, CudaLayerAdapters,
};
use crate::backend::Backend;
use crate::error::Result;
use crate::model::config::UnetConfig;
#[cfg(feature = "cuda")]
use crate::model::unet::Unet;
use crate::model::unet::UnetInput;
use crate::model::Model;
use crate::runtime::Runtime;

/// A model's UNet on a runtime's device (CUDA: fp16 weights, f32 accumulation), shared by
/// every session of the model on that runtime.
#[derive(Clone, Debug)]
pub enum DeviceUnet {
    #[cfg(feature = "cuda")]
    Cuda {
        dev: Arc<CudaDevice>,
        unet: crate::model::CudaUnetF16,
    },
    /// The generic model code on [`Cuda`] in fp16 with the fused adapter kernels
    /// ([`CudaLayerAdapters`]): the candidate to replace `Cuda` once a GPU run shows it equal
    /// in results and speed ([`DeviceUnet::generic_for_runtime`]; unverified on a GPU so far).
    #[cfg(feature = "cuda")]
    CudaGeneric {
        unet: Arc<crate::model::unet::Unet<Cuda<half::f16>>>,
    },
}

/// A session's adapter set on a [`DeviceUnet`] (see `backend::cuda::adapters` and
/// `backend::cuda::layer_adapters`).
#[derive(Debug)]
pub enum DeviceAdapters {
    #[cfg(feature = "cuda")]
    Cuda(CudaAdapters<half::f16>),
    /// A set on [`DeviceUnet::CudaGeneric`].
    #[cfg(feature = "cuda")]
    CudaLayer(CudaLayerAdapters<half::f16>),
}

impl DeviceUnet {
    /// The UNet of `model` on `rt`'s device, uploaded on the first call (the model caches it
    /// per device); `None` when the runtime runs on the CPU. The tuned `CudaUnet`, or the
    /// generic model code when the environment says `HDB_CUDA_UNET=generic`: a temporary
    /// switch, so a GPU run can put the generic UNet under every session and pipeline test
    /// before it replaces the tuned one (it goes with the tuned UNet).
    pub fn for_runtime(rt: &Runtime, model: &Model) -> Result<Option<DeviceUnet>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            if generic_requested() {
                return DeviceUnet::generic_for_runtime(rt, model);
            }
            let unet = model.cuda_unet(dev)?;
            return Ok(Some(DeviceUnet::Cuda {
                dev: dev.clone(),
                unet,
            }));
        }
        let _ = (rt, model);
        Ok(None)
    }

    /// The UNet of `model` on `rt`'s device through the generic model code
    /// (`DeviceUnet::CudaGeneric`), uploaded on the first call (the model caches it per
    /// device); `None` when the runtime runs on the CPU.
    pub fn generic_for_runtime(rt: &Runtime, model: &Model) -> Result<Option<DeviceUnet>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            let unet = model.cuda_generic_unet(dev)?;
            return Ok(Some(DeviceUnet::CudaGeneric { unet }));
        }
        let _ = (rt, model);
        Ok(None)
    }

    /// A UNet of `config` from `src` on `rt`'s device, for a pipeline built without a
    /// [`Model`] (the demo's built-in one); `None` when the runtime runs on the CPU. The tuned
    /// UNet (uploaded from a host copy built for it), or the generic one under
    /// `HDB_CUDA_UNET=generic` (see [`DeviceUnet::for_runtime`]). Not cached: each call
    /// uploads.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn load(
        rt: &Runtime,
        config: UnetConfig,
        src: &dyn crate::model::unet::WeightSource,
    ) -> Result<Option<DeviceUnet>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            if generic_requested() {
                let be = Cuda::<half::f16>::new(dev.clone());
                let unet = Arc::new(crate::model::unet::Unet::load_on(be, config, src)?);
                return Ok(Some(DeviceUnet::CudaGeneric { unet }));
            }
            let host = Unet::load(config, src)?;
            let unet = Arc::new(crate::backend::cuda::unet::CudaUnet::upload(dev, &host)?);
            return Ok(Some(DeviceUnet::Cuda {
                dev: dev.clone(),
                unet,
            }));
        }
        Ok(None)
    }

    /// Where it runs, for logs: `cuda:0 (NVIDIA H100 80GB HBM3), fp16`.
    pub fn describe(&self) -> String {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref dev, .. } => {
                format!("cuda:{} ({}), fp16", dev.ordinal(), dev.name())
            }
            #[cfg(feature = "cuda")]
            DeviceUnet::CudaGeneric { ref unet } => {
                let dev = unet.backend().dev();
                format!(
                    "cuda:{} ({}), fp16, generic model code",
                    dev.ordinal(),
                    dev.name()
                )
            }
        }
    }

    pub fn config(&self) -> &UnetConfig {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet, .. } => unet.config(),
            #[cfg(feature = "cuda")]
            DeviceUnet::CudaGeneric { ref unet } => &unet.config,
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
            DeviceUnet::Cuda { ref dev, ref unet } => {
                let a = CudaAdapters::resolve(dev, unet, set, mode)?;
                log::debug!(
                    "{} adapter(s) on cuda:{} in {mode:?} mode: {} projections, {:.1} MB",
                    a.count(),
                    dev.ordinal(),
                    a.layers(),
                    a.device_bytes() as f64 / 1e6
                );
                Ok(DeviceAdapters::Cuda(a))
            }
            #[cfg(feature = "cuda")]
            DeviceUnet::CudaGeneric { ref unet } => {
                let u: &Unet<Cuda<half::f16>> = unet;
                let resolved = crate::adapter::apply::Applied::new(set, ApplyMode::Runtime, u)?;
                let a = CudaLayerAdapters::new(u.backend(), u, &resolved, mode)?;
                Ok(DeviceAdapters::CudaLayer(a))
            }
        }
    }

    /// The adaptable projections by adapter key (`unet.<path>`) and their dims.
    pub fn adaptable_layers(
        &self,
    ) -> std::collections::BTreeMap<String, crate::adapter::LayerShape> {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceUnet::Cuda { ref unet, .. } => unet.adaptable_layers(),
            #[cfg(feature = "cuda")]
            DeviceUnet::CudaGeneric { ref unet } => unet.adaptable_layers(),
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
            DeviceUnet::Cuda { ref dev, ref unet } => {
                let ctx = match ad {
                    None => None,
                    Some(DeviceAdapters::Cuda(adapters)) => Some(CudaAdapterCtx {
                        adapters,
                        per_sample,
                    }),
                    Some(DeviceAdapters::CudaLayer(_)) => return Err(other_kind()),
                };
                unet.forward_with(dev, x, ctx)
            }
            #[cfg(feature = "cuda")]
            DeviceUnet::CudaGeneric { ref unet } => match ad {
                None => unet.forward_hooked(x, None),
                Some(DeviceAdapters::CudaLayer(a)) => {
                    let hook = a.with_samples(per_sample)?;
                    unet.forward_hooked(x, Some(&hook))
                }
                Some(DeviceAdapters::Cuda(_)) => Err(other_kind()),
            },
        }
    }
}

/// `HDB_CUDA_UNET=generic` (see [`DeviceUnet::for_runtime`]); anything else is the tuned UNet.
#[cfg(feature = "cuda")]
fn generic_requested() -> bool {
    std::env::var("HDB_CUDA_UNET").is_ok_and(|v| v.eq_ignore_ascii_case("generic"))
}

/// A set built for the other kind of device UNet.
#[cfg(feature = "cuda")]
fn other_kind() -> crate::Error {
    crate::Error::invalid_arg(
        "adapters",
        "were built for another kind of device UNet (tuned or generic)",
    )
}

impl DeviceAdapters {
    pub fn mode(&self) -> ApplyMode {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceAdapters::Cuda(ref a) => a.mode(),
            #[cfg(feature = "cuda")]
            DeviceAdapters::CudaLayer(ref a) => a.mode(),
        }
    }

    /// Adapters in the set.
    pub fn count(&self) -> usize {
        match *self {
            #[cfg(feature = "cuda")]
            DeviceAdapters::Cuda(ref a) => a.count(),
            #[cfg(feature = "cuda")]
            DeviceAdapters::CudaLayer(ref a) => a.count(),
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
                Ok(Some(DeviceAdapters::CudaLayer(a)))
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
                (Some(DeviceAdapters::CudaLayer(a)), None) => {
                    let hook = a.with_samples(per_sample)?;
                    text_encoder.forward_hooked(ids, batch, Some(&hook))
                }
                (Some(DeviceAdapters::Cuda(_)), None) => Err(crate::Error::invalid_arg(
                    "adapters",
                    "the text encoder's set was built for the tuned UNet, not the text encoder \
                     (DeviceTextVae::text_adapters)",
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
        progress: Option<crate::pipeline::Progress<'_>>,
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
