//! A session's identity adapters on a generic model over [`Cuda`] (`Unet<Cuda<T>>`,
//! `TextEncoder<Cuda<T>>`), keyed by adapter key, with the fused kernels: built from the same
//! resolved per-layer factors the CPU applies ([`Applied`] in runtime mode: per adapted
//! projection, each adapter's `down` [r, din] and `up` x scale [dout, r]).
//!
//! - Merge mode: the set owns merged copies of just the projections it touches, written in one
//!   `lidb_merge` launch from the model's own weights (the pristine base, never written), which
//!   [`AdapterHook::weight`] hands to the projection's GEMM.
//! - Runtime mode: every adapted projection gets a device table of [`Factor`]s, one per
//!   adapter of the set; after the projection's GEMM, `lora_bgmv` adds the update in place, one
//!   launch per projection with per-sample indices, else one per adapter that changes it. An
//!   adapted convolution (LoCon) holds each adapter's factors as conv weights instead: two
//!   conv2d (down with the layer's kernel, up 1x1) and an add per adapter, on every sample,
//!   or with per-sample indices on just the samples that carry it (gathered into one batch,
//!   the update added back at their offsets; no launch where no sample does).
//! - LoHa, LoKr and DoRA adapters apply in merge mode only (as on the CPU): their updates are
//!   full-rank or depend on the base weights, so each layer they touch is merged on the host
//!   by the CPU's own merge from the device base, downloaded, and its merged copy uploaded
//!   ([`CudaLayerAdapters::merged_with_host`]); the set's other layers take `lidb_merge`.
//!
//! [`CudaLayerAdapters`] is the set (build it when the set changes); [`LayerAdaptersCtx`] is
//! the set with one evaluation's per-sample indices uploaded: the hook the model runs with.
//!
//! The kernels' limits are checked when the set is built, naming the layer: a layer's total
//! rank above `MERGE_MAX_RANK` in merge mode, an adapter's rank above `LORA_MAX_RANK` in
//! runtime mode. Building allocates, uploads and launches before it returns, and changes
//! nothing else, so a failure leaves the caller's previous set intact. Checked against the CPU
//! on an H100 (tests/cuda_models.rs, tests/cuda_unet/session.rs; docs/perf.md); per-sample
//! LoCon and the host merge so far on the emulated GPU only (tests/cuda_unet/adapters.rs).

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::apply::{merge_layer, validate_per_sample, Applied, ApplyMode, LayerApply};
use super::set::SetBackend;
use super::Adapter;
use crate::backend::api::AdapterHook;
use crate::backend::cuda::ops::{self, At, BgmvShape, BlasElem, Factor, MergeLayer};
use crate::backend::cuda::{Cuda, CudaDevice};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::Adaptable;

/// `lidb_merge`'s limit on the summed rank of one layer's factors (`MERGE_MAX_RANK`, lidb.cu).
const MERGE_MAX_RANK: usize = 256;
/// `lora_bgmv`'s limit on one adapter's rank (`LORA_MAX_RANK`, lora.cu).
const LORA_MAX_RANK: usize = 128;

/// Factor segments in the packed upload start on 32-byte boundaries (8 f32), so the kernels'
/// 16-byte vector loads apply.
const ALIGN: usize = 8;

/// Checks every layer's ranks against the kernels' limits (merge: the layer's total rank;
/// runtime: each adapter's rank). `resolved` holds runtime factors.
fn check_ranks(resolved: &Applied, mode: ApplyMode) -> Result<()> {
    for (key, la) in &resolved.layers {
        match mode {
            ApplyMode::Merge => {
                let total: usize = la.runtime.iter().map(|f| f.3).sum();
                if total > MERGE_MAX_RANK {
                    return Err(Error::Unsupported(format!(
                        "layer '{key}': the adapters' ranks add up to {total}, above the CUDA \
                         merge kernel's limit of {MERGE_MAX_RANK} per layer (merge fewer \
                         adapters at once)"
                    )));
                }
            }
            ApplyMode::Runtime => {
                if let Some((i, _, _, r)) = la.runtime.iter().find(|f| f.3 > LORA_MAX_RANK) {
                    return Err(Error::Unsupported(format!(
                        "layer '{key}': adapter #{i} has rank {r}, above the CUDA runtime-mode \
                         kernel's limit of {LORA_MAX_RANK} (use merge mode)"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The index of `present` (the adapters that change a projection) in `masks`, added if new.
fn mask_of(masks: &mut Vec<Vec<usize>>, present: &[usize]) -> usize {
    match masks.iter().position(|m| m == present) {
        Some(m) => m,
        None => {
            masks.push(present.to_vec());
            masks.len() - 1
        }
    }
}

/// Per-sample runtime mode: for each mask, the samples' adapter indices with the adapters
/// outside the mask set to -1, uploaded; None where no sample uses an adapter of the mask
/// (that projection needs no launch).
fn per_mask_indices(
    dev: &CudaDevice,
    masks: &[Vec<usize>],
    idx: &[i32],
) -> Result<Vec<Option<CudaSlice<i32>>>> {
    masks
        .iter()
        .map(|present| {
            let v: Vec<i32> = idx
                .iter()
                .map(|&a| {
                    if a >= 0 && present.contains(&(a as usize)) {
                        a
                    } else {
                        -1
                    }
                })
                .collect();
            if v.iter().all(|&a| a < 0) {
                Ok(None)
            } else {
                dev.upload(&v).map(Some)
            }
        })
        .collect()
}

/// The samples whose index in `idx` is `adapter`, as runs of consecutive ones (first sample,
/// count): a convolution adapter gathers and scatters them a run per copy.
fn sample_runs(idx: &[i32], adapter: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (s, _) in idx
        .iter()
        .enumerate()
        .filter(|(_, &a)| i64::from(a) == adapter as i64)
    {
        match runs.last_mut() {
            Some((first, len)) if *first + *len == s => *len += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

/// Runtime mode: one projection's factors.
struct Lora {
    /// One entry per adapter of the set; rank 0 where the adapter leaves the projection alone.
    table: CudaSlice<Factor>,
    /// The adapters that change this projection, in set order.
    present: Vec<usize>,
    /// Index of `present` in [`CudaLayerAdapters::masks`].
    mask: usize,
}

/// One adapted projection's share of the set.
struct Layer<T> {
    din: usize,
    dout: usize,
    merged: Option<CudaSlice<T>>,
    lora: Option<Lora>,
    /// Runtime mode on a convolution: per adapter, (its index, down `[r, in, k, k]`, up
    /// `[out, r, 1, 1]` x scale) on the device.
    conv: Vec<(usize, CudaSlice<T>, CudaSlice<T>)>,
}

/// A session's adapter set on one generic model over [`Cuda`]. Immutable once built.
pub struct CudaLayerAdapters<T: BlasElem> {
    dev: Arc<CudaDevice>,
    mode: ApplyMode,
    count: usize,
    layers: BTreeMap<String, Layer<T>>,
    /// Runtime mode: `[i]` for adapter i, the index array of a launch that applies adapter i
    /// to every row.
    whole: Vec<CudaSlice<i32>>,
    /// Runtime mode: the distinct sets of adapters present in a projection.
    masks: Vec<Vec<usize>>,
    /// Runtime mode: every factor of the set, packed (the tables point into it).
    _factors: Option<CudaSlice<f32>>,
}

impl<T: BlasElem> std::fmt::Debug for CudaLayerAdapters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLayerAdapters")
            .field("dtype", &T::SUFFIX)
            .field("mode", &self.mode)
            .field("count", &self.count)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl<T: BlasElem> CudaLayerAdapters<T> {
    /// Builds `resolved` (resolved in runtime mode, which keeps the factors: see
    /// [`Applied::new`]) on `model`'s device, applied in `mode`. Errors name the layer.
    pub fn new(
        be: &Cuda<T>,
        model: &dyn Adaptable<Cuda<T>>,
        resolved: &Applied,
        mode: ApplyMode,
    ) -> Result<Self> {
        if resolved.mode != ApplyMode::Runtime {
            return Err(Error::Internal(
                "CUDA adapters are built from a set resolved in runtime mode (with factors)".into(),
            ));
        }
        check_ranks(resolved, mode)?;
        // Convolutions (LoCon) in runtime mode run their factors as two convolutions (down with
        // the layer's kernel, up 1x1) on the backend's conv2d: lora_bgmv is a per-row GEMV.
        let table = model.adaptable_layers();
        let is_conv = |k: &str| {
            table
                .get(k)
                .is_some_and(|s| s.kind != crate::model::LayerKind::Linear)
        };
        let dev = be.dev();
        dev.bind_to_thread()?;
        let count = resolved.count;

        // Every adapted projection's factors, packed: key -> (adapter, down, up, rank) offsets.
        let mut packed: Vec<f32> = Vec::new();
        let mut push = |v: &[f32]| {
            let off = packed.len();
            packed.extend_from_slice(v);
            packed.resize(packed.len().next_multiple_of(ALIGN), 0.0);
            off
        };
        type Located<'m, T> = (
            &'m CudaSlice<T>,
            usize,
            usize,
            Vec<(usize, usize, usize, usize)>,
        );
        let mut located: BTreeMap<&str, Located<'_, T>> = BTreeMap::new();
        for (key, la) in &resolved.layers {
            if la.runtime.is_empty() {
                continue;
            }
            let (w, dout, din) = model.projection(key).ok_or_else(|| {
                Error::AdapterMismatch(format!("layer '{key}' is not a projection of this model"))
            })?;
            let mut factors = Vec::with_capacity(la.runtime.len());
            for (i, down, up, r) in &la.runtime {
                if *i >= count || *r == 0 || down.len() != r * din || up.len() != dout * r {
                    return Err(Error::Internal(format!(
                        "layer '{key}': factors of adapter #{i} (rank {r}, {} and {} values) do \
                         not fit [{dout}, {din}]",
                        down.len(),
                        up.len()
                    )));
                }
                factors.push((*i, push(down), push(up), *r));
            }
            located.insert(key, (w, dout, din, factors));
        }
        let packed_dev = if packed.is_empty() {
            None
        } else {
            Some(dev.upload(&packed)?)
        };
        let base = packed_dev.as_ref().map_or(0, |b| dev.ptr(b));
        let at = |off: usize| base + (off * std::mem::size_of::<f32>()) as u64;
        let factor = |&(_, d, u, r): &(usize, usize, usize, usize)| Factor {
            down: at(d),
            up: at(u),
            rank: r as i32,
            scale: 1.0, // the user scale is folded into `up`
        };

        let mut layers = BTreeMap::new();
        let mut whole = Vec::new();
        let mut masks: Vec<Vec<usize>> = Vec::new();
        let mut keep_factors = None;
        match mode {
            ApplyMode::Runtime => {
                for (key, (_, dout, din, factors)) in &located {
                    if is_conv(key) {
                        let la = &resolved.layers[*key];
                        let conv = la
                            .runtime
                            .iter()
                            .map(|(i, down, up, _)| {
                                let w =
                                    |v: &[f32]| be.weight(crate::io::F32Weight::Owned(v.to_vec()));
                                Ok((*i, w(down)?, w(up)?))
                            })
                            .collect::<Result<_>>()?;
                        layers.insert(
                            key.to_string(),
                            Layer {
                                din: *din,
                                dout: *dout,
                                merged: None,
                                lora: None,
                                conv,
                            },
                        );
                        continue;
                    }
                    let mut table = vec![Factor::default(); count.max(1)];
                    let mut present: Vec<usize> = factors.iter().map(|f| f.0).collect();
                    for f in factors {
                        table[f.0] = factor(f);
                    }
                    present.sort_unstable();
                    present.dedup();
                    if present.len() != factors.len() {
                        return Err(Error::Internal(format!(
                            "layer '{key}': an adapter appears twice"
                        )));
                    }
                    let mask = mask_of(&mut masks, &present);
                    let lora = Lora {
                        table: dev.upload(&table)?,
                        present,
                        mask,
                    };
                    layers.insert(
                        key.to_string(),
                        Layer {
                            din: *din,
                            dout: *dout,
                            merged: None,
                            lora: Some(lora),
                            conv: Vec::new(),
                        },
                    );
                }
                whole = (0..count)
                    .map(|i| dev.upload(&[i as i32]))
                    .collect::<Result<_>>()?;
                keep_factors = packed_dev;
            }
            ApplyMode::Merge => {
                let mut table: Vec<MergeLayer> = Vec::new();
                let mut flat: Vec<Factor> = Vec::new();
                let mut max_dout = 0;
                for (key, (w, dout, din, factors)) in &located {
                    let copy: CudaSlice<T> = dev.alloc(w.len())?;
                    let first = flat.len();
                    flat.extend(factors.iter().map(factor));
                    table.push(MergeLayer {
                        w_base: dev.ptr(*w),
                        w: dev.ptr(&copy),
                        dout: *dout as i64,
                        din: *din as i64,
                        first_factor: first as i32,
                        n_factors: (flat.len() - first) as i32,
                    });
                    max_dout = max_dout.max(*dout);
                    layers.insert(
                        key.to_string(),
                        Layer {
                            din: *din,
                            dout: *dout,
                            merged: Some(copy),
                            lora: None,
                            conv: Vec::new(),
                        },
                    );
                }
                if !table.is_empty() {
                    let lt = dev.upload(&table)?;
                    let ft = dev.upload(&flat)?;
                    ops::lidb_merge::<T>(dev, &lt, table.len(), max_dout, &ft)?;
                    // The tables and the packed factors are freed in stream order, after the
                    // merge has read them.
                }
            }
        }
        Ok(CudaLayerAdapters {
            dev: dev.clone(),
            mode,
            count,
            layers,
            whole,
            masks,
            _factors: keep_factors,
        })
    }

    /// A merge-mode set: the layers of `host` (factors as [`Applied::resolve_factors`] gives
    /// them) merged on the host by the CPU's own [`merge_layer`] from the model's device base
    /// (downloaded to f32), the others (`device`: low-rank factors in runtime form, as
    /// [`CudaLayerAdapters::new`] takes them) by `lidb_merge`. For LoHa, LoKr and DoRA layers:
    /// the first two are full-rank (no low-rank product for the kernel), the last depends on
    /// the base weights' norms. Errors name the layer.
    pub fn merged_with_host(
        be: &Cuda<T>,
        model: &dyn Adaptable<Cuda<T>>,
        device: &Applied,
        host: &BTreeMap<String, LayerApply>,
    ) -> Result<Self> {
        let mut set = Self::new(be, model, device, ApplyMode::Merge)?;
        let dev = be.dev();
        for (key, la) in host {
            let (w, dout, din) = model.projection(key).ok_or_else(|| {
                Error::AdapterMismatch(format!("layer '{key}' is not a projection of this model"))
            })?;
            if w.len() != dout * din || set.layers.contains_key(key) {
                return Err(Error::Internal(format!(
                    "layer '{key}': a base of {} values for [{dout}, {din}], or merged twice",
                    w.len()
                )));
            }
            let base = dev.download_f32(w, w.len())?;
            let mut merged = vec![0f32; base.len()];
            merge_layer(&mut merged, &base, la, dout, din);
            let layer = Layer {
                din,
                dout,
                merged: Some(dev.upload_f32(&merged)?),
                lora: None,
                conv: Vec::new(),
            };
            set.layers.insert(key.clone(), layer);
        }
        Ok(set)
    }

    pub fn mode(&self) -> ApplyMode {
        self.mode
    }

    /// Adapters in the set.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Projections the set changes.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// The set with per-sample adapter indices (runtime mode; -1 = none) for one evaluation
    /// of a batch of `per_sample.len()` samples: the hook the model runs with.
    pub fn with_samples<'a>(
        &'a self,
        per_sample: Option<&'a [i32]>,
    ) -> Result<LayerAdaptersCtx<'a, T>> {
        if let Some(idx) = per_sample {
            validate_per_sample(self.mode, self.count, Some(idx), idx.len())?;
        }
        let per_mask = per_sample
            .map(|idx| per_mask_indices(&self.dev, &self.masks, idx))
            .transpose()?;
        Ok(LayerAdaptersCtx {
            set: self,
            per_sample,
            per_mask,
        })
    }
}

/// A [`CudaLayerAdapters`] set prepared for one evaluation.
pub struct LayerAdaptersCtx<'a, T: BlasElem> {
    set: &'a CudaLayerAdapters<T>,
    per_sample: Option<&'a [i32]>,
    /// Per-sample runtime mode: by mask, the samples' indices with the adapters outside the
    /// mask set to -1; None where no sample uses an adapter of the mask (no launch).
    per_mask: Option<Vec<Option<CudaSlice<i32>>>>,
}

impl<T: BlasElem> AdapterHook<Cuda<T>> for LayerAdaptersCtx<'_, T> {
    fn validate(&self, batch: usize) -> Result<()> {
        validate_per_sample(self.set.mode, self.set.count, self.per_sample, batch)
    }

    /// t = conv(x, down) with the layer's kernel, stride and padding, then y += conv1x1(t, up),
    /// per adapter: on every sample, or with per-sample indices on the samples that carry it,
    /// gathered into one batch (no launch where none does).
    fn add_conv(
        &self,
        be: &Cuda<T>,
        key: &str,
        y: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        p: &crate::backend::Conv2d,
    ) -> Result<()> {
        let Some(layer) = self.set.layers.get(key).filter(|l| !l.conv.is_empty()) else {
            return Ok(());
        };
        let kk = p.c_in * p.kernel * p.kernel;
        let (ho, wo) = p.out_hw();
        let (n_in, n_out) = (p.c_in * p.h * p.w, p.c_out * ho * wo);
        if !Arc::ptr_eq(be.dev(), &self.set.dev)
            || x.len() != p.batch * n_in
            || y.len() != p.batch * n_out
            || self.per_sample.is_some_and(|idx| idx.len() != p.batch)
        {
            return Err(Error::Internal(format!(
                "adapter '{key}': a convolution set on another device, or {} inputs and {} \
                 outputs (with {:?} sample indices) that do not fit {p:?}",
                x.len(),
                y.len(),
                self.per_sample.map(<[i32]>::len)
            )));
        }
        let dev = &self.set.dev;
        for (i, down, up) in &layer.conv {
            let r = down.len() / kk.max(1);
            if r == 0 || r * kk != down.len() || up.len() != p.c_out * r {
                return Err(Error::Internal(format!(
                    "adapter '{key}': factors of adapter #{i} do not fit {p:?}"
                )));
            }
            let runs = match self.per_sample {
                Some(idx) => sample_runs(idx, *i),
                None => vec![(0, p.batch)],
            };
            let n: usize = runs.iter().map(|run| run.1).sum();
            if n == 0 {
                continue;
            }
            let every = n == p.batch;
            // The adapter's samples, in order, as one batch of n (x itself where it is all).
            let gathered;
            let xs = if every {
                x
            } else {
                let mut g = dev.alloc::<T>(n * n_in)?;
                let mut j = 0;
                for &(s, len) in &runs {
                    ops::copy(dev, &mut g, j * n_in, x, s * n_in, len * n_in)?;
                    j += len;
                }
                gathered = g;
                &gathered
            };
            let (down_dims, up_dims) = p.locon(n, r);
            let t = be.conv2d(xs, down, None, &down_dims)?;
            let u = be.conv2d(&t, up, None, &up_dims)?;
            if every {
                be.add_inplace(y, &u)?;
            } else {
                let mut j = 0;
                for &(s, len) in &runs {
                    ops::add_inplace_at(dev, y, s * n_out, &u, j * n_out, len * n_out)?;
                    j += len;
                }
            }
        }
        Ok(())
    }

    fn weight(&self, key: &str) -> Option<&CudaSlice<T>> {
        self.set.layers.get(key).and_then(|l| l.merged.as_ref())
    }

    fn add(
        &self,
        be: &Cuda<T>,
        key: &str,
        y: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let Some(layer) = self.set.layers.get(key) else {
            return Ok(());
        };
        let Some(l) = &layer.lora else {
            return Ok(());
        };
        if !Arc::ptr_eq(be.dev(), &self.set.dev) {
            return Err(Error::Internal(format!(
                "adapter '{key}': the adapters were built on another device"
            )));
        }
        let rows = x.len() / din.max(1);
        if (din, dout) != (layer.din, layer.dout)
            || x.len() != rows * din
            || y.len() != rows * dout
            || batch == 0
            || !rows.is_multiple_of(batch)
        {
            return Err(Error::Internal(format!(
                "adapter '{key}': {} inputs and {} outputs in {batch} samples do not fit \
                 [{}] -> [{}]",
                x.len(),
                y.len(),
                layer.din,
                layer.dout
            )));
        }
        let dev = &self.set.dev;
        let n = self.set.count;
        let shape = |rows_per_sample: usize| BgmvShape {
            rows,
            rows_per_sample,
            din,
            dout,
            ld_x: din,
            ld_y: dout,
        };
        let (ya, xa) = (At::from(&*y), At::from(x));
        match &self.per_mask {
            Some(per_mask) => match per_mask.get(l.mask) {
                Some(Some(idx)) => {
                    ops::lora_bgmv(dev, ya, xa, idx, &l.table, n, shape(rows / batch))
                }
                _ => Ok(()),
            },
            // Every adapter on every sample: one launch per adapter, all rows reading index i.
            None => l.present.iter().try_for_each(|&i| {
                ops::lora_bgmv(dev, ya, xa, &self.set.whole[i], &l.table, n, shape(rows))
            }),
        }
    }
}

impl<T: BlasElem> SetBackend for Cuda<T> {
    type Set = CudaLayerAdapters<T>;

    /// Resolved against the model's own projections (dims only: no host copy of its weights is
    /// needed) and built on its device; `previous` is not reused (a device set is rebuilt).
    fn build_set(
        &self,
        target: &dyn Adaptable<Cuda<T>>,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
        _previous: Option<&mut CudaLayerAdapters<T>>,
    ) -> Result<CudaLayerAdapters<T>> {
        // Full-rank (LoHa, LoKr) and DoRA updates merge on the host, layer by layer: the
        // device merge adds low-rank products, and DoRA needs the base weights' norms.
        let on_host = |i: usize| {
            set.get(i).is_some_and(|(a, _)| {
                matches!(
                    a.source,
                    super::AdapterSource::MergeOnly(_) | super::AdapterSource::Dora { .. }
                )
            })
        };
        if let Some(i) = (0..set.len()).find(|&i| on_host(i)) {
            if mode == ApplyMode::Runtime {
                // (AdapterSet::build refuses these first, with the CPU's words)
                return Err(Error::Unsupported(format!(
                    "adapter #{i} is a LoHa, LoKr or DoRA adapter: merge mode only"
                )));
            }
            let factors = Applied::resolve_factors(set, target)?;
            let (host, device): (BTreeMap<_, _>, BTreeMap<_, _>) = factors
                .layers
                .into_iter()
                .partition(|(_, la)| la.runtime.iter().any(|f| on_host(f.0)));
            // The other layers' factors are the runtime form (`up` x scale) the kernels take.
            let device = Applied {
                mode: ApplyMode::Runtime,
                count: factors.count,
                layers: device,
            };
            let built = CudaLayerAdapters::merged_with_host(self, target, &device, &host)?;
            log::debug!(
                "{} adapter(s) on {} projections of {} merged ({} on the host)",
                built.count(),
                built.layers(),
                self.describe(),
                host.len()
            );
            return Ok(built);
        }
        let resolved = Applied::new(set, ApplyMode::Runtime, target)?;
        let built = CudaLayerAdapters::new(self, target, &resolved, mode)?;
        log::debug!(
            "{} adapter(s) on {} projections of {} in {mode:?} mode",
            built.count(),
            built.layers(),
            self.describe()
        );
        Ok(built)
    }

    fn set_mode(set: &CudaLayerAdapters<T>) -> ApplyMode {
        set.mode()
    }

    fn set_count(set: &CudaLayerAdapters<T>) -> usize {
        set.count()
    }

    fn with_hook<R>(
        set: &CudaLayerAdapters<T>,
        per_sample: Option<&[i32]>,
        f: impl FnOnce(&dyn AdapterHook<Cuda<T>>) -> Result<R>,
    ) -> Result<R> {
        f(&set.with_samples(per_sample)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::apply::LayerApply;

    fn applied(ranks: &[&[usize]]) -> Applied {
        let layers = ranks
            .iter()
            .enumerate()
            .map(|(j, rs)| {
                let runtime = rs
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| (i, vec![0.0; r * 4], vec![0.0; 4 * r], r))
                    .collect();
                (
                    format!("unet.layer{j}.to_q"),
                    LayerApply {
                        merged: None,
                        runtime,
                        magnitudes: Vec::new(),
                    },
                )
            })
            .collect();
        Applied {
            mode: ApplyMode::Runtime,
            count: ranks.iter().map(|r| r.len()).max().unwrap_or(0),
            layers,
        }
    }

    #[test]
    fn ranks_above_the_kernels_limits_are_unsupported_naming_the_layer() {
        let ok = applied(&[&[128, 128], &[1]]);
        check_ranks(&ok, ApplyMode::Merge).expect("256 in all merges");
        check_ranks(&ok, ApplyMode::Runtime).expect("128 each runs");

        let e = check_ranks(&applied(&[&[1], &[200, 57]]), ApplyMode::Merge).expect_err("257");
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("unet.layer1.to_q") && m.contains("257")),
            "{e}"
        );
        let e = check_ranks(&applied(&[&[4, 129]]), ApplyMode::Runtime).expect_err("129");
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("unet.layer0.to_q")
                && m.contains("adapter #1") && m.contains("129")),
            "{e}"
        );
        check_ranks(&applied(&[&[4, 129]]), ApplyMode::Merge).expect("129 merges");
    }

    #[test]
    fn a_convolution_adapter_runs_on_its_samples_in_runs_of_consecutive_ones() {
        let idx = [0, 0, -1, 1, 0, 0, 0, 1];
        assert_eq!(sample_runs(&idx, 0), vec![(0, 2), (4, 3)]);
        assert_eq!(sample_runs(&idx, 1), vec![(3, 1), (7, 1)]);
        assert_eq!(sample_runs(&idx, 2), Vec::new());
        assert_eq!(sample_runs(&[-1, -1], 0), Vec::new());
        assert_eq!(sample_runs(&[3, 3, 3], 3), vec![(0, 3)]);
    }
}
