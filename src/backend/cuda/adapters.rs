//! A session's identity adapters on the CUDA UNet ([`super::unet::CudaUnet`]), built from the
//! same resolved per-layer factors the CPU applies ([`Applied`] in runtime mode: per adapted
//! projection, each adapter's `down` [r, din] and `up` x scale [dout, r]).
//!
//! - Merge mode: the session owns merged copies of just the weight buffers its adapters touch
//!   (an attention's stacked q/k/v or k/v buffer, cross-attention's to_q, to_out), written in
//!   one `lidb_merge` launch from the UNet's own weights, which no session ever writes: they
//!   are the pristine base, shared by every session of the model. A projection of a stacked
//!   buffer is a row range of it, so each projection is one [`MergeLayer`] pointing into the
//!   buffer; the buffer's other projections are layers with no factors, copied bit for bit.
//!   Removing the set drops the copies, and the shared weights run again exactly.
//! - Runtime mode: every adapted projection gets a device table of [`Factor`]s, one per adapter
//!   of the set (rank 0 where that adapter leaves the projection alone). After the projection's
//!   GEMM, `lora_bgmv` adds the update in place: with per-sample indices, one launch per
//!   projection (indices of adapters absent from it become -1); otherwise one launch per
//!   adapter that changes it, with every row reading that adapter's index.
//!
//! The kernels' limits are checked when the set is built, naming the layer: a layer's total
//! rank above `MERGE_MAX_RANK` in merge mode, an adapter's rank above `LORA_MAX_RANK` in
//! runtime mode. Building allocates, uploads and launches before it returns, and changes
//! nothing else, so a failure leaves the caller's previous set intact.

use std::collections::BTreeMap;

use cudarc::driver::CudaSlice;

use super::device::CudaDevice;
use super::ops::{self, At, BgmvShape, BlasElem, Factor, MergeLayer};
use super::unet::{Buf, CudaUnet, Place, Slot};
use crate::adapter::apply::{validate_per_sample, Applied, ApplyMode};
use crate::adapter::Adapter;
use crate::error::{Error, Result};

/// `lidb_merge`'s limit on the summed rank of one layer's factors (`MERGE_MAX_RANK`, lidb.cu).
pub(crate) const MERGE_MAX_RANK: usize = 256;
/// `lora_bgmv`'s limit on one adapter's rank (`LORA_MAX_RANK`, lora.cu).
pub(crate) const LORA_MAX_RANK: usize = 128;

/// Factor segments in the packed upload start on 32-byte boundaries (8 f32), so the kernels'
/// 16-byte vector loads apply.
pub(crate) const ALIGN: usize = 8;

/// Runtime mode: one projection's factors.
struct ProjLora {
    /// One entry per adapter of the set; rank 0 where the adapter leaves this projection alone.
    table: CudaSlice<Factor>,
    /// The adapters that change this projection, in set order.
    present: Vec<usize>,
    /// Index of `present` in [`CudaAdapters::masks`].
    mask: usize,
}

/// One attention layer's share of the set.
struct AttnState<T> {
    /// Merge mode: the session's merged copy of each buffer, by [`Buf`].
    merged: [Option<CudaSlice<T>>; 3],
    /// Runtime mode: each projection's factors, by [`Slot`].
    lora: [Option<ProjLora>; 4],
}

impl<T> AttnState<T> {
    fn empty() -> Self {
        AttnState {
            merged: [None, None, None],
            lora: [None, None, None, None],
        }
    }
}

/// A session's adapter set on one [`CudaUnet`]: merged weight copies (merge mode) or device
/// factor tables (runtime mode). Immutable once built; build a new one to change the set.
pub struct CudaAdapters<T: BlasElem> {
    mode: ApplyMode,
    count: usize,
    /// The [`CudaUnet`] it was built for.
    unet_uid: u64,
    /// By attention id.
    attn: Vec<AttnState<T>>,
    /// Adapted projections.
    layers: usize,
    /// Runtime mode: `[i]` for adapter i, the index array of a launch that applies adapter i
    /// to every row (rows_per_sample = rows).
    whole: Vec<CudaSlice<i32>>,
    /// Runtime mode: the distinct sets of adapters present in a projection.
    masks: Vec<Vec<usize>>,
    /// Runtime mode: every factor of the set, packed (the tables point into it).
    _factors: Option<CudaSlice<f32>>,
}

impl<T: BlasElem> std::fmt::Debug for CudaAdapters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaAdapters")
            .field("dtype", &T::SUFFIX)
            .field("mode", &self.mode)
            .field("count", &self.count)
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

/// Checks every layer's ranks against the kernels' limits (merge: the layer's total rank;
/// runtime: each adapter's rank). `resolved` holds runtime factors.
pub(crate) fn check_ranks(resolved: &Applied, mode: ApplyMode) -> Result<()> {
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
pub(crate) fn mask_of(masks: &mut Vec<Vec<usize>>, present: &[usize]) -> usize {
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
pub(crate) fn per_mask_indices(
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

/// One adapted projection, located in the UNet, with its factors' offsets in the packed
/// upload: (adapter index, down offset, up offset, rank).
struct Located {
    id: usize,
    slot: Slot,
    place: Place,
    factors: Vec<(usize, usize, usize, usize)>,
}

impl<T: BlasElem> CudaAdapters<T> {
    /// Resolves `set` (each adapter with its scale) against `unet`'s own projections (dims
    /// only: no host copy of the weights) and builds it on the device in `mode`.
    pub fn resolve(
        dev: &CudaDevice,
        unet: &CudaUnet<T>,
        set: &[(&Adapter, f32)],
        mode: ApplyMode,
    ) -> Result<Self> {
        let resolved = Applied::new(set, ApplyMode::Runtime, unet)?;
        Self::new(dev, unet, &resolved, mode)
    }

    /// Builds a set on the device from its host resolution in runtime mode (which keeps the
    /// factors), applied in `mode`.
    pub fn new(
        dev: &CudaDevice,
        unet: &CudaUnet<T>,
        resolved: &Applied,
        mode: ApplyMode,
    ) -> Result<Self> {
        if resolved.mode != ApplyMode::Runtime {
            return Err(Error::Internal(
                "CUDA adapters are built from a set resolved in runtime mode (with factors)".into(),
            ));
        }
        check_ranks(resolved, mode)?;
        dev.bind_to_thread()?;
        let count = resolved.count;
        let attns = unet.attentions();

        // Locate every adapted projection and pack its factors.
        let mut packed: Vec<f32> = Vec::new();
        let mut push = |v: &[f32]| {
            let off = packed.len();
            packed.extend_from_slice(v);
            packed.resize(packed.len().next_multiple_of(ALIGN), 0.0);
            off
        };
        let mut located = Vec::new();
        for (key, la) in &resolved.layers {
            if la.runtime.is_empty() {
                continue;
            }
            let (id, slot) = unet.adapter_slot(key).ok_or_else(|| {
                Error::AdapterMismatch(format!(
                    "layer '{key}' is not an attention projection of this UNet"
                ))
            })?;
            let place = attns[id].place(slot);
            let mut factors = Vec::with_capacity(la.runtime.len());
            for (i, down, up, r) in &la.runtime {
                if *i >= count
                    || down.len() != r * place.din
                    || up.len() != place.dout * r
                    || *r == 0
                {
                    return Err(Error::Internal(format!(
                        "layer '{key}': factors of adapter #{i} (rank {r}, {} and {} values) do \
                         not fit [{}, {}]",
                        down.len(),
                        up.len(),
                        place.dout,
                        place.din
                    )));
                }
                factors.push((*i, push(down), push(up), *r));
            }
            located.push(Located {
                id,
                slot,
                place,
                factors,
            });
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

        let mut attn: Vec<AttnState<T>> = (0..attns.len()).map(|_| AttnState::empty()).collect();
        let mut whole = Vec::new();
        let mut masks: Vec<Vec<usize>> = Vec::new();
        let mut keep_factors = None;
        match mode {
            ApplyMode::Runtime => {
                for l in &located {
                    let mut table = vec![Factor::default(); count.max(1)];
                    let mut present = Vec::with_capacity(l.factors.len());
                    for f in &l.factors {
                        table[f.0] = factor(f);
                        present.push(f.0);
                    }
                    present.sort_unstable();
                    present.dedup();
                    if present.len() != l.factors.len() {
                        return Err(Error::Internal(format!(
                            "attention {} {:?}: an adapter appears twice",
                            l.id, l.slot
                        )));
                    }
                    let mask = mask_of(&mut masks, &present);
                    attn[l.id].lora[l.slot as usize] = Some(ProjLora {
                        table: dev.upload(&table)?,
                        present,
                        mask,
                    });
                }
                whole = (0..count)
                    .map(|i| dev.upload(&[i as i32]))
                    .collect::<Result<_>>()?;
                keep_factors = packed_dev;
            }
            ApplyMode::Merge => {
                // The buffers the set touches, each with its projections' factors.
                let mut touched: BTreeMap<(usize, Buf), Vec<&Located>> = BTreeMap::new();
                for l in &located {
                    touched.entry((l.id, l.place.buf)).or_default().push(l);
                }
                let tsz = std::mem::size_of::<T>() as u64;
                let mut table: Vec<MergeLayer> = Vec::new();
                let mut factors: Vec<Factor> = Vec::new();
                let mut max_dout = 0;
                for (&(id, buf), ls) in &touched {
                    let a = attns[id];
                    let lin = a.buffer(buf).ok_or_else(|| {
                        Error::Internal(format!("attention {id} has no {buf:?} buffer"))
                    })?;
                    let w_base = lin.weight();
                    let copy: CudaSlice<T> = dev.alloc(w_base.len())?;
                    // Every projection of the buffer: with its factors, or copied.
                    for slot in Slot::ALL {
                        let p = a.place(slot);
                        if p.buf != buf {
                            continue;
                        }
                        let first = factors.len();
                        if let Some(l) = ls.iter().find(|l| l.slot == slot) {
                            factors.extend(l.factors.iter().map(factor));
                        }
                        let off = (p.row * p.din) as u64 * tsz;
                        table.push(MergeLayer {
                            w_base: dev.ptr(w_base) + off,
                            w: dev.ptr(&copy) + off,
                            dout: p.dout as i64,
                            din: p.din as i64,
                            first_factor: first as i32,
                            n_factors: (factors.len() - first) as i32,
                        });
                        max_dout = max_dout.max(p.dout);
                    }
                    attn[id].merged[buf as usize] = Some(copy);
                }
                if !table.is_empty() {
                    if factors.is_empty() {
                        factors.push(Factor::default());
                    }
                    let lt = dev.upload(&table)?;
                    let ft = dev.upload(&factors)?;
                    ops::lidb_merge::<T>(dev, &lt, table.len(), max_dout, &ft)?;
                    // The tables and the packed factors are freed in stream order, after the
                    // merge has read them.
                }
            }
        }
        Ok(CudaAdapters {
            mode,
            count,
            unet_uid: unet.uid(),
            attn,
            layers: located.len(),
            whole,
            masks,
            _factors: keep_factors,
        })
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
        self.layers
    }

    /// Device memory the set holds (merged weights, factors and tables), in bytes.
    pub fn device_bytes(&self) -> usize {
        let merged: usize = self
            .attn
            .iter()
            .flat_map(|a| a.merged.iter().flatten())
            .map(|b| b.len() * std::mem::size_of::<T>())
            .sum();
        let tables: usize = self
            .attn
            .iter()
            .flat_map(|a| a.lora.iter().flatten())
            .map(|l| l.table.len() * std::mem::size_of::<Factor>())
            .sum();
        let factors = self._factors.as_ref().map_or(0, |f| f.len() * 4);
        merged + tables + factors
    }
}

/// What one CUDA UNet evaluation applies: a set, and optionally an adapter index per sample
/// (runtime mode; -1 = none).
#[derive(Clone, Copy, Debug)]
pub struct CudaAdapterCtx<'a, T: BlasElem> {
    pub adapters: &'a CudaAdapters<T>,
    pub per_sample: Option<&'a [i32]>,
}

impl<T: BlasElem> CudaAdapterCtx<'_, T> {
    /// Checks the per-sample indices against a batch (the CPU's checks and errors).
    pub fn validate(&self, batch: usize) -> Result<()> {
        validate_per_sample(
            self.adapters.mode,
            self.adapters.count,
            self.per_sample,
            batch,
        )
    }
}

/// A set prepared for one evaluation: the per-sample index arrays uploaded.
pub(super) struct Active<'a, T: BlasElem> {
    set: &'a CudaAdapters<T>,
    /// Per-sample runtime mode: by mask, the samples' indices with the adapters outside the
    /// mask set to -1; None where no sample uses any adapter of the mask (no launch).
    per_mask: Option<Vec<Option<CudaSlice<i32>>>>,
}

impl<'a, T: BlasElem> Active<'a, T> {
    pub(super) fn new(
        dev: &CudaDevice,
        unet: &CudaUnet<T>,
        ad: CudaAdapterCtx<'a, T>,
        batch: usize,
    ) -> Result<Self> {
        ad.validate(batch)?;
        let set = ad.adapters;
        if set.unet_uid != unet.uid() {
            return Err(Error::invalid_arg(
                "adapters",
                "were built for another CUDA UNet (another model or upload)",
            ));
        }
        let per_mask = ad
            .per_sample
            .map(|idx| per_mask_indices(dev, &set.masks, idx))
            .transpose()?;
        Ok(Active { set, per_mask })
    }

    /// Merge mode: the session's copy of buffer `buf` of attention `id`, if the set touches it.
    pub(super) fn merged(&self, id: usize, buf: Buf) -> Option<&'a CudaSlice<T>> {
        self.set.attn.get(id)?.merged[buf as usize].as_ref()
    }

    /// Runtime mode: y [rows, ld_y] += LoRA(x [rows, din]) for projection `slot` of attention
    /// `id` (at `place`, whose din/dout it uses); `y` starts at the projection's first column.
    /// The rows are `batch` equal runs of samples.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add(
        &self,
        dev: &CudaDevice,
        id: usize,
        slot: Slot,
        place: Place,
        y: At<'_, T>,
        ld_y: usize,
        x: &CudaSlice<T>,
        rows: usize,
        batch: usize,
    ) -> Result<()> {
        let Some(l) = self
            .set
            .attn
            .get(id)
            .and_then(|a| a.lora[slot as usize].as_ref())
        else {
            return Ok(());
        };
        let n = self.set.count;
        let shape = |rows_per_sample: usize| BgmvShape {
            rows,
            rows_per_sample,
            din: place.din,
            dout: place.dout,
            ld_x: place.din,
            ld_y,
        };
        let x = At::from(x);
        match &self.per_mask {
            Some(per_mask) => match &per_mask[l.mask] {
                Some(idx) => {
                    ops::lora_bgmv(dev, y, x, idx, &l.table, n, shape(rows / batch.max(1)))
                }
                None => Ok(()),
            },
            // Every adapter on every sample: one launch per adapter, all rows reading index i.
            None => l.present.iter().try_for_each(|&i| {
                ops::lora_bgmv(dev, y, x, &self.set.whole[i], &l.table, n, shape(rows))
            }),
        }
    }
}

/// The tuned UNet as an adapter target: its projections' dims by adapter key (runtime-mode
/// resolution; its weights are on the device only).
impl<T: BlasElem> crate::adapter::apply::Adaptable for CudaUnet<T> {
    fn key_prefix(&self) -> &'static str {
        "unet."
    }

    fn projection_dims(&self, key: &str) -> Option<(usize, usize)> {
        let (id, slot) = self.adapter_slot(key)?;
        let place = self.attentions().get(id)?.place(slot);
        Some((place.dout, place.din))
    }

    fn host_weight(&self, _key: &str) -> Option<&[f32]> {
        None
    }
}

impl<T: BlasElem> CudaUnet<T> {
    /// The adaptable projections by adapter key (`unet.<path>`) and their dims.
    pub fn adaptable_layers(&self) -> BTreeMap<String, crate::adapter::LayerShape> {
        use crate::adapter::apply::Adaptable;
        self.adapter_keys()
            .filter_map(|k| {
                let (dout, din) = self.projection_dims(k)?;
                Some((k.to_string(), crate::adapter::LayerShape { din, dout }))
            })
            .collect()
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
}
