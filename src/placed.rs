//! Models placed on a device. Where a component runs is its type: `Unet<Cpu>` on the CPU
//! (f32), `Unet<Cuda<f16>>` on a GPU (fp16 storage, f32 accumulation), the same model code on
//! either backend. [`Placed<B>`] holds one model's UNet, text encoder and VAE on backend `B`,
//! each built on first use and shared by every session of that model; adapter sets for them are
//! typed by backend and component too (`crate::adapter::set::AdapterSet`). The one choice of
//! backend is made where a model meets a runtime (`crate::session::Engine`), never per call.
//!
//! [`PlacedHypernet`] is the hypernetwork on a runtime's device: f32 on the CPU; on a GPU in
//! its file's storage type: an f32 file in f32 (a prediction matches the CPU's to rounding),
//! an f16 or bf16 file in half precision with f32 accumulation (faster; theta within the
//! tolerance `tests/cuda_models.rs` states of f32's).

use std::sync::{Arc, Mutex};

use crate::adapter::set::SetBackend;
use crate::backend::{Backend, Cpu};
use crate::error::{Error, Result};
use crate::hypernet::{Hypernet, HypernetConfig};
use crate::model::adaptable::LayerTable;
use crate::model::config::UnetConfig;
use crate::model::layers::WeightSource;
use crate::model::text_encoder::{TextEncoder, TextEncoderConfig};
use crate::model::unet::Unet;
use crate::model::vae::{Vae, VaeConfig};
use crate::model::{Adaptable, Model};
use crate::progress::Progress;
use crate::runtime::Runtime;

/// A backend whole models are placed on: adapter sets can be built on it, and it is cheap to
/// clone (a handle on the device).
pub trait Place: SetBackend + Clone + 'static {}

impl<B: SetBackend + Clone + 'static> Place for B {}

/// The backend models take on a CUDA runtime: fp16 storage, f32 accumulation.
#[cfg(feature = "cuda")]
pub type CudaHalf = crate::backend::cuda::Cuda<half::f16>;

/// A value built on first use and shared afterwards. The lock is held while building, so
/// concurrent first uses build once.
pub(crate) struct Lazy<T>(Mutex<Option<Arc<T>>>);

impl<T> Default for Lazy<T> {
    fn default() -> Self {
        Lazy(Mutex::new(None))
    }
}

impl<T> Lazy<T> {
    pub(crate) fn ready(v: T) -> Self {
        Lazy(Mutex::new(Some(Arc::new(v))))
    }

    pub(crate) fn get_or_try(
        &self,
        what: &str,
        build: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let mut guard = self
            .0
            .lock()
            .map_err(|_| Error::Internal(format!("the cache of {what} is poisoned")))?;
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        let v = Arc::new(build()?);
        *guard = Some(v.clone());
        Ok(v)
    }

    /// The value, if it was built.
    pub(crate) fn get(&self) -> Option<Arc<T>> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// One model's UNet, text encoder and VAE on backend `B`.
pub struct Placed<B: Place> {
    be: B,
    /// Where components not yet built come from; `None` when all were given at construction.
    model: Option<Arc<Model>>,
    unet: Lazy<Unet<B>>,
    text_encoder: Lazy<TextEncoder<B>>,
    vae: Lazy<Vae<B>>,
}

impl<B: Place> std::fmt::Debug for Placed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placed")
            .field("backend", &self.be.describe())
            .finish_non_exhaustive()
    }
}

impl<B: Place> Placed<B> {
    /// `model`'s components on `be`, each built (read, converted, uploaded) on first use.
    pub fn new(be: B, model: Arc<Model>) -> Placed<B> {
        Placed {
            be,
            model: Some(model),
            unet: Lazy::default(),
            text_encoder: Lazy::default(),
            vae: Lazy::default(),
        }
    }

    /// Components of the given configs from `src` (random weights in the demo and benches),
    /// built now on `be`.
    pub fn from_source(
        be: B,
        (unet, text_encoder, vae): (UnetConfig, TextEncoderConfig, VaeConfig),
        src: &dyn WeightSource,
    ) -> Result<Placed<B>> {
        Ok(Placed {
            unet: Lazy::ready(Unet::load_on(be.clone(), unet, src)?),
            text_encoder: Lazy::ready(TextEncoder::load_on(be.clone(), text_encoder, src)?),
            vae: Lazy::ready(Vae::load_on(be.clone(), vae, src)?),
            model: None,
            be,
        })
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Where it runs and in which type, for logs: `cpu f32`, `cuda:0 (NVIDIA H100) f16`.
    pub fn describe(&self) -> String {
        self.be.describe()
    }

    /// Builds `what` from the model, logging how long it took.
    fn build<T>(&self, what: &str, f: impl FnOnce(B, &Model) -> Result<T>) -> Result<T> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("{what} was neither given nor can be read")))?;
        let t = std::time::Instant::now();
        let v = f(self.be.clone(), model)?;
        log::info!(
            "built {what} on {} in {:.2} s",
            self.be.describe(),
            t.elapsed().as_secs_f64()
        );
        Ok(v)
    }

    /// The UNet, built (and shape-checked) on the first call.
    pub fn unet(&self) -> Result<Arc<Unet<B>>> {
        self.unet.get_or_try("the UNet", || {
            self.build("the UNet", |be, m| Unet::from_model_on(be, m))
        })
    }

    pub fn text_encoder(&self) -> Result<Arc<TextEncoder<B>>> {
        self.text_encoder.get_or_try("the text encoder", || {
            self.build("the text encoder", |be, m| {
                TextEncoder::from_model_on(be, m)
            })
        })
    }

    pub fn vae(&self) -> Result<Arc<Vae<B>>> {
        self.vae.get_or_try("the VAE", || {
            self.build("the VAE", |be, m| Vae::from_model_on(be, m))
        })
    }

    /// The adaptable layers of the components that were built, or of the model's weights.
    pub fn adaptable_layers(&self) -> LayerTable {
        if let Some(m) = &self.model {
            return m.adaptable_layers();
        }
        let mut t = self
            .unet
            .get()
            .map(|u| u.adaptable_layers())
            .unwrap_or_default();
        if let Some(te) = self.text_encoder.get() {
            t.extend(te.adaptable_layers());
        }
        t
    }
}

/// A hypernetwork on a runtime's device. Only the device's copy of the weights is built.
#[derive(Debug)]
pub enum PlacedHypernet {
    Cpu(Box<Hypernet<Cpu>>),
    /// On a GPU in f32.
    #[cfg(feature = "cuda")]
    Cuda(Box<Hypernet<crate::backend::cuda::Cuda<f32>>>),
    /// On a GPU in f16 storage, f32 accumulation.
    #[cfg(feature = "cuda")]
    CudaF16(Box<Hypernet<crate::backend::cuda::Cuda<half::f16>>>),
    /// On a GPU in bf16 storage, f32 accumulation.
    #[cfg(feature = "cuda")]
    CudaBf16(Box<Hypernet<crate::backend::cuda::Cuda<half::bf16>>>),
}

/// `$body` with `$n` bound to the network, whichever backend it is on.
macro_rules! on_net {
    ($self:expr, $n:ident => $body:expr) => {
        match $self {
            PlacedHypernet::Cpu($n) => $body,
            #[cfg(feature = "cuda")]
            PlacedHypernet::Cuda($n) => $body,
            #[cfg(feature = "cuda")]
            PlacedHypernet::CudaF16($n) => $body,
            #[cfg(feature = "cuda")]
            PlacedHypernet::CudaBf16($n) => $body,
        }
    };
}

impl PlacedHypernet {
    /// The hypernetwork file at `path` on `rt`'s device: on a GPU in the file's storage type
    /// (the dtype holding most of its parameters), on the CPU in f32.
    pub fn load(rt: &Runtime, path: &std::path::Path) -> Result<PlacedHypernet> {
        let (config, store) = crate::hypernet::read(path)?;
        let dtype = store.main_dtype().unwrap_or(crate::tensor::DType::F32);
        Self::from_source_as(rt, config, &store, dtype)
    }

    /// A hypernetwork of `config` from `src` (random weights in benchmarks and the demo) on
    /// `rt`'s device, in f32.
    pub fn from_source(
        rt: &Runtime,
        config: HypernetConfig,
        src: &(dyn WeightSource + Sync),
    ) -> Result<PlacedHypernet> {
        Self::from_source_as(rt, config, src, crate::tensor::DType::F32)
    }

    /// As [`PlacedHypernet::from_source`], stored in `dtype` on a GPU (the CPU computes and
    /// stores f32 whatever `dtype` says).
    pub fn from_source_as(
        rt: &Runtime,
        config: HypernetConfig,
        src: &(dyn WeightSource + Sync),
        dtype: crate::tensor::DType,
    ) -> Result<PlacedHypernet> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = rt.cuda() {
            use crate::backend::cuda::Cuda;
            use crate::tensor::DType;
            return Ok(match dtype {
                DType::F32 => PlacedHypernet::Cuda(Box::new(Hypernet::from_source_on(
                    Cuda::<f32>::new(dev.clone()),
                    config,
                    src,
                )?)),
                DType::F16 => PlacedHypernet::CudaF16(Box::new(Hypernet::from_source_on(
                    Cuda::<half::f16>::new(dev.clone()),
                    config,
                    src,
                )?)),
                DType::BF16 => PlacedHypernet::CudaBf16(Box::new(Hypernet::from_source_on(
                    Cuda::<half::bf16>::new(dev.clone()),
                    config,
                    src,
                )?)),
            });
        }
        let _ = dtype;
        rt.install(|| Hypernet::from_source(config, src))
            .map(|n| PlacedHypernet::Cpu(Box::new(n)))
    }

    pub fn config(&self) -> &HypernetConfig {
        on_net!(self, n => &n.config)
    }

    /// As [`Hypernet::preprocess`].
    pub fn preprocess(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Vec<f32>> {
        on_net!(self, n => n.preprocess(rgb, width, height, stride))
    }

    /// As [`Hypernet::predict`] (run it in the runtime's `install` for the CPU's threads).
    pub fn predict(
        &self,
        image: &[f32],
        iterations: Option<usize>,
        progress: Option<Progress<'_>>,
    ) -> Result<Vec<f32>> {
        on_net!(self, n => n.predict(image, iterations, progress))
    }

    /// As [`Hypernet::to_lidb`].
    pub fn to_lidb(&self, theta: &[f32]) -> Result<crate::adapter::lidb::Lidb> {
        on_net!(self, n => n.to_lidb(theta))
    }

    /// As [`Hypernet::check_layers`].
    pub fn check_layers(&self, table: &LayerTable) -> Result<()> {
        on_net!(self, n => n.check_layers(table))
    }

    /// Where it runs and in which storage type, for logs: `cpu f32`, `cuda:0 (...) f16`.
    pub fn describe(&self) -> String {
        on_net!(self, n => n.backend().describe())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn placed_objects_may_cross_threads() {
        // Models and runtimes are shared by every thread of a host (the C API's contract).
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::Placed<crate::backend::Cpu>>();
        send_sync::<super::PlacedHypernet>();
        #[cfg(feature = "cuda")]
        send_sync::<super::Placed<super::CudaHalf>>();
    }
}
