//! Applying adapters to the UNet, per session. Two modes:
//! - merge: `W = W_base + sum_i scale_i * up_i . down_i`, computed from the pristine base into
//!   the session's own copies of just the adapted projections (the shared model never changes,
//!   and an empty set restores the base exactly);
//! - runtime: `y = x W^T + sum_i scale_i * up_i(down_i(x))`, so a swap costs only the adapter,
//!   and each sample of a batch may carry its own adapter.

use std::collections::BTreeMap;

use super::Adapter;
use crate::backend::cpu as ops;
use crate::backend::{AdapterHook, Backend, Conv2d, Cpu};
use crate::error::{Error, Result};
use crate::io::F32Weight;
use crate::model::Adaptable;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    Merge,
    Runtime,
}

/// One layer's share of the active adapters.
#[derive(Debug, Default)]
pub struct LayerApply {
    /// Merge mode: the whole merged weight [dout, din].
    pub merged: Option<F32Weight>,
    /// Runtime mode: (index of the adapter in the set, down [r, din], up [dout, r] x scale, rank).
    pub runtime: Vec<(usize, Vec<f32>, Vec<f32>, usize)>,
    /// Per `runtime` entry, a DoRA adapter's magnitudes and its scale (merge mode only).
    pub magnitudes: Vec<Option<DoraApply>>,
}

/// One DoRA layer of a set: its magnitudes and the adapter's scale. For
/// [`super::DoraStyle::Lycoris`] the entry's `up` is unscaled (the scale interpolates the
/// rescale instead); for peft it is scaled like any LoRA's.
#[derive(Clone, Debug)]
pub struct DoraApply {
    pub dora: super::Dora,
    pub scale: f32,
}

/// A session's active adapter set, resolved per layer key (`unet.<path>`).
#[derive(Debug)]
pub struct Applied {
    pub mode: ApplyMode,
    pub count: usize,
    pub layers: BTreeMap<String, LayerApply>,
}

impl Applied {
    /// Resolves `adapters` (each with its scale) for one component. Layers of other components
    /// are skipped here: each component resolves its own.
    pub fn new<B: Backend>(
        adapters: &[(&Adapter, f32)],
        mode: ApplyMode,
        target: &dyn Adaptable<B>,
    ) -> Result<Applied> {
        Applied::replacing(None, adapters, mode, target)
    }

    /// As [`Applied::new`], reusing the merged-weight buffers of `previous` (the set this one
    /// replaces) so a swap writes into memory that is already mapped. `previous` is only
    /// touched once the new set has been validated, so on error it stays usable.
    pub fn replacing<B: Backend>(
        previous: Option<&mut Applied>,
        adapters: &[(&Adapter, f32)],
        mode: ApplyMode,
        target: &dyn Adaptable<B>,
    ) -> Result<Applied> {
        Applied::resolve(previous, adapters, mode, target, true)
    }

    /// The set's per-layer factors for merge mode (DoRA magnitudes included), validated
    /// against `target`'s dims but not merged: for a backend that merges each layer itself
    /// from its own copy of the base ([`merge_layer`]). No host weights are needed.
    pub fn resolve_factors<B: Backend>(
        adapters: &[(&Adapter, f32)],
        target: &dyn Adaptable<B>,
    ) -> Result<Applied> {
        Applied::resolve(None, adapters, ApplyMode::Merge, target, false)
    }

    fn resolve<'a, B: Backend>(
        previous: Option<&mut Applied>,
        adapters: &[(&Adapter, f32)],
        mode: ApplyMode,
        target: &'a dyn Adaptable<B>,
        merge_on_host: bool,
    ) -> Result<Applied> {
        // key -> (adapter index, down, up x scale, rank), in adapter order
        let mut per_layer: BTreeMap<String, LayerApply> = BTreeMap::new();
        let mut dims: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (i, (a, scale)) in adapters.iter().enumerate() {
            if !scale.is_finite() {
                return Err(Error::invalid_arg(
                    "scales",
                    format!("scale #{i} is {scale}"),
                ));
            }
            let prefix = target.key_prefix();
            let magnitudes = match &a.source {
                super::AdapterSource::Dora { magnitudes, .. } => Some(magnitudes),
                _ => None,
            };
            if mode == ApplyMode::Runtime && magnitudes.is_some() {
                return Err(Error::Unsupported(format!(
                    "adapter #{i} is a DoRA adapter: merge mode only"
                )));
            }
            for (k, l) in a.layers.iter().filter(|(k, _)| k.starts_with(prefix)) {
                let (_, dout, din) = target.projection(k).ok_or_else(|| {
                    Error::AdapterMismatch(format!(
                        "layer '{k}' of adapter #{i} is not in this model"
                    ))
                })?;
                // Adapters are validated against a model's layer table when loaded; this
                // catches one loaded for another model (merge_rows would index past them).
                if !l.fits(dout, din) {
                    return Err(Error::AdapterMismatch(format!(
                        "layer '{k}' of adapter #{i}: factors of rank {} with {} and {} values do not fit this model's [{dout}, {din}] weight",
                        l.rank,
                        l.down.len(),
                        l.up.len()
                    )));
                }
                dims.insert(k.clone(), (dout, din));
                let dora = magnitudes.and_then(|m| m.get(k)).map(|d| DoraApply {
                    dora: d.clone(),
                    scale: *scale,
                });
                let up: Vec<f32> = match &dora {
                    Some(d) if d.dora.style == super::DoraStyle::Lycoris => l.up.clone(),
                    _ => l.up.iter().map(|x| x * scale).collect(),
                };
                let la = per_layer.entry(k.clone()).or_default();
                la.runtime.push((i, l.down.clone(), up, l.rank));
                la.magnitudes.push(dora);
            }
        }
        if mode == ApplyMode::Merge && merge_on_host {
            // Every base first, so a target without host weights fails before `previous` is
            // touched.
            let mut bases: Vec<&'a [f32]> = Vec::with_capacity(per_layer.len());
            for k in per_layer.keys() {
                let w = target.projection(k).and_then(|(w, _, _)| B::host_f32(w));
                let w = w.ok_or_else(|| {
                    Error::Internal(format!(
                        "merge mode on the host needs the base weight of '{k}' on the host; \
                         a model on a device takes its sets resolved in runtime mode"
                    ))
                })?;
                bases.push(w);
            }
            let mut spare: Vec<Vec<f32>> = previous
                .map(|p| {
                    p.layers
                        .values_mut()
                        .filter_map(|l| match l.merged.take() {
                            Some(F32Weight::Owned(v)) => Some(v),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            // (bases is in per_layer's key order)
            for ((k, la), w) in per_layer.iter_mut().zip(bases) {
                let (dout, din) = dims[k];
                let mut m = match spare.iter().position(|b| b.len() == w.len()) {
                    Some(i) => spare.swap_remove(i),
                    None => vec![0.0; w.len()],
                };
                merge_rows(&mut m, w, &la.runtime, &la.magnitudes, dout, din);
                la.merged = Some(F32Weight::Owned(m));
                la.runtime.clear();
                la.magnitudes.clear();
            }
        }
        Ok(Applied {
            mode,
            count: adapters.len(),
            layers: per_layer,
        })
    }
}

/// One adapter's factors of a layer: (index in the set, down `[r, din]`, up `[dout, r]` x
/// scale, r).
type Factors = (usize, Vec<f32>, Vec<f32>, usize);

/// From this rank on a factor pair is merged by a GEMM: the row loop below does `rank` passes
/// of FMAs over each row, fine for identities (rank 1 to 4, bandwidth-bound) but compute-bound
/// for a rank-32 style LoRA on every layer.
const GEMM_MIN_RANK: usize = 8;

/// One layer's merged weight `out` [dout, din] from its `base` and the set's factors for it
/// (`la` as [`Applied::resolve_factors`] gives it): the merge every backend uses.
pub fn merge_layer(out: &mut [f32], base: &[f32], la: &LayerApply, dout: usize, din: usize) {
    merge_rows(out, base, &la.runtime, &la.magnitudes, dout, din);
}

/// `out = w + sum up . down`: one pass over the rows of `w` [dout, din] for the low-rank
/// factors (each base row read once and each merged row written once; rows in parallel), then
/// a GEMM per factor pair of rank [`GEMM_MIN_RANK`] or more.
///
/// A factor pair with DoRA magnitudes instead adds `W' - w` ([`dora_weight`]).
fn merge_rows(
    out: &mut [f32],
    w: &[f32],
    factors: &[(usize, Vec<f32>, Vec<f32>, usize)],
    magnitudes: &[Option<DoraApply>],
    dout: usize,
    din: usize,
) {
    use rayon::prelude::*;
    let is_dora = |j: usize| magnitudes.get(j).is_some_and(Option::is_some);
    let plain: Vec<&Factors> = factors
        .iter()
        .enumerate()
        .filter(|(j, _)| !is_dora(*j))
        .map(|(_, f)| f)
        .collect();
    let rows_per_task = (1 << 16) / din.max(1) + 1;
    out.par_chunks_mut(rows_per_task * din)
        .zip(w.par_chunks(rows_per_task * din))
        .enumerate()
        .for_each(|(t, (o, b))| {
            for (j, (orow, brow)) in o.chunks_mut(din).zip(b.chunks(din)).enumerate() {
                let row = t * rows_per_task + j;
                orow.copy_from_slice(brow);
                for (_, down, up, r) in plain.iter().copied().filter(|f| f.3 < GEMM_MIN_RANK) {
                    for q in 0..*r {
                        let c = up[row * r + q];
                        // (x + 0 * y is x for finite y, up to a zero's sign; merge-only
                        // layouts hold identity factors, mostly zeros)
                        if c == 0.0 {
                            continue;
                        }
                        let d = &down[q * din..(q + 1) * din];
                        orow.iter_mut().zip(d).for_each(|(x, y)| *x += c * y);
                    }
                }
            }
        });
    for (_, down, up, r) in plain.into_iter().filter(|f| f.3 >= GEMM_MIN_RANK) {
        ops::matmul(out, up, down, dout, *r, din, false, true);
    }
    for ((_, down, up, r), d) in factors
        .iter()
        .zip(magnitudes)
        .filter_map(|(f, m)| Some((f, m.as_ref()?)))
    {
        let merged = dora_weight(w, down, up, *r, d, dout, din);
        out.iter_mut()
            .zip(merged.iter().zip(w))
            .for_each(|(o, (m, b))| *o += m - b);
    }
}

/// A DoRA layer's weight `W'` from the base `w` and its factors (`up` scaled as
/// [`DoraApply`] says), in f32 with the norms in f64:
/// - peft: `m / |w + up . down| * (w + up . down)`;
/// - LyCORIS: `(w + up . down) * (s (m / (|w + up . down| + eps) - 1) + 1)`, eps = f32's
///   machine epsilon, as `lycoris.functional.general.weight_decompose`.
///
/// The norm runs over each output row, or with `on_out` false over each input channel's
/// columns (`din / in_channels` of them: a convolution's kernel window) across all rows.
fn dora_weight(
    w: &[f32],
    down: &[f32],
    up: &[f32],
    r: usize,
    d: &DoraApply,
    dout: usize,
    din: usize,
) -> Vec<f32> {
    let mut full = w.to_vec();
    ops::matmul(&mut full, up, down, dout, r, din, false, true);
    let m = &d.dora.magnitude;
    let lycoris = d.dora.style == super::DoraStyle::Lycoris;
    let eps = if lycoris {
        f64::from(f32::EPSILON)
    } else {
        0.0
    };
    // the rescale of one group from its squared norm and magnitude
    let factor = |sq: f64, mag: f32| -> f32 {
        let g = f64::from(mag) / (sq.sqrt() + eps).max(f64::MIN_POSITIVE);
        if lycoris {
            (f64::from(d.scale) * (g - 1.0) + 1.0) as f32
        } else {
            g as f32
        }
    };
    if d.dora.on_out {
        for (row, mag) in full.chunks_mut(din).zip(m) {
            let sq: f64 = row.iter().map(|&x| f64::from(x).powi(2)).sum();
            let g = factor(sq, *mag);
            row.iter_mut().for_each(|x| *x *= g);
        }
    } else {
        let per = din / m.len().max(1);
        let mut sq = vec![0f64; m.len()];
        for row in full.chunks(din) {
            for (c, x) in row.iter().enumerate() {
                sq[c / per] += f64::from(*x).powi(2);
            }
        }
        let g: Vec<f32> = sq.iter().zip(m).map(|(s, mag)| factor(*s, *mag)).collect();
        for row in full.chunks_mut(din) {
            row.iter_mut()
                .enumerate()
                .for_each(|(c, x)| *x *= g[c / per]);
        }
    }
    full
}

/// What a UNet evaluation applies: the set, and optionally an adapter index per sample
/// (runtime mode; -1 = none).
#[derive(Clone, Copy, Debug)]
pub struct AdapterCtx<'a> {
    pub applied: &'a Applied,
    pub per_sample: Option<&'a [i32]>,
}

/// Checks per-sample adapter indices (`per_sample`, one per sample of a `batch`) against a set
/// of `count` adapters applied in `mode`; shared by the CPU and CUDA UNets, so both give the
/// same errors.
pub fn validate_per_sample(
    mode: ApplyMode,
    count: usize,
    per_sample: Option<&[i32]>,
    batch: usize,
) -> Result<()> {
    if let Some(idx) = per_sample {
        if mode != ApplyMode::Runtime {
            return Err(Error::invalid_arg(
                "adapter_index",
                "per-sample adapters need the runtime apply mode (merge applies one set to every sample)",
            ));
        }
        if idx.len() != batch {
            return Err(Error::invalid_arg(
                "adapter_index",
                format!("has {} entries for a batch of {batch}", idx.len()),
            ));
        }
        if let Some((j, &i)) = idx
            .iter()
            .enumerate()
            .find(|(_, &i)| i < -1 || i64::from(i) >= count as i64)
        {
            return Err(Error::invalid_arg(
                "adapter_index",
                format!("sample {j} has index {i}; valid: -1 (none) or 0..{count}"),
            ));
        }
    }
    Ok(())
}

impl AdapterHook<Cpu> for AdapterCtx<'_> {
    fn validate(&self, batch: usize) -> Result<()> {
        AdapterCtx::validate(self, batch)
    }

    fn weight(&self, key: &str) -> Option<&F32Weight> {
        self.applied.layers.get(key).and_then(|l| l.merged.as_ref())
    }

    fn add(
        &self,
        _: &Cpu,
        key: &str,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        if y.len() != x.len() / din.max(1) * dout {
            return Err(Error::Internal(format!(
                "adapter '{key}': {} inputs and {} outputs do not match [{din}] -> [{dout}]",
                x.len(),
                y.len()
            )));
        }
        self.add_runtime(key, y, x, batch, din, dout);
        Ok(())
    }

    fn add_conv(
        &self,
        _: &Cpu,
        key: &str,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        p: &Conv2d,
    ) -> Result<()> {
        let Some(l) = self.applied.layers.get(key) else {
            return Ok(());
        };
        let (ho, wo) = p.out_hw();
        let (n_in, n_out) = (p.c_in * p.h * p.w, p.c_out * ho * wo);
        if x.len() != p.batch * n_in || y.len() != p.batch * n_out {
            return Err(Error::Internal(format!(
                "adapter '{key}': {} inputs and {} outputs do not match {p:?}",
                x.len(),
                y.len()
            )));
        }
        for (i, down, up, r) in &l.runtime {
            let r = *r;
            // One run over `n` samples: t = conv(x, down) [n, r, ho, wo]; y += conv1x1(t, up).
            let apply = |y: &mut [f32], x: &[f32], n: usize| {
                let (pd, pu) = p.locon(n, r);
                let mut t = vec![0f32; n * r * ho * wo];
                ops::conv::conv2d(&mut t, x, down, None, &pd);
                let mut u = vec![0f32; n * n_out];
                ops::conv::conv2d(&mut u, &t, up, None, &pu);
                y.iter_mut().zip(&u).for_each(|(a, b)| *a += b);
            };
            match self.per_sample {
                None => apply(y, x, p.batch),
                Some(idx) => {
                    for (s, _) in idx.iter().enumerate().filter(|(_, &a)| a == *i as i32) {
                        apply(
                            &mut y[s * n_out..(s + 1) * n_out],
                            &x[s * n_in..(s + 1) * n_in],
                            1,
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

impl AdapterCtx<'_> {
    /// Checks the per-sample indices against a batch.
    pub fn validate(&self, batch: usize) -> Result<()> {
        validate_per_sample(
            self.applied.mode,
            self.applied.count,
            self.per_sample,
            batch,
        )
    }

    /// Runtime mode: y [rows, dout] += sum scale * (x [rows, din] . down^T) . up^T, where rows
    /// are `batch` equal runs of samples.
    fn add_runtime(
        &self,
        key: &str,
        y: &mut [f32],
        x: &[f32],
        batch: usize,
        din: usize,
        dout: usize,
    ) {
        let Some(l) = self.applied.layers.get(key) else {
            return;
        };
        let rows = x.len() / din;
        let per = rows / batch.max(1);
        for (i, down, up, r) in &l.runtime {
            let r = *r;
            let apply = |y: &mut [f32], x: &[f32], n: usize| {
                let mut t = vec![0f32; n * r];
                ops::matmul(&mut t, x, down, n, din, r, true, false);
                ops::matmul(y, &t, up, n, r, dout, true, true);
            };
            match self.per_sample {
                None => apply(y, x, rows),
                Some(idx) => {
                    for (s, _) in idx.iter().enumerate().filter(|(_, &a)| a == *i as i32) {
                        apply(
                            &mut y[s * per * dout..(s + 1) * per * dout],
                            &x[s * per * din..(s + 1) * per * din],
                            per,
                        );
                    }
                }
            }
        }
    }
}
