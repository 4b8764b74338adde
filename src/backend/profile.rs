//! Where the time goes, for `hdb bench ... --profile`: [`Profiled`], a backend that runs every
//! op on the backend it wraps and adds the op's wall-clock time to a category named by the op
//! and its arguments (conv 1x1 / 3x3 / 3x3 stride 2, attention self / cross / causal, ...).
//! A model loaded on `Profiled<B>` is profiled without a line of profiling in the model code.
//! Collecting is off until [`Profiled::enable`]; when off, an op costs one relaxed atomic load
//! more.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::api::{Activation, AttnDims, Backend, NormDims};
use crate::backend::Conv2d;
use crate::error::Result;
use crate::io::F32Weight;

type SyncFn = Arc<dyn Fn() + Send + Sync>;

/// What the clones of one [`Profiled`] share.
struct Totals {
    enabled: AtomicBool,
    by_category: Mutex<BTreeMap<&'static str, (Duration, u64)>>,
    /// Waits for the device (see [`Profiled::synced`]).
    sync: Option<SyncFn>,
}

/// Backend `B` with each op timed under a category. Clones share the totals: a model keeps a
/// clone of the backend it was loaded on.
pub struct Profiled<B: Backend> {
    inner: B,
    totals: Arc<Totals>,
}

impl<B: Backend> Profiled<B> {
    /// `inner`, timed by the host's clock: right for the CPU, whose ops return when done.
    pub fn new(inner: B) -> Self {
        Self::with_sync(inner, None)
    }

    /// `inner`, with `sync` called before and after each timed op. A GPU's work is queued, so
    /// the host's clock says nothing about it until the host has waited for the device: pass
    /// the device's synchronize. A profiled run then takes longer than a plain one (the launch
    /// gaps are no longer hidden); the shares are what count.
    pub fn synced(inner: B, sync: impl Fn() + Send + Sync + 'static) -> Self {
        Self::with_sync(inner, Some(Arc::new(sync)))
    }

    fn with_sync(inner: B, sync: Option<SyncFn>) -> Self {
        Profiled {
            inner,
            totals: Arc::new(Totals {
                enabled: AtomicBool::new(false),
                by_category: Mutex::new(BTreeMap::new()),
                sync,
            }),
        }
    }

    /// The backend it wraps.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Starts (or stops) collecting, clearing what was collected.
    pub fn enable(&self, on: bool) {
        if let Ok(mut t) = self.totals.by_category.lock() {
            t.clear();
        }
        self.totals.enabled.store(on, Ordering::Relaxed);
    }

    /// Time and call count per category, most expensive first.
    pub fn report(&self) -> Vec<(&'static str, Duration, u64)> {
        let mut v: Vec<_> = self
            .totals
            .by_category
            .lock()
            .map(|t| t.iter().map(|(k, (d, n))| (*k, *d, *n)).collect())
            .unwrap_or_default();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    /// Runs `f` (one op of the inner backend), timed under `category` when collecting.
    fn timed<R>(&self, category: &'static str, f: impl FnOnce(&B) -> R) -> R {
        if !self.totals.enabled.load(Ordering::Relaxed) {
            return f(&self.inner);
        }
        let wait = || {
            if let Some(s) = &self.totals.sync {
                s();
            }
        };
        wait();
        let start = Instant::now();
        let r = f(&self.inner);
        wait();
        let d = start.elapsed();
        if let Ok(mut t) = self.totals.by_category.lock() {
            let e = t.entry(category).or_default();
            e.0 += d;
            e.1 += 1;
        }
        r
    }
}

impl<B: Backend + Clone> Clone for Profiled<B> {
    fn clone(&self) -> Self {
        Profiled {
            inner: self.inner.clone(),
            totals: self.totals.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Profiled<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profiled")
            .field("inner", &self.inner)
            .finish()
    }
}

/// A convolution's category: 1x1, 3x3 (any k x k at stride 1) or 3x3 stride 2.
fn conv_category(p: &Conv2d) -> &'static str {
    match (p.kernel, p.stride) {
        (1, _) => "conv 1x1",
        (_, 1) => "conv 3x3",
        _ => "conv 3x3 stride 2",
    }
}

/// An attention's category: causal (the text encoder), self (as many keys as queries: every
/// self-attention of the models) or cross.
fn attention_category(d: &AttnDims) -> &'static str {
    if d.causal {
        "attention (causal)"
    } else if d.lq == d.lk {
        "attention (self)"
    } else {
        "attention (cross)"
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Weight = B::Weight;

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn weight(&self, w: F32Weight) -> Result<B::Weight> {
        self.timed("weights", |b| b.weight(w))
    }

    fn host_f32(w: &B::Weight) -> Option<&[f32]> {
        B::host_f32(w)
    }

    fn upload(&self, x: &[f32]) -> Result<B::Buf> {
        self.timed("transfers", |b| b.upload(x))
    }

    fn download(&self, x: &B::Buf) -> Result<Vec<f32>> {
        self.timed("transfers", |b| b.download(x))
    }

    fn len(&self, x: &B::Buf) -> usize {
        self.inner.len(x)
    }

    fn copy(&self, x: &B::Buf) -> Result<B::Buf> {
        self.timed("copies", |b| b.copy(x))
    }

    fn linear(
        &self,
        x: &B::Buf,
        w: &B::Weight,
        bias: Option<&B::Weight>,
        dims: (usize, usize, usize),
    ) -> Result<B::Buf> {
        self.timed("linear", |b| b.linear(x, w, bias, dims))
    }

    fn conv2d(
        &self,
        x: &B::Buf,
        w: &B::Weight,
        bias: Option<&B::Weight>,
        p: &Conv2d,
    ) -> Result<B::Buf> {
        self.timed(conv_category(p), |b| b.conv2d(x, w, bias, p))
    }

    fn group_norm(
        &self,
        x: &B::Buf,
        gamma: &B::Weight,
        beta: &B::Weight,
        d: NormDims,
        silu: bool,
    ) -> Result<B::Buf> {
        self.timed("group norm", |b| b.group_norm(x, gamma, beta, d, silu))
    }

    fn layer_norm(
        &self,
        x: &B::Buf,
        gamma: &B::Weight,
        beta: &B::Weight,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<B::Buf> {
        self.timed("layer norm", |b| {
            b.layer_norm(x, gamma, beta, rows_dim, eps)
        })
    }

    fn attention(&self, q: &B::Buf, k: &B::Buf, v: &B::Buf, d: AttnDims) -> Result<B::Buf> {
        self.timed(attention_category(&d), |b| b.attention(q, k, v, d))
    }

    fn activate(&self, x: &mut B::Buf, act: Activation) -> Result<()> {
        self.timed("activation", |b| b.activate(x, act))
    }

    fn geglu(&self, x: &B::Buf, rows_d: (usize, usize)) -> Result<B::Buf> {
        self.timed("geglu", |b| b.geglu(x, rows_d))
    }

    fn add_inplace(&self, y: &mut B::Buf, x: &B::Buf) -> Result<()> {
        self.timed("add", |b| b.add_inplace(y, x))
    }

    fn add_channel_bias(
        &self,
        y: &mut B::Buf,
        v: &B::Buf,
        dims: (usize, usize, usize),
    ) -> Result<()> {
        self.timed("add", |b| b.add_channel_bias(y, v, dims))
    }

    fn timestep_embedding(
        &self,
        t: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        shift: f32,
    ) -> Result<B::Buf> {
        self.timed("timestep embedding", |b| {
            b.timestep_embedding(t, dim, flip_sin_to_cos, shift)
        })
    }

    fn transpose(
        &self,
        x: &B::Buf,
        dims: (usize, usize, usize),
        to_tokens: bool,
    ) -> Result<B::Buf> {
        self.timed("copies", |b| b.transpose(x, dims, to_tokens))
    }

    fn concat_channels(
        &self,
        a: &B::Buf,
        bb: &B::Buf,
        dims: (usize, usize, usize, usize),
    ) -> Result<B::Buf> {
        self.timed("copies", |b| b.concat_channels(a, bb, dims))
    }

    fn upsample_nearest2x(&self, x: &B::Buf, dims: (usize, usize, usize)) -> Result<B::Buf> {
        self.timed("copies", |b| b.upsample_nearest2x(x, dims))
    }

    fn pad_bottom_right(&self, x: &B::Buf, dims: (usize, usize, usize)) -> Result<B::Buf> {
        self.timed("copies", |b| b.pad_bottom_right(x, dims))
    }

    fn linear_backward(
        &self,
        dy: &B::Buf,
        w: &B::Weight,
        dims: (usize, usize, usize),
    ) -> Result<B::Buf> {
        self.timed("linear backward", |b| b.linear_backward(dy, w, dims))
    }

    fn conv2d_backward(&self, dy: &B::Buf, w: &B::Weight, p: &Conv2d) -> Result<B::Buf> {
        let name = match conv_category(p) {
            "conv 1x1" => "conv 1x1 backward",
            "conv 3x3" => "conv 3x3 backward",
            _ => "conv 3x3 stride 2 backward",
        };
        self.timed(name, |b| b.conv2d_backward(dy, w, p))
    }

    fn group_norm_backward(
        &self,
        x: &B::Buf,
        gamma: &B::Weight,
        beta: &B::Weight,
        dy: &B::Buf,
        d: NormDims,
        silu: bool,
    ) -> Result<B::Buf> {
        self.timed("group norm backward", |b| {
            b.group_norm_backward(x, gamma, beta, dy, d, silu)
        })
    }

    fn layer_norm_backward(
        &self,
        x: &B::Buf,
        gamma: &B::Weight,
        dy: &B::Buf,
        rows_dim: (usize, usize),
        eps: f32,
    ) -> Result<B::Buf> {
        self.timed("layer norm backward", |b| {
            b.layer_norm_backward(x, gamma, dy, rows_dim, eps)
        })
    }

    fn attention_backward(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        dout: &B::Buf,
        d: AttnDims,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let name = match attention_category(&d) {
            "attention (causal)" => "attention (causal) backward",
            "attention (self)" => "attention (self) backward",
            _ => "attention (cross) backward",
        };
        self.timed(name, |b| b.attention_backward(q, k, v, dout, d))
    }

    fn activate_backward(&self, x: &B::Buf, dy: &B::Buf, act: Activation) -> Result<B::Buf> {
        self.timed("activation backward", |b| b.activate_backward(x, dy, act))
    }

    fn geglu_backward(&self, x: &B::Buf, dy: &B::Buf, rows_d: (usize, usize)) -> Result<B::Buf> {
        self.timed("geglu backward", |b| b.geglu_backward(x, dy, rows_d))
    }

    fn upsample_nearest2x_backward(
        &self,
        dy: &B::Buf,
        planes_h_w: (usize, usize, usize),
    ) -> Result<B::Buf> {
        self.timed("copies", |b| b.upsample_nearest2x_backward(dy, planes_h_w))
    }

    fn outer_f32(&self, a: &B::Buf, b: &B::Buf, dims: (usize, usize, usize)) -> Result<Vec<f32>> {
        self.timed("adapter gradients", |be| be.outer_f32(a, b, dims))
    }

    fn split_channels(
        &self,
        x: &B::Buf,
        dims: (usize, usize, usize, usize),
    ) -> Result<(B::Buf, B::Buf)> {
        self.timed("copies", |b| b.split_channels(x, dims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn ops_are_timed_under_their_category_once_enabled() {
        let be = Profiled::new(Cpu);
        let x = be.upload(&[1.0; 2 * 3 * 4 * 4]).unwrap();
        let w = be.weight(F32Weight::Owned(vec![0.5; 2 * 3 * 9])).unwrap();
        let p = |kernel, stride| Conv2d {
            batch: 2,
            c_in: 3,
            h: 4,
            w: 4,
            c_out: 2,
            kernel,
            stride,
            padding: 1,
        };
        be.conv2d(&x, &w, None, &p(3, 1)).unwrap();
        assert!(be.report().is_empty(), "collected while off");
        let clone = be.clone();
        be.enable(true);
        clone.conv2d(&x, &w, None, &p(3, 1)).unwrap();
        be.conv2d(&x, &w, None, &p(3, 2)).unwrap();
        let q = be.upload(&[0.1; 2 * 4]).unwrap();
        let kv = be.upload(&[0.2; 2 * 3 * 4]).unwrap();
        let d = AttnDims {
            batch: 2,
            lq: 1,
            lk: 3,
            heads: 1,
            head_dim: 4,
            causal: false,
        };
        be.attention(&q, &kv, &kv, d).unwrap();
        let mut names: Vec<_> = be.report().iter().map(|r| (r.0, r.2)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("attention (cross)", 1),
                ("conv 3x3", 1),
                ("conv 3x3 stride 2", 1),
                ("transfers", 2)
            ]
        );
        be.enable(false);
        assert!(be.report().is_empty(), "cleared");
    }
}
