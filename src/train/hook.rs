//! The adapters being trained, as the model's projections see them on any backend: runtime
//! LoRA with the effective factors (the base weights are never written), recording the
//! gradients of those factors in the backward pass.
//!
//! For a projection `y = x W^T + (x D^T) U^T` (D `[r, in]`, U `[out, r]`, scale folded into U),
//! with `t = x D^T` and `dt = dy U`: `dU += dy^T t`, `dD += dt^T x`, `dx += dt D`. The factors
//! are uploaded in the backend's storage type for the products with activations; their
//! gradients are summed in f32 ([`Backend::outer_f32`]) and kept on the host, where the
//! optimizer's f32 state lives.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::params::Trainable;
use crate::backend::{AdapterHook, Backend};
use crate::error::{Error, Result};
use crate::io::F32Weight;

struct Layer<B: Backend> {
    rank: usize,
    /// `[r, in]` and `[out, r]` on the backend.
    down: B::Weight,
    up: B::Weight,
    /// (d_down `[r, in]`, d_up `[out, r]`), f32, accumulated.
    grads: Mutex<(Vec<f32>, Vec<f32>)>,
}

/// A trainable adapter's effective factors for one step on backend `B`, and their gradients.
pub struct TrainHook<B: Backend> {
    layers: BTreeMap<String, Layer<B>>,
}

impl<B: Backend> TrainHook<B> {
    /// The hook for `t`'s current values on `be`, gradients zero.
    pub fn new(be: &B, t: &Trainable) -> Result<TrainHook<B>> {
        let mut layers = BTreeMap::new();
        for l in &t.layers {
            let e = l.effective();
            let grads = Mutex::new((vec![0.0; e.down.len()], vec![0.0; e.up.len()]));
            let layer = Layer {
                rank: e.rank,
                down: be.weight(F32Weight::Owned(e.down))?,
                up: be.weight(F32Weight::Owned(e.up))?,
                grads,
            };
            layers.insert(l.key.clone(), layer);
        }
        Ok(TrainHook { layers })
    }

    /// The accumulated gradients of layer `key`'s effective (down, up).
    pub fn gradients(&self, key: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let l = self
            .layers
            .get(key)
            .ok_or_else(|| Error::Internal(format!("no trained layer '{key}'")))?;
        let g = l
            .grads
            .lock()
            .map_err(|_| Error::Internal(format!("the gradients of '{key}' are poisoned")))?;
        Ok(g.clone())
    }

    /// Layer `key` (if trained) and the rows of an input of `x_len` values.
    fn layer(&self, key: &str, x_len: usize, din: usize) -> Result<Option<(&Layer<B>, usize)>> {
        let Some(l) = self.layers.get(key) else {
            return Ok(None);
        };
        if din == 0 || !x_len.is_multiple_of(din) {
            return Err(Error::Internal(format!(
                "trained adapter '{key}': {x_len} inputs are not rows of {din}"
            )));
        }
        Ok(Some((l, x_len / din)))
    }
}

impl<B: Backend> AdapterHook<B> for TrainHook<B> {
    fn validate(&self, _batch: usize) -> Result<()> {
        Ok(())
    }

    fn weight(&self, _key: &str) -> Option<&B::Weight> {
        None
    }

    fn add(
        &self,
        be: &B,
        key: &str,
        y: &mut B::Buf,
        x: &B::Buf,
        _batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let Some((l, rows)) = self.layer(key, be.len(x), din)? else {
            return Ok(());
        };
        let t = be.linear(x, &l.down, None, (rows, din, l.rank))?;
        let u = be.linear(&t, &l.up, None, (rows, l.rank, dout))?;
        be.add_inplace(y, &u)
    }

    fn backward(
        &self,
        be: &B,
        key: &str,
        dx: &mut B::Buf,
        x: &B::Buf,
        dy: &B::Buf,
        _batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let Some((l, rows)) = self.layer(key, be.len(x), din)? else {
            return Ok(());
        };
        let r = l.rank;
        let t = be.linear(x, &l.down, None, (rows, din, r))?;
        let dt = be.linear_backward(dy, &l.up, (rows, r, dout))?;
        let d_up = be.outer_f32(dy, &t, (rows, dout, r))?;
        let d_down = be.outer_f32(&dt, x, (rows, r, din))?;
        {
            let mut g = l
                .grads
                .lock()
                .map_err(|_| Error::Internal(format!("the gradients of '{key}' are poisoned")))?;
            let (gd, gu) = &mut *g;
            gd.iter_mut().zip(&d_down).for_each(|(a, b)| *a += b);
            gu.iter_mut().zip(&d_up).for_each(|(a, b)| *a += b);
        }
        let dxa = be.linear_backward(&dt, &l.down, (rows, din, r))?;
        be.add_inplace(dx, &dxa)
    }
}
