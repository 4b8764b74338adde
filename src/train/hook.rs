//! The adapters being trained, as the model's projections see them on the CPU: runtime LoRA
//! with the effective factors (the base weights are never written), recording the gradients
//! of those factors in the backward pass.
//!
//! For a projection `y = x W^T + (x D^T) U^T` (D `[r, in]`, U `[out, r]`, scale folded into U),
//! with `t = x D^T` and `dt = dy U`: `dU += dy^T t`, `dD += dt^T x`, `dx += dt D`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::params::{Effective, Trainable};
use crate::backend::cpu::{matmul, matmul_at};
use crate::backend::{AdapterHook, Cpu};
use crate::error::{Error, Result};
use crate::io::F32Weight;

struct Layer {
    factors: Effective,
    /// (d_down `[r, in]`, d_up `[out, r]`), accumulated.
    grads: Mutex<(Vec<f32>, Vec<f32>)>,
}

/// A trainable adapter's effective factors for one step, and their gradients.
pub struct TrainHook {
    layers: BTreeMap<String, Layer>,
}

impl TrainHook {
    /// The hook for `t`'s current values, gradients zero.
    pub fn new(t: &Trainable) -> TrainHook {
        let layers = t
            .layers
            .iter()
            .map(|l| {
                let factors = l.effective();
                let grads =
                    Mutex::new((vec![0.0; factors.down.len()], vec![0.0; factors.up.len()]));
                (l.key.clone(), Layer { factors, grads })
            })
            .collect();
        TrainHook { layers }
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

    fn layer(
        &self,
        key: &str,
        din: usize,
        dout: usize,
        rows_x: usize,
        rows_y: usize,
    ) -> Result<Option<&Layer>> {
        let Some(l) = self.layers.get(key) else {
            return Ok(None);
        };
        let r = l.factors.rank;
        if l.factors.down.len() != r * din || l.factors.up.len() != dout * r || rows_x != rows_y {
            return Err(Error::Internal(format!(
                "trained adapter '{key}': rank {r} factors do not fit [{dout}, {din}] or the rows differ"
            )));
        }
        Ok(Some(l))
    }
}

impl AdapterHook<Cpu> for TrainHook {
    fn validate(&self, _batch: usize) -> Result<()> {
        Ok(())
    }

    fn weight(&self, _key: &str) -> Option<&F32Weight> {
        None
    }

    fn add(
        &self,
        _: &Cpu,
        key: &str,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        _batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let rows = x.len() / din.max(1);
        let Some(l) = self.layer(key, din, dout, rows, y.len() / dout.max(1))? else {
            return Ok(());
        };
        let r = l.factors.rank;
        let mut t = vec![0f32; rows * r];
        matmul(&mut t, x, &l.factors.down, rows, din, r, true, false);
        matmul(y, &t, &l.factors.up, rows, r, dout, true, true);
        Ok(())
    }

    fn backward(
        &self,
        _: &Cpu,
        key: &str,
        dx: &mut Vec<f32>,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        _batch: usize,
        din: usize,
        dout: usize,
    ) -> Result<()> {
        let rows = x.len() / din.max(1);
        let Some(l) = self.layer(key, din, dout, rows, dy.len() / dout.max(1))? else {
            return Ok(());
        };
        if dx.len() != x.len() {
            return Err(Error::Internal(format!(
                "trained adapter '{key}': dx and x differ"
            )));
        }
        let r = l.factors.rank;
        let mut t = vec![0f32; rows * r];
        matmul(&mut t, x, &l.factors.down, rows, din, r, true, false);
        let mut dt = vec![0f32; rows * r];
        matmul(&mut dt, dy, &l.factors.up, rows, dout, r, false, false);
        {
            let mut g = l
                .grads
                .lock()
                .map_err(|_| Error::Internal(format!("the gradients of '{key}' are poisoned")))?;
            let (gd, gu) = &mut *g;
            matmul_at(gu, dy, &t, dout, rows, r, true);
            matmul_at(gd, &dt, x, r, rows, din, true);
        }
        matmul(dx, &dt, &l.factors.down, rows, r, din, false, true);
        Ok(())
    }
}
