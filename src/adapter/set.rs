//! A session's adapter set as one model component on one backend runs it: built once when the
//! session's adapters change, typed by the backend and the component it was built for, so a set
//! built for the text encoder cannot be handed to the UNet, nor a CPU set to a model on a GPU.
//!
//! Each backend says what a set is there ([`SetBackend`]): on the CPU an [`Applied`] (merged
//! f32 copies of the touched projections, or the factors for runtime mode); on CUDA a
//! `CudaLayerAdapters` (`crate::adapter::cuda`: merged copies written by `lidb_merge`, or
//! factor tables for `lora_bgmv`). [`AdapterSet`] wraps one with the component it belongs to.

use std::marker::PhantomData;

use super::apply::{validate_per_sample, AdapterCtx, Applied, ApplyMode};
use super::Adapter;
use crate::backend::{AdapterHook, Backend, Cpu};
use crate::error::Result;
use crate::model::Adaptable;

/// A backend adapter sets are built on.
pub trait SetBackend: Backend {
    /// A set on this backend, for one model component.
    type Set: Send + Sync + std::fmt::Debug;

    /// Builds `set` (each adapter with its scale) against `target`'s projections in `mode`,
    /// reusing the memory of `previous` (the set it replaces) where the backend can. Layers of
    /// other components are skipped. On error `previous` is unchanged.
    fn build_set(
        &self,
        target: &dyn Adaptable<Self>,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
        previous: Option<&mut Self::Set>,
    ) -> Result<Self::Set>;

    fn set_mode(set: &Self::Set) -> ApplyMode;

    /// Adapters in the set.
    fn set_count(set: &Self::Set) -> usize;

    /// Runs `f` with `set`, and per-sample adapter indices for one evaluation (runtime mode;
    /// -1 = none), as the hook the model's projections call.
    fn with_hook<R>(
        set: &Self::Set,
        per_sample: Option<&[i32]>,
        f: impl FnOnce(&dyn AdapterHook<Self>) -> Result<R>,
    ) -> Result<R>;
}

impl SetBackend for Cpu {
    type Set = Applied;

    fn build_set(
        &self,
        target: &dyn Adaptable<Cpu>,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
        previous: Option<&mut Applied>,
    ) -> Result<Applied> {
        Applied::replacing(previous, set, mode, target)
    }

    fn set_mode(set: &Applied) -> ApplyMode {
        set.mode
    }

    fn set_count(set: &Applied) -> usize {
        set.count
    }

    fn with_hook<R>(
        set: &Applied,
        per_sample: Option<&[i32]>,
        f: impl FnOnce(&dyn AdapterHook<Cpu>) -> Result<R>,
    ) -> Result<R> {
        f(&AdapterCtx {
            applied: set,
            per_sample,
        })
    }
}

/// A set built for model component `M` (`Unet<B>`, `TextEncoder<B>`) on backend `B`.
pub struct AdapterSet<B: SetBackend, M: ?Sized> {
    set: B::Set,
    _for: PhantomData<fn(&M)>,
}

impl<B: SetBackend, M: ?Sized> std::fmt::Debug for AdapterSet<B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterSet")
            .field("model", &std::any::type_name::<M>())
            .field("set", &self.set)
            .finish()
    }
}

impl<B: SetBackend, M: Adaptable<B>> AdapterSet<B, M> {
    /// `set` built against `model` (on backend `be`) in `mode`, reusing `previous`'s memory;
    /// `None` when the set changes none of `model`'s layers. On error `previous` is unchanged.
    pub fn build(
        be: &B,
        model: &M,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
        previous: Option<&mut Self>,
    ) -> Result<Option<Self>> {
        let prefix = model.key_prefix();
        let touches = set
            .iter()
            .any(|(a, _)| a.layers.keys().any(|k| k.starts_with(prefix)));
        // Scales are checked whether or not this component is touched, so both components
        // refuse the same set.
        if let Some((i, (_, s))) = set.iter().enumerate().find(|(_, (_, s))| !s.is_finite()) {
            return Err(crate::Error::invalid_arg(
                "scales",
                format!("scale #{i} is {s}"),
            ));
        }
        if mode == ApplyMode::Runtime {
            if let Some((i, layout)) =
                set.iter()
                    .enumerate()
                    .find_map(|(i, (a, _))| match a.source {
                        super::AdapterSource::MergeOnly(l) => Some((i, l)),
                        super::AdapterSource::Dora { layout, .. } => Some((i, layout)),
                        _ => None,
                    })
            {
                return Err(crate::Error::Unsupported(format!(
                    "adapter #{i} is a {layout} adapter: its updates are full matrices, applied in \
                     merge mode only (runtime mode runs low-rank LoRA and LiDB adapters)"
                )));
            }
        }
        if !touches {
            return Ok(None);
        }
        let built = be.build_set(model, set, mode, previous.map(|p| &mut p.set))?;
        Ok(Some(AdapterSet {
            set: built,
            _for: PhantomData,
        }))
    }
}

impl<B: SetBackend, M: ?Sized> AdapterSet<B, M> {
    pub fn mode(&self) -> ApplyMode {
        B::set_mode(&self.set)
    }

    /// Adapters in the set (per-sample indices refer to them).
    pub fn count(&self) -> usize {
        B::set_count(&self.set)
    }

    /// The backend's own form of the set.
    pub fn inner(&self) -> &B::Set {
        &self.set
    }

    /// Checks per-sample indices against a batch, as every evaluation does.
    pub fn validate(&self, per_sample: Option<&[i32]>, batch: usize) -> Result<()> {
        validate_per_sample(self.mode(), self.count(), per_sample, batch)
    }

    /// Runs `f` with this set (and `per_sample`) as the hook of `M`'s projections.
    pub fn with_hook<R>(
        &self,
        per_sample: Option<&[i32]>,
        f: impl FnOnce(&dyn AdapterHook<B>) -> Result<R>,
    ) -> Result<R> {
        B::with_hook(&self.set, per_sample, f)
    }
}
