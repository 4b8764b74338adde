//! [`CudaKeyAdapters`]: a session's identity adapters, resolved on the CPU
//! ([`crate::adapter::apply::Applied`]), as the [`AdapterHook`] of the [`Cuda`] backend: the
//! generic path any model code on the trait can use, keyed by adapter key
//! (`unet.<path>.to_q`, `text_encoder.<path>.q_proj`, ...).
//!
//! Everything is uploaded once, converted to `T`, by [`CudaKeyAdapters::new`]: in merge mode
//! each adapted projection's merged weight [dout, din]; in runtime mode each adapter's factors
//! down [r, din] and up [dout, r] (the adapter's scale already folded into up). An update is
//! two cuBLAS GEMMs per factor and run of rows: t = x down^T, then y += t up^T (beta = 1),
//! with `t` [rows, r] in `T` (the CPU keeps it in f32; for bf16 that adds a rounding of the
//! low-rank update, not of y). The fast path sessions use (`lidb_merge` and per-sample
//! `lora_bgmv`, one launch per projection) is [`super::CudaLayerAdapters`].

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::backend::Cuda;
use super::device::CudaDevice;
use super::ops::{self, At, BlasElem};
use crate::adapter::apply::{validate_per_sample, Applied, ApplyMode};
use crate::backend::api::AdapterHook;
use crate::error::{Error, Result};

/// One adapter's low-rank factors for one projection, on the device.
struct Factor<T> {
    /// Index of the adapter in the session's set (what per-sample indices name).
    adapter: usize,
    /// [rank, din]
    down: CudaSlice<T>,
    /// [dout, rank], scale folded in.
    up: CudaSlice<T>,
    rank: usize,
    din: usize,
    dout: usize,
}

/// One projection's share of the adapters, on the device.
struct Layer<T> {
    merged: Option<CudaSlice<T>>,
    runtime: Vec<Factor<T>>,
}

/// A session's adapters on a [`Cuda`] backend, by adapter key.
pub struct CudaKeyAdapters<T: BlasElem> {
    dev: Arc<CudaDevice>,
    mode: ApplyMode,
    count: usize,
    per_sample: Option<Vec<i32>>,
    layers: BTreeMap<String, Layer<T>>,
}

impl<T: BlasElem> std::fmt::Debug for CudaKeyAdapters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKeyAdapters")
            .field("dtype", &T::SUFFIX)
            .field("mode", &self.mode)
            .field("count", &self.count)
            .field("per_sample", &self.per_sample)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl<T: BlasElem> CudaKeyAdapters<T> {
    /// Uploads `applied`'s merged weights (merge mode) or low-rank factors (runtime mode) to
    /// `be`'s device, with an adapter index per sample (`-1`: none; runtime mode only) or
    /// `None` (every adapter on every sample). The indices are checked against the set here
    /// and against the batch by [`AdapterHook::validate`]. A factor whose sizes do not divide
    /// by its rank is an `Error::Internal` naming its key.
    pub fn new(be: &Cuda<T>, applied: &Applied, per_sample: Option<&[i32]>) -> Result<Self> {
        if let Some(idx) = per_sample {
            // Mode and index range now; the batch size is checked per call.
            validate_per_sample(applied.mode, applied.count, Some(idx), idx.len())?;
        }
        let dev = be.dev();
        let mut layers = BTreeMap::new();
        for (key, la) in &applied.layers {
            let merged = la
                .merged
                .as_ref()
                .map(|w| dev.upload_f32::<T>(w))
                .transpose()?;
            let mut runtime = Vec::with_capacity(la.runtime.len());
            for (adapter, down, up, rank) in &la.runtime {
                let rank = *rank;
                if rank == 0 {
                    continue; // contributes nothing (the CPU's GEMMs are empty too)
                }
                if down.is_empty() || down.len() % rank != 0 || up.len() % rank != 0 {
                    return Err(Error::Internal(format!(
                        "adapter #{adapter} '{key}': factors of {} and {} values do not split \
                         into rank {rank}",
                        down.len(),
                        up.len()
                    )));
                }
                runtime.push(Factor {
                    adapter: *adapter,
                    down: dev.upload_f32::<T>(down)?,
                    up: dev.upload_f32::<T>(up)?,
                    rank,
                    din: down.len() / rank,
                    dout: up.len() / rank,
                });
            }
            layers.insert(key.clone(), Layer { merged, runtime });
        }
        Ok(CudaKeyAdapters {
            dev: dev.clone(),
            mode: applied.mode,
            count: applied.count,
            per_sample: per_sample.map(<[i32]>::to_vec),
            layers,
        })
    }
}

/// Runs of consecutive samples `(first, count)` whose index is `adapter`.
fn runs(idx: &[i32], adapter: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (s, &a) in idx.iter().enumerate() {
        if i64::from(a) != adapter as i64 {
            continue;
        }
        match out.last_mut() {
            Some((first, n)) if *first + *n == s => *n += 1,
            _ => out.push((s, 1)),
        }
    }
    out
}

impl<T: BlasElem> AdapterHook<Cuda<T>> for CudaKeyAdapters<T> {
    fn validate(&self, batch: usize) -> Result<()> {
        validate_per_sample(self.mode, self.count, self.per_sample.as_deref(), batch)
    }

    fn weight(&self, key: &str) -> Option<&CudaSlice<T>> {
        self.layers.get(key).and_then(|l| l.merged.as_ref())
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
        let Some(layer) = self.layers.get(key) else {
            return Ok(());
        };
        if layer.runtime.is_empty() {
            return Ok(());
        }
        if !Arc::ptr_eq(be.dev(), &self.dev) {
            return Err(Error::Internal(format!(
                "adapter '{key}': the adapters were uploaded to another device"
            )));
        }
        let rows = x.len() / din.max(1);
        let want_y = rows.checked_mul(dout);
        if din == 0 || x.len() % din != 0 || want_y != Some(y.len()) {
            return Err(Error::Internal(format!(
                "adapter '{key}': {} inputs and {} outputs do not match [{din}] -> [{dout}]",
                x.len(),
                y.len()
            )));
        }
        // Rows are `batch` equal runs of samples.
        let per = match &self.per_sample {
            None => rows,
            Some(idx) => {
                if batch == 0 || rows % batch != 0 || idx.len() != batch {
                    return Err(Error::Internal(format!(
                        "adapter '{key}': {rows} rows do not split into {batch} samples \
                         ({} per-sample indices)",
                        idx.len()
                    )));
                }
                rows / batch
            }
        };
        let dev = &self.dev;
        dev.bind_to_thread()?;
        for f in &layer.runtime {
            if (f.din, f.dout) != (din, dout) {
                return Err(Error::Internal(format!(
                    "adapter #{} '{key}': factors [{}] -> [{}] on a [{din}] -> [{dout}] \
                     projection",
                    f.adapter, f.din, f.dout
                )));
            }
            // (first row, rows) of the rows this adapter applies to.
            let spans: Vec<(usize, usize)> = match &self.per_sample {
                None => vec![(0, rows)],
                Some(idx) => runs(idx, f.adapter)
                    .into_iter()
                    .map(|(s, n)| (s * per, n * per))
                    .collect(),
            };
            let Some(most) = spans.iter().map(|&(_, n)| n).max() else {
                continue;
            };
            // t [n, r], reused by every run of this factor.
            let t = dev.alloc::<T>(most * f.rank)?;
            for (r0, n) in spans {
                ops::linear(
                    dev,
                    At::from(&t),
                    f.rank,
                    At::new(x, r0 * din),
                    &f.down,
                    None,
                    (n, din, f.rank),
                )?;
                ops::linear_acc(
                    dev,
                    At::new(y, r0 * dout),
                    dout,
                    At::from(&t),
                    &f.up,
                    (n, f.rank, dout),
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_of_matching_samples() {
        assert_eq!(runs(&[0, 0, -1, 0, 1, 0, 0], 0), [(0, 2), (3, 1), (5, 2)]);
        assert_eq!(runs(&[0, 0, -1, 0, 1, 0, 0], 1), [(4, 1)]);
        assert!(runs(&[-1, -1], 0).is_empty());
    }
}
